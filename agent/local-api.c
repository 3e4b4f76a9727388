/* SPDX-License-Identifier: Apache-2.0 */
#include <errno.h>
#include <grp.h>
#include <inttypes.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include "local-api.h"
#include "log.h"
#include "proto.h"
#include "util.h"

/* Connections served at once; more wait in the listen backlog. */
#define LOCAL_API_MAX_CLIENTS 16
#define LOCAL_API_BACKLOG 16
/* A client must send its request and read the answer within this. */
#define LOCAL_API_CLIENT_TIMEOUT_USEC (5 * 1000000ULL)
#define LOCAL_API_MAX_GROUPS 256
/* Refused clients are logged at most once per interval: any local user can
 * connect as often as it likes. */
#define LOCAL_API_REFUSED_LOG_USEC (10 * 1000000ULL)

typedef struct Client Client;

struct LocalApi {
        sd_event *event;
        LocalApiHooks hooks;
        char *path;
        int fd;
        sd_event_source *listen_source;
        bool group_known;
        gid_t group;
        size_t max_request;
        Client *clients;
        unsigned n_clients;
        uint64_t refused_logged;     /* CLOCK_MONOTONIC µs of the last refusal logged */
        uint64_t refused_unlogged;   /* refusals since, not logged */
};

struct Client {
        LocalApi *api;
        Client *next, *prev;
        int fd;
        uid_t uid; /* the peer's, from SO_PEERCRED */
        sd_event_source *io_source;
        sd_event_source *timer_source;
        char *in;
        size_t in_len, in_cap;
        char *out;
        size_t out_len, out_done;
        bool responding;
        bool draining;
};

static void client_free(Client *c) {
        LocalApi *api;

        if (!c)
                return;
        api = c->api;
        if (c->prev)
                c->prev->next = c->next;
        else
                api->clients = c->next;
        if (c->next)
                c->next->prev = c->prev;
        api->n_clients--;
        sd_event_source_disable_unref(c->io_source);
        sd_event_source_disable_unref(c->timer_source);
        if (c->fd >= 0)
                close(c->fd);
        free(c->in);
        free(c->out);
        free(c);
        /* A slot is free again. */
        if (api->listen_source)
                sd_event_source_set_enabled(api->listen_source, SD_EVENT_ON);
}

/* --- answering ---------------------------------------------------------- */

static int client_write(Client *c) {
        while (c->out_done < c->out_len) {
                ssize_t n = send(c->fd, c->out + c->out_done, c->out_len - c->out_done, MSG_NOSIGNAL);

                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        if (errno == EAGAIN)
                                return 0;
                        return -errno;
                }
                c->out_done += (size_t)n;
        }
        return 1;
}

/* The answer is out: say so, then read and discard what the client still
 * sends until it closes (bounded by the client timeout). Closing with
 * unread input would reset the connection, and the client could lose
 * the answer, e.g. when we refused it before reading its request. */
static void client_finish(Client *c) {
        if (shutdown(c->fd, SHUT_WR) < 0 || sd_event_source_set_io_events(c->io_source, EPOLLIN) < 0) {
                client_free(c);
                return;
        }
        c->draining = true;
}

/* Takes the reference to reply. Writes what the socket takes now and the
 * rest when it becomes writable; the connection closes when done. */
static void client_respond(Client *c, json_t *reply) {
        char *s = reply ? json_dumps(reply, JSON_COMPACT) : NULL;
        int r;

        json_decref(reply);
        c->responding = true;
        if (!s || asprintf(&c->out, "%s\n", s) < 0) {
                free(s);
                client_free(c);
                return;
        }
        free(s);
        c->out_len = strlen(c->out);
        r = client_write(c);
        if (r > 0) {
                client_finish(c);
                return;
        }
        if (r < 0) {
                client_free(c);
                return;
        }
        if (sd_event_source_set_io_events(c->io_source, EPOLLOUT) < 0)
                client_free(c);
}

static json_t *error_reply(int error, const char *fmt, ...) _printf_(2, 3);
static json_t *error_reply(int error, const char *fmt, ...) {
        char msg[512];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);
        return json_pack("{s:b, s:s, s:i}", "ok", 0, "error", msg, "errno", error < 0 ? -error : error);
}

