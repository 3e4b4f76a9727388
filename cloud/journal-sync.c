/* SPDX-License-Identifier: Apache-2.0 */
/* The journal's sync thread (journal-sync.h). One mutex and one condition
 * variable; the thread holds the mutex only to take or publish state, never
 * across fdatasync(). */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <unistd.h>

#include "journal-sync.h"
#include "log.h"
#include "stats.h"
#include "util.h"

struct JournalSyncer {
        pthread_t thread;
        pthread_mutex_t lock;
        pthread_cond_t cond;
        /* The next sync asked for: a descriptor we own (-1: none) and what it covers. */
        int fd;
        uint64_t events, bytes;
        bool stop;
        bool failing; /* the last fdatasync() failed: log the next success */
};

static void *syncer_main(void *userdata) {
        JournalSyncer *s = userdata;

        pthread_mutex_lock(&s->lock);
        for (;;) {
                int fd;
                uint64_t events, bytes, started;

                while (s->fd < 0 && !s->stop)
                        pthread_cond_wait(&s->cond, &s->lock);
                if (s->fd < 0)
                        break; /* stopping with nothing asked for */
                fd = s->fd;
                events = s->events;
                bytes = s->bytes;
                s->fd = -1;
                s->events = s->bytes = 0;
                pthread_mutex_unlock(&s->lock);

                started = now_usec();
                if (fdatasync(fd) < 0) {
                        if (!s->failing)
                                log_warning_errno(errno, "Failed to sync the event journal: %m");
                        s->failing = true;
                } else if (s->failing) {
                        log_info("Syncing the event journal works again.");
                        s->failing = false;
                }
                close(fd);
                stats_journal_synced(started, events, bytes);

                pthread_mutex_lock(&s->lock);
        }
        pthread_mutex_unlock(&s->lock);
        return NULL;
}

int journal_syncer_new(JournalSyncer **ret) {
        JournalSyncer *s = calloc(1, sizeof(*s));
        int r;

        if (!s)
                return -ENOMEM;
        s->fd = -1;
        pthread_mutex_init(&s->lock, NULL);
        pthread_cond_init(&s->cond, NULL);
        r = pthread_create(&s->thread, NULL, syncer_main, s);
        if (r != 0) {
                pthread_cond_destroy(&s->cond);
                pthread_mutex_destroy(&s->lock);
                free(s);
                return -r;
        }
        *ret = s;
        return 0;
}

JournalSyncer *journal_syncer_free(JournalSyncer *s) {
        if (!s)
                return NULL;
        pthread_mutex_lock(&s->lock);
        s->stop = true;
        pthread_cond_signal(&s->cond);
        pthread_mutex_unlock(&s->lock);
        pthread_join(s->thread, NULL);
        pthread_cond_destroy(&s->cond);
        pthread_mutex_destroy(&s->lock);
        free(s);
        return NULL;
}

int journal_syncer_request(JournalSyncer *s, int fd, uint64_t events, uint64_t bytes) {
        int copy = fcntl(fd, F_DUPFD_CLOEXEC, 3);

        if (copy < 0)
                return -errno;
        pthread_mutex_lock(&s->lock);
        /* A request not yet taken is replaced: the newer descriptor's sync
         * covers everything the older one's would have (same file, or the
         * rewritten file that was synced when it replaced the old one). */
        if (s->fd >= 0)
                close(s->fd);
        s->fd = copy;
        s->events += events;
        s->bytes += bytes;
        pthread_cond_signal(&s->cond);
        pthread_mutex_unlock(&s->lock);
        return 0;
}
