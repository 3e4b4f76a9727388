/* SPDX-License-Identifier: Apache-2.0 */
/* The peer figure for a function call: an MQTT v5 request/response through
 * a Mosquitto broker (docs/design/benchmarks.md). A responder client answers
 * every message on "tether/bench/req" on the request's Response Topic with its
 * Correlation Data; the requester times each round trip. Both use TLS with
 * client certificates and TCP_NODELAY, like tether's device leg.
 *
 *   bench-mqtt --port P --cafile CA --cert C --key K [--qos 0|1] [-n N]
 *              [--warmup N] [--reps N]
 *
 * Prints the same table as bench-call. Figures, never pass/fail. */
#include <errno.h>
#include <getopt.h>
#include <mosquitto.h>
#include <mqtt_protocol.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define REQ_TOPIC "tether/bench/req"
#define RESP_TOPIC "tether/bench/resp"

static const char *host = "127.0.0.1", *cafile, *cert, *key;
static int port, qos = 1;

static double now_ms(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static struct mosquitto *client(const char *id, void *userdata) {
        struct mosquitto *m = mosquitto_new(id, true, userdata);

        if (!m) {
                fprintf(stderr, "bench-mqtt: mosquitto_new failed\n");
                exit(1);
        }
        mosquitto_int_option(m, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V5);
        mosquitto_int_option(m, MOSQ_OPT_TCP_NODELAY, 1);
        if (mosquitto_tls_set(m, cafile, NULL, cert, key, NULL) != MOSQ_ERR_SUCCESS) {
                fprintf(stderr, "bench-mqtt: TLS setup failed\n");
                exit(1);
        }
        if (mosquitto_connect(m, host, port, 60) != MOSQ_ERR_SUCCESS) {
                fprintf(stderr, "bench-mqtt: cannot connect to %s:%d\n", host, port);
                exit(1);
        }
        return m;
}

static void on_request(struct mosquitto *m, void *ud, const struct mosquitto_message *msg,
                       const mosquitto_property *props) {
        char *topic = NULL;
        void *corr = NULL;
        uint16_t corr_len = 0;
        mosquitto_property *out = NULL;

        if (!mosquitto_property_read_string(props, MQTT_PROP_RESPONSE_TOPIC, &topic, false))
                return;
        if (mosquitto_property_read_binary(props, MQTT_PROP_CORRELATION_DATA, &corr, &corr_len, false))
                mosquitto_property_add_binary(&out, MQTT_PROP_CORRELATION_DATA, corr, corr_len);
        /* A 4-byte answer, like tether's decimal result. */
        mosquitto_publish_v5(m, NULL, topic, 4, "5\0\0\0", qos, false, out);
        mosquitto_property_free_all(&out);
        free(topic);
        free(corr);
}

static void responder(void) {
        struct mosquitto *m = client("tether-bench-responder", NULL);

        mosquitto_message_v5_callback_set(m, on_request);
        mosquitto_subscribe(m, NULL, REQ_TOPIC, qos);
        mosquitto_loop_forever(m, -1, 1);
        exit(0);
}

typedef struct Requester {
        uint32_t waiting; /* correlation id awaited, 0 when answered */
} Requester;

static void on_response(struct mosquitto *m, void *ud, const struct mosquitto_message *msg,
                        const mosquitto_property *props) {
        Requester *r = ud;
        void *corr = NULL;
        uint16_t len = 0;

        if (mosquitto_property_read_binary(props, MQTT_PROP_CORRELATION_DATA, &corr, &len, false) &&
            len == sizeof(uint32_t) && memcmp(corr, &r->waiting, sizeof(uint32_t)) == 0)
                r->waiting = 0;
        free(corr);
}

static int cmp_double(const void *a, const void *b) {
        double x = *(const double *)a, y = *(const double *)b;
        return x < y ? -1 : x > y;
}

static double pct(const double *sorted, int n, double p) {
        int i = (int)(p * (n - 1) + 0.5);
        return sorted[i < n ? i : n - 1];
}

static int call(struct mosquitto *m, Requester *r, uint32_t id) {
        mosquitto_property *props = NULL;
        double deadline = now_ms() + 5000;

        mosquitto_property_add_string(&props, MQTT_PROP_RESPONSE_TOPIC, RESP_TOPIC);
        mosquitto_property_add_binary(&props, MQTT_PROP_CORRELATION_DATA, &id, sizeof(id));
        r->waiting = id;
        /* 16-byte request, the size of the baseline function-call argument. */
        mosquitto_publish_v5(m, NULL, REQ_TOPIC, 16, "0123456789abcdef", qos, false, props);
        mosquitto_property_free_all(&props);
        while (r->waiting) {
                if (mosquitto_loop(m, 100, 1) != MOSQ_ERR_SUCCESS || now_ms() > deadline)
                        return -1;
        }
        return 0;
}

int main(int argc, char **argv) {
        static const struct option opts[] = {
                { "host", required_argument, NULL, 'H' }, { "port", required_argument, NULL, 'p' },
                { "cafile", required_argument, NULL, 'a' }, { "cert", required_argument, NULL, 'c' },
                { "key", required_argument, NULL, 'k' },   { "qos", required_argument, NULL, 'q' },
                { "warmup", required_argument, NULL, 'w' }, { "reps", required_argument, NULL, 'r' },
                {},
        };
        int n = 2000, warmup = 200, reps = 3, c, errors = 0;
        Requester req = {};
        struct mosquitto *m;
        double *all, *rep;
        uint32_t id = 1;
        pid_t child;

        while ((c = getopt_long(argc, argv, "n:", opts, NULL)) >= 0) {
                switch (c) {
                case 'H': host = optarg; break;
                case 'p': port = atoi(optarg); break;
                case 'a': cafile = optarg; break;
                case 'c': cert = optarg; break;
                case 'k': key = optarg; break;
                case 'q': qos = atoi(optarg); break;
                case 'n': n = atoi(optarg); break;
                case 'w': warmup = atoi(optarg); break;
                case 'r': reps = atoi(optarg); break;
                default: return 2;
                }
        }
        if (!port || !cafile || !cert || !key || n < 1 || reps < 1 || (qos != 0 && qos != 1)) {
                fprintf(stderr, "usage: bench-mqtt --port P --cafile CA --cert C --key K [--qos 0|1] "
                                "[-n N] [--warmup N] [--reps N]\n");
                return 2;
        }
        mosquitto_lib_init();
        child = fork();
        if (child == 0)
                responder();

        m = client("tether-bench-requester", &req);
        mosquitto_message_v5_callback_set(m, on_response);
        mosquitto_subscribe(m, NULL, RESP_TOPIC, qos);
        /* The responder's subscription must exist before timing: the first
         * answered call proves it. */
        for (double deadline = now_ms() + 10000; call(m, &req, id++) < 0;)
                if (now_ms() > deadline) {
                        fprintf(stderr, "bench-mqtt: no responder\n");
                        kill(child, SIGTERM);
                        return 1;
                }
        for (int i = 0; i < warmup; i++)
                errors += call(m, &req, id++) < 0;

        all = calloc((size_t)n * reps, sizeof(double));
        rep = calloc((size_t)n, sizeof(double));
        printf("MQTT v5 request/response via Mosquitto, QoS %d, TLS, %d calls x %d repetitions after %d warm-up\n",
               qos, n, reps, warmup);
        printf("rep     median ms      p90 ms      p99 ms      max ms     calls/s   errors\n");
        for (int r = 0; r < reps; r++) {
                double t0 = now_ms(), total;
                int e = 0;
                for (int i = 0; i < n; i++) {
                        double s = now_ms();
                        e += call(m, &req, id++) < 0;
                        rep[i] = all[r * n + i] = now_ms() - s;
                }
                total = now_ms() - t0;
                qsort(rep, n, sizeof(double), cmp_double);
                printf("%-3d %11.3f %11.3f %11.3f %11.3f %11.1f %8d\n", r + 1, pct(rep, n, 0.5), pct(rep, n, 0.9),
                       pct(rep, n, 0.99), rep[n - 1], n / (total / 1000), e);
                errors += e;
        }
        qsort(all, (size_t)n * reps, sizeof(double), cmp_double);
        printf("all %11.3f %11.3f %11.3f %11.3f\n", pct(all, n * reps, 0.5), pct(all, n * reps, 0.9),
               pct(all, n * reps, 0.99), all[n * reps - 1]);
        kill(child, SIGTERM);
        waitpid(child, NULL, 0);
        mosquitto_destroy(m);
        mosquitto_lib_cleanup();
        free(all);
        free(rep);
        return errors ? 1 : 0;
}
