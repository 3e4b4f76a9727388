/* SPDX-License-Identifier: Apache-2.0 */
/* The web console's files (console.c, prefix console_; docs/console.md):
 * GET and HEAD of /console/ (index.html) and /console/NAME, answered from
 * the one directory of [API] Console=. The files are public code: no token
 * is asked for here, every API call the console makes carries one.
 *
 * Guarantees: only regular files directly in that directory are served,
 * named [A-Za-z0-9._-]+ without a leading '.', with an extension of the
 * known list (console_content_type()), at most CONSOLE_FILE_MAX bytes; a
 * symlink is never followed (openat(O_NOFOLLOW) in the directory opened
 * at console_new()); every answer, errors included, carries the console's
 * security headers (CSP, nosniff, no referrer, no framing, no-cache).
 * Files are read at each request, so a changed file is served at once; an
 * ETag (inode, size, mtime) answers a matching If-None-Match with 304.
 *
 * A Console owns the directory's fd. Used from the loop's thread only;
 * blocking reads of small local files; logs only what it cannot serve
 * for the operator's reasons (a file too large, an I/O error). */
#pragma once

#include <microhttpd.h>
#include <stdbool.h>

#define CONSOLE_FILE_MAX (4 * 1024 * 1024)
#define CONSOLE_NAME_MAX 128
#define CONSOLE_CSP                                                                                                 \
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "       \
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

typedef struct Console Console;

/* Open dir for serving: 0 and *ret. dir NULL or "" is a console that is
 * off (every /console URL answers 404): 0 and *ret NULL. A directory that
 * cannot be opened: a negative errno, logged by the caller. */
int console_new(const char *dir, Console **ret);
/* NULL is fine; returns NULL. */
Console *console_free(Console *c);
static inline void console_freep(Console **c) { console_free(*c); }

/* Whether url (the path, without the query) is the console's: "/console"
 * or anything below "/console/". */
bool console_owns(const char *url);

/* The content type of a file name by its extension, or NULL for a name
 * the console does not serve. */
const char *console_content_type(const char *name);

/* Whether name may be served: [A-Za-z0-9._-]+, at most CONSOLE_NAME_MAX
 * bytes, not starting with '.' (so neither "." nor ".." nor "..x"). */
bool console_name_ok(const char *name);

/* The answer to method on url (console_owns(url) is true); c may be NULL
 * (console off). if_none_match is the request's header or NULL. Returns
 * 0 with *ret (the caller's, to queue and destroy) and *ret_status, or
 * -ENOMEM. */
int console_respond(Console *c, const char *url, const char *method, const char *if_none_match,
                    struct MHD_Response **ret, unsigned *ret_status);
