/* SPDX-License-Identifier: Apache-2.0 */
/* libFuzzer target: the payload codecs a device or cloud reads from the
 * other side (lib/proto.c): event notifications, describe documents,
 * variable values, function results. The first byte picks the codec. */
#include <stdint.h>
#include <stdlib.h>

#include "proto.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        if (size < 1)
                return 0;
        switch (data[0] % 4) {
        case 0: {
                ProtoEvent e = {};

                if (proto_event_decode(data + 1, size - 1, &e) == 0) {
                        char *json = NULL;
                        size_t len;

                        /* What decodes must encode again. */
                        if (proto_event_encode(&e, &json, &len) < 0)
                                abort();
                        free(json);
                        proto_event_done(&e);
                }
                break;
        }
        case 1: {
                json_t *j = NULL;

                if (proto_describe_decode(data + 1, size - 1, &j) == 0)
                        json_decref(j);
                break;
        }
        case 2: {
                json_t *j = NULL;
                uint32_t type;

                if (proto_value_decode(data + 1, size - 1, &j, &type) == 0) {
                        if (!proto_type_to_string(type))
                                abort();
                        json_decref(j);
                }
                break;
        }
        case 3: {
                int32_t v;

                if (proto_result_parse(data + 1, size - 1, &v) == 0) {
                        char buf[12];
                        int n = proto_result_format(v, buf);

                        /* Round trip: the canonical form parses to the same value. */
                        if (n <= 0 || proto_result_parse((const uint8_t *)buf, (size_t)n, &v) < 0)
                                abort();
                }
                break;
        }
        }
        return 0;
}
