/* SPDX-License-Identifier: Apache-2.0 */
/* The API's webhook requests (api.h, docs/integrations.md "API and CLI"):
 * GET/POST /v1/webhooks, GET/DELETE /v1/webhooks/NAME, GET
 * /v1/integrations. The parameters are checked here and by
 * integration_config_check() (the configuration file's checks and texts);
 * the rows are webhooks.c's, the running webhooks the Integrations'.
 * A webhook's secret is in the answer to its creation only, never in a
 * listing, a log line or the audit log. Every answer is a status and a
 * JSON body; nothing here logs but what the modules it calls log. */
#include "config.h"

#include <errno.h>
#include <microhttpd.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api-request.h"
#include "api.h"
#include "integrations.h"
#include "util.h"
#include "webhooks.h"

#define API_WEBHOOK_SECRET_BYTES 32 /* a generated secret: 64 hex digits */
#define API_WEBHOOK_TIMEOUT_DEFAULT 10

/* The integrations of kind (NULL: all) named name (NULL: all), with the
 * rows' creation time and creator: a new array, NULL on OOM or when the
 * table cannot be read. */
static json_t *api_integrations_array(Integrations *s, Store *store, const char *kind, const char *name) {
        json_t *a = s ? integrations_json(s, kind, name) : json_array();

        if (a && webhooks_annotate(store, a) < 0) {
                json_decref(a);
                return NULL;
        }
        return a;
}

/* Whether an integration of any kind is named name on this node: 1, 0,
 * or -ENOMEM; *ret_config: it is one from the configuration file. */
static int api_integration_known(Integrations *s, const char *name, bool *ret_config) {
        json_t *a = s ? integrations_json(s, NULL, name) : json_array(), *o;
        int r;

        if (!a)
                return -ENOMEM;
        o = json_array_get(a, 0);
        r = o != NULL;
        *ret_config = o && !streq(json_string_value(json_object_get(o, "source")) ?: "", "api");
        json_decref(a);
        return r;
}

unsigned api_integrations_list(Integrations *s, Store *store, const char *kind, json_t **ret_body) {
        json_t *a = api_integrations_array(s, store, kind, NULL);

        if (!a)
                return api_fail(ret_body, MHD_HTTP_SERVICE_UNAVAILABLE, "Cannot list the integrations now");
        *ret_body = a;
        return MHD_HTTP_OK;
}

unsigned api_webhook_get(Integrations *s, Store *store, const char *name, json_t **ret_body) {
        json_t *a, *o;

        if (strlen(name) > INTEGRATION_NAME_MAX)
                return api_fail(ret_body, MHD_HTTP_NOT_FOUND, "No webhook with this name");
        a = api_integrations_array(s, store, "webhook", name);
        if (!a)
                return api_fail(ret_body, MHD_HTTP_SERVICE_UNAVAILABLE, "Cannot read the webhooks now");
        o = json_incref(json_array_get(a, 0));
        json_decref(a);
        if (!o)
                return api_fail(ret_body, MHD_HTTP_NOT_FOUND, "No webhook with this name");
        *ret_body = o;
        return MHD_HTTP_OK;
}

/* Parameter key as text into *ret (a copy; NULL when absent, null or
 * ""): 0, or -EINVAL with the answer set (not text, not UTF-8, control
 * characters, a NUL byte), -ENOMEM. A form's values are strings; in JSON
 * only strings are text here. */
static int api_text(json_t *params, const char *key, char **ret, json_t **ret_body, unsigned *ret_status) {
        json_t *v = json_object_get(params, key);
        const char *s;
        size_t len;

        *ret = NULL;
        if (!v || json_is_null(v))
                return 0;
        if (!json_is_string(v)) {
                *ret_status = api_fail(ret_body, MHD_HTTP_BAD_REQUEST, "\"%s\" must be text", key);
                return -EINVAL;
        }
        s = json_string_value(v);
        len = json_string_length(v);
        if (memchr(s, 0, len) || proto_utf8_check(s, len) < 0) {
                *ret_status = api_fail(ret_body, MHD_HTTP_BAD_REQUEST, "\"%s\" must be UTF-8 text without NUL bytes",
                                       key);
                return -EINVAL;
        }
        if (len == 0)
                return 0;
        *ret = strdup(s);
        return *ret ? 0 : -ENOMEM;
}

/* timeout: whole seconds as a JSON integer or a decimal string; anything
 * else becomes 0, which integration_config_check() refuses with the text
 * of Timeout= in the file. */
