/* SPDX-License-Identifier: Apache-2.0 */
/* Unit tests for the persistent outbox (agent/outbox.c): order, limits,
 * overflow policies, compaction, recovery after a crash in the middle
 * of a write (a child process dies inside the write, the parent reopens),
 * and the files of version 1, whose events have no publish time. */
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>

#include "agent/outbox.h"
#include "util.h"

static char dir[] = "/tmp/tether-outbox-test-XXXXXX";

static const OutboxLimits roomy = { .max_events = 1000, .max_bytes = 1 << 20 };

static void clean_dir(void) {
        char cmd[128];

        snprintf(cmd, sizeof(cmd), "rm -f %s/outbox*", dir);
        assert_int_equal(system(cmd), 0);
}

static int setup(void **state) {
        clean_dir();
        return 0;
}

static Outbox *open_ok(const OutboxLimits *l) {
        Outbox *o = NULL;

        assert_int_equal(outbox_open(dir, l, &o), 0);
        return o;
}

static uint64_t append(Outbox *o, const char *name, const char *data) {
        uint64_t seq = 0;

        assert_int_equal(outbox_append(o, name, data, data ? strlen(data) : 0, 60, 0, &seq), 0);
        return seq;
}

static off_t file_size(void) {
        char path[256];
        struct stat st;

        snprintf(path, sizeof(path), "%s/outbox", dir);
        assert_int_equal(stat(path, &st), 0);
        return st.st_size;
}

/* Every queued event, oldest first, as "name=data" joined by spaces. */
static void queued(Outbox *o, char *buf, size_t size) {
        OutboxEvent e;
        uint64_t after = 0;
        size_t n = 0;

        buf[0] = 0;
        while (outbox_next(o, after, &e) == 0 && n < size) {
                n += (size_t)snprintf(buf + n, size - n, "%s%s=%.*s", n ? " " : "", e.name, (int)e.data_len, e.data);
                after = e.seq;
        }
}

static void test_order_ack_reopen(void **state) {
        Outbox *o = open_ok(&roomy);
        uint64_t epoch = outbox_epoch(o), s1, s2, s3;
        char buf[256];
        OutboxEvent e;

        assert_int_not_equal(epoch, 0);
        s1 = append(o, "a/one", "1");
        s2 = append(o, "a/two", "");
        s3 = append(o, "a/three", "3");
        assert_int_equal(s1, 1);
        assert_int_equal(s2, 2);
        assert_int_equal(s3, 3);
        assert_int_equal(outbox_count(o), 3);

        assert_int_equal(outbox_next(o, 0, &e), 0);
        assert_int_equal(e.seq, 1);
        assert_string_equal(e.name, "a/one");
        assert_int_equal(e.data_len, 1);
        assert_int_equal(e.ttl, 60);
        assert_int_equal(outbox_next(o, 3, &e), -ENOENT);

        /* Out of order: 2 first; the head waits for 1. */
        assert_int_equal(outbox_ack(o, 2), 0);
        assert_int_equal(outbox_ack(o, 2), -ENOENT);
        queued(o, buf, sizeof(buf));
        assert_string_equal(buf, "a/one=1 a/three=3");
        assert_int_equal(outbox_ack(o, 1), 0);
        assert_int_equal(outbox_count(o), 1);
        assert_int_equal(outbox_sync(o), 0);
        outbox_free(o);

        o = open_ok(&roomy);
        assert_int_equal(outbox_epoch(o), epoch);
        assert_int_equal(outbox_stats(o)->recovered, 1);
        assert_int_equal(outbox_stats(o)->damaged_bytes, 0);
        queued(o, buf, sizeof(buf));
        assert_string_equal(buf, "a/three=3");
        assert_int_equal(append(o, "a/four", "4"), 4);
        outbox_free(o);
}

