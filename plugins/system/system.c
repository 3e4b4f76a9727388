/* SPDX-License-Identifier: Apache-2.0 */
/* The system plugin: the gateway's own state as cloud variables, and the
 * two privileged actions a remote operator needs, both off by default
 * (docs/plugins/system.md).
 *
 *   variables  system.uptime (s), system.load1/.load5/.load15,
 *              system.mem_total/.mem_available (B),
 *              system.disk.NAME.size/.avail (B), .used (%) per Mounts= entry,
 *              system.addresses (JSON string), system.os, system.kernel,
 *              system.hostname, system.agent_version, system.plugins (JSON)
 *   functions  system.restart "UNIT"  only with RestartUnits=, only those
 *              system.reboot ""       only with AllowReboot=yes
 *   events     system/restart, system/reboot: the outcome of the D-Bus call
 *
 * Restart and reboot go over sd-bus to systemd and logind, asynchronously
 * on the agent's loop: the function returns once the request is sent, the
 * event says what systemd answered. No shell anywhere. */
#include <arpa/inet.h>
#include <errno.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>
#include <sys/utsname.h>
#include <syslog.h>
#include <systemd/sd-bus.h>
#include <tether/plugin.h>

#define SYSTEM_UNIT_MAX 255
#define SYSTEM_MOUNT_NAME_MAX 40 /* "system.disk." + NAME + ".avail" <= 64 */

typedef struct System System;

typedef struct Mount {
        System *sys;
        char *path;
        char name[SYSTEM_MOUNT_NAME_MAX + 1];
        char var_size[TETHER_NAME_MAX + 1], var_avail[TETHER_NAME_MAX + 1], var_used[TETHER_NAME_MAX + 1];
} Mount;

typedef struct Request {
        System *sys;
        sd_bus_slot *slot;
        char unit[SYSTEM_UNIT_MAX + 1]; /* empty for reboot */
        struct Request *next;
} Request;

struct System {
        const struct tether_host_api *api;
        tether_host *host;
        char *proc_root;
        char *os_release;
        bool include_loopback;
        Mount *mounts;
        size_t n_mounts;
        char **restart_units; /* NULL-terminated; NULL = restart off */
        bool allow_reboot;
        sd_bus *bus;
        Request *requests;
        char *scratch; /* the last string a getter handed out */
};

/* --- small helpers ---------------------------------------------------------------- */

static char **split_words(const char *s) {
        char *copy = strdup(s), *save = NULL, **v = NULL;
        size_t n = 0;

        if (!copy)
                return NULL;
        v = calloc(1, sizeof(char *));
        for (char *t = strtok_r(copy, " \t", &save); v && t; t = strtok_r(NULL, " \t", &save)) {
                char **m = realloc(v, (n + 2) * sizeof(char *));
                if (!m || !(m[n] = strdup(t))) {
                        free(m ? m : v);
                        v = NULL;
                        break;
                }
                v = m;
                v[++n] = NULL;
        }
        free(copy);
        return v;
}

static void strv_free(char **v) {
        for (char **p = v; p && *p; p++)
                free(*p);
        free(v);
}

static bool parse_bool(const char *v, bool def) {
        if (!v || !*v)
                return def;
        return strcmp(v, "yes") == 0 || strcmp(v, "true") == 0 || strcmp(v, "1") == 0 || strcmp(v, "on") == 0;
}

static int bool_check(System *s, const char *key) {
        static const char *const ok[] = { "yes", "no", "true", "false", "1", "0", "on", "off" };
        const char *v = s->api->config_get(s->host, key);

        if (!v || !*v)
                return 0;
        for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++)
                if (strcmp(v, ok[i]) == 0)
                        return 0;
        s->api->log(s->host, LOG_ERR, "invalid %s='%s' (yes or no)", key, v);
        return -EINVAL;
}

/* A growing string for JSON we build by hand (the plugin links libc and
 * libsystemd only). */
typedef struct Str {
        char *p;
        size_t len, cap;
        bool failed;
} Str;

