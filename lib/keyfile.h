/* SPDX-License-Identifier: Apache-2.0 */
/* Keyfile reading ("[Section]", "Key=Value", like systemd units) shared by
 * tetherd's and tether-cloudd's configuration: inih with line numbers,
 * value parsers, tables of keys stored by offset, and the first error as
 * "FILE:LINE: reason". Each daemon keeps its own table, wording, defaults
 * and validation. No logging: errors go to the caller (on_error may log
 * each one as it happens). Programs using this link $(INIH_LIBS). */
#pragma once

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "util.h"

typedef struct KeyfileParser KeyfileParser;

/* Called for each key: 1 to go on, keyfile_fail()'s 0 to mark the line bad. */
typedef int (*keyfile_handler_t)(KeyfileParser *p, const char *section, const char *name, const char *value);

struct KeyfileParser {
        /* Set by the caller. */
        const char *path;   /* for messages; not owned */
        void *userdata;     /* the handler's */
        /* Optional: sees every failure's "FILE:LINE: reason", not only the first. */
        void (*on_error)(const char *message);

        /* Set by keyfile_parse(). */
        unsigned line;      /* the line being handled; after a syntax error, that line */
        int error;          /* the first keyfile_fail()'s error, 0 if none */
        char *message;      /* the first keyfile_fail()'s "FILE:LINE: reason"; freed by keyfile_parser_done() */

        /* Private. */
        FILE *file;
        keyfile_handler_t handler;
};

/* Read f (named p->path) with inih, calling handler for every key with
 * p->line set; parsing goes on after a bad line so that later lines are
 * seen too. A line longer than inih's buffer allows (199 bytes in Debian,
 * not counting its end) fails as "line longer than N bytes" rather than
 * being cut. Returns 0; p->error when a handler or a line's length failed;
 * -EBADMSG when inih found a syntax error itself (p->line is its line,
 * p->message untouched); -ENOMEM. f stays open. */
int keyfile_parse(KeyfileParser *p, FILE *f, keyfile_handler_t handler);
/* Frees p->message. */
void keyfile_parser_done(KeyfileParser *p);

/* Record a failure of the current line: the first one's error and
 * "PATH:LINE: reason" are kept in p->error and p->message. Returns 0, what
 * a handler returns for a bad line. */
int keyfile_fail(KeyfileParser *p, int error, const char *fmt, ...) _printf_(3, 4);

/* Replace *dst with a copy of value (any value, "" too). -ENOMEM. */
int keyfile_set_string(char **dst, const char *value);
/* A decimal number 0..max, digits only. -EINVAL, -ERANGE; *ret untouched then. */
int keyfile_parse_uint(const char *value, uint64_t max, uint64_t *ret);
/* Seconds with an optional fraction ("0.25"), at least min_ms and at most a
 * year, in milliseconds. -EINVAL, -ERANGE. */
int keyfile_parse_seconds(const char *value, uint64_t min_ms, uint64_t *ret_ms);

/* How a table key is stored at its offset. */
typedef enum KeyfileType {
        KEYFILE_STRING,       /* char *, must not be empty */
        KEYFILE_STRING_EMPTY, /* char *, may be empty */
        KEYFILE_U16,          /* uint16_t, min..max */
        KEYFILE_UINT,         /* unsigned, min..max */
        KEYFILE_SIZE,         /* size_t, min..max */
        KEYFILE_U64,          /* uint64_t, min..max */
        KEYFILE_SECONDS,      /* uint64_t milliseconds from seconds, at least min (ms) */
        KEYFILE_TYPE_OWN,     /* the caller's own types start here; keyfile_set() refuses them */
} KeyfileType;

typedef struct KeyfileKey {
        const char *section;
        const char *name;
        unsigned type; /* KeyfileType, or the caller's own >= KEYFILE_TYPE_OWN */
        size_t offset; /* of the field in the caller's struct */
        uint64_t min, max;
} KeyfileKey;

/* The entry of keys[0..n) for section and name, or NULL. */
const KeyfileKey *keyfile_find_key(const KeyfileKey *keys, size_t n, const char *section, const char *name);
/* Parse value by k's type into base + k->offset. 0; -EINVAL (empty
 * string, not a number, not a type of ours), -ERANGE, -ENOMEM; the field
 * is untouched on failure. */
int keyfile_set(const KeyfileKey *k, void *base, const char *value);
