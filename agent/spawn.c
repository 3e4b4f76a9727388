/* SPDX-License-Identifier: Apache-2.0 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include "spawn.h"

int spawn_reader(const char *const *argv, pid_t *ret_pid, int *ret_fd, const char **ret_step) {
        const char *step = "pipe2";
        int fds[2], r;
        pid_t pid;

        if (pipe2(fds, O_CLOEXEC) < 0)
                goto fail_errno;
        step = "fcntl";
        if (fcntl(fds[0], F_SETFL, O_NONBLOCK) < 0)
                goto fail_close;
        step = "fork";
        pid = fork();
        if (pid < 0)
                goto fail_close;
        if (pid == 0) {
                sigset_t none;
                int null = open("/dev/null", O_RDWR | O_CLOEXEC);

                sigemptyset(&none);
                sigprocmask(SIG_SETMASK, &none, NULL);
                dup2(fds[1], STDOUT_FILENO);
                if (null >= 0) {
                        dup2(null, STDIN_FILENO);
                        dup2(null, STDERR_FILENO);
                }
                execvp(argv[0], (char *const *)argv);
                _exit(127);
        }
        close(fds[1]);
        *ret_pid = pid;
        *ret_fd = fds[0];
        return 0;

fail_close:
        r = -errno;
        close(fds[0]);
        close(fds[1]);
        goto fail;
fail_errno:
        r = -errno;
fail:
        if (ret_step)
                *ret_step = step;
        return r;
}
