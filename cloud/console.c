/* SPDX-License-Identifier: Apache-2.0 */
/* The web console's static files (console.h). */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "console.h"
#include "log.h"
#include "util.h"

#define CONSOLE_PREFIX "/console"

struct Console {
        int dirfd; /* O_PATH | O_DIRECTORY */
        char *dir; /* for log lines */
};

int console_new(const char *dir, Console **ret) {
        Console *c;
        int fd;

        if (!dir || !*dir) {
                *ret = NULL;
                return 0;
        }
        fd = open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0)
                return -errno;
        c = calloc(1, sizeof(*c));
        if (!c || !(c->dir = strdup(dir))) {
                free(c);
                close(fd);
                return -ENOMEM;
        }
        c->dirfd = fd;
        *ret = c;
        return 0;
}

Console *console_free(Console *c) {
        if (!c)
                return NULL;
        if (c->dirfd >= 0)
                close(c->dirfd);
        free(c->dir);
        free(c);
        return NULL;
}

bool console_owns(const char *url) {
        return streq(url, CONSOLE_PREFIX) || startswith(url, CONSOLE_PREFIX "/");
}

const char *console_content_type(const char *name) {
        static const struct {
                const char *ext, *type;
        } types[] = {
                { ".html", "text/html; charset=utf-8" },
                { ".js", "text/javascript; charset=utf-8" },
                { ".mjs", "text/javascript; charset=utf-8" },
                { ".css", "text/css; charset=utf-8" },
                { ".svg", "image/svg+xml" },
                { ".png", "image/png" },
                { ".ico", "image/x-icon" },
                { ".json", "application/json" },
                { ".md", "text/plain; charset=utf-8" },
        };

        for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++)
                if (endswith(name, types[i].ext) && strlen(name) > strlen(types[i].ext))
                        return types[i].type;
        return NULL;
}

bool console_name_ok(const char *name) {
        size_t n = strlen(name);

        if (n == 0 || n > CONSOLE_NAME_MAX || name[0] == '.')
                return false;
        for (size_t i = 0; i < n; i++) {
                char ch = name[i];

                if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '.' ||
                      ch == '_' || ch == '-'))
                        return false;
        }
        return true;
}

static void console_headers(struct MHD_Response *resp) {
        (void)MHD_add_response_header(resp, "Content-Security-Policy", CONSOLE_CSP);
        (void)MHD_add_response_header(resp, "X-Content-Type-Options", "nosniff");
        (void)MHD_add_response_header(resp, "Referrer-Policy", "no-referrer");
        (void)MHD_add_response_header(resp, "X-Frame-Options", "DENY");
        (void)MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
}

/* A short plain-text answer with the console's headers. */
static int console_text(unsigned status, const char *text, struct MHD_Response **ret, unsigned *ret_status) {
        struct MHD_Response *resp;

        resp = MHD_create_response_from_buffer(strlen(text), (void *)text, MHD_RESPMEM_PERSISTENT);
        if (!resp)
                return -ENOMEM;
        (void)MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/plain; charset=utf-8");
        console_headers(resp);
        *ret = resp;
        *ret_status = status;
        return 0;
}

/* Whether the If-None-Match list holds etag (or is "*"). */
static bool console_etag_matches(const char *list, const char *etag) {
        size_t n = strlen(etag);

        for (const char *p = list; *p;) {
                size_t len;

                while (*p == ' ' || *p == '\t' || *p == ',')
                        p++;
                len = strcspn(p, ",");
                while (len > 0 && (p[len - 1] == ' ' || p[len - 1] == '\t'))
                        len--;
                if ((len == 1 && *p == '*') || (len == n && memcmp(p, etag, n) == 0))
                        return true;
                p += strcspn(p, ",");
        }
        return false;
}

/* The whole regular file name in the directory, at most CONSOLE_FILE_MAX
 * bytes: 0 and *ret (malloc'd), *ret_len, *ret_st; -ENOENT for whatever
 * is not such a file (missing, a symlink, a directory, a device). */