__attribute__((format(printf, 2, 3))) static void str_printf(Str *b, const char *fmt, ...) {
        va_list ap;
        int n;

        if (b->failed)
                return;
        for (;;) {
                size_t room = b->cap - b->len;

                va_start(ap, fmt);
                n = vsnprintf(b->p ? b->p + b->len : NULL, room, fmt, ap);
                va_end(ap);
                if (n < 0) {
                        b->failed = true;
                        return;
                }
                if ((size_t)n < room) {
                        b->len += (size_t)n;
                        return;
                }
                size_t cap = b->cap ? b->cap * 2 : 256;
                while (cap < b->len + (size_t)n + 1)
                        cap *= 2;
                char *np = realloc(b->p, cap);
                if (!np) {
                        b->failed = true;
                        return;
                }
                b->p = np;
                b->cap = cap;
        }
}

static void str_json_string(Str *b, const char *s) {
        str_printf(b, "\"");
        for (; *s; s++) {
                unsigned char c = (unsigned char)*s;

                if (c == '"' || c == '\\')
                        str_printf(b, "\\%c", c);
                else if (c < 0x20)
                        str_printf(b, "\\u%04x", c);
                else
                        str_printf(b, "%c", c);
        }
        str_printf(b, "\"");
}

/* Hand a string to the host: it copies it before the getter returns to the
 * loop, so keeping the last one is enough. */
static int give_string(System *s, char *str, struct tether_value *ret) {
        if (!str)
                return -ENOMEM;
        free(s->scratch);
        s->scratch = str;
        ret->s = str;
        return 0;
}

/* Read a whole small file (procfs, os-release) into a malloc'd string. */
static int read_file(const char *path, char **ret) {
        char buf[16384];
        size_t n;
        FILE *f = fopen(path, "re");

        if (!f)
                return errno == ENOENT ? -ENODEV : -errno;
        n = fread(buf, 1, sizeof(buf) - 1, f);
        if (ferror(f)) {
                fclose(f);
                return -EIO;
        }
        fclose(f);
        buf[n] = '\0';
        *ret = strdup(buf);
        return *ret ? 0 : -ENOMEM;
}

static int proc_read(System *s, const char *name, char **ret) {
        char path[4096];

        if (snprintf(path, sizeof(path), "%s/%s", s->proc_root, name) >= (int)sizeof(path))
                return -ENAMETOOLONG;
        return read_file(path, ret);
}

/* --- variables ------------------------------------------------------------------ */

static int var_uptime(void *userdata, struct tether_value *ret) {
        System *s = userdata;
        char *text = NULL, *end;
        double up;
        int r;

        r = proc_read(s, "uptime", &text);
        if (r < 0)
                return r;
        up = strtod(text, &end);
        r = end == text || (*end != ' ' && *end != '\n') || !(up >= 0) ? -EBADMSG : 0;
        free(text);
        if (r == 0)
                ret->d = up;
        return r;
}

static int load_field(System *s, int field, struct tether_value *ret) {
        char *text = NULL, *p, *end;
        double v[3];
        int r = 0;

        r = proc_read(s, "loadavg", &text);
        if (r < 0)
                return r;
        p = text;
        for (int i = 0; i < 3 && r == 0; i++) {
                v[i] = strtod(p, &end);
                if (end == p || (*end != ' ' && *end != '\n' && *end != '\0') || !(v[i] >= 0))
                        r = -EBADMSG;
                p = end;
        }
        free(text);
        if (r == 0)
                ret->d = v[field];
        return r;
}

static int var_load1(void *userdata, struct tether_value *ret) {
        return load_field(userdata, 0, ret);
}
static int var_load5(void *userdata, struct tether_value *ret) {
        return load_field(userdata, 1, ret);
}
static int var_load15(void *userdata, struct tether_value *ret) {
        return load_field(userdata, 2, ret);
}

static int meminfo(System *s, const char *key, struct tether_value *ret) {
        char *text = NULL, *line;
        size_t klen = strlen(key);
        int r;

        r = proc_read(s, "meminfo", &text);
        if (r < 0)
                return r;
        r = -EBADMSG;
        for (line = text; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
                unsigned long long kib;
                char unit[8];

                if (strncmp(line, key, klen) != 0 || line[klen] != ':')
                        continue;
                if (sscanf(line + klen + 1, "%llu %7s", &kib, unit) == 2 && strcmp(unit, "kB") == 0) {
                        ret->d = (double)kib * 1024;
                        r = 0;
                }
                break;
        }
        free(text);
        return r;
}

static int var_mem_total(void *userdata, struct tether_value *ret) {
        return meminfo(userdata, "MemTotal", ret);
}
static int var_mem_available(void *userdata, struct tether_value *ret) {
        return meminfo(userdata, "MemAvailable", ret);
}

