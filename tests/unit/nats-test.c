/* SPDX-License-Identifier: Apache-2.0 */
/* A nats-server of its own for the unit tests (nats-test.h). */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "lib/util.h"
#include "nats-test.h"

bool nats_server_installed(void) {
        const char *path = getenv("PATH");
        _cleanup_free_ char *copy = strdup(path ? path : "/usr/bin:/bin");
        char *save = NULL;

        if (!copy)
                return false;
        for (char *d = strtok_r(copy, ":", &save); d; d = strtok_r(NULL, ":", &save)) {
                char p[4096];

                snprintf(p, sizeof(p), "%s/nats-server", d);
                if (access(p, X_OK) == 0)
                        return true;
        }
        return false;
}

int nats_server_start(NatsServer *srv, uint64_t timeout_usec) {
        char log[128], store[128], line[512], port[16];
        uint64_t deadline;
        int found = 0;
        bool ready = false;

        snprintf(log, sizeof(log), "%s/server.log", srv->dir);
        snprintf(store, sizeof(store), "%s/js", srv->dir);
        snprintf(port, sizeof(port), "%d", srv->port > 0 ? srv->port : -1);
        (void)unlink(log);
        srv->pid = fork();
        if (srv->pid < 0)
                return -errno;
        if (srv->pid == 0) {
                int null = open("/dev/null", O_RDWR | O_CLOEXEC);

                /* Not outliving a test that failed half-way; its log is in
                 * the file, not on the test's output. */
                (void)prctl(PR_SET_PDEATHSIG, SIGKILL);
                if (null >= 0) {
                        dup2(null, STDOUT_FILENO);
                        dup2(null, STDERR_FILENO);
                }
                if (srv->name) {
                        char cluster[64];

                        snprintf(cluster, sizeof(cluster), "nats://127.0.0.1:%d", srv->cluster_port);
                        execlp("nats-server", "nats-server", "-a", "127.0.0.1", "-p", port, "-js", "-sd", store, "-l",
                               log, "-n", srv->name, "--cluster_name", "test", "--cluster", cluster, "--routes",
                               srv->routes, (char *)NULL);
                }
                execlp("nats-server", "nats-server", "-a", "127.0.0.1", "-p", port, "-js", "-sd", store, "-l", log,
                       (char *)NULL);
                _exit(127);
        }
        deadline = now_usec() + timeout_usec;
        while (!ready && now_usec() < deadline) {
                FILE *f = fopen(log, "re");
                struct timespec ts = { 0, 20 * 1000 * 1000 };

                while (f && fgets(line, sizeof(line), f)) {
                        const char *p = strstr(line, "Listening for client connections on 127.0.0.1:");

                        if (p)
                                found = atoi(p + strlen("Listening for client connections on 127.0.0.1:"));
                        if (strstr(line, "Server is ready"))
                                ready = found > 0;
                }
                if (f)
                        fclose(f);
                if (!ready)
                        nanosleep(&ts, NULL); /* polling the log for the event */
        }
        if (!ready)
                return -ETIMEDOUT;
        srv->port = found;
        return 0;
}

int nats_server_new(NatsServer *srv, const char *prefix, uint64_t timeout_usec) {
        int n = snprintf(srv->dir, sizeof(srv->dir), "/tmp/%s-XXXXXX", prefix);

        if (n < 0 || (size_t)n >= sizeof(srv->dir)) {
                srv->dir[0] = '\0';
                return -EINVAL;
        }
        if (!mkdtemp(srv->dir)) {
                srv->dir[0] = '\0';
                return -errno;
        }
        return nats_server_start(srv, timeout_usec);
}

void nats_server_kill(NatsServer *srv, int sig) {
        if (srv->pid > 0) {
                kill(srv->pid, sig);
                waitpid(srv->pid, NULL, 0);
                srv->pid = -1;
        }
}

void nats_server_free(NatsServer *srv) {
        char cmd[128];

        nats_server_kill(srv, SIGTERM);
        if (srv->dir[0] && !getenv("TETHER_TEST_KEEP")) {
                snprintf(cmd, sizeof(cmd), "rm -rf '%s'", srv->dir);
                (void)!system(cmd);
        }
}