static json_t *do_publish(Client *c, json_t *req) {
        const char *name = NULL, *data = NULL;
        json_int_t ttl = 0;
        int private_ = 0, r;
        json_error_t err;

        if (json_unpack_ex(req, &err, JSON_STRICT, "{s:s, s:s, s?s, s?I, s?b}", "method", &(const char *){ NULL },
                           "name", &name, "data", &data, "ttl", &ttl, "private", &private_) < 0)
                return error_reply(EINVAL, "bad publish request: %s", err.text);
        if (ttl < 0 || ttl > UINT32_MAX)
                return error_reply(EINVAL, "ttl %lld out of range", (long long)ttl);
        r = c->api->hooks.publish(c->api->hooks.userdata, name, data, (uint32_t)ttl,
                                  private_ ? TETHER_EVENT_PRIVATE : 0);
        if (r < 0)
                return error_reply(r, "cannot publish '%s': %s", name,
                                   r == -E2BIG     ? "data larger than MaxPayload"
                                   : r == -ENOBUFS ? "the event queue is full (MaxQueuedEvents)"
                                   : r == -EINVAL  ? "invalid event name or data"
                                                   : strerror(-r));
        return json_pack("{s:b}", "ok", 1);
}

/* Starts the enrollment and answers at once with its generation:
 * tetherctl follows it through "status" (the answer may take minutes). */
static json_t *do_enroll(Client *c, json_t *req) {
        const char *token = NULL, *id = NULL;
        int force = 0, r;
        char error[512] = "";
        json_error_t err;

        if (!c->api->hooks.enroll)
                return error_reply(EOPNOTSUPP, "enrollment is not supported");
        /* Enrolling replaces the device's identity (--force, --id): not for
         * members of [Local] Group=, who may only read status and publish. */
        if (c->uid != 0 && c->uid != geteuid())
                return error_reply(EACCES,
                                   "permission denied: only root or tetherd's own user (uid %u) may enroll, not "
                                   "uid %u",
                                   (unsigned)geteuid(), (unsigned)c->uid);
        if (json_unpack_ex(req, &err, JSON_STRICT, "{s:s, s:s, s?s, s?b}", "method", &(const char *){ NULL },
                           "token", &token, "id", &id, "force", &force) < 0)
                return error_reply(EINVAL, "bad enroll request: %s", err.text);
        r = c->api->hooks.enroll(c->api->hooks.userdata, token, id, force, error, sizeof(error));
        if (r < 0)
                return error_reply(r, "%s", error[0] ? error : strerror(-r));
        return json_pack("{s:b, s:i}", "ok", 1, "generation", r);
}

static void client_handle(Client *c) {
        json_error_t err;
        json_t *req, *reply;
        const char *method;

        req = json_loadb(c->in, c->in_len, JSON_REJECT_DUPLICATES, &err);
        if (!req || !json_is_object(req)) {
                json_decref(req);
                client_respond(c, error_reply(EBADMSG, "request is not a JSON object: %s",
                                              req ? "wrong type" : err.text));
                return;
        }
        method = json_string_value(json_object_get(req, "method"));
        if (!method)
                reply = error_reply(EINVAL, "request has no \"method\"");
        else if (streq(method, "status")) {
                json_t *st = c->api->hooks.status(c->api->hooks.userdata);
                reply = st ? json_pack("{s:b, s:o}", "ok", 1, "status", st) : error_reply(ENOMEM, "out of memory");
        } else if (streq(method, "publish"))
                reply = do_publish(c, req);
        else if (streq(method, "enroll"))
                reply = do_enroll(c, req);
        else
                reply = error_reply(EOPNOTSUPP, "unknown method '%.64s'", method);
        json_decref(req);
        client_respond(c, reply);
}

/* --- reading ------------------------------------------------------------ */

