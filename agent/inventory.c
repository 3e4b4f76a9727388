/* SPDX-License-Identifier: Apache-2.0 */
/* What the device runs on (inventory.h). */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include "inventory.h"
#include "log.h"
#include "proto.h"
#include "spawn.h"
#include "util.h"

/* arch, then every package of the arguments dpkg knows, one per line:
 * "arch\tARCH" and "pkg\tNAME\tVERSION\tSTATUS" (dpkg's three status
 * letters). The package names are arguments, never part of the script.
 * dpkg-query exits 1 when a pattern matches nothing: the lines it wrote
 * count all the same. */
static const char inventory_script[] =
        "a=$(dpkg --print-architecture 2>/dev/null) && printf 'arch\\t%s\\n' \"$a\"; "
        "exec dpkg-query \"--root=$0\" -W -f='pkg\\t${Package}\\t${Version}\\t${db:Status-Abbrev}\\n' \"$@\" "
        "2>/dev/null";

struct Inventory {
        sd_event *event;
        InventoryHooks hooks;
        char *dpkg_root;
        char **packages;
        json_t *system;

        pid_t pid;
        int fd;
        sd_event_source *child_source, *io_source;
        char *out;
        size_t out_len;
        bool overflow, again;
        json_t *next; /* os and kernel of the run in progress */
};

static void strv_free_(char **v) {
        for (size_t i = 0; v && v[i]; i++)
                free(v[i]);
        free(v);
}

static char **strv_copy(char *const *v) {
        size_t n = 0;
        char **c;

        while (v && v[n])
                n++;
        c = calloc(n + 1, sizeof(char *));
        for (size_t i = 0; c && i < n; i++)
                if (!(c[i] = strdup(v[i]))) {
                        strv_free_(c);
                        return NULL;
                }
        return c;
}

/* PRETTY_NAME of os-release (os-release(5): /etc, then /usr/lib), its
 * quotes and backslash escapes undone; NULL if none. */
static char *os_pretty_name(void) {
        static const char *const paths[] = { "/etc/os-release", "/usr/lib/os-release" };
        char line[512];

        for (size_t i = 0; i < ELEMENTSOF(paths); i++) {
                _cleanup_fclose_ FILE *f = fopen(paths[i], "re");

                if (!f)
                        continue;
                while (fgets(line, sizeof(line), f)) {
                        char *v = line + strlen("PRETTY_NAME="), *o;
                        char quote = 0;

                        if (!startswith(line, "PRETTY_NAME="))
                                continue;
                        v[strcspn(v, "\n")] = 0;
                        if (*v == '"' || *v == '\'')
                                quote = *v++;
                        for (o = v; *v && *v != quote; v++) {
                                if (*v == '\\' && v[1])
                                        v++;
                                *o++ = *v;
                        }
                        *o = 0;
                        return strdup(line + strlen("PRETTY_NAME=") + (quote ? 1 : 0));
                }
                return NULL;
        }
        return NULL;
}

