/* SPDX-License-Identifier: Apache-2.0 */
/* libFuzzer target: tetherd's configuration parser (agent/agent-config.c) on a
 * keyfile of arbitrary content. Warnings are silenced; errors must come
 * back as -EINVAL with a message, never crash. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "agent/agent-config.h"
#include "log.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        static int fd = -1;
        char path[64], *error = NULL;
        Config *c;
        int r;

        if (fd < 0) {
                log_set_max_level(LOG_EMERG);
                fd = memfd_create("tetherd.conf", MFD_CLOEXEC);
                if (fd < 0)
                        abort();
        }
        if (ftruncate(fd, 0) < 0 || pwrite(fd, data, size, 0) != (ssize_t)size)
                abort();
        snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
        c = config_new();
        if (!c)
                return 0;
        r = config_parse_file(c, path, &error);
        if (r < 0 && r != -ENOMEM && !error)
                abort(); /* a refusal always says why */
        free(error);
        config_free(c);
        return 0;
}
