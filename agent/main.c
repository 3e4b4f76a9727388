/* SPDX-License-Identifier: Apache-2.0 */
/* tetherd: the device agent. One sd-event loop drives the cloud
 * connection, the plugins' fds and timers, and signals. */
#include <coap3/coap.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <sys/random.h>
#include <systemd/sd-daemon.h>
#include <systemd/sd-event.h>
#include <systemd/sd-journal.h>

#include "agent-config.h"
#include "conn.h"
#include "enroll.h"
#include "local-api.h"
#include "log.h"
#include "loop-probe.h"
#include "outbox.h"
#include "inventory.h"
#include "ota.h"
#include "plugin-host.h"
#include "proto.h"
#include "registry.h"
#include "streams.h"
#include "util.h"

typedef struct Agent {
        sd_event *event;
        char *config_path;
        Config *config;
        Registry *registry;
        PluginHost *plugins;
        Outbox *outbox;
        Conn *conn;
        Enroll *enroll;
        LocalApi *local;
        char *status;           /* last STATUS= line */
        uint64_t started_usec;  /* CLOCK_MONOTONIC */
        uint64_t connected_usec; /* 0 while not connected */
        /* X_TETHER_OUTBOX= notifications, at most one per interval. */
        sd_event_source *notify_source;
        size_t queued, queued_notified;
        bool queued_known;
        Ota *ota;
        Inventory *inventory;
        LoopProbe *probe;
        Streams *streams;
} Agent;

#define AGENT_NOTIFY_OUTBOX_USEC 100000

static void outbox_limits(const Config *c, OutboxLimits *ret) {
        *ret = (OutboxLimits){
                .max_events = c->outbox_max_events,
                .max_bytes = c->outbox_max_bytes,
                .overflow = c->outbox_overflow == CONFIG_OVERFLOW_DROP_OLDEST ? OUTBOX_DROP_OLDEST : OUTBOX_REJECT,
                .sync_always = c->outbox_sync_ms == 0,
        };
}

static int open_outbox(Agent *a) {
        const OutboxStats *st;
        OutboxLimits limits;
        int r;

        outbox_limits(a->config, &limits);
        r = outbox_open(a->config->state_dir, &limits, &a->outbox);
        if (r == -EBUSY)
                return log_error_errno(r, "The outbox in '%s' is in use by another tetherd", a->config->state_dir);
        if (r < 0)
                return log_error_errno(r, "Failed to open the outbox in '%s': %m", a->config->state_dir);
        st = outbox_stats(a->outbox);
        if (st->recreated)
                log_error("The outbox file in '%s' was unreadable; kept it as '%s.corrupt' and started a new one",
                          a->config->state_dir, OUTBOX_FILE);
        if (st->damaged_bytes > 0)
                log_warning("Outbox '%s/%s': skipped %zu damaged byte(s) in %zu place(s), the first at offset "
                            "%" PRIu64 " (a write torn by a crash?)",
                            a->config->state_dir, OUTBOX_FILE, st->damaged_bytes, st->damaged_places,
                            st->first_damage);
        log_info("Outbox '%s/%s': %" PRIu64 " event(s) waiting, epoch %016" PRIx64 ", next sequence number %" PRIu64,
                 a->config->state_dir, OUTBOX_FILE, st->recovered, outbox_epoch(a->outbox),
                 outbox_next_seq(a->outbox));
        return 0;
}

static int on_notify_outbox(sd_event_source *s, uint64_t usec, void *userdata) {
        Agent *a = userdata;

        if (a->queued_known && a->queued == a->queued_notified)
                return 0;
        a->queued_known = true;
        a->queued_notified = a->queued;
        (void)sd_notifyf(false, "X_TETHER_OUTBOX=%zu", a->queued);
        /* Whatever changes next waits a full interval. */
        sd_event_source_set_time(s, usec + AGENT_NOTIFY_OUTBOX_USEC);
        sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
        return 0;
}

