/* SPDX-License-Identifier: Apache-2.0 */
/* tether-cloudd: one sd-event loop serving devices (CoAP over TLS) and
 * users (HTTP API). */
#include "config.h"

#include <signal.h>
#include <sys/resource.h>
#include <systemd/sd-daemon.h>
#include <systemd/sd-event.h>
#include <systemd/sd-journal.h>

#include "cloud.h"
#include "log.h"
#include "util.h"

static int main_signal_cb(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        log_info("Received %s, stopping.", strsignal((int)si->ssi_signo));
        return sd_event_exit(sd_event_source_get_event(s), 0);
}

/* SIGHUP: read the API tokens again. Event streams opened with a token
 * that is gone end; device sessions, calls in flight and the other event
 * streams go on as they were. */
static int main_reload_cb(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        CloudConfig *config = userdata;
        size_t before = config->n_tokens;

        (void)sd_notifyf(0, "RELOADING=1\nMONOTONIC_USEC=%llu", now_usec());
        if (cloud_config_reload_tokens(config) < 0)
                log_error("Reload failed, keeping the %zu API token(s) loaded before.", before);
        else {
                log_info("Reloaded %zu API token(s) from '%s'.", config->n_tokens, config->token_file);
                log_info("Closed %u event stream(s) whose token was removed.", api_end_revoked_streams());
        }
        (void)sd_notify(0, "READY=1");
        return 0;
}

/* One file descriptor per device session: take the hard limit. */
static void main_raise_nofile(void) {
        struct rlimit rl;

        if (getrlimit(RLIMIT_NOFILE, &rl) < 0 || rl.rlim_cur >= rl.rlim_max)
                return;
        rl.rlim_cur = rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &rl) < 0)
                log_debug_errno(errno, "Failed to raise RLIMIT_NOFILE: %m");
}

static int run(int argc, char *argv[]) {
        _cleanup_(cloud_config_freep) CloudConfig *config = NULL;
        _cleanup_(journal_freep) Journal *journal = NULL;
        sd_event *event = NULL;
        const char *path;
        unsigned coap_port = 0, api_port = 0, ota_port = 0;
        sigset_t mask;
        int r;

        r = cloud_config_parse_argv(argc, argv, &path);
        if (r != 0)
                return r;
        r = cloud_config_load(path, &config);
        if (r < 0)
                return r;

        (void)signal(SIGPIPE, SIG_IGN);
        main_raise_nofile();
        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        sigaddset(&mask, SIGHUP);
        if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0)
                return log_error_errno(errno, "Failed to block signals: %m");

        r = sd_event_default(&event);
        if (r < 0)
                return log_error_errno(r, "Failed to create the event loop: %m");
        r = sd_event_add_signal(event, NULL, SIGTERM, main_signal_cb, NULL);
        if (r >= 0)
                r = sd_event_add_signal(event, NULL, SIGINT, main_signal_cb, NULL);
        if (r >= 0)
                r = sd_event_add_signal(event, NULL, SIGHUP, main_reload_cb, config);
        if (r >= 0)
                r = sd_event_set_watchdog(event, true);
        if (r < 0) {
                log_error_errno(r, "Failed to set up the event loop: %m");
                goto out;
        }

        r = journal_new(event, config, &journal);
        if (r < 0)
                goto out;
        events_init(config, journal);
        r = devices_start(event, config, &coap_port);
        if (r < 0)
                goto out;
        r = api_start(event, config, journal, &api_port);
        if (r < 0)
                goto out;
        r = ota_server_start(event, config, journal, &ota_port);
        if (r < 0)
                goto out;

        log_info("Listening for devices on %s port %u, HTTP API on %s port %u.", config->coap_listen, coap_port,
                 config->api_listen, api_port);
        (void)sd_notifyf(0,
                         "READY=1\n"
                         "STATUS=Listening: devices on port %u, API on port %u; 0 devices online\n"
                         "X_COAP_PORT=%u\n"
                         "X_API_PORT=%u\n"
                         "X_OTA_PORT=%u",
                         coap_port, api_port, coap_port, api_port, ota_port);

        r = sd_event_loop(event);
        if (r < 0)
                log_error_errno(r, "Event loop failed: %m");
        (void)sd_notify(0, "STOPPING=1\nSTATUS=Stopping");
out:
        api_stop();
        ota_server_stop();
        devices_stop();
        events_stop();
        journal = journal_free(journal);
        sd_event_unref(event);
        return r < 0 ? r : 0;
}

int main(int argc, char *argv[]) {
        int r;

        log_open(CLOUD_PROGRAM);
        log_set_journal_sender(sd_journal_sendv);
        r = run(argc, argv);
        return r < 0 ? EXIT_FAILURE : EXIT_SUCCESS;
}
