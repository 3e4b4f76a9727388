/* SPDX-License-Identifier: Apache-2.0 */
/* tether-cloudd: the command line and the process (signals, limits); the
 * Cloud object (cloud.h) does the rest. */
#include "config.h"

#include <signal.h>
#include <sys/resource.h>
#include <systemd/sd-journal.h>

#include "cloud.h"
#include "log.h"
#include "stats.h"
#include "util.h"

/* One file descriptor per device session: take the hard limit. */
static void main_raise_nofile(void) {
        struct rlimit rl;

        if (getrlimit(RLIMIT_NOFILE, &rl) < 0 || rl.rlim_cur >= rl.rlim_max)
                return;
        rl.rlim_cur = rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &rl) < 0)
                log_debug_errno(errno, "Failed to raise RLIMIT_NOFILE: %m");
}

static int run(int argc, char *argv[]) {
        _cleanup_(cloud_freep) Cloud *cloud = NULL;
        CloudConfig *config = NULL;
        const char *path;
        sigset_t mask;
        int r;

        r = cloud_config_parse_argv(argc, argv, &path);
        if (r != 0)
                return r;
        r = cloud_config_load(path, &config);
        if (r < 0)
                return r;

        (void)signal(SIGPIPE, SIG_IGN);
        main_raise_nofile();
        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        sigaddset(&mask, SIGHUP);
        sigaddset(&mask, SIGCHLD); /* the signing command (signer.c) */
        if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0) {
                cloud_config_free(config);
                return log_error_errno(errno, "Failed to block signals: %m");
        }

        r = cloud_new(config, &cloud);
        if (r < 0)
                return r;
        r = cloud_run(cloud);
        return r < 0 ? r : 0;
}

int main(int argc, char *argv[]) {
        int r;

        log_open(CLOUD_PROGRAM);
        log_set_journal_sender(sd_journal_sendv);
        r = run(argc, argv);
        return r < 0 ? EXIT_FAILURE : EXIT_SUCCESS;
}
