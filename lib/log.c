#include <stdarg.h>
#include <sys/stat.h>

#include "log.h"

static const char *log_program = "tether";
static int log_max_level = LOG_INFO;
static bool log_journal;

/* Same test as systemd's: JOURNAL_STREAM names the device and inode of
 * the stream journald gave us; only then is a priority prefix understood. */
static bool stderr_is_journal(void) {
        const char *e = getenv("JOURNAL_STREAM");
        unsigned long long dev, ino;
        struct stat st;

        if (!e || sscanf(e, "%llu:%llu", &dev, &ino) != 2)
                return false;
        if (fstat(STDERR_FILENO, &st) < 0)
                return false;
        return (unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino;
}

void log_open(const char *program) {
        const char *lvl = getenv("TETHER_LOG_LEVEL");

        log_program = program;
        log_journal = stderr_is_journal();
        if (lvl) {
                if (streq(lvl, "debug"))
                        log_max_level = LOG_DEBUG;
                else if (streq(lvl, "info"))
                        log_max_level = LOG_INFO;
                else if (streq(lvl, "notice"))
                        log_max_level = LOG_NOTICE;
                else if (streq(lvl, "warning"))
                        log_max_level = LOG_WARNING;
                else if (streq(lvl, "err") || streq(lvl, "error"))
                        log_max_level = LOG_ERR;
        }
}

void log_set_max_level(int level) { log_max_level = level; }
int log_get_max_level(void) { return log_max_level; }
const char *log_get_program(void) { return log_program; }

int log_internal(int level, int error, const char *fmt, ...) {
        int saved = errno;
        char buf[2048];
        va_list ap;

        if (error < 0)
                error = -error;
        if (level > log_max_level)
                goto out;

        errno = error;
        va_start(ap, fmt);
        vsnprintf(buf, sizeof(buf), fmt, ap);
        va_end(ap);

        if (log_journal)
                fprintf(stderr, "<%d>%s\n", level, buf);
        else
                fprintf(stderr, "%s: %s\n", log_program, buf);
out:
        errno = saved;
        return error ? -error : 0;
}
