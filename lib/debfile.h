/* SPDX-License-Identifier: Apache-2.0 */
/* A .deb file on disk: its control fields (read by dpkg-deb, never by a
 * parser of ours) and its SHA-256. The blocking helpers are for the CLI
 * and the install helper; the agent runs dpkg-deb as a child of its event
 * loop and hands the output to debfile_control_parse(). */
#pragma once

#include <stdint.h>
#include <sys/types.h>

#define DEBFILE_CONTROL_MAX 16384 /* bytes of dpkg-deb output we accept */

typedef struct DebControl {
        char *package;
        char *version;
        char *architecture;
        uint64_t installed_size; /* KiB, 0 if absent */
} DebControl;

void debfile_control_done(DebControl *c);

/* The argv to get the fields: dpkg-deb --field PATH Package Version
 * Architecture Installed-Size. NULL-terminated, static strings except
 * path (borrowed). */
void debfile_control_argv(const char *path, const char *argv[static 8]);

/* Parse dpkg-deb --field output ("Name: value" lines). -EBADMSG if a
 * required field is missing or a line is malformed. */
int debfile_control_parse(const char *text, size_t len, DebControl *ret);

/* Run dpkg-deb and parse (blocks). -ENOENT: dpkg-deb missing; -EBADMSG:
 * not a .deb. */
int debfile_control_read(const char *path, DebControl *ret);

/* SHA-256 (lowercase hex) and size of a file (blocks). */
int debfile_sha256(const char *path, char ret_hex[static 65], uint64_t *ret_size);
/* The same over an open fd from its current offset to the end. */
int debfile_sha256_fd(int fd, char ret_hex[static 65], uint64_t *ret_size);

/* Run argv (PATH is searched; stdin and stderr are /dev/null), collect up
 * to max bytes of its stdout into buf. Returns its exit status (>= 0; 127
 * if it could not be run) or -errno (-E2BIG: more output than max). */
int debfile_run_capture(const char *const argv[], char *buf, size_t max, size_t *ret_len);

/* The dpkg architecture of this machine (dpkg --print-architecture,
 * blocks), malloc'd. */
int debfile_native_arch(char **ret);