static unsigned api_timeout(json_t *v) {
        const char *s;
        char *end;
        unsigned long n;

        if (!v || json_is_null(v))
                return API_WEBHOOK_TIMEOUT_DEFAULT;
        if (json_is_integer(v))
                return json_integer_value(v) >= 1 && json_integer_value(v) <= 300 ? (unsigned)json_integer_value(v)
                                                                                   : 0;
        if (!json_is_string(v))
                return 0;
        s = json_string_value(v);
        if (!(*s >= '0' && *s <= '9') || strlen(s) != json_string_length(v) || strlen(s) > 3)
                return 0;
        n = strtoul(s, &end, 10);
        return *end || n > 300 ? 0 : (unsigned)n;
}

/* A name for a webhook created without one, not in use on this node nor
 * in the table: "hook-" and 8 hex digits. */
static int api_webhook_name(Integrations *s, Store *store, char **ret) {
        for (unsigned attempt = 0; attempt < 8; attempt++) {
                _cleanup_(integration_config_freep) IntegrationConfig *row = NULL;
                char name[sizeof("hook-") + 8];
                uint8_t rnd[4];
                bool config;
                int r;

                if (RAND_bytes(rnd, sizeof(rnd)) != 1)
                        return -EIO;
                memcpy(name, "hook-", 5);
                hex_encode(rnd, sizeof(rnd), name + 5);
                r = api_integration_known(s, name, &config);
                if (r < 0)
                        return r;
                if (r > 0)
                        continue;
                r = webhooks_get(store, name, &row);
                if (r == 0)
                        continue;
                if (r != -ENOENT)
                        return r;
                *ret = strdup(name);
                return *ret ? 0 : -ENOMEM;
        }
        return -EEXIST;
}