static void agent_queue_changed(void *userdata, size_t queued) {
        Agent *a = userdata;
        int enabled = SD_EVENT_OFF;

        a->queued = queued;
        (void)sd_event_source_get_enabled(a->notify_source, &enabled);
        if (enabled == SD_EVENT_OFF) {
                sd_event_source_set_time(a->notify_source, now_usec() + AGENT_NOTIFY_OUTBOX_USEC);
                sd_event_source_set_enabled(a->notify_source, SD_EVENT_ONESHOT);
        }
}

static int agent_publish(void *userdata, const char *name, const char *data, uint32_t ttl, uint32_t flags) {
        Agent *a = userdata;
        return conn_publish(a->conn, name, data, ttl, flags);
}

static int agent_describe(void *userdata, char **ret, size_t *ret_len) {
        Agent *a = userdata;
        json_t *plugins = plugin_host_describe(a->plugins);
        int r;

        if (!plugins)
                return -ENOMEM;
        r = registry_describe(a->registry, plugins, a->inventory ? inventory_system(a->inventory) : NULL,
                              a->config->max_payload, a->config->max_subscriptions, ret, ret_len);
        json_decref(plugins);
        return r;
}

/* STATUS= for systemd, kept for tetherctl status. */
static void agent_set_status(Agent *a, const char *status) {
        char *copy = strdup(status);

        if (copy) {
                free(a->status);
                a->status = copy;
        }
        sd_notifyf(false, "STATUS=%s", status);
}

static void agent_state_changed(void *userdata, bool connected, const char *status) {
        Agent *a = userdata;

        if (!connected)
                a->connected_usec = 0;
        else if (a->connected_usec == 0)
                a->connected_usec = now_usec();
        if (status && *status)
                agent_set_status(a, status);
        if (a->ota)
                ota_connection_changed(a->ota, connected);
        if (a->enroll)
                enroll_connection_changed(a->enroll, connected);
        if (a->streams)
                streams_connection_changed(a->streams, connected);
}

/* Enrolled: the certificate is in place, connect without waiting. */
static void agent_enrolled(void *userdata, const char *device_id) {
        Agent *a = userdata;
        char status[256 + CONFIG_HOST_TEXT_MAX];

        snprintf(status, sizeof(status), "Enrolled as '%s'; connecting to %s", device_id,
                 config_host_text(&a->config->cloud_hosts[0], (char[CONFIG_HOST_TEXT_MAX]){}));
        agent_set_status(a, status);
        conn_retry_now(a->conn);
}

static void agent_enroll_status(void *userdata, const char *status) {
        agent_set_status(userdata, status);
}

static int agent_enroll(void *userdata, const char *token, const char *id, bool force, char *error,
                        size_t error_size) {
        Agent *a = userdata;

        return enroll_request(a->enroll, token, id, force, error, error_size);
}

/* The "counters" of tetherctl status --json (docs/cli.md). */
static json_t *agent_counters(Agent *a) {
        const ConnStats *cs = conn_stats(a->conn);
        const StreamsStats *ss = streams_stats(a->streams);
        json_t *calls = json_object(), *reads = json_object(), *counters;

        for (ConnServed i = 0; calls && reads && i < _CONN_SERVED_MAX; i++)
                if (json_object_set_new(calls, conn_served_name(i), json_integer((json_int_t)cs->calls[i])) < 0 ||
                    json_object_set_new(reads, conn_served_name(i), json_integer((json_int_t)cs->reads[i])) < 0)
                        break;
        counters = json_pack("{s:I, s:I, s:I, s:I, s:f, s:o, s:o, s:{s:I, s:I, s:I, s:I, s:I}, s:{s:I}, s:o}",
                         "connect_attempts", (json_int_t)cs->connect_attempts, "handshakes_completed",
                         (json_int_t)cs->handshakes_completed, "handshakes_failed",
                         (json_int_t)cs->handshakes_failed, "reconnects", (json_int_t)cs->reconnects,
                         "connected_sec_total", conn_connected_ms(a->conn) / 1e3, "calls", calls, "reads", reads,
                         "events", "published", (json_int_t)cs->events_published, "acked",
                         (json_int_t)cs->events_acked, "refused", (json_int_t)cs->events_refused, "held",
                         (json_int_t)cs->events_held, "queued", (json_int_t)conn_queued(a->conn), "ota", "held",
                         (json_int_t)(a->ota ? ota_reports_held(a->ota) : 0), "loop_delay",
                         loop_probe_to_json(a->probe));
        if (counters && json_object_update_new(counters,
                                               json_pack("{s:I, s:I, s:{s:I, s:I, s:I}}", "streams_open",
                                                         (json_int_t)ss->open, "streams_opened",
                                                         (json_int_t)ss->opened, "streams", "refused",
                                                         (json_int_t)ss->refused, "bytes_in",
                                                         (json_int_t)ss->bytes_in, "bytes_out",
                                                         (json_int_t)ss->bytes_out)) < 0)
                counters = (json_decref(counters), NULL);
        return counters;
}

