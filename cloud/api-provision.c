/* SPDX-License-Identifier: Apache-2.0 */
/* The API's provisioning token requests (api.h, docs/cloud.md
 * "Provisioning tokens"): POST/GET /v1/provision, GET/DELETE
 * /v1/provision/ID. Parameters are checked here, each refusal naming the
 * field and its limit; the tokens themselves are provision.c's. Every
 * answer is a status and a JSON body; nothing here logs but what the
 * modules it calls log, and no answer but the creation's holds a token. */
#include "config.h"

#include <errno.h>
#include <microhttpd.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "api-request.h"
#include "api.h"
#include "proto.h"
#include "util.h"

/* A whole number from a JSON integer or a plain decimal string (what a
 * form holds): 0 or -EINVAL. */
static int api_whole(json_t *v, int64_t *ret) {
        const char *s;
        char *end;
        long long n;

        if (json_is_integer(v)) {
                *ret = (int64_t)json_integer_value(v);
                return 0;
        }
        if (!json_is_string(v))
                return -EINVAL;
        s = json_string_value(v);
        if (!*s || strlen(s) != json_string_length(v) || strlen(s) > 19 || !(*s >= '0' && *s <= '9'))
                return -EINVAL;
        errno = 0;
        n = strtoll(s, &end, 10);
        if (errno || *end)
                return -EINVAL;
        *ret = n;
        return 0;
}

unsigned api_provision_create(Provision *p, json_t *params, const char *actor,
                              char ret_id[static PROVISION_ID_MAX + 1], json_t **ret_body) {
        static const char *const known[] = { "name", "uses", "expires_in", "expires_at", "tags", "access_token" };
        char err[PROVISION_REASON_MAX], *secret = NULL;
        ProvisionSpec spec = { .name = "", .uses_max = 1, .created_by = actor };
        int64_t now = (int64_t)time(NULL), n;
        const char *key;
        json_t *v, *j;
        int r;

        json_object_foreach(params, key, v) {
                bool ok = false;

                for (size_t i = 0; i < ELEMENTSOF(known); i++)
                        ok |= streq(key, known[i]);
                if (!ok)
                        return api_fail(ret_body, MHD_HTTP_BAD_REQUEST,
                                        "Unknown parameter (known: uses, expires_in, expires_at, tags, name)");
        }
        v = json_object_get(params, "name");
        if (v && !json_is_null(v)) {
                const char *s = json_string_value(v);
                size_t len = json_string_length(v);
                bool clean = s && proto_utf8_check(s, len) == 0 && !memchr(s, 0, len);

                for (size_t i = 0; clean && i < len; i++)
                        clean = (unsigned char)s[i] >= 0x20 && s[i] != 0x7f &&
                                !((unsigned char)s[i] == 0xc2 && i + 1 < len && (unsigned char)s[i + 1] >= 0x80 &&
                                  (unsigned char)s[i + 1] <= 0x9f);
                if (!json_is_string(v) || len > PROVISION_NAME_MAX || !clean)
                        return api_fail(ret_body, MHD_HTTP_BAD_REQUEST,
                                        "\"name\" must be UTF-8 text of at most %u bytes without control characters",
                                        PROVISION_NAME_MAX);
                spec.name = s;
        }
        v = json_object_get(params, "uses");
        if (v && !json_is_null(v)) {
                if (api_whole(v, &n) < 0 || n < 1 || n > PROVISION_USES_MAX)
                        return api_fail(ret_body, MHD_HTTP_BAD_REQUEST,
                                        "\"uses\" must be a whole number from 1 to %u", PROVISION_USES_MAX);
                spec.uses_max = (uint32_t)n;
        }
        if (json_object_get(params, "expires_in") && json_object_get(params, "expires_at"))
                return api_fail(ret_body, MHD_HTTP_BAD_REQUEST, "Give \"expires_in\" or \"expires_at\", not both");
        spec.expires_at = now + PROVISION_LIFETIME_DEFAULT;
        if ((v = json_object_get(params, "expires_in"))) {
                if (api_whole(v, &n) < 0 || n < 1 || n > PROVISION_LIFETIME_MAX)
                        return api_fail(ret_body, MHD_HTTP_BAD_REQUEST,
                                        "\"expires_in\" must be whole seconds from 1 to %lld (10 years)",
                                        PROVISION_LIFETIME_MAX);
                spec.expires_at = now + n;
        } else if ((v = json_object_get(params, "expires_at"))) {
                if (!json_is_string(v) ||
                    api_parse_rfc3339(json_string_value(v), json_string_length(v), &spec.expires_at) < 0)
                        return api_fail(ret_body, MHD_HTTP_BAD_REQUEST,
                                        "\"expires_at\" must be an RFC 3339 time such as \"2030-01-31T12:00:00Z\"");
                if (spec.expires_at <= now || spec.expires_at > now + PROVISION_LIFETIME_MAX)
                        return api_fail(ret_body, MHD_HTTP_BAD_REQUEST,
                                        "\"expires_at\" must be in the future, at most %lld seconds (10 years) "
                                        "from now",
                                        PROVISION_LIFETIME_MAX);
        }
        v = json_object_get(params, "tags");
        if (json_is_string(v))
                return api_fail(ret_body, MHD_HTTP_BAD_REQUEST,
                                "\"tags\" must be a JSON object of names to text values (send the request as "
                                "application/json)");
        if (provision_tags_check(v, err) < 0)
                return api_fail(ret_body, MHD_HTTP_BAD_REQUEST, "%s", err);
        spec.tags = v;

        r = provision_create(p, &spec, &secret, &j);
        if (r == -EUSERS)
                return api_fail(ret_body, MHD_HTTP_CONFLICT,
                                "Too many live provisioning tokens (%u); revoke some first", PROVISION_LIVE_MAX);
        if (r == -EINVAL)
                return api_fail(ret_body, MHD_HTTP_BAD_REQUEST, "Invalid provisioning token request");
        if (r < 0)
                return api_fail(ret_body, MHD_HTTP_SERVICE_UNAVAILABLE, "Cannot store the provisioning token now: %s",
                                strerror(-r));
        snprintf(ret_id, PROVISION_ID_MAX + 1, "%s", json_string_value(json_object_get(j, "id")));
        if (json_object_set_new(j, "token", json_string(secret)) < 0 || json_object_set_new(j, "ok", json_true()) < 0) {
                json_decref(j);
                j = NULL;
        }
        OPENSSL_clear_free(secret, strlen(secret));
        *ret_body = j;
        return MHD_HTTP_CREATED;
}