/* The output of a run into system (arch and packages). */
static void parse_output(Inventory *inv, json_t *system) {
        json_t *packages = json_object();
        char *save = NULL;

        if (!packages)
                return;
        for (char *line = strtok_r(inv->out, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
                char *f[4] = {}, *p = line;
                size_t n = 0;

                while (p && n < ELEMENTSOF(f)) {
                        f[n++] = p;
                        p = strchr(p, '\t');
                        if (p)
                                *p++ = 0;
                }
                if (p)
                        continue; /* more fields than any line has */
                if (n == 2 && streq(f[0], "arch") && proto_text_clean(f[1], strlen(f[1]), PROTO_SYSTEM_TEXT_MAX))
                        (void)json_object_set_new(system, "arch", json_string(f[1]));
                /* Installed: the status letter (the second) is 'i'. */
                else if (n == 4 && streq(f[0], "pkg") && strlen(f[3]) >= 2 && f[3][1] == 'i' &&
                         proto_package_name_valid(f[1], strlen(f[1])) &&
                         proto_package_version_valid(f[2], strlen(f[2])) &&
                         json_object_size(packages) < PROTO_SYSTEM_PACKAGES_MAX)
                        (void)json_object_set_new(packages, f[1], json_string(f[2]));
        }
        (void)json_object_set_new(system, "packages", packages);
}

static int start(Inventory *inv);

static void finish(Inventory *inv) {
        json_t *system = TAKE_PTR(inv->next);

        inv->child_source = sd_event_source_disable_unref(inv->child_source);
        inv->io_source = sd_event_source_disable_unref(inv->io_source);
        if (inv->fd >= 0)
                close(inv->fd);
        inv->fd = -1;
        inv->pid = 0;
        if (system && inv->out && !inv->overflow)
                parse_output(inv, system);
        free(inv->out);
        inv->out = NULL;
        inv->out_len = 0;
        inv->overflow = false;
        if (system && !json_equal(system, inv->system)) {
                json_decref(inv->system);
                inv->system = system;
                inv->hooks.changed(inv->hooks.userdata);
        } else
                json_decref(system);
        if (inv->again) {
                inv->again = false;
                (void)start(inv);
        }
}

/* Read what is there; false at the end (EOF, error or too much). */
static bool read_output(Inventory *inv) {
        for (;;) {
                char buf[4096];
                ssize_t n = read(inv->fd, buf, sizeof(buf));
                char *p;

                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return errno == EAGAIN;
                if (n == 0)
                        return false;
                if (inv->out_len + (size_t)n > INVENTORY_OUTPUT_MAX) {
                        log_warning("dpkg-query wrote more than %u bytes; leaving the packages out",
                                    (unsigned)INVENTORY_OUTPUT_MAX);
                        inv->overflow = true;
                        (void)kill(inv->pid, SIGKILL);
                        return false;
                }
                p = realloc(inv->out, inv->out_len + (size_t)n + 1);
                if (!p) {
                        inv->overflow = true;
                        return false;
                }
                memcpy(p + inv->out_len, buf, (size_t)n);
                inv->out = p;
                inv->out_len += (size_t)n;
                p[inv->out_len] = 0;
        }
}

static int on_io(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        Inventory *inv = userdata;

        if (!read_output(inv))
                inv->io_source = sd_event_source_disable_unref(inv->io_source);
        return 0;
}

static int on_exit_(sd_event_source *s, const siginfo_t *si, void *userdata) {
        Inventory *inv = userdata;

        if (inv->io_source)
                (void)read_output(inv);
        finish(inv);
        return 0;
}

static int start(Inventory *inv) {
        _cleanup_free_ const char **argv = NULL;
        const char *step = NULL;
        size_t n = 0, k = 0;
        int fd, r;
        pid_t pid;

        while (inv->packages && inv->packages[n])
                n++;
        argv = calloc(n + 8, sizeof(char *));
        if (!argv)
                return -ENOMEM;
        argv[k++] = "/bin/sh";
        argv[k++] = "-c";
        argv[k++] = inventory_script;
        argv[k++] = inv->dpkg_root; /* $0 */
        argv[k++] = "tether-agent";
        argv[k++] = "tether-plugin-*";
        for (size_t i = 0; i < n; i++)
                argv[k++] = inv->packages[i];
        r = spawn_reader(argv, &pid, &fd, &step);
        if (r < 0)
                return streq(step, "fork") ? log_warning_errno(r, "Cannot start dpkg-query: %m")
                                           : log_warning_errno(r, "Cannot read the installed packages: %m");
        inv->fd = fd;
        inv->pid = pid;
        r = sd_event_add_io(inv->event, &inv->io_source, inv->fd, EPOLLIN, on_io, inv);
        if (r >= 0)
                r = sd_event_add_child(inv->event, &inv->child_source, pid, WEXITED, on_exit_, inv);
        if (r < 0) {
                log_warning_errno(r, "Cannot watch dpkg-query: %m");
                (void)kill(pid, SIGKILL);
                (void)waitpid(pid, NULL, 0); /* killed: at once */
                inv->again = false;
                finish(inv);
                return r;
        }
        return 0;
}

int inventory_refresh(Inventory *inv) {
        _cleanup_free_ char *os = NULL;
        struct utsname u;
        json_t *next;

        if (inv->pid > 0) {
                inv->again = true;
                return 0;
        }
        next = json_object();
        if (!next)
                return -ENOMEM;
        os = os_pretty_name();
        if (os && proto_text_clean(os, strlen(os), PROTO_SYSTEM_TEXT_MAX))
                (void)json_object_set_new(next, "os", json_string(os));
        if (uname(&u) == 0 && proto_text_clean(u.release, strlen(u.release), PROTO_SYSTEM_TEXT_MAX))
                (void)json_object_set_new(next, "kernel", json_string(u.release));
        json_decref(inv->next);
        inv->next = next;
        /* Until dpkg answers, what is known already. */
        if (!inv->system) {
                inv->system = json_deep_copy(next);
                if (inv->system)
                        inv->hooks.changed(inv->hooks.userdata);
        }
        return start(inv);
}

json_t *inventory_system(Inventory *inv) {
        return inv->system;
}

int inventory_reconfigure(Inventory *inv, const char *dpkg_root, char *const *packages) {
        char *root = strdup(dpkg_root ?: "/"), **p = strv_copy(packages);

        if (!root || !p) {
                free(root);
                strv_free_(p);
                return -ENOMEM;
        }
        free(inv->dpkg_root);
        inv->dpkg_root = root;
        strv_free_(inv->packages);
        inv->packages = p;
        return 0;
}

Inventory *inventory_free(Inventory *inv) {
        if (!inv)
                return NULL;
        if (inv->pid > 0) {
                (void)kill(inv->pid, SIGKILL);
                (void)waitpid(inv->pid, NULL, 0); /* killed: at once */
        }
        sd_event_source_disable_unref(inv->child_source);
        sd_event_source_disable_unref(inv->io_source);
        if (inv->fd >= 0)
                close(inv->fd);
        free(inv->out);
        json_decref(inv->next);
        json_decref(inv->system);
        free(inv->dpkg_root);
        strv_free_(inv->packages);
        sd_event_unref(inv->event);
        free(inv);
        return NULL;
}

int inventory_new(sd_event *event, const char *dpkg_root, char *const *packages, const InventoryHooks *hooks,
                  Inventory **ret) {
        _cleanup_(inventory_freep) Inventory *inv = calloc(1, sizeof(Inventory));
        int r;

        if (!inv)
                return -ENOMEM;
        inv->fd = -1;
        inv->event = sd_event_ref(event);
        inv->hooks = *hooks;
        r = inventory_reconfigure(inv, dpkg_root, packages);
        if (r < 0)
                return r;
        *ret = TAKE_PTR(inv);
        return 0;
}