/* Every entry of [Cloud] Host=, in order: [{"host": ..., "port": ...}]. */
static json_t *agent_cloud_hosts(Agent *a) {
        json_t *list = json_array();

        for (size_t i = 0; list && i < a->config->n_cloud_hosts; i++)
                if (json_array_append_new(list, json_pack("{s:s, s:i}", "host", a->config->cloud_hosts[i].name,
                                                          "port", (int)a->config->cloud_hosts[i].port)) < 0)
                        return json_decref(list), NULL;
        return list;
}

/* What "tetherctl status" shows: the describe document plus the state of
 * the connection. */
static json_t *agent_status(void *userdata) {
        Agent *a = userdata;
        _cleanup_free_ char *describe = NULL;
        json_t *st, *variables, *values;
        const char *name;
        json_t *type;
        size_t len;
        uint64_t now = now_usec();
        const ConfigHost *host = conn_host(a->conn, NULL);

        if (agent_describe(a, &describe, &len) < 0)
                return NULL;
        st = json_loadb(describe, len, 0, NULL);
        if (!st)
                return NULL;
        values = json_object();
        variables = json_object_get(st, "variables");
        json_object_foreach(variables, name, type) {
                _cleanup_free_ char *v = NULL;
                size_t vlen;
                json_t *value = NULL;

                if (registry_read(a->registry, name, &v, &vlen) >= 0)
                        (void)proto_value_decode((const uint8_t *)v, vlen, &value, &(uint32_t){ 0 });
                json_object_set_new(values, name, value ? value : json_null());
        }
        if (json_object_update_new(st, json_pack("{s:b, s:s, s:s, s:i, s:o, s:f, s:f, s:I, s:o, s:o}", "connected",
                                                 conn_is_connected(a->conn), "state", a->status ? a->status : "",
                                                 "cloud_host", host->name, "cloud_port", (int)host->port,
                                                 "cloud_hosts", agent_cloud_hosts(a), "uptime_sec",
                                                 (now - a->started_usec) / 1e6, "connected_sec",
                                                 a->connected_usec ? (now - a->connected_usec) / 1e6 : 0.0,
                                                 "queued_events", (json_int_t)conn_queued(a->conn), "values",
                                                 values, "counters", agent_counters(a))) < 0 ||
            json_object_set_new(st, "tls_resumed",
                                json_boolean(conn_is_connected(a->conn) && conn_stats(a->conn)->resumed)) < 0 ||
            json_object_update_new(st, enroll_status(a->enroll)) < 0) {
                json_decref(st);
                return NULL;
        }
        return st;
}

/* (Re)open the local API with the current configuration. Failing to is
 * logged, never fatal: the cloud connection matters more. */
static void agent_local_api_configure(Agent *a) {
        int missing = 0, r;

        r = local_api_configure(a->local, a->config->local_socket, a->config->local_group,
                                LOCAL_API_REQUEST_MAX(a->config->max_payload), &missing);
        if (r < 0)
                log_error_errno(r, "Failed to listen on '%s', tetherctl will not work: %m",
                                a->config->local_socket);
        if (missing)
                log_warning("Group '%s' ([Local] Group=) does not exist: only root and the agent's user may use "
                            "tetherctl",
                            a->config->local_group);
}

