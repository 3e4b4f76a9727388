/* SPDX-License-Identifier: Apache-2.0 */
/* libFuzzer target: outbox recovery (agent/outbox.c) from a file of
 * arbitrary content, as a crash, a bad disk or another program might
 * leave it; then every recovered event is read back and one appended. */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "agent/outbox.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char dir[] = "/dev/shm/tether-fuzz-outbox-XXXXXX"; /* fsync is cheap there */

/* libFuzzer ends with exit(): leave nothing behind. */
static void remove_dir(void) {
        static const char *const files[] = { "outbox", "outbox.lock", "outbox.tmp", "outbox.corrupt" };
        char path[128];

        for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
                snprintf(path, sizeof(path), "%s/%s", dir, files[i]);
                (void)unlink(path);
        }
        (void)rmdir(dir);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        static bool made;
        OutboxLimits limits = { .max_events = 1000, .max_bytes = 1 << 20 };
        char path[128];
        Outbox *o = NULL;
        OutboxEvent e;
        uint64_t after = 0, n = 0;
        int fd;

        if (!made) {
                if (!mkdtemp(dir))
                        abort();
                atexit(remove_dir);
                made = true;
        }
        snprintf(path, sizeof(path), "%s/outbox.corrupt", dir);
        (void)unlink(path);
        snprintf(path, sizeof(path), "%s/outbox", dir);
        fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (fd < 0 || write(fd, data, size) != (ssize_t)size)
                abort();
        close(fd);
        if (outbox_open(dir, &limits, &o) < 0)
                return 0;
        while (outbox_next(o, after, &e) == 0) {
                if (e.seq <= after || strlen(e.name) == 0)
                        abort();
                after = e.seq;
                n++;
        }
        if (n != outbox_count(o))
                abort();
        if (outbox_append(o, "fuzz/after", "x", 1, 60, 0, NULL) == 0 && outbox_next_seq(o) <= after)
                abort();
        outbox_free(o);
        return 0;
}
