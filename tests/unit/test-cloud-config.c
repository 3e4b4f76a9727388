/* SPDX-License-Identifier: Apache-2.0 */
/* Unit tests for tether-cloudd's configuration (cloud/config.c): keyfile
 * values and limits, the API token file, the command line, the sections
 * of the outbound integrations ([Webhook NAME], [MQTTBridge NAME]) and
 * their checks (cloud/integrations-config.c). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <netinet/in.h>
#include <unistd.h>

#include "cloud/cloud-config.h"
#include "cloud/integrations.h"
#include "util.h"

static char dir[] = "/tmp/tether-cloud-config-test-XXXXXX";

static void write_file(const char *name, const char *text) {
        char path[256];
        FILE *f;

        snprintf(path, sizeof(path), "%s/%s", dir, name);
        f = fopen(path, "we");
        assert_non_null(f);
        fputs(text, f);
        fclose(f);
}

/* The required keys, the token file given by name (relative to dir). */
static int load_with(const char *tokens_name, const char *extra, CloudConfig **ret) {
        char text[4096], path[256];

        snprintf(text, sizeof(text),
                 "[Cloud]\nCAFile=/ca.crt\nCertificate=/c.crt\nKey=/c.key\n[API]\nTokenFile=%s/%s\n%s", dir,
                 tokens_name, extra);
        write_file("cloud.conf", text);
        snprintf(path, sizeof(path), "%s/cloud.conf", dir);
        return cloud_config_load(path, ret);
}

static int load(const char *extra, CloudConfig **ret) {
        return load_with("tokens", extra, ret);
}

static int setup(void **state) {
        assert_non_null(mkdtemp(dir));
        write_file("tokens", "secret-token-1\n");
        return 0;
}

static int teardown(void **state) {
        char cmd[512];

        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
        return system(cmd) == 0 ? 0 : -1;
}

static void test_defaults(void **state) {
        _cleanup_(cloud_config_freep) CloudConfig *c = NULL;

        assert_int_equal(load("", &c), 0);
        assert_string_equal(c->coap_listen, "0.0.0.0");
        assert_int_equal(c->coap_port, 5684);
        assert_int_equal(c->max_payload, 16384);
        assert_int_equal(c->max_subscriptions, 32);
        assert_int_equal(c->ping_sec, 30);
        assert_int_equal(c->device_timeout_sec, 90);
        assert_int_equal(c->call_timeout_sec, 10);
        assert_int_equal(c->handshake_timeout_sec, 15);
        assert_int_equal(c->max_handshakes, 1024);
        assert_int_equal(c->max_queued_bytes, 1024 * 1024);
        assert_int_equal(c->session_shards, 16);
        /* Unset: cloud_new() chooses from the CPUs. */
        assert_int_equal(c->handshake_threads, CLOUD_HANDSHAKE_THREADS_AUTO);
        assert_string_equal(c->api_listen, "127.0.0.1");
        assert_int_equal(c->api_port, 8080);
        assert_int_equal(c->max_connections_per_ip, 64);
        assert_null(c->api_cert_file);
        assert_null(c->api_key_file);
        assert_int_equal(c->max_connections, 4096);
        assert_int_equal(c->idle_timeout_sec, 30);
        assert_int_equal(c->header_timeout_sec, 10);
        assert_int_equal(c->rate_address, 500);
        assert_int_equal(c->rate_address_burst, 1000);
        assert_int_equal(c->rate_token, 500);
        assert_int_equal(c->rate_token_burst, 1000);
        assert_int_equal(c->rate_auth_failures, 10);
        assert_int_equal(c->rate_auth_failures_burst, 100);
        assert_int_equal(c->n_tokens, 1);
}