static unsigned agent_ota_request(void *userdata, const char *job, const uint8_t *data, size_t len, char *text,
                                  size_t text_size) {
        Agent *a = userdata;

        if (!a->ota) {
                snprintf(text, text_size, "busy: starting up");
                return COAP_RESPONSE_CODE(503);
        }
        return ota_handle_request(a->ota, job, data, len, text, text_size);
}

static unsigned agent_stream_request(void *userdata, unsigned method, uint32_t sid, const char *query,
                                     size_t query_len, const uint8_t *data, size_t len, ConnStreamAnswer *answer) {
        Agent *a = userdata;

        if (!a->streams) {
                snprintf(answer->text, sizeof(answer->text), "busy: starting up");
                return COAP_RESPONSE_CODE(503);
        }
        return streams_request(a->streams, method, sid, query, query_len, data, len, answer);
}

/* For OTA plugin packages: load the plugins that are on disk now. */
static void agent_reload_plugins(void *userdata) {
        Agent *a = userdata;
        int r;

        plugin_host_unload(a->plugins);
        r = plugin_host_load(a->plugins, a->config);
        log_info("Reloaded plugins, %d running", r < 0 ? 0 : r);
        conn_registry_changed(a->conn);
}

/* An OTA job ended: what is installed may have changed. */
static void agent_ota_ended(void *userdata) {
        Agent *a = userdata;

        if (a->inventory)
                (void)inventory_refresh(a->inventory);
}

static void agent_inventory_changed(void *userdata) {
        Agent *a = userdata;

        conn_describe_changed(a->conn);
}

static bool agent_plugin_running(void *userdata, const char *name) {
        Agent *a = userdata;
        json_t *list = plugin_host_describe(a->plugins), *p;
        bool found = false;
        size_t i;

        json_array_foreach(list, i, p)
                if (streq(json_string_value(json_object_get(p, "name")) ?: "", name))
                        found = true;
        json_decref(list);
        return found;
}

static int on_signal(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        Agent *a = userdata;
        _cleanup_(config_freep) Config *next = NULL;
        _cleanup_free_ char *error = NULL;
        int r;

        if (si->ssi_signo != SIGHUP) {
                log_info("Received %s, stopping", strsignal((int)si->ssi_signo));
                sd_notify(false, "STOPPING=1\nSTATUS=Stopping");
                return sd_event_exit(a->event, 0);
        }

        sd_notifyf(false, "RELOADING=1\nMONOTONIC_USEC=%llu", now_usec());
        r = config_load(a->config_path, &next, &error);
        if (r < 0) {
                log_error("Reload failed, keeping the running configuration: %s", error ? error : strerror(-r));
                sd_notify(false, "READY=1");
                return 0;
        }
        if (!streq(next->state_dir, a->config->state_dir))
                log_warning("[State] Directory= changed to '%s': the outbox stays in '%s' until a restart",
                            next->state_dir, a->config->state_dir);
        {
                OutboxLimits limits;

                outbox_limits(next, &limits);
                outbox_set_limits(a->outbox, &limits);
        }
        /* Plugins hold pointers into the old config: unload them first. */
        plugin_host_unload(a->plugins);
        r = conn_reconfigure(a->conn, next);
        if (r < 0)
                log_error_errno(r, "Failed to apply the new cloud settings: %m");
        enroll_reconfigure(a->enroll, next);
        streams_reconfigure(a->streams, next);
        config_free(a->config);
        a->config = TAKE_PTR(next);
        r = plugin_host_load(a->plugins, a->config);
        agent_local_api_configure(a);
        ota_reconfigure(a->ota, a->config);
        if (inventory_reconfigure(a->inventory, a->config->ota.dpkg_root, a->config->inventory_packages) < 0)
                log_warning("Out of memory applying [Inventory] Packages=");
        else
                (void)inventory_refresh(a->inventory);
        log_info("Reloaded configuration, %d plugin(s) running", r < 0 ? 0 : r);
        conn_registry_changed(a->conn);
        sd_notify(false, "READY=1");
        return 0;
}