static int disk(Mount *m, int what, struct tether_value *ret) {
        struct statvfs st;
        double used, total;

        /* statvfs() of a hung network mount would block: Mounts= is for
         * local file systems (docs/plugins/system.md). */
        if (statvfs(m->path, &st) < 0)
                return errno == ENOENT ? -ENODEV : -errno;
        switch (what) {
        case 0:
                ret->d = (double)st.f_blocks * (double)st.f_frsize;
                return 0;
        case 1:
                ret->d = (double)st.f_bavail * (double)st.f_frsize;
                return 0;
        default:
                /* As df computes Use%: of what unprivileged users can have. */
                used = (double)(st.f_blocks - st.f_bfree);
                total = used + (double)st.f_bavail;
                ret->d = total > 0 ? used * 100.0 / total : 0;
                return 0;
        }
}

static int var_disk_size(void *userdata, struct tether_value *ret) {
        return disk(userdata, 0, ret);
}
static int var_disk_avail(void *userdata, struct tether_value *ret) {
        return disk(userdata, 1, ret);
}
static int var_disk_used(void *userdata, struct tether_value *ret) {
        return disk(userdata, 2, ret);
}

static int prefix_len(const struct sockaddr *mask) {
        const unsigned char *b;
        size_t n;
        int bits = 0;

        if (!mask)
                return -1;
        if (mask->sa_family == AF_INET) {
                b = (const unsigned char *)&((const struct sockaddr_in *)mask)->sin_addr;
                n = 4;
        } else {
                b = (const unsigned char *)&((const struct sockaddr_in6 *)mask)->sin6_addr;
                n = 16;
        }
        for (size_t i = 0; i < n; i++)
                bits += __builtin_popcount(b[i]);
        return bits;
}

/* {"eth0":["192.168.1.5/24","fe80::1/64"],...}, interfaces in the order
 * getifaddrs() lists them. */
static int var_addresses(void *userdata, struct tether_value *ret) {
        System *s = userdata;
        struct ifaddrs *ifa = NULL;
        Str b = {};
        char seen[64][IF_NAMESIZE + 1];
        size_t n_seen = 0;

        if (getifaddrs(&ifa) < 0)
                return -errno;
        str_printf(&b, "{");
        for (struct ifaddrs *i = ifa; i; i = i->ifa_next) {
                bool first = true, done = false;

                if (!i->ifa_name || ((i->ifa_flags & IFF_LOOPBACK) && !s->include_loopback))
                        continue;
                for (size_t k = 0; k < n_seen && !done; k++)
                        done = strcmp(seen[k], i->ifa_name) == 0;
                if (done || n_seen == 64)
                        continue;
                snprintf(seen[n_seen++], sizeof(seen[0]), "%s", i->ifa_name);
                str_printf(&b, "%s", n_seen > 1 ? "," : "");
                str_json_string(&b, i->ifa_name);
                str_printf(&b, ":[");
                for (struct ifaddrs *j = i; j; j = j->ifa_next) {
                        char addr[INET6_ADDRSTRLEN];
                        const void *src;

                        if (!j->ifa_addr || strcmp(j->ifa_name, i->ifa_name) != 0 ||
                            (j->ifa_addr->sa_family != AF_INET && j->ifa_addr->sa_family != AF_INET6))
                                continue;
                        src = j->ifa_addr->sa_family == AF_INET
                                      ? (const void *)&((const struct sockaddr_in *)j->ifa_addr)->sin_addr
                                      : (const void *)&((const struct sockaddr_in6 *)j->ifa_addr)->sin6_addr;
                        if (!inet_ntop(j->ifa_addr->sa_family, src, addr, sizeof(addr)))
                                continue;
                        str_printf(&b, "%s\"%s/%d\"", first ? "" : ",", addr, prefix_len(j->ifa_netmask));
                        first = false;
                }
                str_printf(&b, "]");
        }
        str_printf(&b, "}");
        freeifaddrs(ifa);
        if (b.failed) {
                free(b.p);
                return -ENOMEM;
        }
        return give_string(s, b.p, ret);
}

/* PRETTY_NAME from os-release: KEY=value with shell quoting
 * (os-release(5)); falls back to NAME. */
