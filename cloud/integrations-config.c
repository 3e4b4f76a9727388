/* SPDX-License-Identifier: Apache-2.0 */
/* The configuration of one outbound integration (integrations.h): the
 * checks shared by the configuration file (config.c) and the API. Pure:
 * no logging, no state. URLs are taken apart by libcurl's parser
 * (curl_url()), MQTT topic filters checked by libmosquitto's. */
#include <arpa/inet.h>
#include <curl/curl.h>
#include <mosquitto.h>
#include <openssl/crypto.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "integrations.h"
#include "proto.h"
#include "util.h"

#define INTEGRATION_URL_MAX 2048
#define INTEGRATION_TAG_VALUE_MAX 256
#define INTEGRATION_TEXT_MAX 1024 /* Host=, ClientID=, User=, Password=, Topic=, Subscribe=, file names */

static void cleanse_free(char *s) {
        if (s)
                OPENSSL_cleanse(s, strlen(s));
        free(s);
}

IntegrationConfig *integration_config_free(IntegrationConfig *c) {
        if (!c)
                return NULL;
        free(c->name);
        free(c->prefix);
        free(c->tag);
        free(c->url);
        cleanse_free(c->secret);
        free(c->ca_file);
        free(c->host);
        free(c->cert_file);
        free(c->key_file);
        free(c->client_id);
        free(c->user);
        cleanse_free(c->password);
        free(c->topic);
        free(c->subscribe);
        free(c->inbound_prefix);
        free(c);
        return NULL;
}

static int dup_str(const char *s, char **ret) {
        if (s && !(*ret = strdup(s)))
                return -ENOMEM;
        return 0;
}

int integration_config_dup(const IntegrationConfig *c, IntegrationConfig **ret) {
        _cleanup_(integration_config_freep) IntegrationConfig *d = calloc(1, sizeof(*d));

        if (!d)
                return -ENOMEM;
        *d = (IntegrationConfig){ .kind = c->kind, .from_api = c->from_api, .timeout_sec = c->timeout_sec,
                                  .port = c->port, .qos = c->qos, .protocol = c->protocol };
        if (dup_str(c->name, &d->name) < 0 || dup_str(c->prefix, &d->prefix) < 0 || dup_str(c->tag, &d->tag) < 0 ||
            dup_str(c->url, &d->url) < 0 || dup_str(c->secret, &d->secret) < 0 ||
            dup_str(c->ca_file, &d->ca_file) < 0 || dup_str(c->host, &d->host) < 0 ||
            dup_str(c->cert_file, &d->cert_file) < 0 || dup_str(c->key_file, &d->key_file) < 0 ||
            dup_str(c->client_id, &d->client_id) < 0 || dup_str(c->user, &d->user) < 0 ||
            dup_str(c->password, &d->password) < 0 || dup_str(c->topic, &d->topic) < 0 ||
            dup_str(c->subscribe, &d->subscribe) < 0 || dup_str(c->inbound_prefix, &d->inbound_prefix) < 0)
                return -ENOMEM;
        *ret = TAKE_PTR(d);
        return 0;
}

static int fail(char err[static INTEGRATION_ERROR_MAX], const char *fmt, ...) _printf_(2, 3);
static int fail(char err[static INTEGRATION_ERROR_MAX], const char *fmt, ...) {
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(err, INTEGRATION_ERROR_MAX, fmt, ap);
        va_end(ap);
        return -EINVAL;
}

bool integration_name_valid(const char *s) {
        size_t n = s ? strlen(s) : 0;

        if (n == 0 || n > INTEGRATION_NAME_MAX)
                return false;
        for (; *s; s++)
                if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') || *s == '_' ||
                      *s == '-'))
                        return false;
        return true;
}

/* Printable UTF-8 of at most max bytes: no control characters. */
static bool text_valid(const char *s, size_t max) {
        size_t n = strlen(s);

        if (n == 0 || n > max || proto_utf8_check(s, n) < 0)
                return false;
        for (size_t i = 0; i < n; i++)
                if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f)
                        return false;
        return true;
}

/* KEY or KEY=VALUE, as a token's tag restriction (docs/cloud.md). */
static bool tag_valid(const char *s) {
        const char *eq = strchr(s, '=');
        size_t n = eq ? (size_t)(eq - s) : strlen(s);

        if (proto_name_check(s, n, PROTO_NAME_FUNCTION) < 0)
                return false;
        return !eq || !eq[1] || text_valid(eq + 1, INTEGRATION_TAG_VALUE_MAX);
}

/* A loopback host as libcurl's parser gives it: 127.0.0.0/8, [::1] or
 * localhost. */
