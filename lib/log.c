/* SPDX-License-Identifier: Apache-2.0 */
#include <stdarg.h>
#include <sys/stat.h>

#include "log.h"

static const char *log_program = "tether";
static int log_max_level = LOG_INFO;
static bool log_journal;
static int (*log_journal_send)(const struct iovec *iov, int n);

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

void log_set_journal_sender(int (*send)(const struct iovec *iov, int n)) { log_journal_send = send; }

static void log_write(int level, const char *buf) {
        if (log_journal)
                fprintf(stderr, "<%d>%s\n", level, buf);
        else
                fprintf(stderr, "%s: %s\n", log_program, buf);
}

static int log_send_journal(int level, const LogFields *fields, const char *message);

/* Format and write one message; fields (may be NULL) go to the journal's
 * native socket when stderr is the journal. errno is preserved, and set to
 * error while fmt is formatted (for %m). */
__attribute__((format(printf, 4, 0)))
static int log_emit(int level, int error, const LogFields *fields, const char *fmt, va_list ap) {
        int saved = errno;
        char buf[2048];

        if (error < 0)
                error = -error;
        if (level <= log_max_level) {
                errno = error;
                vsnprintf(buf, sizeof(buf), fmt, ap);
                /* The stream and the native socket are two ways into the
                 * same journal; whatever the socket refuses still gets
                 * there as text. */
                if (!fields || !log_journal || !log_journal_send || log_send_journal(level, fields, buf) < 0)
                        log_write(level, buf);
        }
        errno = saved;
        return error ? -error : 0;
}

int log_internal(int level, int error, const char *fmt, ...) {
        va_list ap;
        int r;

        va_start(ap, fmt);
        r = log_emit(level, error, NULL, fmt, ap);
        va_end(ap);
        return r;
}

static char *field_new(const char *key, const char *value, bool clean) {
        size_t k = strlen(key), n = strlen(value);
        char *s;

        if (clean && n > LOG_FIELD_VALUE_MAX)
                n = LOG_FIELD_VALUE_MAX;
        s = malloc(k + 1 + n + 1);
        if (!s)
                return NULL;
        memcpy(s, key, k);
        s[k] = '=';
        memcpy(s + k + 1, value, n);
        s[k + 1 + n] = 0;
        if (clean)
                for (char *c = s + k + 1; *c; c++)
                        if (*c < 0x20 || *c > 0x7e)
                                *c = '?';
        return s;
}

void log_fields_free(char **fields, int n) {
        for (int i = 0; i < n; i++)
                free(fields[i]);
}

int log_fields_format(int level, const char *program, const LogFields *f, const char *message,
                      char *ret_fields[LOG_FIELDS_MAX]) {
        const struct {
                const char *key, *value;
                bool clean;
        } all[LOG_FIELDS_MAX] = {
                { "MESSAGE", message, false },
                { "PRIORITY", (const char[]){ '0' + (level & 7), 0 }, false },
                { "SYSLOG_IDENTIFIER", program, true },
                { "MESSAGE_ID", f ? f->message_id : NULL, true },
                { "TETHER_DEVICE_ID", f ? f->device_id : NULL, true },
                { "TETHER_JOB_ID", f ? f->job_id : NULL, true },
                { "TETHER_PEER", f ? f->peer : NULL, true },
        };
        char *out[LOG_FIELDS_MAX];
        int n = 0;

        for (size_t i = 0; i < LOG_FIELDS_MAX; i++) {
                if (!all[i].value)
                        continue;
                out[n] = field_new(all[i].key, all[i].value, all[i].clean);
                if (!out[n]) {
                        log_fields_free(out, n);
                        return -ENOMEM;
                }
                n++;
        }
        memcpy(ret_fields, out, n * sizeof(char *));
        return n;
}

static int log_send_journal(int level, const LogFields *f, const char *message) {
        char *fields[LOG_FIELDS_MAX];
        struct iovec iov[LOG_FIELDS_MAX];
        int n, r;

        n = log_fields_format(level, log_program, f, message, fields);
        if (n < 0)
                return n;
        for (int i = 0; i < n; i++)
                iov[i] = (struct iovec){ .iov_base = fields[i], .iov_len = strlen(fields[i]) };
        r = log_journal_send(iov, n);
        log_fields_free(fields, n);
        return r;
}

int log_struct_internal(int level, int error, const LogFields *fields, const char *fmt, ...) {
        va_list ap;
        int r;

        va_start(ap, fmt);
        r = log_emit(level, error, fields, fmt, ap);
        va_end(ap);
        return r;
}