static void help(void) {
        printf("Usage: tetherd [OPTIONS]\n\n"
               "The tether device agent: keeps one mutually authenticated connection to a\n"
               "tether cloud and serves functions, variables and events from its plugins.\n\n"
               "  -c --config=PATH   configuration file (default %s)\n"
               "     --check-config  load the configuration, report errors and exit\n"
               "  -h --help          show this help\n"
               "     --version       show the version\n\n"
               "Signals: SIGTERM stops, SIGHUP reloads configuration and plugins.\n"
               "Environment: TETHER_LOG_LEVEL=debug|info|notice|warning|err\n",
               CONFIG_DEFAULT_PATH);
}

static void agent_done(Agent *a) {
        local_api_free(a->local);
        plugin_host_free(a->plugins);
        /* The connection first: it answers OTA's and enrollment's open
         * requests (a renewal in flight) as it goes, so both must still be
         * there. */
        conn_free(a->conn);
        a->conn = NULL;
        /* After the connection: its requests still waiting are answered
         * into the streams as it goes. */
        a->streams = streams_free(a->streams);
        a->enroll = enroll_free(a->enroll);
        outbox_free(a->outbox);
        sd_event_source_disable_unref(a->notify_source);
        ota_free(a->ota);
        inventory_free(a->inventory);
        loop_probe_free(a->probe);
        registry_free(a->registry);
        config_free(a->config);
        sd_event_unref(a->event);
        free(a->config_path);
        free(a->status);
}