static int console_read(Console *c, const char *name, char **ret, size_t *ret_len, struct stat *ret_st) {
        _cleanup_close_ int fd = openat(c->dirfd, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
        _cleanup_free_ char *buf = NULL;
        struct stat st;
        size_t len = 0;

        if (fd < 0)
                return errno == ELOOP || errno == ENOTDIR || errno == EISDIR || errno == EACCES ? -ENOENT : -errno;
        if (fstat(fd, &st) < 0)
                return -errno;
        if (!S_ISREG(st.st_mode))
                return -ENOENT;
        if (st.st_size > CONSOLE_FILE_MAX)
                return -EFBIG;
        buf = malloc((size_t)st.st_size + 1);
        if (!buf)
                return -ENOMEM;
        /* A file that grows while read is cut where fstat() saw its end:
         * the ETag says that size. */
        while (len < (size_t)st.st_size) {
                ssize_t k = read(fd, buf + len, (size_t)st.st_size - len);

                if (k < 0 && errno == EINTR)
                        continue;
                if (k < 0)
                        return -errno;
                if (k == 0)
                        break;
                len += (size_t)k;
        }
        *ret_st = st;
        *ret_len = len;
        *ret = TAKE_PTR(buf);
        return 0;
}

int console_respond(Console *c, const char *url, const char *method, const char *if_none_match,
                    struct MHD_Response **ret, unsigned *ret_status) {
        _cleanup_free_ char *buf = NULL;
        const char *name, *type;
        struct MHD_Response *resp;
        struct stat st = {};
        char etag[96];
        unsigned status;
        size_t len = 0;
        int r;

        if (!c)
                return console_text(MHD_HTTP_NOT_FOUND, "The console is off on this cloud ([API] Console=).\n", ret,
                                    ret_status);
        if (!streq(method, MHD_HTTP_METHOD_GET) && !streq(method, MHD_HTTP_METHOD_HEAD)) {
                r = console_text(MHD_HTTP_METHOD_NOT_ALLOWED, "Method not allowed\n", ret, ret_status);
                if (r == 0)
                        (void)MHD_add_response_header(*ret, MHD_HTTP_HEADER_ALLOW, "GET, HEAD");
                return r;
        }
        if (streq(url, CONSOLE_PREFIX)) {
                r = console_text(MHD_HTTP_MOVED_PERMANENTLY, "Moved to /console/\n", ret, ret_status);
                if (r == 0)
                        (void)MHD_add_response_header(*ret, MHD_HTTP_HEADER_LOCATION, CONSOLE_PREFIX "/");
                return r;
        }
        name = url + strlen(CONSOLE_PREFIX "/");
        if (!*name)
                name = "index.html";
        type = console_content_type(name);
        if (!console_name_ok(name) || !type)
                return console_text(MHD_HTTP_NOT_FOUND, "Not found\n", ret, ret_status);
        r = console_read(c, name, &buf, &len, &st);
        if (r == -ENOENT)
                return console_text(MHD_HTTP_NOT_FOUND, "Not found\n", ret, ret_status);
        if (r == -ENOMEM)
                return r;
        if (r < 0) {
                log_warning_errno(r, "Cannot serve console file '%s' from '%s': %m", name, c->dir);
                return console_text(r == -EFBIG ? MHD_HTTP_NOT_FOUND : MHD_HTTP_INTERNAL_SERVER_ERROR,
                                    r == -EFBIG ? "Not found\n" : "Cannot read the file\n", ret, ret_status);
        }
        snprintf(etag, sizeof(etag), "\"%" PRIx64 "-%" PRIx64 "-%" PRIx64 ".%09ld\"", (uint64_t)st.st_ino,
                 (uint64_t)len, (uint64_t)st.st_mtim.tv_sec, (long)st.st_mtim.tv_nsec);
        if (if_none_match && console_etag_matches(if_none_match, etag)) {
                resp = MHD_create_response_from_buffer(0, NULL, MHD_RESPMEM_PERSISTENT);
                status = MHD_HTTP_NOT_MODIFIED;
        } else {
                resp = MHD_create_response_from_buffer(len, buf, MHD_RESPMEM_MUST_FREE);
                if (resp)
                        buf = NULL;
                status = MHD_HTTP_OK;
        }
        if (!resp)
                return -ENOMEM;
        (void)MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, type);
        (void)MHD_add_response_header(resp, MHD_HTTP_HEADER_ETAG, etag);
        console_headers(resp);
        *ret = resp;
        *ret_status = status;
        return 0;
}
