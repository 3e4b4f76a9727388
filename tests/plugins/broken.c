/* SPDX-License-Identifier: Apache-2.0 */
/* Plugins that misbehave on purpose, for the integration tests.
 * Built twice: "failing" registers a function and then fails init (the
 * agent must drop the function and keep serving); with
 * -DBROKEN_ABI_MAJOR=99 it claims an ABI the agent must refuse. */
#include <errno.h>
#include <tether/plugin.h>

static int fn_ghost(void *userdata, const char *arg, int32_t *ret_result) {
        *ret_result = 1;
        return 0;
}

static int broken_init(const struct tether_host_api *api, tether_host *host, void **ret_userdata) {
        int r = api->function_add(host, "ghost", fn_ghost, NULL);
        if (r < 0)
                return r;
        return -EIO;
}

#ifdef BROKEN_ABI_MAJOR
__attribute__((visibility("default"))) const struct tether_plugin_descriptor tether_plugin = {
        .abi_major = BROKEN_ABI_MAJOR,
        .abi_minor = 0,
        .struct_size = sizeof(struct tether_plugin_descriptor),
        .name = "future",
        .version = "99.0",
        .init = broken_init,
};
#else
TETHER_PLUGIN("failing", "0.1", broken_init, NULL);
#endif
