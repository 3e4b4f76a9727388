/* SPDX-License-Identifier: Apache-2.0 */
/* libFuzzer target: tether-cloudd's configuration parser (cloud/config.c)
 * on a keyfile of arbitrary content (the token file it names is read too,
 * when the path exists). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "cloud/cloud-config.h"
#include "log.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        static int fd = -1;
        CloudConfig *c = NULL;
        char path[64];

        if (fd < 0) {
                log_set_max_level(-1);
                fd = memfd_create("tether-cloudd.conf", MFD_CLOEXEC);
                if (fd < 0)
                        abort();
        }
        if (ftruncate(fd, 0) < 0 || pwrite(fd, data, size, 0) != (ssize_t)size)
                abort();
        snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
        if (cloud_config_load(path, &c) == 0)
                cloud_config_free(c);
        return 0;
}
