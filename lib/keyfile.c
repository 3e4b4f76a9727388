/* SPDX-License-Identifier: Apache-2.0 */
#include <ctype.h>
#include <errno.h>
#include <ini.h>
#include <math.h>
#include <stdarg.h>
#include <string.h>

#include "keyfile.h"

/* inih reads line by line through us, into its own buffer of num bytes
 * (INI_MAX_LINE, 200 in Debian's libinih). It would cut a longer line there
 * and parse the rest as a line of its own, so we refuse a line of more than
 * num - 1 bytes (not counting "\n" or "\r\n"): its rest is skipped, inih
 * gets an empty line instead and parsing goes on. One call is one line of
 * the file, so p->line and the line inih returns for a syntax error are the
 * file's. */
static char *keyfile_reader(char *str, int num, void *stream) {
        KeyfileParser *p = stream;
        size_t len;
        int c;

        if (!fgets(str, num, p->file))
                return NULL;
        p->line++;
        len = strlen(str);
        if (len + 1 < (size_t)num || str[len - 1] == '\n')
                return str; /* the whole line; the last one may lack the newline */
        /* The buffer is full: the line fits only if its end comes next. */
        c = getc(p->file);
        if (c == '\r')
                c = getc(p->file);
        if (c == '\n' || c == EOF)
                return str;
        while (c != '\n' && c != EOF)
                c = getc(p->file);
        keyfile_fail(p, -EINVAL, "line longer than %d bytes", num - 1);
        strcpy(str, "\n");
        return str;
}

static int keyfile_ini_handler(void *user, const char *section, const char *name, const char *value) {
        KeyfileParser *p = user;

        return p->handler(p, section, name, value);
}

int keyfile_parse(KeyfileParser *p, FILE *f, keyfile_handler_t handler) {
        int r;

        p->file = f;
        p->handler = handler;
        p->line = 0;
        r = ini_parse_stream(keyfile_reader, p, keyfile_ini_handler, p);
        p->file = NULL;
        if (p->error < 0)
                return p->error;
        if (r > 0) {
                p->line = (unsigned)r;
                return -EBADMSG;
        }
        if (r < 0) /* inih's -2: its line buffer could not be allocated */
                return -ENOMEM;
        return 0;
}

void keyfile_parser_done(KeyfileParser *p) {
        free(p->message);
        p->message = NULL;
}

int keyfile_fail(KeyfileParser *p, int error, const char *fmt, ...) {
        _cleanup_free_ char *message = NULL;
        char reason[512];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(reason, sizeof(reason), fmt, ap);
        va_end(ap);
        if (asprintf(&message, "%s:%u: %s", p->path, p->line, reason) < 0)
                message = NULL;
        if (message && p->on_error)
                p->on_error(message);
        if (p->error == 0) {
                p->error = error < 0 ? error : -EINVAL;
                p->message = TAKE_PTR(message);
        }
        return 0;
}

int keyfile_set_string(char **dst, const char *value) {
        char *v = strdup(value);

        if (!v)
                return -ENOMEM;
        free(*dst);
        *dst = v;
        return 0;
}

int keyfile_parse_uint(const char *value, uint64_t max, uint64_t *ret) {
        unsigned long long v;
        char *end;

        if (!*value || !isdigit((unsigned char)*value))
                return -EINVAL;
        errno = 0;
        v = strtoull(value, &end, 10);
        if (errno || *end || v > max)
                return -ERANGE;
        *ret = v;
        return 0;
}

int keyfile_parse_seconds(const char *value, uint64_t min_ms, uint64_t *ret_ms) {
        double v;
        char *end;

        if (!*value || !(isdigit((unsigned char)*value) || *value == '.'))
                return -EINVAL;
        errno = 0;
        v = strtod(value, &end);
        if (errno || *end || !isfinite(v) || v < 0 || v > 86400.0 * 365)
                return -ERANGE;
        if ((uint64_t)llround(v * 1000.0) < min_ms)
                return -ERANGE;
        *ret_ms = (uint64_t)llround(v * 1000.0);
        return 0;
}

const KeyfileKey *keyfile_find_key(const KeyfileKey *keys, size_t n, const char *section, const char *name) {
        for (size_t i = 0; i < n; i++)
                if (streq(keys[i].section, section) && streq(keys[i].name, name))
                        return &keys[i];
        return NULL;
}

int keyfile_set(const KeyfileKey *k, void *base, const char *value) {
        void *field = (uint8_t *)base + k->offset;
        uint64_t u;
        int r;

        switch (k->type) {
        case KEYFILE_STRING:
                if (!*value)
                        return -EINVAL;
                return keyfile_set_string(field, value);
        case KEYFILE_STRING_EMPTY:
                return keyfile_set_string(field, value);
        case KEYFILE_SECONDS:
                return keyfile_parse_seconds(value, k->min, field);
        case KEYFILE_U16:
        case KEYFILE_UINT:
        case KEYFILE_SIZE:
        case KEYFILE_U64:
                r = keyfile_parse_uint(value, k->max, &u);
                if (r < 0)
                        return r;
                if (u < k->min)
                        return -ERANGE;
                if (k->type == KEYFILE_U16)
                        *(uint16_t *)field = (uint16_t)u;
                else if (k->type == KEYFILE_UINT)
                        *(unsigned *)field = (unsigned)u;
                else if (k->type == KEYFILE_SIZE)
                        *(size_t *)field = (size_t)u;
                else
                        *(uint64_t *)field = u;
                return 0;
        default:
                return -EINVAL;
        }
}