static bool host_loopback(const char *host) {
        struct in_addr a4;
        struct in6_addr a6;
        char buf[64];
        size_t n = strlen(host);

        if (strcasecmp(host, "localhost") == 0)
                return true;
        if (inet_pton(AF_INET, host, &a4) == 1)
                return (ntohl(a4.s_addr) >> 24) == 127;
        if (n >= 2 && n < sizeof(buf) && host[0] == '[' && host[n - 1] == ']') {
                memcpy(buf, host + 1, n - 2);
                buf[n - 2] = 0;
                return inet_pton(AF_INET6, buf, &a6) == 1 && IN6_IS_ADDR_LOOPBACK(&a6);
        }
        return false;
}

static int check_url(const char *url, char err[static INTEGRATION_ERROR_MAX]) {
        static const char rule[] = "URL= must be https://, or http:// to a loopback address (127.0.0.0/8, [::1], "
                                   "localhost)";
        CURLU *u = NULL;
        char *scheme = NULL, *host = NULL;
        int r = 0;

        if (!url)
                return fail(err, "URL= is required.");
        if (strlen(url) > INTEGRATION_URL_MAX || !text_valid(url, INTEGRATION_URL_MAX) || strchr(url, ' '))
                return fail(err, "URL= is not a URL (at most %u bytes, no spaces or control characters).",
                            INTEGRATION_URL_MAX);
        u = curl_url();
        if (!u)
                return -ENOMEM;
        if (curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK ||
            curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
            curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK || !host[0])
                /* Not echoed: it may hold a user:password, and the file's
                 * errors are logged. */
                r = fail(err, "URL= is not a URL with a host.");
        else if (strcasecmp(scheme, "https") != 0 && !(strcasecmp(scheme, "http") == 0 && host_loopback(host)))
                r = fail(err, "%s.", rule);
        curl_free(scheme);
        curl_free(host);
        curl_url_cleanup(u);
        return r;
}

/* Topic=: a topic for publishing with {device}, {event} and {name} in it,
 * no wildcards. */
static int check_topic(const char *t, char err[static INTEGRATION_ERROR_MAX]) {
        static const char *const fields[] = { "{device}", "{event}", "{name}" };

        if (!text_valid(t, INTEGRATION_TEXT_MAX))
                return fail(err, "Topic= must be 1 to %u bytes of UTF-8 without control characters.",
                            INTEGRATION_TEXT_MAX);
        for (const char *p = t; *p;) {
                bool known = false;

                if (*p == '+' || *p == '#')
                        return fail(err, "Topic= must not hold the wildcards + or #.");
                if (*p == '}')
                        return fail(err, "Topic= has a '}' without '{': only {device}, {event} and {name} are "
                                         "replaced.");
                if (*p != '{') {
                        p++;
                        continue;
                }
                for (size_t i = 0; i < ELEMENTSOF(fields) && !known; i++)
                        if (startswith(p, fields[i])) {
                                p += strlen(fields[i]);
                                known = true;
                        }
                if (!known)
                        return fail(err, "Topic= may hold only {device}, {event} and {name}, not '%.20s'.", p);
        }
        return 0;
}

static int check_common(const IntegrationConfig *c, char err[static INTEGRATION_ERROR_MAX]) {
        if (!integration_name_valid(c->name))
                return fail(err, "Invalid integration name '%.64s' (expected 1 to %u of A-Z a-z 0-9 _ -).",
                            c->name ?: "", INTEGRATION_NAME_MAX);
        if (c->prefix && c->prefix[0] &&
            proto_name_check(c->prefix, strlen(c->prefix), PROTO_NAME_PREFIX) < 0)
                return fail(err, "Prefix= must be an event name prefix (A-Z a-z 0-9 _ . - /, at most %u bytes).",
                            TETHER_EVENT_NAME_MAX);
        if (c->tag && !tag_valid(c->tag))
                return fail(err, "Tag= must be KEY or KEY=VALUE (KEY: 1 to 64 of A-Z a-z 0-9 _ . -; VALUE: at most "
                                 "%u bytes of text).",
                            INTEGRATION_TAG_VALUE_MAX);
        if (c->ca_file && !text_valid(c->ca_file, INTEGRATION_TEXT_MAX))
                return fail(err, "CAFile= is not a file name.");
        return 0;
}