static int var_os(void *userdata, struct tether_value *ret) {
        System *s = userdata;
        char *text = NULL, *found = NULL;
        int r;

        r = read_file(s->os_release, &text);
        if (r == -ENODEV && strcmp(s->os_release, "/etc/os-release") == 0)
                r = read_file("/usr/lib/os-release", &text);
        if (r < 0)
                return r;
        for (int pass = 0; pass < 2 && !found; pass++) {
                const char *key = pass == 0 ? "PRETTY_NAME=" : "NAME=";

                for (char *line = text; line && *line && !found;) {
                        char *nl = strchr(line, '\n');

                        if (nl)
                                *nl = '\0';
                        if (strncmp(line, key, strlen(key)) == 0) {
                                const char *v = line + strlen(key);
                                char q = (*v == '"' || *v == '\'') ? *v++ : 0;
                                char *out = malloc(strlen(v) + 1), *o = out;

                                if (!out)
                                        break;
                                for (; *v && *v != q; v++) {
                                        if (q != '\'' && *v == '\\' && v[1])
                                                v++;
                                        *o++ = *v;
                                }
                                *o = '\0';
                                found = out;
                        }
                        if (nl)
                                *nl = '\n';
                        line = nl ? nl + 1 : NULL;
                }
        }
        free(text);
        if (!found)
                return -EBADMSG;
        return give_string(s, found, ret);
}

static int var_kernel(void *userdata, struct tether_value *ret) {
        struct utsname u;

        if (uname(&u) < 0)
                return -errno;
        return give_string(userdata, strdup(u.release), ret);
}

static int var_hostname(void *userdata, struct tether_value *ret) {
        struct utsname u;

        if (uname(&u) < 0)
                return -errno;
        return give_string(userdata, strdup(u.nodename), ret);
}

static int var_agent_version(void *userdata, struct tether_value *ret) {
        System *s = userdata;
        const char *v = s->api->abi_minor >= 1 && s->api->agent_version ? s->api->agent_version(s->host) : NULL;

        return give_string(s, strdup(v ? v : "unknown"), ret);
}

static int var_plugins(void *userdata, struct tether_value *ret) {
        System *s = userdata;
        const char *name, *version;
        Str b = {};

        if (s->api->abi_minor < 1 || !s->api->plugin_info)
                return -EOPNOTSUPP;
        str_printf(&b, "{");
        for (uint32_t i = 0; s->api->plugin_info(s->host, i, &name, &version) == 0; i++) {
                str_printf(&b, "%s", i ? "," : "");
                str_json_string(&b, name);
                str_printf(&b, ":");
                str_json_string(&b, version);
        }
        str_printf(&b, "}");
        if (b.failed) {
                free(b.p);
                return -ENOMEM;
        }
        return give_string(s, b.p, ret);
}

/* --- restart and reboot over D-Bus ------------------------------------------------- */

static bool unit_name_valid(const char *u) {
        static const char *const suffixes[] = { ".service", ".socket", ".target", ".timer", ".path",
                                                ".mount",   ".automount", ".swap", ".device", ".slice",
                                                ".scope" };
        size_t n = strlen(u);
        bool suffix = false;

        if (n == 0 || n > SYSTEM_UNIT_MAX || u[0] == '.' || u[0] == '-')
                return false;
        for (const char *p = u; *p; p++)
                if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
                      strchr(":_.\\@-", *p)))
                        return false;
        for (size_t i = 0; i < sizeof(suffixes) / sizeof(suffixes[0]) && !suffix; i++) {
                size_t l = strlen(suffixes[i]);
                suffix = n > l && strcmp(u + n - l, suffixes[i]) == 0;
        }
        return suffix;
}

/* "foo" means "foo.service", as systemctl has it. */
static int unit_normalize(const char *in, char *out, size_t size) {
        if (!strchr(in, '.')) {
                if (snprintf(out, size, "%s.service", in) >= (int)size)
                        return -EINVAL;
        } else if (snprintf(out, size, "%s", in) >= (int)size)
                return -EINVAL;
        return unit_name_valid(out) ? 0 : -EINVAL;
}

static int bus_get(System *s, sd_bus **ret) {
        int r;

        if (s->bus) {
                *ret = s->bus;
                return 0;
        }
        r = sd_bus_open_system(&s->bus);
        if (r < 0) {
                s->api->log(s->host, LOG_ERR, "cannot connect to the system bus: %s", strerror(-r));
                s->bus = NULL;
                return -ENOTCONN; /* not ENOENT: that would read as "no such function" */
        }
        r = sd_bus_attach_event(s->bus, s->api->event(s->host), SD_EVENT_PRIORITY_NORMAL);
        if (r < 0) {
                s->bus = sd_bus_unref(s->bus);
                return r;
        }
        *ret = s->bus;
        return 0;
}

