/* SPDX-License-Identifier: Apache-2.0 */
/* A child process whose output the loop reads: argv[0] (looked up in PATH
 * when it has no slash), its stdout on a pipe, stdin and stderr on
 * /dev/null, the signal mask the agent's loop blocked emptied. Nothing
 * else of the agent's stays open in it: every other descriptor of the
 * agent is O_CLOEXEC. */
#pragma once

#include <sys/types.h>

/* On success 0, *ret_pid is the child (the caller reaps it) and *ret_fd
 * the pipe's read end (O_CLOEXEC, O_NONBLOCK; the caller closes it).
 * On failure a negative errno, nothing left open and no child; *ret_step
 * (if not NULL) names the call that failed: "pipe2", "fcntl" or "fork".
 * An exec failure is the child's exit status 127. */
int spawn_reader(const char *const *argv, pid_t *ret_pid, int *ret_fd, const char **ret_step);