static void test_unsynced_ack_means_resend(void **state) {
        Outbox *o = open_ok(&roomy);
        char buf[128];

        append(o, "x", "1");
        append(o, "y", "2");
        assert_int_equal(outbox_ack(o, 1), 0);
        /* A crash now loses the acknowledgement, never the event. Simulate
         * by reopening the file behind the live outbox's back is not
         * possible (it is locked), so check what the file holds: only the
         * sync writes the head. */
        assert_true(outbox_dirty(o));
        assert_int_equal(outbox_sync(o), 0);
        assert_false(outbox_dirty(o));
        outbox_free(o);
        o = open_ok(&roomy);
        queued(o, buf, sizeof(buf));
        assert_string_equal(buf, "y=2");
        outbox_free(o);
}

static void test_sequence_survives_empty_and_compaction(void **state) {
        OutboxLimits l = roomy;
        Outbox *o = open_ok(&l);
        uint64_t epoch = outbox_epoch(o), seq = 0;
        char data[200];
        off_t big;

        memset(data, 'd', sizeof(data) - 1);
        data[sizeof(data) - 1] = 0;
        /* Push well past the compaction threshold with everything acked. */
        for (int i = 0; i < 8000; i++) {
                seq = append(o, "bulk/event", data);
                assert_int_equal(outbox_ack(o, seq), 0);
        }
        big = file_size();
        assert_true(big > (1 << 20));
        assert_int_equal(outbox_sync(o), 0);
        assert_true(outbox_stats(o)->compactions >= 1);
        assert_true(file_size() < 4096);
        outbox_free(o);

        o = open_ok(&l);
        assert_int_equal(outbox_epoch(o), epoch);
        assert_int_equal(outbox_count(o), 0);
        assert_int_equal(outbox_next_seq(o), seq + 1);
        outbox_free(o);

        /* A wiped outbox is a new epoch, counting from 1 again. */
        clean_dir();
        o = open_ok(&l);
        assert_int_not_equal(outbox_epoch(o), epoch);
        assert_int_equal(outbox_next_seq(o), 1);
        outbox_free(o);
}

static void test_compaction_keeps_queue(void **state) {
        Outbox *o = open_ok(&(OutboxLimits){ .max_events = 100000, .max_bytes = 64 << 20 });
        char buf[64], data[300];
        OutboxEvent e;
        uint64_t keep[3];

        memset(data, 'q', sizeof(data) - 1);
        data[sizeof(data) - 1] = 0;
        keep[0] = append(o, "keep/a", "A");
        for (int i = 0; i < 5000; i++)
                assert_int_equal(outbox_ack(o, append(o, "junk", data)), 0);
        keep[1] = append(o, "keep/b", "B");
        for (int i = 0; i < 2000; i++)
                assert_int_equal(outbox_ack(o, append(o, "junk", data)), 0);
        keep[2] = append(o, "keep/c", "C");
        assert_int_equal(outbox_sync(o), 0);
        assert_true(outbox_stats(o)->compactions >= 1);
        queued(o, buf, sizeof(buf));
        assert_string_equal(buf, "keep/a=A keep/b=B keep/c=C");
        /* Only the head is persisted: an acknowledgement behind an older
         * queued event comes back after a restart (and the cloud drops the
         * resend); one at the front does not. */
        assert_int_equal(outbox_ack(o, keep[1]), 0);
        outbox_free(o);
        o = open_ok(&roomy);
        queued(o, buf, sizeof(buf));
        assert_string_equal(buf, "keep/a=A keep/b=B keep/c=C");
        assert_int_equal(outbox_ack(o, keep[0]), 0);
        outbox_free(o);
        o = open_ok(&roomy);
        queued(o, buf, sizeof(buf));
        assert_string_equal(buf, "keep/b=B keep/c=C");
        assert_int_equal(outbox_next(o, keep[1], &e), 0);
        assert_int_equal(e.seq, keep[2]);
        outbox_free(o);
}

static void test_reject_when_full(void **state) {
        Outbox *o = open_ok(&(OutboxLimits){ .max_events = 3, .max_bytes = 1 << 20 });
        char buf[128];

        append(o, "e", "1");
        append(o, "e", "2");
        append(o, "e", "3");
        assert_int_equal(outbox_append(o, "e", "4", 1, 60, 0, NULL), -ENOBUFS);
        assert_int_equal(outbox_stats(o)->rejected, 1);
        assert_int_equal(outbox_ack(o, 1), 0);
        append(o, "e", "5");
        queued(o, buf, sizeof(buf));
        assert_string_equal(buf, "e=2 e=3 e=5");

        /* Bytes: an event larger than the whole budget is refused as such. */
        outbox_set_limits(o, &(OutboxLimits){ .max_events = 10, .max_bytes = 64 });
        assert_int_equal(outbox_append(o, "e", "a long enough event body to pass 64 bytes", 41, 60, 0, NULL),
                         -E2BIG);
        outbox_free(o);
}