unsigned api_webhooks_create(Integrations *s, Store *store, json_t *params, const char *actor,
                             char ret_name[static INTEGRATION_NAME_MAX + 1], json_t **ret_body) {
        static const char *const known[] = { "name", "url", "prefix", "event", "tag", "secret", "timeout",
                                             "access_token" };
        _cleanup_(integration_config_freep) IntegrationConfig *c = NULL;
        char err[INTEGRATION_ERROR_MAX], *secret = NULL;
        unsigned status = 0;
        const char *key;
        json_t *v, *a, *o;
        bool config;
        int r;

        if (!s)
                return api_fail(ret_body, MHD_HTTP_SERVICE_UNAVAILABLE, "The integrations are not running");
        json_object_foreach(params, key, v) {
                bool ok = false;

                for (size_t i = 0; i < ELEMENTSOF(known); i++)
                        ok |= streq(key, known[i]);
                if (!ok)
                        return api_fail(ret_body, MHD_HTTP_BAD_REQUEST,
                                        "Unknown parameter (known: name, url, prefix or event, tag, secret, "
                                        "timeout)");
        }
        if (json_object_get(params, "prefix") && json_object_get(params, "event"))
                return api_fail(ret_body, MHD_HTTP_BAD_REQUEST,
                                "Give \"prefix\" or \"event\" (the same, as Particle names it), not both");
        c = calloc(1, sizeof(*c));
        if (!c)
                goto oom;
        c->kind = INTEGRATION_WEBHOOK;
        c->from_api = true;
        r = api_text(params, "name", &c->name, ret_body, &status);
        if (r == 0)
                r = api_text(params, "url", &c->url, ret_body, &status);
        if (r == 0)
                r = api_text(params, json_object_get(params, "event") ? "event" : "prefix", &c->prefix, ret_body,
                             &status);
        if (r == 0)
                r = api_text(params, "tag", &c->tag, ret_body, &status);
        if (r == 0)
                r = api_text(params, "secret", &c->secret, ret_body, &status);
        if (r == -ENOMEM)
                goto oom;
        if (r < 0)
                return status;
        c->timeout_sec = api_timeout(json_object_get(params, "timeout"));
        if (!c->secret) {
                uint8_t rnd[API_WEBHOOK_SECRET_BYTES];

                c->secret = malloc(2 * API_WEBHOOK_SECRET_BYTES + 1);
                if (!c->secret)
                        goto oom;
                if (RAND_bytes(rnd, sizeof(rnd)) != 1)
                        return api_fail(ret_body, MHD_HTTP_SERVICE_UNAVAILABLE, "Cannot make a secret now");
                hex_encode(rnd, sizeof(rnd), c->secret);
                OPENSSL_cleanse(rnd, sizeof(rnd));
        }
        if (!c->name) {
                r = api_webhook_name(s, store, &c->name);
                if (r == -ENOMEM)
                        goto oom;
                if (r < 0)
                        return api_fail(ret_body, MHD_HTTP_SERVICE_UNAVAILABLE, "Cannot name the webhook now: %s",
                                        strerror(-r));
        }
        if (integration_config_check(c, err) < 0)
                return api_fail(ret_body, MHD_HTTP_BAD_REQUEST, "%s", err[0] ? err : "Invalid webhook");
        r = api_integration_known(s, c->name, &config);
        if (r < 0)
                goto oom;
        if (r > 0)
                return api_fail(ret_body, MHD_HTTP_CONFLICT, "An integration named '%s' exists already%s", c->name,
                                config ? " (in the configuration file)" : "");
        r = webhooks_create(store, c, actor);
        if (r == -EEXIST)
                return api_fail(ret_body, MHD_HTTP_CONFLICT, "A webhook named '%s' exists already", c->name);
        if (r < 0)
                return api_fail(ret_body, MHD_HTTP_SERVICE_UNAVAILABLE, "Cannot store the webhook now: %s",
                                strerror(-r));
        snprintf(ret_name, INTEGRATION_NAME_MAX + 1, "%s", c->name);
        secret = strdup(c->secret);
        if (!secret) {
                (void)webhooks_delete(store, ret_name);
                goto oom;
        }
        r = integrations_add(s, TAKE_PTR(c), err);
        if (r < 0) {
                /* Not running: not kept either. */
                (void)webhooks_delete(store, ret_name);
                OPENSSL_clear_free(secret, strlen(secret));
                ret_name[0] = 0;
                if (r == -EEXIST)
                        return api_fail(ret_body, MHD_HTTP_CONFLICT, "An integration with this name exists already");
                if (r == -EINVAL)
                        return api_fail(ret_body, MHD_HTTP_BAD_REQUEST, "%s", err[0] ? err : "Invalid webhook");
                if (r == -ENOSPC)
                        return api_fail(ret_body, MHD_HTTP_CONFLICT, "%s", err);
                return api_fail(ret_body, MHD_HTTP_SERVICE_UNAVAILABLE, "Cannot start the webhook now: %s",
                                strerror(-r));
        }
        a = api_integrations_array(s, store, "webhook", ret_name);
        o = json_incref(json_array_get(a, 0));
        json_decref(a);
        if (!o)
                o = json_pack("{s:s, s:s, s:s}", "name", ret_name, "kind", "webhook", "source", "api");
        if (!o || json_object_set_new(o, "secret", json_string(secret)) < 0 ||
            json_object_set_new(o, "ok", json_true()) < 0) {
                json_decref(o);
                o = NULL;
        }
        OPENSSL_clear_free(secret, strlen(secret));
        /* NULL (OOM) after the webhook was made: the connection is closed,
         * the webhook runs; its secret is gone with the answer. */
        *ret_body = o;
        return MHD_HTTP_CREATED;
oom:
        *ret_body = NULL;
        return MHD_HTTP_INTERNAL_SERVER_ERROR;
}

unsigned api_webhooks_delete(Integrations *s, Store *store, const char *name, json_t **ret_body) {
        bool config = false;
        int known, r;

        if (strlen(name) > INTEGRATION_NAME_MAX)
                return api_fail(ret_body, MHD_HTTP_NOT_FOUND, "No webhook with this name");
        known = api_integration_known(s, name, &config);
        if (known < 0) {
                *ret_body = NULL;
                return MHD_HTTP_INTERNAL_SERVER_ERROR;
        }
        if (known > 0 && config)
                return api_fail(ret_body, MHD_HTTP_CONFLICT,
                                "The integration '%s' is from the configuration file: remove its section there and "
                                "restart tether-cloudd",
                                name);
        r = webhooks_delete(store, name);
        if (r == -ENOENT && !known)
                return api_fail(ret_body, MHD_HTTP_NOT_FOUND, "No webhook with this name");
        if (r < 0 && r != -ENOENT)
                return api_fail(ret_body, MHD_HTTP_SERVICE_UNAVAILABLE, "Cannot delete the webhook now: %s",
                                strerror(-r));
        if (s) {
                r = integrations_remove(s, name);
                if (r < 0 && r != -ENOENT)
                        return api_fail(ret_body, MHD_HTTP_SERVICE_UNAVAILABLE, "Cannot stop the webhook now: %s",
                                        strerror(-r));
        }
        *ret_body = json_pack("{s:b, s:s}", "ok", 1, "name", name);
        return MHD_HTTP_OK;
}