static void test_values(void **state) {
        _cleanup_(cloud_config_freep) CloudConfig *c = NULL;

        assert_int_equal(load("[Cloud]\nListen=::\nPort=0\nMaxPayload=65536\nMaxSubscriptions=0\nPingSec=1\n"
                              "DeviceTimeoutSec=2\nCallTimeoutSec=3600\nHandshakeTimeoutSec=4\nMaxHandshakes=5\n"
                              "MaxQueuedBytes=1024\nSessionShards=256\nHandshakeThreads=0\n[API]\nListen=::1\n"
                              "Port=65535\n"
                              "MaxConnectionsPerIP=7\nMaxConnections=9\nIdleTimeoutSec=11\nHeaderTimeoutSec=12\n"
                              "RateLimitPerAddress=0\nRateLimitPerAddressBurst=1\nRateLimitPerToken=13\n"
                              "RateLimitPerTokenBurst=14\nAuthFailuresPerAddress=15\nAuthFailuresPerAddressBurst=16\n"
                              "Certificate=/api.crt\nKey=/api.key\n",
                              &c),
                         0);
        assert_string_equal(c->coap_listen, "::");
        assert_int_equal(c->coap_port, 0);
        assert_int_equal(c->max_payload, 65536);
        assert_int_equal(c->max_subscriptions, 0);
        assert_int_equal(c->ping_sec, 1);
        assert_int_equal(c->device_timeout_sec, 2);
        assert_int_equal(c->call_timeout_sec, 3600);
        assert_int_equal(c->handshake_timeout_sec, 4);
        assert_int_equal(c->max_handshakes, 5);
        assert_int_equal(c->max_queued_bytes, 1024);
        assert_int_equal(c->session_shards, 256);
        assert_int_equal(c->handshake_threads, 0);
        assert_string_equal(c->api_listen, "::1");
        assert_int_equal(c->api_port, 65535);
        assert_int_equal(c->max_connections_per_ip, 7);
        assert_int_equal(c->max_connections, 9);
        assert_int_equal(c->idle_timeout_sec, 11);
        assert_int_equal(c->header_timeout_sec, 12);
        assert_int_equal(c->rate_address, 0);
        assert_int_equal(c->rate_address_burst, 1);
        assert_int_equal(c->rate_token, 13);
        assert_int_equal(c->rate_token_burst, 14);
        assert_int_equal(c->rate_auth_failures, 15);
        assert_int_equal(c->rate_auth_failures_burst, 16);
        assert_string_equal(c->api_cert_file, "/api.crt");
        assert_string_equal(c->api_key_file, "/api.key");
}

static void expect_invalid(const char *extra) {
        CloudConfig *c = NULL;

        if (load(extra, &c) != -EINVAL)
                fail_msg("accepted: %s", extra);
        assert_null(c);
}

static void test_bad_values(void **state) {
        static const char *const bad[] = {
                "[Cloud]\nPort=65536\n",          "[Cloud]\nPort=-1\n",
                "[Cloud]\nPort=+5\n",             "[Cloud]\nPort=5x\n",
                "[Cloud]\nPort=\n",               "[Cloud]\nMaxPayload=0\n",
                "[Cloud]\nMaxPayload=65537\n",    "[Cloud]\nPingSec=0\n",
                "[Cloud]\nMaxQueuedBytes=1023\n", "[Cloud]\nMaxHandshakes=0\n",
                "[Cloud]\nHandshakeTimeoutSec=0\n", "[Cloud]\nCAFile=\n",
                "[API]\nPort=99999999999999999999\n", "[API]\nMaxConnectionsPerIP=x\n",
                "[Cloud\nPort=1\n",              "[Cloud]\nSessionShards=0\n",
                "[Cloud]\nSessionShards=257\n", "[API]\nMaxConnections=0\n",
                "[Cloud]\nHandshakeThreads=65\n", "[Cloud]\nHandshakeThreads=auto\n",
                "[API]\nIdleTimeoutSec=0\n",     "[API]\nHeaderTimeoutSec=0\n",
                "[API]\nRateLimitPerTokenBurst=0\n", "[API]\nRateLimitPerAddress=-1\n",
                "[API]\nCertificate=/api.crt\n",   "[API]\nKey=/api.key\n",
        };

        for (size_t i = 0; i < ELEMENTSOF(bad); i++)
                expect_invalid(bad[i]);
}

/* load() with what it logs (stderr) in *ret_log, malloc'd. */
static int load_logged(const char *extra, CloudConfig **ret, char **ret_log) {
        char path[256], *log;
        int saved, fd, r;
        FILE *f;
        long n;

        snprintf(path, sizeof(path), "%s/stderr", dir);
        fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        assert_true(fd >= 0);
        fflush(stderr);
        saved = dup(STDERR_FILENO);
        assert_true(saved >= 0);
        assert_true(dup2(fd, STDERR_FILENO) >= 0);
        assert_int_equal(close(fd), 0);
        r = load(extra, ret);
        fflush(stderr);
        assert_true(dup2(saved, STDERR_FILENO) >= 0);
        assert_int_equal(close(saved), 0);

        f = fopen(path, "re");
        assert_non_null(f);
        assert_int_equal(fseek(f, 0, SEEK_END), 0);
        n = ftell(f);
        rewind(f);
        log = calloc(1, (size_t)n + 1);
        assert_non_null(log);
        assert_int_equal(fread(log, 1, (size_t)n, f), (size_t)n);
        fclose(f);
        *ret_log = log;
        return r;
}

/* Debian's libinih reads a line into 200 bytes (INI_MAX_LINE): 199 and the
 * line end fit. A longer line is refused, not cut with its rest read as a
 * line of its own. */
#define LONGEST_LINE 199