static void test_drop_oldest(void **state) {
        OutboxLimits l = { .max_events = 3, .max_bytes = 1 << 20, .overflow = OUTBOX_DROP_OLDEST };
        Outbox *o = open_ok(&l);
        char buf[128];

        for (int i = 1; i <= 5; i++) {
                char d[4];
                snprintf(d, sizeof(d), "%d", i);
                append(o, "e", d);
        }
        assert_int_equal(outbox_stats(o)->dropped, 2);
        queued(o, buf, sizeof(buf));
        assert_string_equal(buf, "e=3 e=4 e=5");
        /* An event dropped while in flight: its receipt finds nothing. */
        assert_int_equal(outbox_ack(o, 1), -ENOENT);
        outbox_free(o);
        /* The drops are in the file (no sync needed: same write). */
        o = open_ok(&l);
        queued(o, buf, sizeof(buf));
        assert_string_equal(buf, "e=3 e=4 e=5");
        outbox_free(o);

        /* By bytes: each event is 12 + 25 + 1 + 3 = 41 bytes on disk. */
        clean_dir();
        l = (OutboxLimits){ .max_events = 100, .max_bytes = 100, .overflow = OUTBOX_DROP_OLDEST };
        o = open_ok(&l);
        append(o, "e", "aaa");
        append(o, "e", "bbb");
        append(o, "e", "ccc");
        assert_int_equal(outbox_stats(o)->dropped, 1);
        assert_true(outbox_bytes(o) <= 100);
        queued(o, buf, sizeof(buf));
        assert_string_equal(buf, "e=bbb e=ccc");
        outbox_free(o);
}

static void test_locked(void **state) {
        Outbox *o = open_ok(&roomy), *o2 = NULL;

        assert_int_equal(outbox_open(dir, &roomy, &o2), -EBUSY);
        assert_null(o2);
        outbox_free(o);
}

/* The crash point: the Nth append writes only part of its record, then
 * the process dies as if the power or the OOM killer struck. */
static int crash_after_calls, crash_keep_bytes;

static ssize_t crashing_pwrite(int fd, const void *buf, size_t n, off_t off) {
        if (--crash_after_calls == 0) {
                ssize_t k = pwrite(fd, buf, (size_t)crash_keep_bytes < n ? (size_t)crash_keep_bytes : n, off);
                (void)k;
                _exit(0);
        }
        return pwrite(fd, buf, n, off);
}

static void crash_child(int appends_before, int keep_bytes) {
        pid_t pid;
        int status;

        pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
                Outbox *o = NULL;

                if (outbox_open(dir, &roomy, &o) < 0)
                        _exit(2);
                crash_after_calls = appends_before + 1;
                crash_keep_bytes = keep_bytes;
                outbox_set_pwrite(o, crashing_pwrite);
                for (int i = 0; i < appends_before + 1; i++) {
                        char d[16];
                        snprintf(d, sizeof(d), "n%d", i + 1);
                        (void)outbox_append(o, "torn/test", d, strlen(d), 60, 0, NULL);
                }
                _exit(3); /* the crash point was not reached */
        }
        assert_int_equal(waitpid(pid, &status, 0), pid);
        assert_true(WIFEXITED(status));
        assert_int_equal(WEXITSTATUS(status), 0);
}

