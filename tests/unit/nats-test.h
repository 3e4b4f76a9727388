/* SPDX-License-Identifier: Apache-2.0 */
/* A nats-server of its own for the unit tests that need one
 * (test-cloud-bus, test-cloud-replica): standalone or one node of a
 * cluster, JetStream with its store in a scratch directory, on loopback.
 * The server is SIGKILLed if the test dies; its log is dir/server.log. */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

typedef struct NatsServer {
        char dir[64];
        pid_t pid; /* -1: not running */
        int port;  /* 0: one the server picks */
        /* In a cluster (name NULL: standalone): */
        const char *name;
        int cluster_port;
        char routes[128];
} NatsServer;

/* Whether nats-server is on PATH (a test exits 77 otherwise). */
bool nats_server_installed(void);
/* Start nats-server in srv->dir on srv->port and wait, polling its log,
 * until it is ready (at most timeout_usec); srv->port is then the port it
 * listens on. -ETIMEDOUT when it was not ready in time. */
int nats_server_start(NatsServer *srv, uint64_t timeout_usec);
/* Make srv->dir a new directory /tmp/PREFIX-XXXXXX and start the server
 * there (nats_server_start()). */
int nats_server_new(NatsServer *srv, const char *prefix, uint64_t timeout_usec);
/* Send sig to the server and reap it; srv->dir stays. */
void nats_server_kill(NatsServer *srv, int sig);
/* Stop the server (SIGTERM) and remove srv->dir, unless TETHER_TEST_KEEP
 * is set. */
void nats_server_free(NatsServer *srv);