/* "KEY=/vvv..." of len bytes. */
static char *long_line(const char *key, size_t len) {
        char *s = malloc(len + 1);

        assert_non_null(s);
        assert_true(len > strlen(key) + 2);
        memset(s, 'v', len);
        memcpy(s, key, strlen(key));
        memcpy(s + strlen(key), "=/", 2);
        s[len] = '\0';
        return s;
}

static void expect_logged(const char *extra, const char *needle) {
        _cleanup_free_ char *log = NULL;
        CloudConfig *c = NULL;

        if (load_logged(extra, &c, &log) != -EINVAL)
                fail_msg("accepted: %s", extra);
        assert_null(c);
        if (!strstr(log, needle))
                fail_msg("log '%s' does not contain '%s'", log, needle);
}

static void test_long_lines(void **state) {
        _cleanup_(cloud_config_freep) CloudConfig *c = NULL;
        _cleanup_free_ char *state_dir = long_line("Directory", LONGEST_LINE);
        _cleanup_free_ char *ota_dir = long_line("ArtifactDirectory", LONGEST_LINE);
        _cleanup_free_ char *over = long_line("Directory", LONGEST_LINE + 1);
        _cleanup_free_ char *cut = long_line("Directory", LONGEST_LINE + 40);
        char extra[2048];

        /* The longest line, ending in "\n", "\r\n" or the end of the file,
         * is read whole, and the lines after it keep their numbers. */
        snprintf(extra, sizeof(extra), "[State]\n%s\n[OTA]\n%s\r\n[State]\n%s", state_dir, ota_dir, state_dir);
        assert_int_equal(load(extra, &c), 0);
        assert_string_equal(c->state_dir, state_dir + strlen("Directory="));
        assert_string_equal(c->ota_dir, ota_dir + strlen("ArtifactDirectory="));
        snprintf(extra, sizeof(extra), "[State]\n%s\n[OTA]\n%s\r\n[Cloud]\nPort=x\n", state_dir, ota_dir);
        expect_logged(extra, "cloud.conf:12: Invalid value 'x' for Port=");

        /* One byte more is an error on its line, whatever the line end. */
        snprintf(extra, sizeof(extra), "[State]\n%s\n", over);
        expect_logged(extra, "cloud.conf:8: line longer than 199 bytes");
        snprintf(extra, sizeof(extra), "[State]\n%s\r\n", over);
        expect_logged(extra, "cloud.conf:8: line longer than 199 bytes");
        snprintf(extra, sizeof(extra), "[State]\n%s", over);
        expect_logged(extra, "cloud.conf:8: line longer than 199 bytes");
        /* Not a cut Directory= with its rest an unknown key (a warning). */
        memcpy(cut + LONGEST_LINE, "Port=1", strlen("Port=1"));
        snprintf(extra, sizeof(extra), "[State]\n%s\n", cut);
        expect_logged(extra, "cloud.conf:8: line longer than 199 bytes");
}

static void test_required(void **state) {
        char path[256];
        CloudConfig *c = NULL;

        write_file("partial.conf", "[Cloud]\nCAFile=/ca.crt\nCertificate=/c.crt\n[API]\nTokenFile=/t\n");
        snprintf(path, sizeof(path), "%s/partial.conf", dir);
        assert_int_equal(cloud_config_load(path, &c), -EINVAL);
        assert_null(c);
        write_file("partial.conf", "[Cloud]\nCAFile=/ca.crt\nCertificate=/c.crt\nKey=/k\n");
        assert_int_equal(cloud_config_load(path, &c), -EINVAL);
        snprintf(path, sizeof(path), "%s/missing.conf", dir);
        assert_int_equal(cloud_config_load(path, &c), -ENOENT);
}

static void test_unknown_keys_only_warn(void **state) {
        _cleanup_(cloud_config_freep) CloudConfig *c = NULL;

        assert_int_equal(load("[Cloud]\nNoSuchKey=1\n[Elsewhere]\nKey=2\n", &c), 0);
        assert_int_equal(c->coap_port, 5684);
}

static void test_token_file(void **state) {
        _cleanup_(cloud_config_freep) CloudConfig *c = NULL;

        write_file("tokens-mixed", "# a comment\n\n   \n  token-one  \r\n\ttoken-two\t\n#not-a-token\ntoken-three");
        assert_int_equal(load_with("tokens-mixed", "", &c), 0);
        assert_int_equal(c->n_tokens, 3);
        assert_true(cloud_config_token_valid(c, "token-one"));
        assert_true(cloud_config_token_valid(c, "token-two"));
        assert_true(cloud_config_token_valid(c, "token-three"));
        assert_false(cloud_config_token_valid(c, "not-a-token"));
        assert_false(cloud_config_token_valid(c, "#not-a-token"));
        assert_false(cloud_config_token_valid(c, "token-one "));
        assert_false(cloud_config_token_valid(c, " token-one"));
        assert_false(cloud_config_token_valid(c, "token-on"));
        assert_false(cloud_config_token_valid(c, "token-onee"));
        assert_false(cloud_config_token_valid(c, "TOKEN-ONE"));
        assert_false(cloud_config_token_valid(c, ""));
        assert_false(cloud_config_token_valid(c, NULL));
}