static void request_free(Request *q) {
        System *s = q->sys;

        for (Request **p = &s->requests; *p; p = &(*p)->next)
                if (*p == q) {
                        *p = q->next;
                        break;
                }
        sd_bus_slot_unref(q->slot);
        free(q);
}

static int on_reply(sd_bus_message *m, void *userdata, sd_bus_error *ret_error) {
        Request *q = userdata;
        System *s = q->sys;
        const char *event = q->unit[0] ? "system/restart" : "system/reboot";
        const sd_bus_error *e = sd_bus_message_get_error(m);
        const char *job = NULL;
        Str b = {};

        str_printf(&b, "{");
        if (q->unit[0]) {
                str_printf(&b, "\"unit\":");
                str_json_string(&b, q->unit);
                str_printf(&b, ",");
        }
        if (e) {
                char msg[512];

                snprintf(msg, sizeof(msg), "%s: %s", e->name ? e->name : "error", e->message ? e->message : "");
                str_printf(&b, "\"ok\":false,\"error\":");
                str_json_string(&b, msg);
                s->api->log(s->host, LOG_WARNING, "%s%s%s failed: %s", q->unit[0] ? "restarting '" : "reboot",
                            q->unit, q->unit[0] ? "'" : "", msg);
        } else {
                str_printf(&b, "\"ok\":true");
                if (q->unit[0] && sd_bus_message_read(m, "o", &job) > 0 && job) {
                        str_printf(&b, ",\"job\":");
                        str_json_string(&b, job);
                }
                s->api->log(s->host, LOG_NOTICE, "%s%s%s accepted by %s", q->unit[0] ? "restart of '" : "reboot",
                            q->unit, q->unit[0] ? "'" : "", q->unit[0] ? "systemd" : "logind");
        }
        str_printf(&b, "}");
        if (!b.failed)
                (void)s->api->publish(s->host, event, b.p, 0, TETHER_EVENT_PRIVATE);
        free(b.p);
        request_free(q);
        return 0;
}

static int send_request(System *s, const char *unit) {
        sd_bus *bus;
        Request *q;
        int r;

        for (Request *p = s->requests; p; p = p->next)
                if (strcmp(p->unit, unit ? unit : "") == 0)
                        return -EBUSY; /* the same request is still out */
        r = bus_get(s, &bus);
        if (r < 0)
                return r;
        q = calloc(1, sizeof(*q));
        if (!q)
                return -ENOMEM;
        q->sys = s;
        snprintf(q->unit, sizeof(q->unit), "%s", unit ? unit : "");
        if (unit)
                r = sd_bus_call_method_async(bus, &q->slot, "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                                             "org.freedesktop.systemd1.Manager", "RestartUnit", on_reply, q, "ss",
                                             unit, "replace");
        else
                /* logind's Reboot: a clean shutdown, with polkit deciding. */
                r = sd_bus_call_method_async(bus, &q->slot, "org.freedesktop.login1", "/org/freedesktop/login1",
                                             "org.freedesktop.login1.Manager", "Reboot", on_reply, q, "b", 0);
        if (r < 0) {
                free(q);
                s->api->log(s->host, LOG_ERR, "cannot send the request to the system bus: %s", strerror(-r));
                return r == -ENOENT ? -ENOTCONN : r;
        }
        q->next = s->requests;
        s->requests = q;
        return 0;
}

static int fn_restart(void *userdata, const char *arg, int32_t *ret_result) {
        System *s = userdata;
        char unit[SYSTEM_UNIT_MAX + 1];
        bool allowed = false;
        int r;

        if (unit_normalize(arg, unit, sizeof(unit)) < 0) {
                s->api->log(s->host, LOG_NOTICE, "system.restart: '%s' is not a unit name", arg);
                return -EINVAL;
        }
        for (char **p = s->restart_units; p && *p && !allowed; p++)
                allowed = strcmp(*p, unit) == 0;
        if (!allowed) {
                s->api->log(s->host, LOG_WARNING, "system.restart: refused '%s': not in RestartUnits=", unit);
                return -EPERM;
        }
        r = send_request(s, unit);
        if (r < 0)
                return r;
        s->api->log(s->host, LOG_NOTICE, "system.restart: asked systemd to restart '%s'", unit);
        *ret_result = 0;
        return 0;
}