static void test_torn_write_recovery(void **state) {
        /* Tear the 11th record at every possible length of its prefix. */
        for (int keep = 1; keep < 40; keep += 3) {
                Outbox *o;
                char buf[512];
                OutboxEvent e;

                clean_dir();
                crash_child(10, keep);
                o = open_ok(&roomy);
                assert_int_equal(outbox_stats(o)->recovered, 10);
                assert_int_equal(outbox_stats(o)->damaged_places, 1);
                assert_int_equal(outbox_stats(o)->damaged_bytes, (size_t)keep);
                assert_int_equal(outbox_next_seq(o), 11);
                assert_int_equal(outbox_next(o, 9, &e), 0);
                assert_string_equal(e.data, "n10");
                /* Appending after recovery gives a clean file. */
                append(o, "after", "crash");
                outbox_free(o);
                o = open_ok(&roomy);
                assert_int_equal(outbox_stats(o)->damaged_bytes, 0);
                assert_int_equal(outbox_stats(o)->recovered, 11);
                queued(o, buf, sizeof(buf));
                assert_non_null(strstr(buf, "torn/test=n10 after=crash"));
                outbox_free(o);
        }
}

static void test_damage_in_the_middle(void **state) {
        Outbox *o = open_ok(&roomy);
        char path[256], buf[256];
        off_t size;
        int fd;

        for (int i = 1; i <= 5; i++) {
                char d[8];
                snprintf(d, sizeof(d), "v%d", i);
                append(o, "mid", d);
        }
        outbox_free(o);
        size = file_size();
        /* Each event record is 12 + 33 + 3 + 2 = 50 bytes (header, fixed
         * part with the time, name, data); the file's header and first
         * ack take 12 + 18 + 12 + 9 = 51. Flip a byte inside the third
         * event. */
        snprintf(path, sizeof(path), "%s/outbox", dir);
        fd = open(path, O_RDWR);
        assert_true(fd >= 0);
        assert_int_equal(pwrite(fd, "X", 1, 51 + 2 * 50 + 20), 1);
        close(fd);
        assert_int_equal(file_size(), size);

        o = open_ok(&roomy);
        assert_int_equal(outbox_stats(o)->recovered, 4);
        assert_int_equal(outbox_stats(o)->damaged_places, 1);
        assert_int_equal(outbox_stats(o)->damaged_bytes, 50);
        assert_int_equal(outbox_stats(o)->first_damage, 51 + 2 * 50);
        queued(o, buf, sizeof(buf));
        assert_string_equal(buf, "mid=v1 mid=v2 mid=v4 mid=v5");
        outbox_free(o);
}

static int failing_left;

static ssize_t enospc_pwrite(int fd, const void *buf, size_t n, off_t off) {
        if (failing_left > 0) {
                failing_left--;
                /* Half the record reaches the disk, then it is full. */
                if (n > 1) {
                        ssize_t k = pwrite(fd, buf, n / 2, off);
                        (void)k;
                }
                errno = ENOSPC;
                return -1;
        }
        return pwrite(fd, buf, n, off);
}

static void test_disk_full(void **state) {
        Outbox *o = open_ok(&roomy);
        char buf[128];

        append(o, "ok", "1");
        outbox_set_pwrite(o, enospc_pwrite);
        failing_left = 2;
        assert_int_equal(outbox_append(o, "full", "x", 1, 60, 0, NULL), -ENOSPC);
        assert_int_equal(outbox_append(o, "full", "y", 1, 60, 0, NULL), -ENOSPC);
        assert_int_equal(outbox_stats(o)->write_errors, 2);
        assert_int_equal(outbox_count(o), 1);
        append(o, "ok", "2");
        outbox_free(o);
        o = open_ok(&roomy);
        assert_int_equal(outbox_stats(o)->damaged_bytes, 0);
        queued(o, buf, sizeof(buf));
        assert_string_equal(buf, "ok=1 ok=2");
        assert_int_equal(outbox_next_seq(o), 3);
        outbox_free(o);
}

static void test_foreign_file(void **state) {
        char path[256];
        Outbox *o;
        FILE *f;

        snprintf(path, sizeof(path), "%s/outbox", dir);
        f = fopen(path, "we");
        assert_non_null(f);
        fputs("this is not an outbox\n", f);
        fclose(f);
        o = open_ok(&roomy);
        assert_true(outbox_stats(o)->recreated);
        assert_int_equal(outbox_count(o), 0);
        assert_int_equal(append(o, "fresh", "1"), 1);
        outbox_free(o);
        snprintf(path, sizeof(path), "%s/outbox.corrupt", dir);
        assert_int_equal(access(path, F_OK), 0);
}

