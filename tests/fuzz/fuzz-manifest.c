/* SPDX-License-Identifier: Apache-2.0 */
/* libFuzzer target for the OTA manifest parsers: the envelope split and
 * the JSON body, the two things an attacker controls before and after the
 * signature check. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "manifest.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        ManifestEnvelope env;
        Manifest m = {};
        const char *err;

        if (manifest_envelope_split(data, size, &env) == 0 &&
            manifest_body_parse(env.body, env.body_len, &m, &err) == 0)
                manifest_done(&m);
        /* The body parser alone, on the raw input. */
        if (manifest_body_parse(data, size, &m, &err) == 0) {
                char *text = NULL, *body = NULL, *tags[] = { (char *)"site-a" };

                (void)manifest_check(&m, 0, "amd64", "1.0", &text);
                free(text);
                (void)manifest_check_target(&m, "gw-1", tags, 1, &text);
                free(text);
                (void)manifest_check_installed(&m, "1.0", &text);
                free(text);
                /* What the signer writes must parse again. */
                if (manifest_body_format(&m, &body) == 0) {
                        Manifest again = {};

                        if (manifest_body_parse((const uint8_t *)body, strlen(body), &again, &err) != 0)
                                abort();
                        manifest_done(&again);
                        free(body);
                }
                manifest_done(&m);
        }
        return 0;
}
