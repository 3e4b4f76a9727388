/* SPDX-License-Identifier: Apache-2.0 */
/* libFuzzer target: the HTTP API's request parsing and routing
 * (cloud/api-request.c). The input is the request's parts separated by
 * newlines: method, URL, Content-Type, Authorization, access_token,
 * Last-Event-ID, then the body (the rest, newlines included). An empty
 * part is an absent header. The body's parameters also go through the
 * inventory rules (cloud/inventory.c): as PUT /v1/devices/ID's fields,
 * and each string parameter as a filter of GET /v1/devices. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cloud/api-request.h"
#include "cloud/inventory.h"
#include "util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        char *buf = malloc(size + 1), *p, *parts[6] = {};
        ApiParsed parsed;
        ApiInput in;
        size_t k = 0;

        if (!buf)
                return 0;
        memcpy(buf, data, size);
        buf[size] = 0;
        p = buf;
        while (k < 6) {
                char *nl = memchr(p, '\n', (size_t)(buf + size - p));

                parts[k++] = p;
                if (!nl) {
                        p = buf + size;
                        break;
                }
                *nl = 0;
                p = nl + 1;
        }
        /* Headers cannot hold NUL; MHD gives C strings. */
        in = (ApiInput){
                .method = parts[0] ? parts[0] : "GET",
                .url = parts[1] ? parts[1] : "/",
                .content_type = parts[2] && *parts[2] ? parts[2] : NULL,
                .authorization = parts[3] && *parts[3] ? parts[3] : NULL,
                .query_token = parts[4] && *parts[4] ? parts[4] : NULL,
                .query_token_len = parts[4] ? strlen(parts[4]) : 0,
                .query_token_present = parts[4] && *parts[4],
                .last_event_id = parts[5] && *parts[5] ? parts[5] : NULL,
                .body = p,
                .body_len = (size_t)(buf + size - p),
        };
        {
                const char *esc = api_bad_escape(in.url);

                if (esc && !streq(esc, "%00") && !streq(esc, "%2F") && !streq(esc, "%2f"))
                        abort();
        }
        if (api_parse_request(&in, &parsed) == 0) {
                if (parsed.route == API_ROUTE_BAD_BODY && (!parsed.body_error[0] ||
                                                           strlen(parsed.body_error) >= sizeof(parsed.body_error)))
                        abort();
                for (const char *c = parsed.body_error; *c; c++)
                        if (*c < 0x20 || *c >= 0x7f)
                                abort();
                if (parsed.route == API_ROUTE_CALL || parsed.route == API_ROUTE_READ) {
                        const char *arg;
                        size_t len;
                        char tmp[32];

                        if (!parsed.name || strlen(parsed.device) == 0)
                                abort();
                        if (api_param(parsed.params, "args", &arg, &len, tmp) > 0 && !arg)
                                abort();
                }
                if (parsed.route == API_ROUTE_PUBLISH || parsed.params) {
                        ApiPublish pub;
                        unsigned status;
                        const char *error;

                        if (api_parse_publish(parsed.params, 16384, &pub, &status, &error) == 0 &&
                            (proto_name_check(pub.name, strlen(pub.name), PROTO_NAME_EVENT) < 0 ||
                             pub.data_len > 16384))
                                abort();
                }
                if (parsed.params) {
                        char err[INVENTORY_ERROR_MAX];
                        InventoryUpdate u;
                        InventoryFilter f;
                        json_t *merged = NULL, *v;
                        const char *key;

                        if (inventory_parse_update(parsed.params, &u, err) == 0) {
                                if (u.name && !inventory_name_valid(u.name, strlen(u.name)))
                                        abort();
                                if (u.tags && inventory_tags_merge(NULL, u.tags, &merged, err) == 0) {
                                        if (json_object_size(merged) > INVENTORY_TAGS_MAX)
                                                abort();
                                        json_decref(merged);
                                }
                        } else if (!err[0] || strlen(err) >= sizeof(err))
                                abort();
                        inventory_filter_init(&f);
                        json_object_foreach(parsed.params, key, v)
                                if (json_is_string(v) && inventory_filter_add(&f, key, json_string_value(v), err) < 0)
                                        break;
                        (void)inventory_filter_match(&f, parsed.params, 1, 2);
                }
                api_parsed_done(&parsed);
        }
        free(buf);
        return 0;
}