static void test_sync_always(void **state) {
        OutboxLimits l = roomy;
        Outbox *o;

        l.sync_always = true;
        o = open_ok(&l);
        append(o, "s", "1");
        assert_false(outbox_dirty(o));
        outbox_free(o);
}

static uint64_t wall_ms(void) {
        struct timespec ts;

        assert_int_equal(clock_gettime(CLOCK_REALTIME, &ts), 0);
        return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* Records built by hand, as an agent of an older version wrote them. */
typedef struct Hand {
        uint8_t buf[4096];
        size_t len;
} Hand;

static RecordWriter hand_begin(Hand *h) {
        return (RecordWriter){ .buf = h->buf + h->len + RECORD_HEADER_SIZE, .cap = 512 };
}

static void hand_end(Hand *h, RecordWriter *w) {
        assert_false(w->overflow);
        record_seal(OUTBOX_MAGIC, h->buf + h->len, w->len);
        h->len += record_size(w->len);
}

static void hand_header(Hand *h, uint8_t version, uint64_t epoch, uint64_t next_seq) {
        RecordWriter w = hand_begin(h);

        record_put_u8(&w, 'H');
        record_put_u8(&w, version);
        record_put_u64(&w, epoch);
        record_put_u64(&w, next_seq);
        hand_end(h, &w);
}

/* tail: bytes after the data (a version 1 event has none). */
static void hand_event(Hand *h, uint64_t seq, const char *name, const char *data, const void *tail,
                       size_t tail_len) {
        RecordWriter w = hand_begin(h);

        record_put_u8(&w, 'E');
        record_put_u64(&w, seq);
        record_put_u32(&w, 30);
        record_put_u32(&w, 0);
        record_put_bytes(&w, name, strlen(name));
        record_put_bytes(&w, data, strlen(data));
        if (tail_len > 0) {
                assert_true(w.len + tail_len <= w.cap);
                memcpy(w.buf + w.len, tail, tail_len);
                w.len += tail_len;
        }
        hand_end(h, &w);
}

static void hand_write(const Hand *h) {
        char path[256];
        FILE *f;

        snprintf(path, sizeof(path), "%s/outbox", dir);
        f = fopen(path, "we");
        assert_non_null(f);
        assert_int_equal(fwrite(h->buf, 1, h->len, f), h->len);
        assert_int_equal(fclose(f), 0);
}

/* The version byte of the file's header record. */
static int file_version(void) {
        uint8_t head[RECORD_HEADER_SIZE + 2];
        char path[256];
        FILE *f;

        snprintf(path, sizeof(path), "%s/outbox", dir);
        f = fopen(path, "re");
        assert_non_null(f);
        assert_int_equal(fread(head, 1, sizeof(head), f), sizeof(head));
        fclose(f);
        assert_int_equal(head[RECORD_HEADER_SIZE], 'H');
        return head[RECORD_HEADER_SIZE + 1];
}

static void test_publish_time_kept(void **state) {
        uint64_t before = wall_ms(), after, t1;
        Outbox *o = open_ok(&roomy);
        OutboxEvent e;

        append(o, "t/one", "1");
        append(o, "t/two", "2");
        after = wall_ms();
        assert_int_equal(outbox_next(o, 0, &e), 0);
        assert_in_range(e.time_ms, before, after);
        t1 = e.time_ms;
        assert_int_equal(outbox_next(o, 1, &e), 0);
        assert_in_range(e.time_ms, t1, after);
        outbox_free(o);
        assert_int_equal(file_version(), 2);

        /* A restart keeps it: it is in the file. */
        o = open_ok(&roomy);
        assert_int_equal(outbox_next(o, 0, &e), 0);
        assert_int_equal(e.time_ms, t1);
        assert_string_equal(e.name, "t/one");
        outbox_free(o);
}

static void test_version1_file(void **state) {
        uint64_t before, after;
        Hand h = {};
        Outbox *o;
        OutboxEvent e;
        char buf[256];

        hand_header(&h, 1, 0x0123456789abcdefULL, 1);
        hand_event(&h, 1, "old/one", "1", NULL, 0);
        hand_event(&h, 2, "old/two", "22", NULL, 0);
        hand_write(&h);

        o = open_ok(&roomy);
        assert_int_equal(outbox_stats(o)->recovered, 2);
        assert_false(outbox_stats(o)->recreated);
        assert_int_equal(outbox_stats(o)->damaged_bytes, 0);
        assert_int_equal(outbox_epoch(o), 0x0123456789abcdefULL);
        assert_int_equal(outbox_next(o, 0, &e), 0);
        assert_int_equal(e.seq, 1);
        assert_string_equal(e.name, "old/one");
        assert_int_equal(e.ttl, 30);
        assert_int_equal(e.time_ms, 0); /* not known */
        /* Opening it made it a version 2 file, the old records as they were. */
        assert_int_equal(file_version(), 2);
        before = wall_ms();
        assert_int_equal(append(o, "new/three", "3"), 3);
        after = wall_ms();
        outbox_free(o);

        o = open_ok(&roomy);
        queued(o, buf, sizeof(buf));
        assert_string_equal(buf, "old/one=1 old/two=22 new/three=3");
        assert_int_equal(outbox_next(o, 1, &e), 0);
        assert_int_equal(e.time_ms, 0);
        assert_int_equal(outbox_next(o, 2, &e), 0);
        assert_in_range(e.time_ms, before, after);
        outbox_free(o);
}

static void test_event_tails(void **state) {
        static const uint8_t stamp[8] = { 1, 2, 3, 4, 5, 6, 7, 0 }, odd[3] = { 1, 2, 3 };
        Hand h = {};
        Outbox *o;
        OutboxEvent e;
        char buf[256];

        /* An event may end after its data or after a u64 time; any other
         * tail is not an event of ours. */
        hand_header(&h, 2, 7, 1);
        hand_event(&h, 1, "a", "1", stamp, sizeof(stamp));
        hand_event(&h, 2, "b", "2", odd, sizeof(odd));
        hand_event(&h, 3, "c", "3", NULL, 0);
        hand_write(&h);
        o = open_ok(&roomy);
        queued(o, buf, sizeof(buf));
        assert_string_equal(buf, "a=1 c=3");
        assert_int_equal(outbox_next(o, 0, &e), 0);
        assert_int_equal(e.time_ms, 0x0007060504030201ULL);
        outbox_free(o);

        /* A version this agent does not know: set aside, not misread. */
        clean_dir();
        h = (Hand){};
        hand_header(&h, 3, 7, 1);
        hand_event(&h, 1, "a", "1", stamp, sizeof(stamp));
        hand_write(&h);
        o = open_ok(&roomy);
        assert_true(outbox_stats(o)->recreated);
        assert_int_equal(outbox_count(o), 0);
        outbox_free(o);
}

int main(int argc, char **argv) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup(test_order_ack_reopen, setup),
                cmocka_unit_test_setup(test_unsynced_ack_means_resend, setup),
                cmocka_unit_test_setup(test_sequence_survives_empty_and_compaction, setup),
                cmocka_unit_test_setup(test_compaction_keeps_queue, setup),
                cmocka_unit_test_setup(test_reject_when_full, setup),
                cmocka_unit_test_setup(test_drop_oldest, setup),
                cmocka_unit_test_setup(test_locked, setup),
                cmocka_unit_test_setup(test_torn_write_recovery, setup),
                cmocka_unit_test_setup(test_damage_in_the_middle, setup),
                cmocka_unit_test_setup(test_disk_full, setup),
                cmocka_unit_test_setup(test_foreign_file, setup),
                cmocka_unit_test_setup(test_sync_always, setup),
                cmocka_unit_test_setup(test_publish_time_kept, setup),
                cmocka_unit_test_setup(test_version1_file, setup),
                cmocka_unit_test_setup(test_event_tails, setup),
        };
        char cmd[128];
        int r;

        if (!mkdtemp(dir))
                return 99;
        /* One test, or those a glob matches: test-foo NAME (HACKING.md). */
        if (argc > 1)
                cmocka_set_test_filter(argv[1]);
        r = cmocka_run_group_tests(tests, NULL, NULL);
        snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
        if (system(cmd) != 0)
                return 99;
        return r;
}
