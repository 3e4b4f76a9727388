/* SPDX-License-Identifier: Apache-2.0 */
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <systemd/sd-journal.h>
#include <time.h>

#include "journal-stream.h"
#include "proto.h"
#include "util.h"

/* unit, identifier: cut to this many bytes. */
#define JOURNAL_FIELD_MAX 256

struct JournalStream {
        sd_event *event;
        sd_journal *journal;
        JournalStreamHooks hooks;
        sd_event_source *io;    /* the journal's fd, when following */
        sd_event_source *defer; /* go on producing */
        bool follow;
        bool have_since;
        uint64_t since;
        bool current;  /* the journal is on an entry not yet formatted (after previous_skip()) */
        bool done;     /* fin sent */
        char *pending; /* a formatted entry, the part not yet sent: pending[pending_off..pending_len) */
        size_t pending_off, pending_len;
};

/* FIELD's value of the current entry, or NULL (absent, or an error). */
static const char *field(sd_journal *j, const char *name, size_t *ret_len) {
        const void *d;
        size_t l, n = strlen(name);

        if (sd_journal_get_data(j, name, &d, &l) < 0 || l <= n || ((const char *)d)[n] != '=')
                return NULL;
        *ret_len = l - n - 1;
        return (const char *)d + n + 1;
}

static int set_text(json_t *o, const char *key, const char *v, size_t len, size_t max) {
        char *s = stream_utf8_repair(v, len, max);
        int r;

        if (!s)
                return -ENOMEM;
        r = json_object_set_new(o, key, json_string(s));
        free(s);
        return r < 0 ? -ENOMEM : 0;
}

/* A decimal field ("_PID", "PRIORITY") within 0..max, or -1. */
static int64_t number(const char *v, size_t len, int64_t max) {
        int64_t n = 0;

        if (!v || len == 0 || len > 10)
                return -1;
        for (size_t i = 0; i < len; i++) {
                if (v[i] < '0' || v[i] > '9')
                        return -1;
                n = n * 10 + (v[i] - '0');
        }
        return n > max ? -1 : n;
}