static int check_webhook(const IntegrationConfig *c, char err[static INTEGRATION_ERROR_MAX]) {
        size_t n;
        int r;

        r = check_url(c->url, err);
        if (r < 0)
                return r;
        if (!c->secret)
                return fail(err, "Secret= is required (%u to %u bytes).", INTEGRATION_SECRET_MIN,
                            INTEGRATION_SECRET_MAX);
        n = strlen(c->secret);
        if (n < INTEGRATION_SECRET_MIN || n > INTEGRATION_SECRET_MAX)
                return fail(err, "Secret= must be %u to %u bytes, not %zu.", INTEGRATION_SECRET_MIN,
                            INTEGRATION_SECRET_MAX, n);
        if (c->timeout_sec < 1 || c->timeout_sec > 300)
                return fail(err, "Timeout= must be 1..300 seconds.");
        if (c->host || c->cert_file || c->key_file || c->client_id || c->user || c->password || c->topic ||
            c->subscribe || c->inbound_prefix)
                return fail(err, "A webhook takes only URL=, Secret=, Prefix=, Tag=, CAFile= and Timeout=.");
        return 0;
}

static int check_mqtt(const IntegrationConfig *c, char err[static INTEGRATION_ERROR_MAX]) {
        int r;

        if (!c->host)
                return fail(err, "Host= is required.");
        if (!text_valid(c->host, 255) || strpbrk(c->host, " /"))
                return fail(err, "Host= must be a host name or address.");
        if (c->port < 1 || c->port > 65535)
                return fail(err, "Port= must be 1..65535.");
        if (!c->cert_file != !c->key_file)
                return fail(err, "CertFile= and KeyFile= go together.");
        if (c->cert_file && !c->ca_file)
                return fail(err, "CertFile= needs CAFile= (TLS is on only with CAFile=).");
        if ((c->cert_file && !text_valid(c->cert_file, INTEGRATION_TEXT_MAX)) ||
            (c->key_file && !text_valid(c->key_file, INTEGRATION_TEXT_MAX)))
                return fail(err, "CertFile= and KeyFile= must be file names.");
        /* A user name alone is fine (Azure IoT Hub with X.509); MQTT has
         * no password without a user name. */
        if (c->password && !c->user)
                return fail(err, "Password= needs User=.");
        if ((c->user && !text_valid(c->user, INTEGRATION_TEXT_MAX)) ||
            (c->password && !text_valid(c->password, INTEGRATION_TEXT_MAX)))
                return fail(err, "User= and Password= must be 1 to %u bytes of text.", INTEGRATION_TEXT_MAX);
        /* MQTT 3.1.1 allows 1..23 characters; brokers take more, 5 too. */
        if (!c->client_id || !text_valid(c->client_id, 256))
                return fail(err, "ClientID= must be 1 to 256 bytes of text.");
        if (!c->topic)
                return fail(err, "Topic= is required.");
        r = check_topic(c->topic, err);
        if (r < 0)
                return r;
        if (c->qos > 1)
                return fail(err, "QoS= must be 0 or 1.");
        if (c->protocol != 4 && c->protocol != 5)
                return fail(err, "Protocol= must be 3.1.1 or 5.");
        if (c->subscribe) {
                /* Inbound events come from "mqtt:NAME", a coreid of at
                 * most PROTO_DEVICE_ID_MAX bytes (the journal's limit). */
                if (strlen(c->name) + strlen("mqtt:") > PROTO_DEVICE_ID_MAX)
                        return fail(err, "With Subscribe=, the name must be at most %zu bytes.",
                                    PROTO_DEVICE_ID_MAX - strlen("mqtt:"));
                if (!text_valid(c->subscribe, INTEGRATION_TEXT_MAX) ||
                    mosquitto_sub_topic_check(c->subscribe) != MOSQ_ERR_SUCCESS)
                        return fail(err, "Subscribe= must be an MQTT topic filter ('+' and '#' only as whole levels, "
                                         "'#' last).");
        }
        if (!c->inbound_prefix || !c->inbound_prefix[0] ||
            proto_name_check(c->inbound_prefix, strlen(c->inbound_prefix), PROTO_NAME_PREFIX) < 0 ||
            strlen(c->inbound_prefix) >= TETHER_EVENT_NAME_MAX)
                return fail(err, "InboundPrefix= must be a non-empty event name prefix (A-Z a-z 0-9 _ . - /).");
        if (proto_event_name_reserved(c->inbound_prefix, false))
                return fail(err, "InboundPrefix= must not be under '%s' (the cloud's own events).",
                            PROTO_EVENT_CLOUD_PREFIX);
        if (c->url || c->secret || c->timeout_sec)
                return fail(err, "An MQTT bridge takes no URL=, Secret= or Timeout=.");
        return 0;
}

int integration_config_check(const IntegrationConfig *c, char err[static INTEGRATION_ERROR_MAX]) {
        int r;

        err[0] = 0;
        r = check_common(c, err);
        if (r < 0)
                return r;
        switch (c->kind) {
        case INTEGRATION_WEBHOOK:
                return check_webhook(c, err);
        case INTEGRATION_MQTT:
                return check_mqtt(c, err);
        }
        return fail(err, "Unknown kind of integration.");
}