static void test_token_file_empty_refuses_everything(void **state) {
        _cleanup_(cloud_config_freep) CloudConfig *c = NULL;

        write_file("tokens-empty", "# nothing here\n\n");
        assert_int_equal(load_with("tokens-empty", "", &c), 0);
        assert_int_equal(c->n_tokens, 0);
        assert_false(cloud_config_token_valid(c, "# nothing here"));
        assert_false(cloud_config_token_valid(c, ""));
}

static void test_token_file_errors(void **state) {
        static const char *const bad[] = { "good\nin valid\n", "tab\tinside\n", "bell\a\n", "del\x7f\n" };
        CloudConfig *c = NULL;

        for (size_t i = 0; i < ELEMENTSOF(bad); i++) {
                write_file("tokens-bad", bad[i]);
                assert_int_equal(load_with("tokens-bad", "", &c), -EINVAL);
                assert_null(c);
        }
        assert_int_equal(load_with("no-such-file", "", &c), -ENOENT);
        assert_null(c);
}

static void test_token_file_limit(void **state) {
        _cleanup_free_ char *text = NULL;
        CloudConfig *c = NULL;
        size_t n = 4097, len = 0;

        text = malloc(n * 16 + 1);
        assert_non_null(text);
        for (size_t i = 0; i < n; i++)
                len += (size_t)sprintf(text + len, "tok-%zu\n", i);
        write_file("tokens-many", text);
        assert_int_equal(load_with("tokens-many", "", &c), -E2BIG);
        assert_null(c);
        /* One fewer is fine. */
        *strstr(text, "tok-4096\n") = 0;
        write_file("tokens-many", text);
        assert_int_equal(load_with("tokens-many", "", &c), 0);
        assert_int_equal(c->n_tokens, 4096);
        assert_true(cloud_config_token_valid(c, "tok-4095"));
        cloud_config_free(c);
}

static void test_argv(void **state) {
        const char *path = NULL;
        char *a1[] = { (char *)"tether-cloudd", (char *)"--config", (char *)"/x.conf", NULL };
        char *a2[] = { (char *)"tether-cloudd", (char *)"-c", (char *)"/y.conf", NULL };
        char *a3[] = { (char *)"tether-cloudd", (char *)"extra", NULL };
        char *a4[] = { (char *)"tether-cloudd", NULL };

        assert_int_equal(cloud_config_parse_argv(3, a1, &path), 0);
        assert_string_equal(path, "/x.conf");
        assert_int_equal(cloud_config_parse_argv(3, a2, &path), 0);
        assert_string_equal(path, "/y.conf");
        assert_int_equal(cloud_config_parse_argv(2, a3, &path), -EINVAL);
        assert_int_equal(cloud_config_parse_argv(1, a4, &path), 0);
        assert_string_equal(path, CLOUD_DEFAULT_CONFIG);
}

static void test_resolve_address(void **state) {
        struct sockaddr_storage ss;
        socklen_t sl;

        assert_int_equal(cloud_config_resolve_address("127.0.0.1", 80, &ss, &sl), 0);
        assert_int_equal(ss.ss_family, AF_INET);
        assert_int_equal(ntohs(((struct sockaddr_in *)&ss)->sin_port), 80);
        assert_int_equal(cloud_config_resolve_address("::", 0, &ss, &sl), 0);
        assert_int_equal(ss.ss_family, AF_INET6);
}

/* [Cluster]: absent is a single node; the defaults follow NATS=; bad
 * values are refused with their line. */