int main(int argc, char *argv[]) {
        static const struct option opts[] = {
                { "config", required_argument, NULL, 'c' },
                { "check-config", no_argument, NULL, 'C' },
                { "help", no_argument, NULL, 'h' },
                { "version", no_argument, NULL, 'V' },
                {},
        };
        _cleanup_(agent_done) Agent a = {};
        _cleanup_free_ char *error = NULL, *status = NULL;
        char hosts[CONFIG_HOSTS_MAX * (CONFIG_HOST_TEXT_MAX + 2)];
        bool check_only = false;
        unsigned seed;
        sigset_t mask;
        int r, c;

        log_open("tetherd");
        log_set_journal_sender(sd_journal_sendv);
        while ((c = getopt_long(argc, argv, "c:h", opts, NULL)) >= 0) {
                switch (c) {
                case 'c':
                        free(a.config_path);
                        a.config_path = strdup(optarg);
                        break;
                case 'C':
                        check_only = true;
                        break;
                case 'h':
                        help();
                        return 0;
                case 'V':
                        printf("tetherd %s\n", PACKAGE_VERSION);
                        return 0;
                default:
                        return 2;
                }
        }
        if (optind < argc) {
                log_error("Unexpected argument '%s'", argv[optind]);
                return 2;
        }
        if (!a.config_path)
                a.config_path = strdup(CONFIG_DEFAULT_PATH);
        if (!a.config_path)
                return 1;

        r = config_load(a.config_path, &a.config, &error);
        if (r < 0) {
                log_error("Invalid configuration: %s", error ? error : strerror(-r));
                return 1;
        }
        if (check_only) {
                printf("%s: OK\n", a.config_path);
                return 0;
        }
        /* Reconnect and start jitter: devices booted together must differ. */
        if (getrandom(&seed, sizeof(seed), GRND_NONBLOCK) != sizeof(seed))
                seed = (unsigned)now_usec() ^ (unsigned)getpid();
        srandom(seed);

        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        sigaddset(&mask, SIGHUP);
        sigaddset(&mask, CONN_RESOLVE_SIGNAL);
        sigaddset(&mask, ENROLL_RESOLVE_SIGNAL);
        sigprocmask(SIG_BLOCK, &mask, NULL);
        signal(SIGPIPE, SIG_IGN);

        r = sd_event_default(&a.event);
        if (r < 0)
                return log_error_errno(r, "Failed to create the event loop: %m"), 1;
        (void)sd_event_set_watchdog(a.event, true);
        r = loop_probe_new(a.event, &a.probe);
        if (r < 0)
                return log_error_errno(r, "Failed to add the loop delay probe: %m"), 1;
        if (sd_event_add_signal(a.event, NULL, SIGTERM, on_signal, &a) < 0 ||
            sd_event_add_signal(a.event, NULL, SIGINT, on_signal, &a) < 0 ||
            sd_event_add_signal(a.event, NULL, SIGHUP, on_signal, &a) < 0)
                return log_error("Failed to watch signals"), 1;

        a.registry = registry_new();
        if (!a.registry)
                return 1;
        if (open_outbox(&a) < 0)
                return 1;
        r = sd_event_add_time(a.event, &a.notify_source, CLOCK_MONOTONIC, 0, 10000, on_notify_outbox, &a);
        if (r < 0)
                return log_error_errno(r, "Failed to add a timer: %m"), 1;
        sd_event_source_set_enabled(a.notify_source, SD_EVENT_OFF);
        r = conn_new(a.event, a.registry, a.outbox, a.config,
                     &(ConnHooks){ .userdata = &a,
                                   .state_changed = agent_state_changed,
                                   .describe = agent_describe,
                                   .queue_changed = agent_queue_changed,
                                   .ota_request = agent_ota_request,
                                   .stream_request = agent_stream_request },
                     &a.conn);
        if (r < 0)
                return log_error_errno(r, "Failed to set up the cloud connection: %m"), 1;
        r = streams_new(a.event, a.conn, a.config, &a.streams);
        if (r < 0)
                return log_error_errno(r, "Failed to set up streams: %m"), 1;
        r = enroll_new(a.event, a.conn, a.config,
                       &(EnrollHooks){ .userdata = &a, .enrolled = agent_enrolled, .status = agent_enroll_status },
                       &a.enroll);
        if (r < 0)
                return log_error_errno(r, "Failed to set up enrollment: %m"), 1;
        r = plugin_host_new(a.event, a.registry, &(PluginHostHooks){ .userdata = &a, .publish = agent_publish },
                            &a.plugins);
        if (r < 0)
                return 1;
        r = plugin_host_load(a.plugins, a.config);
        a.started_usec = now_usec();
        if (local_api_new(a.event,
                          &(LocalApiHooks){ .userdata = &a,
                                            .status = agent_status,
                                            .publish = agent_publish,
                                            .enroll = agent_enroll },
                          &a.local) < 0)
                return log_error("Out of memory"), 1;
        agent_local_api_configure(&a);
        if (ota_new(a.event, a.conn, a.config, a.config_path,
                    &(OtaHooks){ .userdata = &a,
                                 .reload_plugins = agent_reload_plugins,
                                 .plugin_running = agent_plugin_running,
                                 .job_ended = agent_ota_ended },
                    &a.ota) < 0)
                return log_error("Failed to set up OTA"), 1;
        /* After ota_new(): SIGCHLD is blocked for child sources. */
        if (inventory_new(a.event, a.config->ota.dpkg_root, a.config->inventory_packages,
                          &(InventoryHooks){ .userdata = &a, .changed = agent_inventory_changed }, &a.inventory) < 0)
                return log_error("Out of memory"), 1;
        (void)inventory_refresh(a.inventory);
        (void)ota_start(a.ota);
        log_info("tetherd %s starting, %d plugin(s) running, cloud %s", PACKAGE_VERSION, r < 0 ? 0 : r,
                 config_hosts_text(a.config, hosts, sizeof(hosts)));
        /* Without a certificate: enroll first (TokenFile=) or wait for
         * tetherctl enroll; no connect attempts meanwhile. */
        if (enroll_start(a.enroll) > 0) {
                conn_start(a.conn);
                if (asprintf(&status, "Connecting to %s",
                             config_host_text(&a.config->cloud_hosts[0], (char[CONFIG_HOST_TEXT_MAX]){})) >= 0)
                        agent_set_status(&a, status);
        }
        a.queued = outbox_count(a.outbox);
        sd_notifyf(false, "READY=1\nX_TETHER_OUTBOX=%zu", a.queued);
        a.queued_notified = a.queued;
        a.queued_known = true;

        r = sd_event_loop(a.event);
        plugin_host_unload(a.plugins);
        return r < 0 ? 1 : 0;
}