unsigned api_provision_list(Provision *p, json_t **ret_body) {
        json_t *a = provision_to_json(p);

        if (!a)
                return api_fail(ret_body, MHD_HTTP_SERVICE_UNAVAILABLE, "Cannot read the provisioning tokens now");
        *ret_body = a;
        return MHD_HTTP_OK;
}

unsigned api_provision_get(Provision *p, const char *id, json_t **ret_body) {
        json_t *j = strlen(id) <= PROVISION_ID_MAX ? provision_get_json(p, id) : NULL;

        if (!j)
                return api_fail(ret_body, MHD_HTTP_NOT_FOUND, "No provisioning token with this id");
        *ret_body = j;
        return MHD_HTTP_OK;
}

unsigned api_provision_revoke(Provision *p, const char *id, const char *actor, json_t **ret_body) {
        int r = strlen(id) <= PROVISION_ID_MAX ? provision_revoke(p, id, actor) : -ENOENT;

        if (r == -ENOENT)
                return api_fail(ret_body, MHD_HTTP_NOT_FOUND, "No provisioning token with this id");
        if (r == -EALREADY)
                return api_fail(ret_body, MHD_HTTP_CONFLICT, "The provisioning token is already revoked");
        if (r < 0)
                return api_fail(ret_body, MHD_HTTP_SERVICE_UNAVAILABLE, "Cannot revoke the provisioning token now: %s",
                                strerror(-r));
        *ret_body = json_pack("{s:b, s:s}", "ok", 1, "id", id);
        return MHD_HTTP_OK;
}