static void test_cluster(void **state) {
        CloudConfig *c = NULL;
        char host[256] = "";

        assert_int_equal(load("", &c), 0);
        assert_null(c->cluster_nats);
        assert_null(c->cluster_node);
        assert_int_equal(c->cluster_replicas, 0);
        c = cloud_config_free(c);

        /* Without NATS= the rest is ignored (with a warning). */
        assert_int_equal(load("[Cluster]\nNode=n1\nReplicas=3\n", &c), 0);
        assert_null(c->cluster_nats);
        assert_null(c->cluster_node);
        assert_int_equal(c->cluster_replicas, 0);
        c = cloud_config_free(c);

        assert_int_equal(load("[Cluster]\nNATS=nats://127.0.0.1:4222\n", &c), 0);
        assert_string_equal(c->cluster_nats, "nats://127.0.0.1:4222");
        assert_int_equal(c->cluster_replicas, 1);
        assert_non_null(c->cluster_node);
        assert_true(strlen(c->cluster_node) >= 1 && strlen(c->cluster_node) <= CLOUD_NODE_NAME_MAX);
        assert_true(strspn(c->cluster_node, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-") ==
                    strlen(c->cluster_node));
        assert_int_equal(gethostname(host, sizeof(host) - 1), 0);
        /* The host name up to its first dot, cut to CLOUD_NODE_NAME_MAX (a
         * container's name, as in the cross build, can be longer). */
        size_t cut = strcspn(host, ".");
        if (cut > CLOUD_NODE_NAME_MAX)
                cut = CLOUD_NODE_NAME_MAX;
        assert_int_equal(strncmp(c->cluster_node, host, cut), 0);
        assert_null(c->cluster_user);
        assert_null(c->cluster_node_api);
        c = cloud_config_free(c);

        assert_int_equal(load("[Cluster]\nNATS=nats://a:4222, nats://b:4222 tls://c:4222\nNode=cloud-1_a\n"
                              "User=tether\nPassword=pw\nCAFile=/nats-ca.crt\nNodeAPI=https://n1.example:8080\n",
                              &c),
                         0);
        assert_int_equal(c->cluster_replicas, 3);
        assert_string_equal(c->cluster_node, "cloud-1_a");
        assert_string_equal(c->cluster_user, "tether");
        assert_string_equal(c->cluster_password, "pw");
        assert_string_equal(c->cluster_ca_file, "/nats-ca.crt");
        assert_string_equal(c->cluster_node_api, "https://n1.example:8080");
        c = cloud_config_free(c);

        assert_int_equal(load("[Cluster]\nNATS=nats://a:1,nats://b:1,nats://c:1\nReplicas=2\n", &c), 0);
        assert_int_equal(c->cluster_replicas, 2);
        c = cloud_config_free(c);

        expect_logged("[Cluster]\nNATS=nats://a:1\nNode=a.b\n", "cloud.conf:9: Invalid node name 'a.b'");
        expect_logged("[Cluster]\nNATS=nats://a:1\nNode=123456789012345678901234567890123\n", "Node=");
        expect_logged("[Cluster]\nNATS=http://a:1\n", "cloud.conf:8: Invalid server URL 'http://a:1'");
        expect_logged("[Cluster]\nNATS=nats://a:1,nats://\n", "Invalid server URL 'nats://'");
        expect_logged("[Cluster]\nNATS= , \n", "Invalid server URL ''");
        expect_logged("[Cluster]\nNATS=nats://a:1\nReplicas=6\n", "cloud.conf:9: Invalid value '6' for Replicas=");
        expect_logged("[Cluster]\nNATS=nats://a:1\nReplicas=0\n", "Replicas=");
        expect_logged("[Cluster]\nNATS=nats://a:1\nUser=u\n", "User= and Password= go together");
        expect_logged("[Cluster]\nNATS=nats://a:1\nNodeAPI=ftp://x\n", "Invalid URL 'ftp://x' for NodeAPI=");
}

#define SECRET "0123456789abcdef"

static void test_integrations(void **state) {
        CloudConfig *c = NULL;
        IntegrationConfig *w, *m, *m2;

        assert_int_equal(load("", &c), 0);
        assert_int_equal(c->n_integrations, 0);
        c = cloud_config_free(c);

        assert_int_equal(load("[Webhook hook-1]\nURL=https://hooks.example.com/tether\nSecret=" SECRET "\n"
                              "[MQTTBridge aws_iot]\nHost=broker.example.com\nCAFile=/ca.pem\nCertFile=/b.crt\n"
                              "KeyFile=/b.key\nQoS=0\nProtocol=5\nPrefix=temp\nTag=site=berlin\n"
                              "Subscribe=tether/to-devices/#\n"
                              "[MQTTBridge local]\nHost=127.0.0.1\nUser=u\nPassword=p\n"
                              "Topic=x/{name}/{device}/{event}\n"
                              "ClientID=me\nInboundPrefix=in/\nPort=1884\n",
                              &c),
                         0);
        assert_int_equal(c->n_integrations, 3);
        w = c->integrations[0];
        assert_string_equal(w->name, "hook-1");
        assert_int_equal(w->kind, INTEGRATION_WEBHOOK);
        assert_false(w->from_api);
        assert_string_equal(w->url, "https://hooks.example.com/tether");
        assert_string_equal(w->secret, SECRET);
        assert_null(w->prefix);
        assert_null(w->tag);
        assert_null(w->ca_file);
        assert_int_equal(w->timeout_sec, 10);
        m = c->integrations[1];
        assert_string_equal(m->name, "aws_iot");
        assert_int_equal(m->kind, INTEGRATION_MQTT);
        assert_int_equal(m->port, 8883); /* TLS */
        assert_int_equal(m->qos, 0);
        assert_int_equal(m->protocol, 5);
        assert_string_equal(m->prefix, "temp");
        assert_string_equal(m->tag, "site=berlin");
        assert_string_equal(m->topic, "tether/{device}/{event}");
        assert_string_equal(m->client_id, "tether-cloudd");
        assert_string_equal(m->subscribe, "tether/to-devices/#");
        assert_string_equal(m->inbound_prefix, "mqtt/");
        m2 = c->integrations[2];
        assert_int_equal(m2->port, 1884);
        assert_int_equal(m2->qos, 1);
        assert_int_equal(m2->protocol, 4);
        assert_string_equal(m2->topic, "x/{name}/{device}/{event}");
        assert_string_equal(m2->client_id, "me");
        assert_string_equal(m2->inbound_prefix, "in/");
        assert_string_equal(m2->user, "u");
        assert_null(m2->subscribe);
        c = cloud_config_free(c);

        /* Defaults: 1883 without TLS; the client ID from the node's name. */
        assert_int_equal(load("[Cluster]\nNATS=nats://a:1\nNode=n7\n[MQTTBridge b]\nHost=h\nPrefix=\n", &c), 0);
        assert_int_equal(c->integrations[0]->port, 1883);
        assert_string_equal(c->integrations[0]->client_id, "tether-n7");
        assert_string_equal(c->integrations[0]->prefix, "");
        c = cloud_config_free(c);

        /* Loopback receivers may be plain HTTP. */
        static const char *const loopback[] = { "http://127.0.0.1:8080/x", "http://127.9.8.7/", "http://[::1]:9/h",
                                                "http://localhost/", "HTTP://LOCALHOST:1/", "https://[2001:db8::1]/" };
        for (size_t i = 0; i < ELEMENTSOF(loopback); i++) {
                char text[256];

                snprintf(text, sizeof(text), "[Webhook w]\nURL=%s\nSecret=" SECRET "\n", loopback[i]);
                assert_int_equal(load(text, &c), 0);
                c = cloud_config_free(c);
        }
}

static void test_integrations_bad(void **state) {
        /* The base file has 6 lines: the first of "extra" is line 7. */
        expect_logged("[Webhook]\nURL=https://a/\n", "cloud.conf:8: [Webhook] needs a name");
        expect_logged("[Webhook a.b]\nURL=https://a/\n", "cloud.conf:8: Invalid name 'a.b' in [Webhook a.b]");
        expect_logged("[Webhook a]\nURL=https://a/\nSecret=" SECRET "\n[MQTTBridge a]\nHost=h\n",
                      "cloud.conf:11: Duplicate integration name 'a' in [MQTTBridge a] (first at line 8)");
        expect_logged("[Webhook a]\nURL=https://a/\nSecret=" SECRET "\n[Cloud]\nPingSec=5\n[Webhook a]\nTimeout=3\n",
                      "Duplicate integration name 'a'");
        expect_logged("[Webhook a]\nURL=https://a/\nSecret=" SECRET "\nTimeout=0\n",
                      "cloud.conf:10: Invalid value '0' for Timeout= in [Webhook a] (expected 1..300)");
        expect_logged("[Webhook a]\nURL=https://a/\nSecret=" SECRET "\nTimeout=301\n", "Timeout=");
        expect_logged("[Webhook a]\nURL=\n", "cloud.conf:8: Empty value for URL= in [Webhook a]");
        expect_logged("[Webhook a]\nSecret=" SECRET "\n", "cloud.conf:8: [Webhook a] URL= is required");
        expect_logged("[Webhook a]\nURL=https://a/\n", "cloud.conf:8: [Webhook a] Secret= is required");
        expect_logged("[Webhook a]\nURL=https://a/\nSecret=short\n", "Secret= must be 16 to 256 bytes, not 5");
        expect_logged("[Webhook a]\nURL=http://example.com/\nSecret=" SECRET "\n",
                      "[Webhook a] URL= must be https://, or http:// to a loopback address");
        expect_logged("[Webhook a]\nURL=http://128.0.0.1/\nSecret=" SECRET "\n", "URL= must be https://");
        expect_logged("[Webhook a]\nURL=http://localhost.example.com/\nSecret=" SECRET "\n", "URL= must be https://");
        expect_logged("[Webhook a]\nURL=ftp://a/\nSecret=" SECRET "\n", "URL= must be https://");
        expect_logged("[Webhook a]\nURL=not a url\nSecret=" SECRET "\n", "URL= is not a URL");
        expect_logged("[Webhook a]\nURL=https://\nSecret=" SECRET "\n", "URL= is not a URL");
        expect_logged("[Webhook a]\nURL=https://a/\nSecret=" SECRET "\nTag==x\n", "Tag= must be KEY or KEY=VALUE");
        expect_logged("[Webhook a]\nURL=https://a/\nSecret=" SECRET "\nTag=a b\n", "Tag= must be KEY");
        expect_logged("[Webhook a]\nURL=https://a/\nSecret=" SECRET "\nPrefix=a//b\n", "Prefix= must be");
        expect_logged("[MQTTBridge m]\nPort=1\n", "cloud.conf:8: [MQTTBridge m] Host= is required");
        expect_logged("[MQTTBridge m]\nHost=h\nPort=0\n", "Invalid value '0' for Port=");
        expect_logged("[MQTTBridge m]\nHost=h\nQoS=2\n", "cloud.conf:9: Invalid value '2' for QoS=");
        expect_logged("[MQTTBridge m]\nHost=h\nProtocol=3.1\n",
                      "cloud.conf:9: Invalid value '3.1' for Protocol= in [MQTTBridge m] (expected 3.1.1 or 5)");
        expect_logged("[MQTTBridge m]\nHost=h\nCAFile=/ca\nCertFile=/c\n", "CertFile= and KeyFile= go together");
        expect_logged("[MQTTBridge m]\nHost=h\nCertFile=/c\nKeyFile=/k\n", "CertFile= needs CAFile=");
        expect_logged("[MQTTBridge m]\nHost=h\nPassword=p\n", "Password= needs User=");
        {
                /* A user name alone: Azure IoT Hub with X.509. */
                CloudConfig *c = NULL;

                assert_int_equal(load("[MQTTBridge az]\nHost=h\nUser=hub/dev/?api-version=2021-04-12\n", &c), 0);
                assert_int_equal(c->n_integrations, 1);
                assert_null(c->integrations[0]->password);
                c = cloud_config_free(c);
        }
        expect_logged("[MQTTBridge m]\nHost=h\nTopic=a/{devices}\n", "Topic= may hold only {device}");
        expect_logged("[MQTTBridge m]\nHost=h\nTopic=a/+/b\n", "Topic= must not hold the wildcards");
        expect_logged("[MQTTBridge m]\nHost=h\nTopic=a/}\n", "Topic= has a '}'");
        expect_logged("[MQTTBridge m]\nHost=h\nSubscribe=a/#/b\n", "Subscribe= must be an MQTT topic filter");
        expect_logged("[MQTTBridge m]\nHost=h\nSubscribe=a/b+\n", "Subscribe= must be an MQTT topic filter");
        expect_logged("[MQTTBridge m]\nHost=h\nInboundPrefix=tether/x/\n", "InboundPrefix= must not be under");
        /* libinih cuts section names at 49 bytes: refused, not cut. */
        expect_logged("[MQTTBridge m1234567890123456789012345678901234567]\nHost=h\n",
                      "cloud.conf:8: Section [MQTTBridge m1234567890123456789012345678901234567...] is too long: "
                      "the names of [MQTTBridge] sections are at most 37 bytes");
        /* A key of the other kind is unknown here: a warning. */
        {
                _cleanup_free_ char *log = NULL;
                CloudConfig *c = NULL;

                assert_int_equal(load_logged("[MQTTBridge m]\nHost=h\nURL=https://a/\n", &c, &log), 0);
                assert_non_null(strstr(log, "cloud.conf:9: Unknown key URL= in [MQTTBridge m], ignoring."));
                cloud_config_free(c);
        }
        /* Every bad section is logged, not only the first. */
        expect_logged("[Webhook a]\nURL=https://a/\n[Webhook b]\nURL=https://b/\n", "[Webhook b] Secret= is required");
}

static void test_integrations_limit(void **state) {
        _cleanup_free_ char *text = NULL;
        CloudConfig *c = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&text, &len);

        assert_non_null(f);
        for (unsigned i = 0; i < CLOUD_INTEGRATIONS_MAX; i++)
                fprintf(f, "[MQTTBridge m%u]\nHost=h\n", i);
        fflush(f);
        assert_int_equal(load(text, &c), 0);
        assert_int_equal(c->n_integrations, CLOUD_INTEGRATIONS_MAX);
        c = cloud_config_free(c);
        fprintf(f, "[MQTTBridge one-more]\nHost=h\n");
        fclose(f);
        expect_logged(text, "More than 64 integrations");
}

