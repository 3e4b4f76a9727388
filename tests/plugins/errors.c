/* SPDX-License-Identifier: Apache-2.0 */
/* A plugin whose function "fail" returns the negative errno named by its
 * argument ("ENOENT", "EBUSY", ...), and whose variable "broken" fails to
 * read with -EIO: the integration tests check how each reaches the API. */
#include <errno.h>
#include <string.h>
#include <tether/plugin.h>

static const struct {
        const char *name;
        int value;
} errnos[] = { { "ENOENT", ENOENT }, { "EBUSY", EBUSY }, { "EINVAL", EINVAL }, { "EIO", EIO } };

static int fn_fail(void *userdata, const char *arg, int32_t *ret_result) {
        for (size_t i = 0; i < sizeof(errnos) / sizeof(errnos[0]); i++)
                if (strcmp(arg, errnos[i].name) == 0)
                        return -errnos[i].value;
        *ret_result = 0;
        return 0;
}

static int var_broken(void *userdata, struct tether_value *ret) {
        return -EIO;
}

static int errors_init(const struct tether_host_api *api, tether_host *host, void **ret_userdata) {
        int r = api->function_add(host, "fail", fn_fail, NULL);
        if (r < 0)
                return r;
        return api->variable_add(host, "broken", TETHER_TYPE_INT32, var_broken, NULL);
}

TETHER_PLUGIN("errors", "0.1", errors_init, NULL);