static int fn_reboot(void *userdata, const char *arg, int32_t *ret_result) {
        System *s = userdata;
        int r;

        if (*arg) {
                s->api->log(s->host, LOG_NOTICE, "system.reboot takes no argument, got '%s'", arg);
                return -EINVAL;
        }
        r = send_request(s, NULL);
        if (r < 0)
                return r;
        s->api->log(s->host, LOG_NOTICE, "system.reboot: asked logind to reboot");
        *ret_result = 0;
        return 0;
}

/* --- init and fini ---------------------------------------------------------------- */

static void system_fini(void *userdata) {
        System *s = userdata;

        if (!s)
                return;
        while (s->requests)
                request_free(s->requests);
        if (s->bus) {
                /* Requests already sent are out; flush what is queued. */
                sd_bus_detach_event(s->bus);
                sd_bus_flush_close_unref(s->bus);
        }
        for (size_t i = 0; i < s->n_mounts; i++)
                free(s->mounts[i].path);
        free(s->mounts);
        strv_free(s->restart_units);
        free(s->proc_root);
        free(s->os_release);
        free(s->scratch);
        free(s);
}

/* "/" -> "root", "/var/lib" -> "var-lib", other odd characters -> '_' */
static int mount_name(const char *path, char *ret, size_t size) {
        size_t n = 0;

        if (path[0] != '/')
                return -EINVAL;
        if (strcmp(path, "/") == 0) {
                snprintf(ret, size, "root");
                return 0;
        }
        for (const char *p = path + 1; *p; p++) {
                char c = *p == '/' ? '-' : *p;

                if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
                      c == '_'))
                        c = '_';
                if (n + 1 >= size)
                        return -ENAMETOOLONG;
                ret[n++] = c;
        }
        while (n > 0 && ret[n - 1] == '-') /* a trailing slash */
                n--;
        ret[n] = '\0';
        return n > 0 ? 0 : -EINVAL;
}

typedef struct VarDef {
        const char *name;
        uint32_t type;
        tether_variable_fn get;
        const char *unit;
} VarDef;

