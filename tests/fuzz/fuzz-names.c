/* SPDX-License-Identifier: Apache-2.0 */
/* libFuzzer target: name rules, prefix matching, UTF-8 checks and the
 * Uri-Query options of a publish (lib/proto.c), all of which the cloud
 * applies to what devices send. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "proto.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        const char *s = (const char *)data;
        ProtoPublishQuery q = {};
        const uint8_t *opt = data;
        char *copy;

        for (int kind = PROTO_NAME_FUNCTION; kind <= PROTO_NAME_DEVICE; kind++)
                (void)proto_name_check(s, size, (ProtoNameKind)kind);
        if (proto_utf8_check(s, size) == 0 && memchr(s, 0, size))
                abort(); /* NUL is never valid text */

        /* Prefix and name: split at the first NUL. */
        copy = malloc(size + 1);
        if (!copy)
                return 0;
        memcpy(copy, data, size);
        copy[size] = 0;
        {
                const char *name = copy + strlen(copy) + (strlen(copy) < size ? 1 : 0);

                if (proto_prefix_match(copy, name) && strncmp(copy, name, strlen(copy)) != 0)
                        abort();
        }
        free(copy);

        /* Options separated by '&', as in a Uri-Query list. */
        for (size_t i = 0; i <= size; i++)
                if (i == size || data[i] == '&') {
                        if (proto_publish_query_add(&q, opt, (size_t)(data + i - opt)) < 0)
                                break;
                        opt = data + i + 1;
                }
        if (proto_publish_query_check(&q) == 0 && q.has_seq && q.seq == 0)
                abort();
        return 0;
}