static int on_client_io(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        Client *c = userdata;

        if (c->draining) {
                char buf[4096];
                ssize_t n = -1;

                /* Bounded per wakeup; the client timeout bounds the total. */
                for (unsigned i = 0; i < 16; i++) {
                        n = recv(fd, buf, sizeof(buf), 0);
                        if (n == 0 || (n < 0 && errno != EINTR))
                                break;
                }
                if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
                        client_free(c);
                return 0;
        }
        if (c->responding) {
                int r = client_write(c);
                if (r > 0)
                        client_finish(c);
                else if (r < 0)
                        client_free(c);
                return 0;
        }
        for (;;) {
                char buf[4096];
                ssize_t n = recv(fd, buf, sizeof(buf), 0);
                char *nl;

                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        if (errno != EAGAIN)
                                client_free(c);
                        return 0;
                }
                if (n == 0) {
                        /* End of the request without a newline. */
                        client_handle(c);
                        return 0;
                }
                if (c->in_len + (size_t)n > c->in_cap) {
                        client_respond(c, error_reply(E2BIG, "request larger than %zu bytes", c->in_cap));
                        return 0;
                }
                memcpy(c->in + c->in_len, buf, (size_t)n);
                c->in_len += (size_t)n;
                nl = memchr(c->in, '\n', c->in_len);
                if (nl) {
                        c->in_len = (size_t)(nl - c->in);
                        client_handle(c);
                        return 0;
                }
        }
}

static int on_client_timeout(sd_event_source *s, uint64_t usec, void *userdata) {
        Client *c = userdata;

        log_debug("Local API client did not finish in time, closing");
        client_free(c);
        return 0;
}

/* --- access control ----------------------------------------------------- */

static bool peer_allowed(LocalApi *api, int fd, struct ucred *ret_cred) {
        struct ucred cred = {};
        socklen_t len = sizeof(cred);
        gid_t groups[LOCAL_API_MAX_GROUPS];

        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0)
                return false;
        *ret_cred = cred;
        if (cred.uid == 0 || cred.uid == geteuid())
                return true;
        if (!api->group_known)
                return false;
        if (cred.gid == api->group)
                return true;
        len = sizeof(groups);
        if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups, &len) < 0)
                return false;
        for (size_t i = 0; i < len / sizeof(gid_t); i++)
                if (groups[i] == api->group)
                        return true;
        return false;
}

static int client_new(LocalApi *api, int fd) {
        Client *c;
        struct ucred cred = {};
        int r;

        c = calloc(1, sizeof(*c));
        if (!c) {
                close(fd);
                return -ENOMEM;
        }
        c->api = api;
        c->fd = fd;
        c->next = api->clients;
        if (c->next)
                c->next->prev = c;
        api->clients = c;
        api->n_clients++;
        c->in_cap = api->max_request;
        c->in = malloc(c->in_cap);
        if (!c->in) {
                client_free(c);
                return -ENOMEM;
        }
        r = sd_event_add_io(api->event, &c->io_source, fd, EPOLLIN, on_client_io, c);
        if (r >= 0)
                r = sd_event_add_time_relative(api->event, &c->timer_source, CLOCK_MONOTONIC,
                                               LOCAL_API_CLIENT_TIMEOUT_USEC, 0, on_client_timeout, c);
        if (r < 0) {
                client_free(c);
                return r;
        }
        c->uid = (uid_t)-1;
        if (peer_allowed(api, fd, &cred))
                c->uid = cred.uid;
        else {
                uint64_t now = now_usec();

                if (api->refused_logged == 0 || now >= api->refused_logged + LOCAL_API_REFUSED_LOG_USEC) {
                        log_notice("Local API: refused a request from uid %u (pid %d): not root, not the agent's "
                                   "user, not in the permitted group (%" PRIu64 " more refused since the last "
                                   "report, not logged).",
                                   (unsigned)cred.uid, (int)cred.pid, api->refused_unlogged);
                        api->refused_logged = now;
                        api->refused_unlogged = 0;
                } else
                        api->refused_unlogged++;
                client_respond(c, error_reply(EACCES, "permission denied: uid %u is not allowed to use tetherd "
                                                      "(root or members of the configured group only)",
                                              (unsigned)cred.uid));
        }
        return 0;
}