static int system_init(const struct tether_host_api *api, tether_host *host, void **ret_userdata) {
        static const VarDef vars[] = {
                { "system.uptime", TETHER_TYPE_DOUBLE, var_uptime, "s" },
                { "system.load1", TETHER_TYPE_DOUBLE, var_load1, NULL },
                { "system.load5", TETHER_TYPE_DOUBLE, var_load5, NULL },
                { "system.load15", TETHER_TYPE_DOUBLE, var_load15, NULL },
                { "system.mem_total", TETHER_TYPE_DOUBLE, var_mem_total, "B" },
                { "system.mem_available", TETHER_TYPE_DOUBLE, var_mem_available, "B" },
                { "system.addresses", TETHER_TYPE_STRING, var_addresses, NULL },
                { "system.os", TETHER_TYPE_STRING, var_os, NULL },
                { "system.kernel", TETHER_TYPE_STRING, var_kernel, NULL },
                { "system.hostname", TETHER_TYPE_STRING, var_hostname, NULL },
                { "system.agent_version", TETHER_TYPE_STRING, var_agent_version, NULL },
                { "system.plugins", TETHER_TYPE_STRING, var_plugins, NULL },
        };
        const char *v;
        char **mounts = NULL;
        bool units = api->abi_minor >= 1 && api->variable_unit;
        System *s;
        int r;

        if (api->abi_major != TETHER_PLUGIN_ABI_MAJOR)
                return -EPROTO;
        s = calloc(1, sizeof(*s));
        if (!s)
                return -ENOMEM;
        *ret_userdata = s;
        s->api = api;
        s->host = host;

        v = api->config_get(host, "ProcRoot");
        s->proc_root = strdup(v && *v ? v : "/proc");
        v = api->config_get(host, "OsRelease");
        s->os_release = strdup(v && *v ? v : "/etc/os-release");
        if (!s->proc_root || !s->os_release)
                return -ENOMEM;
        if ((r = bool_check(s, "IncludeLoopback")) < 0 || (r = bool_check(s, "AllowReboot")) < 0)
                return r;
        s->include_loopback = parse_bool(api->config_get(host, "IncludeLoopback"), false);
        s->allow_reboot = parse_bool(api->config_get(host, "AllowReboot"), false);

        v = api->config_get(host, "RestartUnits");
        if (v && *v) {
                char **list = split_words(v);

                if (!list)
                        return -ENOMEM;
                for (char **p = list; *p; p++) {
                        char unit[SYSTEM_UNIT_MAX + 1];

                        if (unit_normalize(*p, unit, sizeof(unit)) < 0) {
                                api->log(host, LOG_ERR, "invalid unit name '%s' in RestartUnits=", *p);
                                strv_free(list);
                                return -EINVAL;
                        }
                        free(*p);
                        *p = strdup(unit);
                        if (!*p) {
                                strv_free(list);
                                return -ENOMEM;
                        }
                }
                s->restart_units = list[0] ? list : (strv_free(list), NULL);
        }

        v = api->config_get(host, "Mounts");
        mounts = split_words(v && *v ? v : "/");
        if (!mounts)
                return -ENOMEM;
        for (char **p = mounts; *p; p++) {
                Mount *n = realloc(s->mounts, (s->n_mounts + 1) * sizeof(Mount));

                if (!n) {
                        strv_free(mounts);
                        return -ENOMEM;
                }
                s->mounts = n;
                n = &s->mounts[s->n_mounts];
                *n = (Mount){ .sys = s, .path = strdup(*p) };
                if (!n->path) {
                        strv_free(mounts);
                        return -ENOMEM;
                }
                s->n_mounts++;
                if (mount_name(*p, n->name, sizeof(n->name)) < 0) {
                        api->log(host, LOG_ERR, "invalid Mounts= entry '%s' (an absolute path, at most %d characters)",
                                 *p, SYSTEM_MOUNT_NAME_MAX);
                        strv_free(mounts);
                        return -EINVAL;
                }
                for (size_t k = 0; k + 1 < s->n_mounts; k++)
                        if (strcmp(s->mounts[k].name, n->name) == 0) {
                                api->log(host, LOG_ERR, "Mounts= entries '%s' and '%s' have the same name '%s'",
                                         s->mounts[k].path, n->path, n->name);
                                strv_free(mounts);
                                return -EINVAL;
                        }
                snprintf(n->var_size, sizeof(n->var_size), "system.disk.%s.size", n->name);
                snprintf(n->var_avail, sizeof(n->var_avail), "system.disk.%s.avail", n->name);
                snprintf(n->var_used, sizeof(n->var_used), "system.disk.%s.used", n->name);
        }
        strv_free(mounts);

        for (size_t i = 0; i < sizeof(vars) / sizeof(vars[0]); i++) {
                r = api->variable_add(host, vars[i].name, vars[i].type, vars[i].get, s);
                if (r < 0)
                        return r;
                if (units && vars[i].unit)
                        (void)api->variable_unit(host, vars[i].name, vars[i].unit);
        }
        for (size_t i = 0; i < s->n_mounts; i++) {
                Mount *m = &s->mounts[i];

                if ((r = api->variable_add(host, m->var_size, TETHER_TYPE_DOUBLE, var_disk_size, m)) < 0 ||
                    (r = api->variable_add(host, m->var_avail, TETHER_TYPE_DOUBLE, var_disk_avail, m)) < 0 ||
                    (r = api->variable_add(host, m->var_used, TETHER_TYPE_DOUBLE, var_disk_used, m)) < 0)
                        return r;
                if (units) {
                        (void)api->variable_unit(host, m->var_size, "B");
                        (void)api->variable_unit(host, m->var_avail, "B");
                        (void)api->variable_unit(host, m->var_used, "%");
                }
        }
        if (s->restart_units) {
                r = api->function_add(host, "system.restart", fn_restart, s);
                if (r < 0)
                        return r;
                r = api->event_source_add(host, "system/restart");
                if (r < 0)
                        return r;
        }
        if (s->allow_reboot) {
                r = api->function_add(host, "system.reboot", fn_reboot, s);
                if (r < 0)
                        return r;
                r = api->event_source_add(host, "system/reboot");
                if (r < 0)
                        return r;
        }
        api->log(host, LOG_INFO, "%zu mount(s) watched; restart %s; reboot %s", s->n_mounts,
                 s->restart_units ? "allowed for RestartUnits=" : "off", s->allow_reboot ? "allowed" : "off");
        return 0;
}

TETHER_PLUGIN("system", PACKAGE_VERSION, system_init, system_fini);