/* The current entry as one NDJSON line into pending. */
static int format_entry(JournalStream *js) {
        sd_journal *j = js->journal;
        _cleanup_(json_decrefp) json_t *o = json_object();
        char stamp[64];
        const char *v;
        uint64_t usec = 0;
        size_t len = 0;
        struct tm tm;
        time_t t;
        char *line;
        int64_t n;
        int r;

        if (!o)
                return -ENOMEM;
        r = sd_journal_get_realtime_usec(j, &usec);
        if (r < 0)
                return r;
        t = (time_t)(usec / 1000000);
        if (!gmtime_r(&t, &tm) || strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%S", &tm) == 0)
                return -EINVAL;
        snprintf(stamp + strlen(stamp), sizeof(stamp) - strlen(stamp), ".%06" PRIu64 "Z", usec % 1000000);
        if (json_object_set_new(o, "time", json_string(stamp)) < 0 ||
            json_object_set_new(o, "realtime", json_integer((json_int_t)usec)) < 0)
                return -ENOMEM;
        if ((v = field(j, "_SYSTEMD_UNIT", &len)) && set_text(o, "unit", v, len, JOURNAL_FIELD_MAX) < 0)
                return -ENOMEM;
        if ((v = field(j, "SYSLOG_IDENTIFIER", &len)) && set_text(o, "identifier", v, len, JOURNAL_FIELD_MAX) < 0)
                return -ENOMEM;
        v = field(j, "_PID", &len);
        if (v && (n = number(v, len, INT32_MAX)) >= 0 && json_object_set_new(o, "pid", json_integer(n)) < 0)
                return -ENOMEM;
        v = field(j, "PRIORITY", &len);
        if (v && (n = number(v, len, 7)) >= 0 && json_object_set_new(o, "priority", json_integer(n)) < 0)
                return -ENOMEM;
        v = field(j, "MESSAGE", &len);
        if (set_text(o, "message", v ? v : "", v ? len : 0, STREAM_MESSAGE_MAX) < 0)
                return -ENOMEM;
        /* Keys in the order set; control characters escaped by jansson. */
        line = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
        if (!line)
                return -ENOMEM;
        free(js->pending);
        js->pending_len = strlen(line) + 1;
        line[js->pending_len - 1] = '\n'; /* the NUL becomes the line's end */
        js->pending = line;
        js->pending_off = 0;
        return 0;
}

/* Move to the next entry to send and format it: 1, 0 at the end for
 * now, or a negative errno. */
static int next_entry(JournalStream *js) {
        for (;;) {
                uint64_t usec;
                int r;

                if (js->current)
                        js->current = false;
                else {
                        r = sd_journal_next(js->journal);
                        if (r <= 0)
                                return r;
                }
                if (js->have_since && sd_journal_get_realtime_usec(js->journal, &usec) >= 0 && usec < js->since)
                        continue;
                r = format_entry(js);
                return r < 0 ? r : 1;
        }
}

static void fail(JournalStream *js, int r) {
        char reason[160];

        snprintf(reason, sizeof(reason), "journal error: %s", strerror(-r));
        js->done = true;
        if (js->io)
                sd_event_source_set_enabled(js->io, SD_EVENT_OFF);
        sd_event_source_set_enabled(js->defer, SD_EVENT_OFF);
        js->hooks.failed(js->hooks.userdata, reason);
}

/* Send what fits, at most JOURNAL_STREAM_BATCH entries this turn. */
static void produce(JournalStream *js) {
        unsigned entries = 0;

        while (!js->done) {
                size_t room = js->hooks.room(js->hooks.userdata), used = 0;
                _cleanup_free_ char *out = NULL;
                bool at_end = false, more = false;
                int r;

                if (room == 0)
                        return; /* journal_stream_kick() when there is */
                if (room > PROTO_STREAM_CHUNK_MAX)
                        room = PROTO_STREAM_CHUNK_MAX;
                out = malloc(room);
                if (!out)
                        return fail(js, -ENOMEM);
                while (used < room) {
                        if (js->pending) {
                                size_t n = js->pending_len - js->pending_off;

                                if (n > room - used)
                                        n = room - used;
                                memcpy(out + used, js->pending + js->pending_off, n);
                                used += n;
                                js->pending_off += n;
                                if (js->pending_off == js->pending_len) {
                                        free(js->pending);
                                        js->pending = NULL;
                                }
                                continue;
                        }
                        if (entries >= JOURNAL_STREAM_BATCH) {
                                more = true;
                                break;
                        }
                        r = next_entry(js);
                        if (r < 0)
                                return fail(js, r);
                        if (r == 0) {
                                at_end = true;
                                break;
                        }
                        entries++;
                }
                if (at_end && !js->follow && !js->pending) {
                        js->done = true;
                        (void)js->hooks.send(js->hooks.userdata, out, used, true);
                        return;
                }
                if (used > 0 && js->hooks.send(js->hooks.userdata, out, used, false) < 0) {
                        js->done = true;
                        return;
                }
                if (more) {
                        sd_event_source_set_enabled(js->defer, SD_EVENT_ONESHOT);
                        return;
                }
                if (at_end)
                        return; /* following: the journal's fd says when there is more */
        }
}

static int on_defer(sd_event_source *s, void *userdata) {
        produce(userdata);
        return 0;
}

static int on_journal(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        JournalStream *js = userdata;
        int r = sd_journal_process(js->journal);

        if (r < 0) {
                fail(js, r);
                return 0;
        }
        produce(js);
        return 0;
}

void journal_stream_kick(JournalStream *j) {
        if (j && !j->done)
                sd_event_source_set_enabled(j->defer, SD_EVENT_ONESHOT);
}

/* Position the journal for the backlog (docs/protocol.md: the last lines
 * entries, or those since since; with neither, the last
 * STREAM_LINES_DEFAULT). */
static int seek_backlog(JournalStream *js, const StreamOpen *o) {
        sd_journal *j = js->journal;
        int r;

        if (o->have_since && !o->have_lines)
                return sd_journal_seek_realtime_usec(j, o->since);
        r = sd_journal_seek_tail(j);
        if (r < 0)
                return r;
        if (o->have_lines && o->lines == 0) {
                /* Nothing old: stand on the last entry, already "sent". */
                r = sd_journal_previous(j);
                return r < 0 ? r : 0;
        }
        r = sd_journal_previous_skip(j, o->have_lines ? o->lines : STREAM_LINES_DEFAULT);
        if (r < 0)
                return r;
        js->current = r > 0;
        return 0;
}

int journal_stream_new(sd_event *event, const char *directory, char *const *units, const StreamOpen *o,
                       const JournalStreamHooks *hooks, JournalStream **ret, char *error, size_t error_size) {
        _cleanup_(journal_stream_freep) JournalStream *js = calloc(1, sizeof(*js));
        const char *const *list = units && units[0] ? (const char *const *)units : STREAM_DEFAULT_UNITS;
        int r, fd;

        if (!js) {
                snprintf(error, error_size, "out of memory");
                return -ENOMEM;
        }
        js->event = sd_event_ref(event);
        js->hooks = *hooks;
        js->follow = o->follow;
        js->have_since = o->have_since;
        js->since = o->since;
        if (directory && directory[0])
                r = sd_journal_open_directory(&js->journal, directory, 0);
        else
                r = sd_journal_open(&js->journal, SD_JOURNAL_LOCAL_ONLY);
        if (r < 0) {
                snprintf(error, error_size, "cannot read the journal: %s", strerror(-r));
                return r;
        }
        for (size_t i = 0; list[i]; i++) {
                char match[sizeof("_SYSTEMD_UNIT=") + STREAM_UNIT_NAME_MAX];

                snprintf(match, sizeof(match), "_SYSTEMD_UNIT=%s", list[i]);
                /* Matches of one field are ORed (sd_journal_add_match(3)). */
                r = sd_journal_add_match(js->journal, match, 0);
                if (r < 0) {
                        snprintf(error, error_size, "cannot read the journal: %s", strerror(-r));
                        return r;
                }
        }
        r = seek_backlog(js, o);
        if (r < 0) {
                snprintf(error, error_size, "cannot read the journal: %s", strerror(-r));
                return r;
        }
        r = sd_event_add_defer(event, &js->defer, on_defer, js);
        if (r < 0) {
                snprintf(error, error_size, "cannot read the journal: %s", strerror(-r));
                return r;
        }
        if (js->follow) {
                fd = sd_journal_get_fd(js->journal);
                r = fd < 0 ? fd : sd_journal_get_events(js->journal);
                if (r >= 0)
                        r = sd_event_add_io(event, &js->io, fd, (uint32_t)r, on_journal, js);
                if (r < 0) {
                        snprintf(error, error_size, "cannot follow the journal: %s", strerror(-r));
                        return r;
                }
        }
        /* The first batch goes from the loop, after the open's answer. */
        sd_event_source_set_enabled(js->defer, SD_EVENT_ONESHOT);
        *ret = TAKE_PTR(js);
        return 0;
}

JournalStream *journal_stream_free(JournalStream *js) {
        if (!js)
                return NULL;
        sd_event_source_disable_unref(js->io);
        sd_event_source_disable_unref(js->defer);
        if (js->journal)
                sd_journal_close(js->journal);
        free(js->pending);
        sd_event_unref(js->event);
        free(js);
        return NULL;
}