static int on_listen(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        LocalApi *api = userdata;

        /* Bounded per wakeup so a flood of connects cannot starve the loop. */
        for (unsigned i = 0; i < LOCAL_API_MAX_CLIENTS; i++) {
                int cfd;

                if (api->n_clients >= LOCAL_API_MAX_CLIENTS) {
                        /* Leave the rest in the backlog until a slot frees. */
                        sd_event_source_set_enabled(s, SD_EVENT_OFF);
                        return 0;
                }
                /* cppcheck-suppress nullPointer ; NULL: no peer address wanted */
                cfd = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (cfd < 0) {
                        if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
                                log_warning_errno(errno, "Local API: accept failed: %m");
                        return 0;
                }
                if (client_new(api, cfd) < 0)
                        log_warning("Local API: out of memory for a new client");
        }
        return 0;
}

/* --- setup -------------------------------------------------------------- */

static void listen_close(LocalApi *api) {
        api->listen_source = sd_event_source_disable_unref(api->listen_source);
        if (api->fd >= 0) {
                close(api->fd);
                api->fd = -1;
                if (api->path)
                        (void)unlink(api->path);
        }
        free(api->path);
        api->path = NULL;
}

/* Is something accepting connections on path? */
static bool socket_alive(const struct sockaddr_un *sa) {
        _cleanup_close_ int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);

        if (fd < 0)
                return false;
        return connect(fd, (const struct sockaddr *)sa, sizeof(*sa)) == 0 || errno == EAGAIN;
}

static int listen_open(LocalApi *api, const char *path) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        _cleanup_close_ int fd = -1;
        _cleanup_free_ char *copy = NULL;
        struct stat st;
        int r;

        if (strlen(path) >= sizeof(sa.sun_path))
                return -ENAMETOOLONG;
        memcpy(sa.sun_path, path, strlen(path));
        copy = strdup(path);
        if (!copy)
                return -ENOMEM;
        if (lstat(path, &st) == 0) {
                if (!S_ISSOCK(st.st_mode))
                        return -EEXIST;
                if (socket_alive(&sa))
                        return -EADDRINUSE;
                (void)unlink(path); /* left behind by an agent that died */
        }
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0)
                return -errno;
        if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
                return -errno;
        /* Anyone may connect and is told whether they are allowed: the
         * check is the peer's credentials, not the file mode. */
        if (chmod(path, 0666) < 0 || listen(fd, LOCAL_API_BACKLOG) < 0) {
                r = -errno;
                (void)unlink(path);
                return r;
        }
        r = sd_event_add_io(api->event, &api->listen_source, fd, EPOLLIN, on_listen, api);
        if (r < 0) {
                (void)unlink(path);
                return r;
        }
        api->fd = fd;
        fd = -1;
        api->path = TAKE_PTR(copy);
        return 0;
}

int local_api_configure(LocalApi *api, const char *path, const char *group, size_t max_request,
                        int *ret_group_missing) {
        int r = 0;

        api->max_request = max_request;
        api->group_known = false;
        if (ret_group_missing)
                *ret_group_missing = 0;
        if (group && *group) {
                struct group *g;

                errno = 0;
                /* cppcheck-suppress getgrnamCalled ; no other thread reads the group database */
                g = getgrnam(group);
                if (g) {
                        api->group = g->gr_gid;
                        api->group_known = true;
                } else if (ret_group_missing)
                        *ret_group_missing = 1;
        }
        if (api->path && path && streq(api->path, path))
                return 0;
        listen_close(api);
        if (path && *path)
                r = listen_open(api, path);
        return r;
}

const char *local_api_path(LocalApi *api) {
        return api ? api->path : NULL;
}

int local_api_new(sd_event *event, const LocalApiHooks *hooks, LocalApi **ret) {
        LocalApi *api = calloc(1, sizeof(*api));

        if (!api)
                return -ENOMEM;
        api->event = sd_event_ref(event);
        api->hooks = *hooks;
        api->fd = -1;
        *ret = api;
        return 0;
}

LocalApi *local_api_free(LocalApi *api) {
        if (!api)
                return NULL;
        while (api->clients)
                client_free(api->clients);
        listen_close(api);
        sd_event_unref(api->event);
        free(api);
        return NULL;
}
