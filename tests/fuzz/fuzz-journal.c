/* SPDX-License-Identifier: Apache-2.0 */
/* libFuzzer target: the cloud's event journal (cloud/journal.c) opened
 * from a file of arbitrary content, read back through a cursor, and
 * appended to. */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "cloud/journal.h"
#include "log.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char dir[] = "/dev/shm/tether-fuzz-journal-XXXXXX"; /* fsync is cheap there */

/* libFuzzer ends with exit(): leave nothing behind. */
static void remove_dir(void) {
        static const char *const files[] = { "events.journal", "events.journal.lock", "events.journal.tmp", "events.journal.corrupt" };
        char path[128];

        for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
                snprintf(path, sizeof(path), "%s/%s", dir, files[i]);
                (void)unlink(path);
        }
        (void)rmdir(dir);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        static CloudConfig config = { .journal_max_bytes = 1 << 20, .journal_sync_ms = 1000 };
        static sd_event *event;
        Journal *j = NULL;
        JournalCursor c;
        ProtoEvent e;
        uint64_t id, last = 0;
        char path[128];
        int fd, r;

        if (!event) {
                log_set_max_level(-1);
                if (!mkdtemp(dir) || sd_event_new(&event) < 0)
                        abort();
                atexit(remove_dir);
                config.state_dir = dir;
        }
        snprintf(path, sizeof(path), "%s/events.journal.corrupt", dir);
        (void)unlink(path);
        snprintf(path, sizeof(path), "%s/events.journal", dir);
        fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (fd < 0 || write(fd, data, size) != (ssize_t)size)
                abort();
        close(fd);
        if (journal_new(event, &config, &j) < 0)
                return 0;
        journal_cursor_init(&c, j, 0);
        while ((r = journal_cursor_next(&c, &e, &id)) > 0) {
                if (id <= last)
                        abort();
                last = id;
                proto_event_done(&e);
        }
        journal_cursor_done(&c);
        e = (ProtoEvent){ .name = (char *)"fuzz/after", .data = (char *)"x", .ttl = 60,
                          .published_at = (char *)"2026-01-01T00:00:00.000Z", .coreid = (char *)"dev" };
        if (journal_append(j, &e, 1, 1, &id) == 0 && (id <= last || !journal_seen(j, "dev", 1, 1)))
                abort();
        journal_free(j);
        return 0;
}