/* integration_config_check() as the API uses it. */
static void test_integration_config_check(void **state) {
        IntegrationConfig ic = {
                .name = (char *)"api-hook",
                .kind = INTEGRATION_WEBHOOK,
                .from_api = true,
                .url = (char *)"https://example.com/h",
                .secret = (char *)SECRET,
                .timeout_sec = 10,
        };
        char err[INTEGRATION_ERROR_MAX];
        char long_secret[INTEGRATION_SECRET_MAX + 2];

        assert_int_equal(integration_config_check(&ic, err), 0);
        ic.name = (char *)"";
        assert_int_equal(integration_config_check(&ic, err), -EINVAL);
        assert_non_null(strstr(err, "Invalid integration name ''"));
        ic.name = (char *)"x";
        memset(long_secret, 's', sizeof(long_secret) - 1);
        long_secret[sizeof(long_secret) - 1] = 0;
        ic.secret = long_secret;
        assert_int_equal(integration_config_check(&ic, err), -EINVAL);
        assert_non_null(strstr(err, "Secret= must be 16 to 256 bytes, not 257"));
        long_secret[INTEGRATION_SECRET_MAX] = 0;
        assert_int_equal(integration_config_check(&ic, err), 0);
        /* SSRF: only https://, or http:// to a loopback address named as
         * such (no name that DNS could point anywhere), no other scheme. */
        {
                static const char *const refused[] = {
                        "file:///etc/passwd", "gopher://127.0.0.1:25/x", "ftp://127.0.0.1/", "dict://127.0.0.1/",
                        "http://10.0.0.1/", "http://169.254.169.254/latest/meta-data/",
                        "http://127.0.0.1@evil.example/", "http://localhost.evil.example/",
                        "http://evil.example/#@127.0.0.1/", "https://h/\r\nX-Evil: 1", "https://h/a b",
                        "http://[::ffff:10.0.0.1]/",
                };

                for (size_t i = 0; i < ELEMENTSOF(refused); i++) {
                        ic.url = (char *)refused[i];
                        assert_int_equal(integration_config_check(&ic, err), -EINVAL);
                }
                ic.url = (char *)"http://127.0.0.2:8080/h";
                assert_int_equal(integration_config_check(&ic, err), 0);
                ic.url = (char *)"http://[::1]/h";
                assert_int_equal(integration_config_check(&ic, err), 0);
                /* A refused URL's credentials are not in the text (it is
                 * logged for the file). */
                ic.url = (char *)"https://user:hunter2-password@/h";
                assert_int_equal(integration_config_check(&ic, err), -EINVAL);
                assert_null(strstr(err, "hunter2"));
                ic.url = (char *)"https://example.com/h";
        }
        ic.host = (char *)"h";
        assert_int_equal(integration_config_check(&ic, err), -EINVAL);
        assert_non_null(strstr(err, "A webhook takes only"));
        ic = (IntegrationConfig){ .name = (char *)"m1234567890123456789012345678901234567890123456789012345678",
                                  .kind = INTEGRATION_MQTT, .host = (char *)"h", .port = 1883, .qos = 1,
                                  .protocol = 4, .topic = (char *)"t/{device}", .client_id = (char *)"c",
                                  .inbound_prefix = (char *)"mqtt/", .subscribe = (char *)"a/#" };
        assert_int_equal(integration_config_check(&ic, err), 0);
        ic.name = (char *)"m12345678901234567890123456789012345678901234567890123456789";
        assert_int_equal(integration_config_check(&ic, err), -EINVAL);
        assert_non_null(strstr(err, "With Subscribe=, the name must be at most 59 bytes"));
        ic.subscribe = NULL;
        assert_int_equal(integration_config_check(&ic, err), 0);
        assert_true(integration_name_valid("A-z_09"));
        assert_false(integration_name_valid("a b"));
        assert_false(integration_name_valid(NULL));
}

int main(int argc, char **argv) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_defaults),
                cmocka_unit_test(test_values),
                cmocka_unit_test(test_bad_values),
                cmocka_unit_test(test_long_lines),
                cmocka_unit_test(test_required),
                cmocka_unit_test(test_unknown_keys_only_warn),
                cmocka_unit_test(test_token_file),
                cmocka_unit_test(test_token_file_empty_refuses_everything),
                cmocka_unit_test(test_token_file_errors),
                cmocka_unit_test(test_token_file_limit),
                cmocka_unit_test(test_argv),
                cmocka_unit_test(test_resolve_address),
                cmocka_unit_test(test_cluster),
                cmocka_unit_test(test_integrations),
                cmocka_unit_test(test_integrations_bad),
                cmocka_unit_test(test_integrations_limit),
                cmocka_unit_test(test_integration_config_check),
        };

        /* One test, or those a glob matches: test-foo NAME (HACKING.md). */
        if (argc > 1)
                cmocka_set_test_filter(argv[1]);
        return cmocka_run_group_tests(tests, setup, teardown);
}
