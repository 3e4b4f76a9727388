/* tetherd: the device agent. One sd-event loop drives the cloud
 * connection, the plugins' fds and timers, and signals. */
#include <coap3/coap.h>
#include <getopt.h>
#include <signal.h>
#include <systemd/sd-daemon.h>
#include <systemd/sd-event.h>

#include "config.h"
#include "conn.h"
#include "log.h"
#include "ota.h"
#include "plugin-host.h"
#include "registry.h"
#include "util.h"

typedef struct Agent {
        sd_event *event;
        char *config_path;
        Config *config;
        Registry *registry;
        PluginHost *plugins;
        Conn *conn;
        Ota *ota;
} Agent;

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
        r = registry_describe(a->registry, plugins, a->config->max_payload, a->config->max_subscriptions, ret,
                              ret_len);
        json_decref(plugins);
        return r;
}

static void agent_state_changed(void *userdata, bool connected, const char *status) {
        Agent *a = userdata;

        if (status && *status)
                sd_notifyf(false, "STATUS=%s", status);
        if (a->ota)
                ota_connection_changed(a->ota, connected);
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

/* For OTA plugin packages: load the plugins that are on disk now. */
static void agent_reload_plugins(void *userdata) {
        Agent *a = userdata;
        int r;

        plugin_host_unload(a->plugins);
        r = plugin_host_load(a->plugins, a->config);
        log_info("Reloaded plugins, %d running", r < 0 ? 0 : r);
        conn_registry_changed(a->conn);
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
        /* Plugins hold pointers into the old config: unload them first. */
        plugin_host_unload(a->plugins);
        r = conn_reconfigure(a->conn, next);
        if (r < 0)
                log_error_errno(r, "Failed to apply the new cloud settings: %m");
        config_free(a->config);
        a->config = TAKE_PTR(next);
        r = plugin_host_load(a->plugins, a->config);
        ota_reconfigure(a->ota, a->config);
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
        plugin_host_free(a->plugins);
        /* The connection first: it answers OTA's open requests as it goes. */
        conn_free(a->conn);
        ota_free(a->ota);
        registry_free(a->registry);
        config_free(a->config);
        sd_event_unref(a->event);
        free(a->config_path);
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
        _cleanup_free_ char *error = NULL;
        bool check_only = false;
        sigset_t mask;
        int r, c;

        log_open("tetherd");
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
        srandom((unsigned)now_usec() ^ (unsigned)getpid());

        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        sigaddset(&mask, SIGHUP);
        sigaddset(&mask, CONN_RESOLVE_SIGNAL);
        sigprocmask(SIG_BLOCK, &mask, NULL);
        signal(SIGPIPE, SIG_IGN);

        r = sd_event_default(&a.event);
        if (r < 0)
                return log_error_errno(r, "Failed to create the event loop: %m"), 1;
        (void)sd_event_set_watchdog(a.event, true);
        if (sd_event_add_signal(a.event, NULL, SIGTERM, on_signal, &a) < 0 ||
            sd_event_add_signal(a.event, NULL, SIGINT, on_signal, &a) < 0 ||
            sd_event_add_signal(a.event, NULL, SIGHUP, on_signal, &a) < 0)
                return log_error("Failed to watch signals"), 1;

        a.registry = registry_new();
        if (!a.registry)
                return 1;
        r = conn_new(a.event, a.registry, a.config,
                     &(ConnHooks){ .userdata = &a,
                                   .state_changed = agent_state_changed,
                                   .describe = agent_describe,
                                   .ota_request = agent_ota_request },
                     &a.conn);
        if (r < 0)
                return log_error_errno(r, "Failed to set up the cloud connection: %m"), 1;
        r = plugin_host_new(a.event, a.registry, &(PluginHostHooks){ .userdata = &a, .publish = agent_publish },
                            &a.plugins);
        if (r < 0)
                return 1;
        r = plugin_host_load(a.plugins, a.config);
        if (ota_new(a.event, a.conn, a.config, a.config_path,
                    &(OtaHooks){ .userdata = &a,
                                 .reload_plugins = agent_reload_plugins,
                                 .plugin_running = agent_plugin_running },
                    &a.ota) < 0)
                return log_error("Failed to set up OTA"), 1;
        (void)ota_start(a.ota);
        log_info("tetherd %s starting, %d plugin(s) running, cloud %s:%u", PACKAGE_VERSION, r < 0 ? 0 : r,
                 a.config->cloud_host, a.config->cloud_port);
        conn_start(a.conn);
        sd_notifyf(false, "READY=1\nSTATUS=Connecting to %s:%u", a.config->cloud_host, a.config->cloud_port);

        r = sd_event_loop(a.event);
        plugin_host_unload(a.plugins);
        return r < 0 ? 1 : 0;
}
