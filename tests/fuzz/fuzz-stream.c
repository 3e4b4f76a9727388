/* SPDX-License-Identifier: Apache-2.0 */
/* libFuzzer target: what tetherd parses of a stream request from the
 * cloud (agent/stream-proto.c): the JSON of an open (PUT /t/{sid}), the
 * Uri-Query of a POST, a target, an Allow= value, and the UTF-8 repair of
 * journal text. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "agent/stream-proto.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        StreamOpen o;
        StreamQuery q;
        StreamAddr a, *list = NULL;
        char error[200], bad[64], *s;
        size_t n = 0;

        if (stream_open_parse(data, size, &o, error, sizeof(error)) == 0) {
                if (o.window < 32768 || o.window > 4194304 || o.n_units > STREAM_UNITS_MAX)
                        abort();
                for (size_t i = 0; i < o.n_units; i++)
                        if (!stream_unit_name_valid(o.units[i]))
                                abort();
        }
        stream_open_done(&o);
        (void)stream_query_parse((const char *)data, size, &q);

        s = malloc(size + 1);
        if (!s)
                return 0;
        memcpy(s, data, size);
        s[size] = 0;
        if (stream_addr_parse(s, true, &a) == 0) {
                char text[STREAM_ADDR_TEXT_MAX], *again;
                StreamAddr b;

                /* What parses prints as something that parses the same. */
                again = (char *)stream_addr_text(&a, text);
                if (stream_addr_parse(again, true, &b) < 0 || memcmp(&a, &b, sizeof(a)) != 0)
                        abort();
        }
        if (stream_allow_parse(s, &list, &n, bad) == 0 && n > STREAM_ALLOW_MAX)
                abort();
        free(list);
        free(s);

        s = stream_utf8_repair((const char *)data, size, 100);
        /* Each byte of at most 100 becomes at most 3, then "…". */
        if (s && strlen(s) > 3 * 100 + 3)
                abort();
        free(s);
        return 0;
}
