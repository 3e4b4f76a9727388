/* SPDX-License-Identifier: Apache-2.0 */
/* tether tunnel: a TCP port of a device, reached through the cloud's
 * tunnel API (docs/cli.md, docs/cloud.md), like `ssh -L` (--listen) or as
 * an ssh ProxyCommand (--stdio).
 *
 * Two transports: "upgrade" (the default over http://) below, and
 * "split" (the default over https://, see split_open()).
 *
 * Upgrade: each local connection gets its own HTTP(S) connection to the API, made
 * by libcurl with CURLOPT_CONNECT_ONLY so that TLS, the CA, and proxies
 * are handled as for every other command; the upgrade request and the
 * relayed bytes then go through curl_easy_send()/curl_easy_recv(). The
 * response head is read with a bounded reader (TUNNEL_HEAD_MAX); the only
 * body ever read is a bounded error body.
 *
 * --listen serves each connection on a thread of its own (at most
 * TUNNEL_CONNECTIONS_MAX at once); every thread owns its curl handle, its
 * sockets and its buffers, and ends when the main thread writes to the
 * quit pipe (SIGINT/SIGTERM). Memory per connection is bounded: two
 * TUNNEL_BUF buffers, and a relay reads from one side only while the
 * buffer towards the other side is empty. */
#include <arpa/inet.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/socket.h>
#include <unistd.h>

#include "log.h"
#include "tether-cli.h"

#define TUNNEL_HEAD_MAX 16384         /* bytes of the response head */
#define TUNNEL_ERROR_BODY_MAX 65536   /* bytes of an error body */
#define TUNNEL_BUF 65536              /* each direction's relay buffer */
#define TUNNEL_CONNECTIONS_MAX 64     /* --listen: connections at once */
#define TUNNEL_OPEN_TIMEOUT_MS 30000L /* above the cloud's CallTimeoutSec */
#define TUNNEL_REASON_WAIT_MS 3000L   /* for the cloud to record why a stream ended */

typedef struct TunnelOpts {
        const char *device;
        char target[64];  /* "IPV4:PORT" or "[IPV6]:PORT" */
        char listen[64];  /* the same shape; port 0: any free one */
        bool stdio;
        bool split;       /* the split transport (two plain requests), not the upgrade */
        char *host;       /* Host: header, from the API URL */
        char *path;       /* the API URL's path, without a trailing '/' */
} TunnelOpts;

typedef struct Tunnel {
        const Api *main;
        const TunnelOpts *o;
        Api api; /* its own handle (curl_easy_duphandle of main's) */
        CURL *report_curl; /* another, for tunnel_report() */
        int in_fd, out_fd; /* local side: one socket, or stdin and stdout */
        bool local_socket;
        int quit_fd; /* readable: stop */
        curl_socket_t rfd;
        uint64_t sid;
        uint64_t bytes_in, bytes_out; /* received from / sent into the tunnel */
        char *up;   /* local -> tunnel */
        size_t up_off, up_len;
        char *down; /* tunnel -> local */
        size_t down_off, down_len;
        /* The split transport (split_run()) */
        char key[65];            /* Tether-Stream-Key: 64 lowercase hex digits */
        CURL *down_curl, *up_curl;
        struct curl_slist *down_headers, *up_headers;
        char down_errbuf[CURL_ERROR_SIZE], up_errbuf[CURL_ERROR_SIZE];
        Buffer down_error, up_body; /* a refused down's body; the up's answer */
        int stop_pipe[2];        /* readable: the other half ended badly, stop */
        atomic_bool stop;
} Tunnel;

typedef struct Listener {
        pthread_mutex_t lock;
        pthread_cond_t cond;
        unsigned active;
} Listener;

static volatile sig_atomic_t tunnel_interrupted;
static int quit_pipe[2] = { -1, -1 };

static void tunnel_signal(int sig) {
        int saved = errno;

        tunnel_interrupted = 1;
        if (quit_pipe[1] >= 0)
                (void)!write(quit_pipe[1], "x", 1);
        errno = saved;
}

/* "[HOST:]PORT" (HOST an IPv4 address or a bracketed IPv6 one, default
 * 127.0.0.1) as "HOST:PORT" in out. 0 or -EINVAL. */
static int parse_endpoint(const char *s, bool port_zero_ok, char out[static 64]) {
        char host[INET6_ADDRSTRLEN + 2] = "127.0.0.1";
        const char *port = s, *colon = strrchr(s, ':');
        unsigned char addr[sizeof(struct in6_addr)];
        char *end;
        long p;

        if (colon) {
                size_t hl = (size_t)(colon - s);

                if (hl == 0 || hl >= sizeof(host))
                        return -EINVAL;
                memcpy(host, s, hl);
                host[hl] = '\0';
                port = colon + 1;
                if (host[0] == '[') {
                        if (hl < 3 || host[hl - 1] != ']')
                                return -EINVAL;
                        host[hl - 1] = '\0';
                        if (inet_pton(AF_INET6, host + 1, addr) != 1)
                                return -EINVAL;
                        host[hl - 1] = ']';
                } else if (inet_pton(AF_INET, host, addr) != 1)
                        return -EINVAL;
        }
        if (!(*port >= '0' && *port <= '9'))
                return -EINVAL;
        errno = 0;
        p = strtol(port, &end, 10);
        if (errno || *end || p > 65535 || (p == 0 && !port_zero_ok))
                return -EINVAL;
        snprintf(out, 64, "%s:%ld", host, p);
        return 0;
}

/* Host: and the path prefix of the API URL. */
static int api_url_parts(const Api *a, TunnelOpts *o) {
        CURLU *u = curl_url();
        char *host = NULL, *port = NULL, *path = NULL;
        int r = -ENOMEM;

        if (!u)
                return log_error_errno(-ENOMEM, "Out of memory");
        if (curl_url_set(u, CURLUPART_URL, a->base, 0) != CURLUE_OK ||
            curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK) {
                curl_url_cleanup(u);
                return cli_usage_error("Invalid API URL '%s'", a->base);
        }
        if (curl_url_get(u, CURLUPART_PORT, &port, CURLU_NO_DEFAULT_PORT) != CURLUE_OK)
                port = NULL;
        if (curl_url_get(u, CURLUPART_PATH, &path, 0) != CURLUE_OK)
                path = NULL;
        if (asprintf(&o->host, "%s%s%s", host, port ? ":" : "", port ?: "") >= 0) {
                size_t l;

                o->path = strdup(path ?: "");
                if (o->path) {
                        l = strlen(o->path);
                        while (l > 0 && o->path[l - 1] == '/')
                                o->path[--l] = '\0';
                        r = 0;
                }
        } else
                o->host = NULL;
        curl_free(host);
        curl_free(port);
        curl_free(path);
        curl_url_cleanup(u);
        if (r < 0)
                return log_error_errno(r, "Out of memory");
        return 0;
}

static long left_ms(unsigned long long deadline) {
        unsigned long long now = now_usec();

        return now >= deadline ? 0 : (long)((deadline - now + 999) / 1000);
}

/* Wait until the API socket is ready for events, the deadline passes
 * (-ETIMEDOUT) or we are told to stop (-EINTR). */
static int wait_remote(Tunnel *t, short events, unsigned long long deadline) {
        for (;;) {
                struct pollfd p[2] = { { .fd = t->rfd, .events = events }, { .fd = t->quit_fd, .events = POLLIN } };
                long ms = left_ms(deadline);
                int k;

                if (ms <= 0)
                        return -ETIMEDOUT;
                k = poll(p, 2, ms > INT_MAX ? INT_MAX : (int)ms);
                if (k < 0 && errno == EINTR)
                        continue;
                if (k < 0)
                        return -errno;
                if (p[1].revents || tunnel_interrupted)
                        return -EINTR;
                if (p[0].revents)
                        return 0;
        }
}

static int send_all(Tunnel *t, const char *p, size_t len, unsigned long long deadline) {
        while (len > 0) {
                size_t n = 0;
                CURLcode c = curl_easy_send(t->api.curl, p, len, &n);

                if (c == CURLE_AGAIN) {
                        int r = wait_remote(t, POLLOUT, deadline);
                        if (r < 0)
                                return r;
                        continue;
                }
                if (c != CURLE_OK)
                        return curl_error(&t->api, c);
                p += n;
                len -= n;
        }
        return 0;
}

/* Read into b until it holds at least want bytes (want 0: until end of
 * stream), never more than b->max. 1 at the end of the stream, 0 when
 * want is reached, negative errno. */
static int recv_some(Tunnel *t, Buffer *b, size_t want, unsigned long long deadline) {
        char chunk[4096];

        while (want == 0 || b->len < want) {
                size_t n = 0, room = b->max - b->len;
                CURLcode c;
                int r;

                if (room == 0)
                        return -EFBIG;
                c = curl_easy_recv(t->api.curl, chunk, room < sizeof(chunk) ? room : sizeof(chunk), &n);
                if (c == CURLE_AGAIN) {
                        r = wait_remote(t, POLLIN, deadline);
                        if (r < 0)
                                return r;
                        continue;
                }
                if (c != CURLE_OK)
                        return curl_error(&t->api, c);
                if (n == 0)
                        return 1;
                r = buffer_append(b, chunk, n);
                if (r < 0)
                        return r;
        }
        return 0;
}

/* The value of header name in head (lines after the status line), or
 * NULL; copied into out. */
static const char *head_field(const char *head, const char *name, char *out, size_t size) {
        size_t nl = strlen(name);

        for (const char *l = strstr(head, "\r\n"); l && l[2]; l = strstr(l + 2, "\r\n")) {
                const char *v = l + 2, *e;
                size_t vl;

                if (strncasecmp(v, name, nl) != 0 || v[nl] != ':')
                        continue;
                v += nl + 1;
                v += strspn(v, " \t");
                e = strstr(v, "\r\n");
                vl = e ? (size_t)(e - v) : strlen(v);
                while (vl > 0 && (v[vl - 1] == ' ' || v[vl - 1] == '\t'))
                        vl--;
                if (vl >= size)
                        vl = size - 1;
                memcpy(out, v, vl);
                out[vl] = '\0';
                return out;
        }
        return NULL;
}

/* De-chunk a chunked body in place (bounded; what cannot be parsed is
 * left as it is: the error text then shows the raw body). */
static void dechunk(Buffer *b) {
        size_t in = 0, out = 0;

        while (in < b->len) {
                char *end;
                unsigned long n = strtoul(b->data + in, &end, 16);
                const char *crlf = strstr(b->data + in, "\r\n");

                if (!crlf || end == b->data + in)
                        return;
                in = (size_t)(crlf - b->data) + 2;
                if (n == 0 || n > b->len - in)
                        break;
                memmove(b->data + out, b->data + in, n);
                out += n;
                in += n + 2;
        }
        b->len = out;
        b->data[out] = '\0';
}

/* After a refused upgrade: the error body, as the JSON reader of the
 * other commands sees it. */
static void read_error_body(Tunnel *t, Buffer *head, size_t body_start, unsigned long long deadline, char *out,
                            size_t size) {
        _cleanup_(buffer_done) Buffer body = { .max = TUNNEL_ERROR_BODY_MAX };
        char v[64];
        size_t want = 0;
        bool chunked = false;

        if (head_field(head->data, "Content-Length", v, sizeof(v))) {
                unsigned long long l = strtoull(v, NULL, 10);
                want = l > TUNNEL_ERROR_BODY_MAX ? TUNNEL_ERROR_BODY_MAX : (size_t)l;
        } else if (head_field(head->data, "Transfer-Encoding", v, sizeof(v)) && strcasestr(v, "chunked"))
                chunked = true;
        if (buffer_append(&body, head->data + body_start, head->len - body_start) < 0)
                return;
        if (want > 0 && body.len < want)
                (void)recv_some(t, &body, want, deadline);
        else if (chunked && !strstr(body.data ?: "", "\r\n0\r\n") && !startswith(body.data ?: "", "0\r\n"))
                (void)recv_some(t, &body, 0, deadline);
        if (want > 0 && body.len > want)
                body.len = want;
        if (chunked && body.data)
                dechunk(&body);
        error_text(&body, out, size);
}

/* Connect to the API and ask for the upgrade. 1 on 101 (t->sid set, any
 * bytes after the head in t->down), negative errno otherwise (reported). */
static int tunnel_open(Tunnel *t) {
        const TunnelOpts *o = t->o;
        _cleanup_(buffer_done) Buffer head = { .max = TUNNEL_HEAD_MAX };
        _cleanup_free_ char *target = NULL, *req = NULL;
        unsigned long long deadline;
        long timeout_ms = arg.timeout_ms > 0 ? arg.timeout_ms : TUNNEL_OPEN_TIMEOUT_MS;
        const char *end = NULL;
        char v[64], text[TETHER_ERROR_TEXT_MAX + 1];
        long status;
        CURLcode c;
        int r;

        deadline = now_usec() + (unsigned long long)timeout_ms * 1000ULL;
        t->api.base = strdup(t->main->base);
        if (!t->api.curl || !t->report_curl || !t->api.base)
                return log_error_errno(-ENOMEM, "Out of memory");
        curl_easy_setopt(t->api.curl, CURLOPT_ERRORBUFFER, t->api.errbuf);
        curl_easy_setopt(t->api.curl, CURLOPT_URL, t->api.base);
        curl_easy_setopt(t->api.curl, CURLOPT_CONNECT_ONLY, 1L);
        /* Raw HTTP/1.1 follows: no h2 in ALPN, and through a proxy a
         * CONNECT tunnel even for http://. */
        curl_easy_setopt(t->api.curl, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
        curl_easy_setopt(t->api.curl, CURLOPT_HTTPPROXYTUNNEL, 1L);
        curl_easy_setopt(t->api.curl, CURLOPT_NOSIGNAL, 1L);
        api_set_timeouts(&t->api, timeout_ms);
        c = curl_easy_perform(t->api.curl);
        if (c != CURLE_OK)
                return curl_error(&t->api, c);
        if (curl_easy_getinfo(t->api.curl, CURLINFO_ACTIVESOCKET, &t->rfd) != CURLE_OK ||
            t->rfd == CURL_SOCKET_BAD) {
                log_error("Connection to %s lost", t->api.base);
                return -ECONNRESET;
        }

        target = curl_easy_escape(t->api.curl, o->target, 0);
        if (!target ||
            asprintf(&req,
                     "POST %s/v1/devices/%s/tunnel?target=%s HTTP/1.1\r\n"
                     "Host: %s\r\n"
                     "User-Agent: tether/" PACKAGE_VERSION "\r\n"
                     "%s%s%s"
                     "Connection: Upgrade\r\n"
                     "Upgrade: tether-tunnel\r\n"
                     "Content-Length: 0\r\n"
                     "\r\n",
                     o->path, o->device, target, o->host, arg.token ? "Authorization: Bearer " : "",
                     arg.token ?: "", arg.token ? "\r\n" : "") < 0) {
                req = NULL;
                return log_error_errno(-ENOMEM, "Out of memory");
        }
        r = send_all(t, req, strlen(req), deadline);
        if (r == -ETIMEDOUT)
                log_error("Timed out sending the tunnel request to %s", t->api.base);
        if (r < 0)
                return r;

        /* The head, in as few reads as there are: anything after it is
         * already tunnel data. */
        while (!(end = head.data ? strstr(head.data, "\r\n\r\n") : NULL)) {
                r = recv_some(t, &head, head.len + 1, deadline);
                if (r == -EFBIG) {
                        log_error("The response head from %s is larger than %u bytes", t->api.base, TUNNEL_HEAD_MAX);
                        return -EBADMSG;
                }
                if (r == -ETIMEDOUT) {
                        log_error("tunnel to %s on %s: no answer within %ld s", o->target, o->device,
                                  timeout_ms / 1000);
                        return r;
                }
                if (r == 1) {
                        log_error("Connection to %s closed before it answered the tunnel request", t->api.base);
                        return -ECONNRESET;
                }
                if (r < 0)
                        return r;
        }
        if (sscanf(head.data, "HTTP/1.%*1[01] %3ld", &status) != 1) {
                log_error("Malformed response from %s: not HTTP/1.1", t->api.base);
                return -EBADMSG;
        }
        t->api.status = status;
        if (status != 101) {
                size_t body_start = (size_t)(end - head.data) + 4;

                /* cppcheck-suppress unreadVariable ; ends the text of head.data, read below */
                ((char *)end)[2] = '\0'; /* the head ends with its last CRLF */
                read_error_body(t, &head, body_start, deadline, text, sizeof(text));
                if (!text[0])
                        snprintf(text, sizeof(text), "HTTP %ld", status);
                log_error("tunnel to %s on %s refused: %s", o->target, o->device, text);
                return status == 401 || status == 403 ? -EACCES
                       : status == 404                ? -ENOENT
                       : status == 409                ? -EHOSTDOWN
                       : status == 504                ? -ETIMEDOUT
                                                      : -EPROTO;
        }
        {
                size_t body_start = (size_t)(end - head.data) + 4;

                /* cppcheck-suppress unreadVariable ; ends the text of head.data, read below */
                ((char *)end)[2] = '\0';
                if (!head_field(head.data, "Tether-Stream", v, sizeof(v)) || !(v[0] >= '1' && v[0] <= '9')) {
                        log_error("Malformed response from %s: 101 without a Tether-Stream header", t->api.base);
                        return -EBADMSG;
                }
                t->sid = strtoull(v, NULL, 10);
                memcpy(t->down, head.data + body_start, head.len - body_start);
                t->down_off = 0;
                t->down_len = head.len - body_start;
                t->bytes_in += t->down_len;
        }
        return 1;
}

/* Send TLS close_notify on the API connection and keep reading: a
 * half-close that TLS 1.3 allows. libcurl has no call for it, so this
 * reaches OpenSSL's SSL object through CURLINFO_TLS_SSL_PTR (the backend
 * Debian's libcurl4-openssl-dev links). 0, -EAGAIN (call again when the
 * socket is writable), or -EOPNOTSUPP with another TLS backend (then the
 * device's side ends only with the tunnel). */
static int tls_half_close(Tunnel *t) {
        struct curl_tlssessioninfo *info = NULL;
        int k;

        if (curl_easy_getinfo(t->api.curl, CURLINFO_TLS_SSL_PTR, &info) != CURLE_OK || !info ||
            info->backend != CURLSSLBACKEND_OPENSSL || !info->internals)
                return -EOPNOTSUPP;
        k = SSL_shutdown(info->internals);
        if (k >= 0)
                return 0;
        k = SSL_get_error(info->internals, k);
        return k == SSL_ERROR_WANT_WRITE || k == SSL_ERROR_WANT_READ ? -EAGAIN : -EIO;
}

/* Relay until both directions ended, either side failed, or quit. */
static int tunnel_relay(Tunnel *t) {
        bool local_eof = false, remote_eof = false, remote_shut = false, local_shut = false;
        bool in_ready = false, out_ready = false, r_in = true, r_out = true;

        for (;;) {
                bool moved;

                do {
                        moved = false;
                        if (!remote_eof && t->down_len == 0 && r_in) {
                                size_t n = 0;
                                CURLcode c = curl_easy_recv(t->api.curl, t->down, TUNNEL_BUF, &n);

                                if (c == CURLE_AGAIN)
                                        r_in = false;
                                else if (c != CURLE_OK)
                                        return -ECONNRESET;
                                else if (n == 0)
                                        remote_eof = moved = true;
                                else {
                                        t->down_off = 0;
                                        t->down_len = n;
                                        t->bytes_in += n;
                                        moved = true;
                                }
                        }
                        if (t->down_len > 0 && (out_ready || t->local_socket)) {
                                ssize_t k = write(t->out_fd, t->down + t->down_off, t->down_len);

                                if (k < 0 && (errno == EAGAIN || errno == EINTR))
                                        out_ready = false;
                                else if (k < 0)
                                        return -errno;
                                else {
                                        t->down_off += (size_t)k;
                                        t->down_len -= (size_t)k;
                                        out_ready = false;
                                        moved = true;
                                }
                        }
                        if (!local_eof && t->up_len == 0 && (in_ready || t->local_socket)) {
                                ssize_t k = read(t->in_fd, t->up, TUNNEL_BUF);

                                in_ready = false;
                                if (k < 0 && (errno == EAGAIN || errno == EINTR))
                                        ;
                                else if (k < 0 && errno == ECONNRESET)
                                        return -ECONNRESET;
                                else if (k < 0)
                                        return -errno;
                                else if (k == 0)
                                        local_eof = moved = true;
                                else {
                                        t->up_off = 0;
                                        t->up_len = (size_t)k;
                                        moved = true;
                                }
                        }
                        if (t->up_len > 0 && r_out) {
                                size_t n = 0;
                                CURLcode c = curl_easy_send(t->api.curl, t->up + t->up_off, t->up_len, &n);

                                if (c == CURLE_AGAIN)
                                        r_out = false;
                                else if (c != CURLE_OK)
                                        return -ECONNRESET;
                                else {
                                        t->up_off += n;
                                        t->up_len -= n;
                                        t->bytes_out += n;
                                        moved = true;
                                }
                        }
                } while (moved && !tunnel_interrupted);

                /* Pass on an end of input as a half-close: on plain HTTP
                 * of the socket; over https:// as TLS close_notify, which
                 * libcurl has no call for (see tls_half_close()). */
                if (local_eof && t->up_len == 0 && !remote_shut) {
                        int k = startswith(t->api.base, "http://") ? shutdown(t->rfd, SHUT_WR) : tls_half_close(t);

                        if (k == -EAGAIN)
                                r_out = false; /* again when writable */
                        else
                                remote_shut = true;
                }
                if (remote_eof && t->down_len == 0 && !local_shut) {
                        if (t->local_socket)
                                (void)shutdown(t->out_fd, SHUT_WR);
                        else if (t->out_fd >= 0) {
                                /* ssh (ProxyCommand) sees the end. */
                                close(t->out_fd);
                                t->out_fd = -1;
                        }
                        local_shut = true;
                }
                /* Over when the tunnel's end reached the local side and
                 * the local side ended too (for --stdio: ssh exits once it
                 * sees the end, which ends our input). */
                if (remote_eof && t->down_len == 0 && local_eof)
                        return 0;

                struct pollfd p[4] = {
                        { .fd = !local_eof && t->up_len == 0 ? t->in_fd : -1, .events = POLLIN },
                        { .fd = t->down_len > 0 ? t->out_fd : -1, .events = POLLOUT },
                        { .fd = t->rfd,
                          .events = (short)((!remote_eof && t->down_len == 0 ? POLLIN : 0) |
                                            (t->up_len > 0 || (local_eof && !remote_shut) ? POLLOUT : 0)) },
                        { .fd = t->quit_fd, .events = POLLIN },
                };
                if (p[2].events == 0)
                        p[2].fd = -1;
                if (poll(p, ELEMENTSOF(p), -1) < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                if (p[3].revents || tunnel_interrupted)
                        return -EINTR;
                in_ready = p[0].revents != 0;
                out_ready = p[1].revents != 0;
                if (p[2].revents & (POLLIN | POLLHUP | POLLERR))
                        r_in = true;
                if (p[2].revents & (POLLOUT | POLLHUP | POLLERR))
                        r_out = true;
        }
}

/* The entry of stream sid in the cloud's list of the device's tunnels
 * (any array in the answer, or the answer itself), or NULL. */
static json_t *find_stream(json_t *j, uint64_t sid) {
        const char *key;
        json_t *v, *e;
        size_t i;

        if (json_is_array(j)) {
                json_array_foreach(j, i, e) {
                        json_t *s = json_object_get(e, "sid");

                        if ((json_is_integer(s) && (uint64_t)json_integer_value(s) == sid) ||
                            (json_is_string(s) && strtoull(json_string_value(s), NULL, 10) == sid))
                                return e;
                }
                return NULL;
        }
        json_object_foreach(j, key, v)
                if (json_is_array(v) && (e = find_stream(v, sid)) && json_object_get(e, "closed_at"))
                        return e;
        json_object_foreach(j, key, v)
                if (json_is_array(v) && (e = find_stream(v, sid)))
                        return e;
        return NULL;
}

/* GET the device's tunnels (docs/cloud.md) quietly: NULL on any failure. */
static json_t *get_tunnels(Tunnel *t, const char *url) {
        long status = 0;

        buffer_done(&t->api.body);
        t->api.body.max = TETHER_RESPONSE_MAX;
        curl_easy_setopt(t->api.curl, CURLOPT_URL, url);
        curl_easy_setopt(t->api.curl, CURLOPT_HTTPGET, 1L);
        curl_easy_setopt(t->api.curl, CURLOPT_WRITEFUNCTION, body_write);
        curl_easy_setopt(t->api.curl, CURLOPT_WRITEDATA, &t->api);
        if (curl_easy_perform(t->api.curl) != CURLE_OK)
                return NULL;
        curl_easy_getinfo(t->api.curl, CURLINFO_RESPONSE_CODE, &status);
        if (status != 200 || !t->api.body.data)
                return NULL;
        return json_loadb(t->api.body.data, t->api.body.len, 0, NULL);
}

/* Ask the cloud why stream t->sid ended and say it on stderr. */
static void tunnel_report(Tunnel *t) {
        _cleanup_free_ char *url = NULL;
        unsigned long long deadline = now_usec() + TUNNEL_REASON_WAIT_MS * 1000ULL;
        char text[TETHER_ERROR_TEXT_MAX + 1] = "";
        bool known = false;

        /* The other handle: the tunnel's one is a CONNECT_ONLY connection. */
        if (t->api.curl)
                curl_easy_cleanup(t->api.curl);
        t->api.curl = TAKE_PTR(t->report_curl);
        if (!t->api.curl || asprintf(&url, "%s/v1/devices/%s/tunnels", t->api.base, t->o->device) < 0) {
                url = NULL;
                goto print;
        }
        curl_easy_setopt(t->api.curl, CURLOPT_ERRORBUFFER, t->api.errbuf);
        curl_easy_setopt(t->api.curl, CURLOPT_NOSIGNAL, 1L);
        api_set_timeouts(&t->api, 5000L);
        while (!known) {
                struct timespec ts = { .tv_nsec = 100 * 1000000L };
                json_t *j = get_tunnels(t, url), *e;

                if (!j)
                        break;
                e = find_stream(j, t->sid);
                if (e && (json_object_get(e, "closed_at") || json_string_value(json_object_get(e, "reason")))) {
                        one_line(json_string_value(json_object_get(e, "reason")) ?: "", text, sizeof(text));
                        known = true;
                }
                json_decref(j);
                if (known || now_usec() >= deadline || tunnel_interrupted)
                        break;
                (void)nanosleep(&ts, NULL);
        }
print:
        if (text[0])
                log_notice("tunnel %" PRIu64 " closed: %s (%" PRIu64 " bytes in, %" PRIu64 " out)", t->sid, text,
                           t->bytes_in, t->bytes_out);
        else
                log_notice("tunnel %" PRIu64 " closed (%" PRIu64 " bytes in, %" PRIu64 " out)", t->sid, t->bytes_in,
                           t->bytes_out);
}

/* The split transport (docs/cloud.md "Tunnels and logs"): over an HTTPS
 * API the upgrade is not usable, so a tunnel is three plain requests on
 * two connections: POST .../tunnel (201: the stream's id and key), then
 * at once GET .../tunnels/SID/down (the device's bytes, a chunked body
 * without end until the device's fin; on the first request's connection)
 * on this thread and POST .../tunnels/SID/up (our bytes, a chunked upload
 * whose end is our fin) on another. Each half has its own easy handle and blocks on the local side:
 * a write to the local side that waits is the backpressure towards the
 * cloud, a read that waits holds the upload. The key travels only in the
 * Tether-Stream-Key header. Memory per tunnel: libcurl's buffers of two
 * handles (the report's third is used only at the end) and two bounded
 * error bodies. */

/* Wait until fd is ready for events (0), or until quit or stop (-EINTR). */
static int split_wait(Tunnel *t, int fd, short events) {
        for (;;) {
                struct pollfd p[3] = { { .fd = fd, .events = events },
                                       { .fd = t->quit_fd, .events = POLLIN },
                                       { .fd = t->stop_pipe[0], .events = POLLIN } };
                int k;

                if (tunnel_interrupted || atomic_load(&t->stop))
                        return -EINTR;
                k = poll(p, ELEMENTSOF(p), -1);
                if (k < 0 && errno == EINTR)
                        continue;
                if (k < 0)
                        return -errno;
                if (p[1].revents || p[2].revents)
                        return -EINTR;
                if (p[0].revents)
                        return 0;
        }
}

static void split_stop(Tunnel *t) {
        if (!atomic_exchange(&t->stop, true))
                (void)!write(t->stop_pipe[1], "x", 1);
}

/* Progress callback of both halves: a transfer waiting on the network
 * learns of quit or stop here (libcurl calls it about once a second). */
static int split_progress(void *userdata, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal,
                          curl_off_t ulnow) {
        Tunnel *t = userdata;

        (void)dltotal, (void)dlnow, (void)ultotal, (void)ulnow;
        return tunnel_interrupted || atomic_load(&t->stop) ? 1 : 0;
}

/* The down body to the local side; a refused down's body (not 200) into
 * t->down_error, bounded. */
static size_t split_down_write(char *p, size_t size, size_t n, void *userdata) {
        Tunnel *t = userdata;
        size_t len = size * n, done = 0;
        long status = 0;

        curl_easy_getinfo(t->down_curl, CURLINFO_RESPONSE_CODE, &status);
        if (status != 200)
                return buffer_append(&t->down_error, p, len) < 0 ? 0 : len;
        while (done < len) {
                ssize_t k;

                if (t->local_socket)
                        k = send(t->out_fd, p + done, len - done, MSG_NOSIGNAL);
                else
                        k = write(t->out_fd, p + done, len - done);
                if (k < 0 && (errno == EAGAIN || errno == EINTR)) {
                        if (split_wait(t, t->out_fd, POLLOUT) < 0)
                                return 0;
                        continue;
                }
                if (k < 0)
                        return 0; /* the local side went away: the stream ends */
                done += (size_t)k;
                t->bytes_in += (uint64_t)k;
        }
        return len;
}

/* The up body from the local side: 0 at its end (the cloud sends fin). */
static size_t split_up_read(char *p, size_t size, size_t n, void *userdata) {
        Tunnel *t = userdata;

        for (;;) {
                ssize_t k;

                if (split_wait(t, t->in_fd, POLLIN) < 0)
                        return CURL_READFUNC_ABORT;
                k = read(t->in_fd, p, size * n);
                if (k < 0 && (errno == EAGAIN || errno == EINTR))
                        continue;
                if (k < 0)
                        return CURL_READFUNC_ABORT; /* reset: the cloud resets the stream */
                t->bytes_out += (uint64_t)k;
                return (size_t)k;
        }
}

static size_t split_up_answer(char *p, size_t size, size_t n, void *userdata) {
        Tunnel *t = userdata;

        return buffer_append(&t->up_body, p, size * n) < 0 ? 0 : size * n;
}

/* Headers of a half: the main handle's (token, no Expect:) and the key. */
static struct curl_slist *split_headers(Tunnel *t, bool up) {
        _cleanup_free_ char *key = NULL;
        struct curl_slist *l = NULL, *n;

        if (asprintf(&key, "Tether-Stream-Key: %s", t->key) < 0)
                return NULL;
        for (const struct curl_slist *h = t->main->headers; h; h = h->next)
                if (!(n = curl_slist_append(l, h->data)))
                        goto fail;
                else
                        l = n;
        if (!(n = curl_slist_append(l, key)))
                goto fail;
        l = n;
        if (up) {
                if (!(n = curl_slist_append(l, "Transfer-Encoding: chunked")))
                        goto fail;
                l = n;
                if (!(n = curl_slist_append(l, "Content-Type: application/octet-stream")))
                        goto fail;
                l = n;
        }
        return l;
fail:
        curl_slist_free_all(l);
        return NULL;
}

static int split_setup(Tunnel *t, CURL *c, bool up) {
        _cleanup_free_ char *url = NULL;
        struct curl_slist *h = split_headers(t, up);

        if (!h || asprintf(&url, "%s/v1/devices/%s/tunnels/%" PRIu64 "/%s", t->api.base, t->o->device, t->sid,
                           up ? "up" : "down") < 0) {
                curl_slist_free_all(h);
                return log_error_errno(-ENOMEM, "Out of memory");
        }
        if (up)
                t->up_headers = h;
        else
                t->down_headers = h;
        curl_easy_setopt(c, CURLOPT_URL, url);
        curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, NULL);
        curl_easy_setopt(c, CURLOPT_ERRORBUFFER, up ? t->up_errbuf : t->down_errbuf);
        curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
        /* Chunked bodies of HTTP/1.1; a tunnel has no total time limit
         * (the cloud's IdleSec= ends idle ones). */
        curl_easy_setopt(c, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
        api_set_timeouts(&(Api){ .curl = c }, 0);
        curl_easy_setopt(c, CURLOPT_TCP_KEEPALIVE, 1L);
        curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
        curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, split_progress);
        curl_easy_setopt(c, CURLOPT_XFERINFODATA, t);
        if (up) {
                /* A POST whose body comes from the read callback, chunked
                 * (no size), sent at once: "Expect:" is among the main
                 * handle's headers, so no 100-continue round trip. */
                curl_easy_setopt(c, CURLOPT_POST, 1L);
                curl_easy_setopt(c, CURLOPT_READFUNCTION, split_up_read);
                curl_easy_setopt(c, CURLOPT_READDATA, t);
                curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, split_up_answer);
                curl_easy_setopt(c, CURLOPT_WRITEDATA, t);
                t->up_body.max = TUNNEL_ERROR_BODY_MAX;
        } else {
                curl_easy_setopt(c, CURLOPT_HTTPGET, 1L);
                curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, split_down_write);
                curl_easy_setopt(c, CURLOPT_WRITEDATA, t);
                curl_easy_setopt(c, CURLOPT_BUFFERSIZE, (long)TUNNEL_BUF);
                t->down_error.max = TUNNEL_ERROR_BODY_MAX;
        }
        return 0;
}

/* POST .../tunnel without the upgrade: 1 on 201 (t->sid, t->key set),
 * negative errno otherwise (reported, as tunnel_open() words it). */
static int split_open(Tunnel *t) {
        const TunnelOpts *o = t->o;
        _cleanup_free_ char *target = NULL, *url = NULL;
        long timeout_ms = arg.timeout_ms > 0 ? arg.timeout_ms : TUNNEL_OPEN_TIMEOUT_MS;
        char text[TETHER_ERROR_TEXT_MAX + 1];
        const char *key;
        json_t *j, *sid;
        CURLcode c;

        t->api.base = strdup(t->main->base);
        if (!t->api.curl || !t->report_curl || !t->api.base)
                return log_error_errno(-ENOMEM, "Out of memory");
        /* The up half's handle: a clean copy, before this one's request
         * (whose connection the down half then reuses). */
        t->up_curl = curl_easy_duphandle(t->api.curl);
        target = curl_easy_escape(t->api.curl, o->target, 0);
        if (!t->up_curl || !target ||
            asprintf(&url, "%s/v1/devices/%s/tunnel?target=%s", t->api.base, o->device, target) < 0) {
                url = NULL;
                return log_error_errno(-ENOMEM, "Out of memory");
        }
        buffer_done(&t->api.body);
        t->api.body.max = TUNNEL_ERROR_BODY_MAX;
        curl_easy_setopt(t->api.curl, CURLOPT_ERRORBUFFER, t->api.errbuf);
        curl_easy_setopt(t->api.curl, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(t->api.curl, CURLOPT_URL, url);
        curl_easy_setopt(t->api.curl, CURLOPT_POSTFIELDS, "");
        curl_easy_setopt(t->api.curl, CURLOPT_POSTFIELDSIZE, 0L);
        curl_easy_setopt(t->api.curl, CURLOPT_WRITEFUNCTION, body_write);
        curl_easy_setopt(t->api.curl, CURLOPT_WRITEDATA, &t->api);
        api_set_timeouts(&t->api, timeout_ms);
        c = curl_easy_perform(t->api.curl);
        if (c == CURLE_OPERATION_TIMEDOUT) {
                log_error("tunnel to %s on %s: no answer within %ld s", o->target, o->device, timeout_ms / 1000);
                return -ETIMEDOUT;
        }
        if (c == CURLE_WRITE_ERROR) {
                log_error("The response from %s is larger than %u bytes", t->api.base, TUNNEL_ERROR_BODY_MAX);
                return -EBADMSG;
        }
        if (c != CURLE_OK)
                return curl_error(&t->api, c);
        curl_easy_getinfo(t->api.curl, CURLINFO_RESPONSE_CODE, &t->api.status);
        if (t->api.status != 201) {
                error_text(&t->api.body, text, sizeof(text));
                if (!text[0])
                        snprintf(text, sizeof(text), "HTTP %ld", t->api.status);
                log_error("tunnel to %s on %s refused: %s", o->target, o->device, text);
                return t->api.status == 401 || t->api.status == 403 ? -EACCES
                       : t->api.status == 404                       ? -ENOENT
                       : t->api.status == 409                       ? -EHOSTDOWN
                       : t->api.status == 504                       ? -ETIMEDOUT
                                                                    : -EPROTO;
        }
        j = json_loadb(t->api.body.data ?: "", t->api.body.len, 0, NULL);
        sid = json_object_get(j, "stream");
        key = json_string_value(json_object_get(j, "key"));
        /* The key goes into a header: exactly 64 lowercase hex digits. */
        if (!json_is_integer(sid) || json_integer_value(sid) <= 0 || !key || strlen(key) != 64 ||
            strspn(key, "0123456789abcdef") != 64) {
                json_decref(j);
                log_error("Malformed response from %s: 201 without a stream and its key", t->api.base);
                return -EBADMSG;
        }
        t->sid = (uint64_t)json_integer_value(sid);
        memcpy(t->key, key, 65);
        json_decref(j);
        /* The down half goes on on this connection (kept alive). */
        t->down_curl = TAKE_PTR(t->api.curl);
        return 1;
}

static void *split_up_thread(void *userdata) {
        Tunnel *t = userdata;
        CURLcode c = curl_easy_perform(t->up_curl);
        long status = 0;

        curl_easy_getinfo(t->up_curl, CURLINFO_RESPONSE_CODE, &status);
        if (c != CURLE_OK || status != 200) {
                /* Our own abort (stop, quit, a local reset) says nothing
                 * new; anything else is the cloud's refusal. */
                if (c == CURLE_OK && status != 410) {
                        char text[TETHER_ERROR_TEXT_MAX + 1];

                        error_text(&t->up_body, text, sizeof(text));
                        log_error("tunnel %" PRIu64 ": sending refused: %s", t->sid, text[0] ? text : "no reason");
                } else if (c != CURLE_OK && c != CURLE_ABORTED_BY_CALLBACK && !tunnel_interrupted &&
                           !atomic_load(&t->stop))
                        log_debug("tunnel %" PRIu64 ": sending ended: %s", t->sid,
                                  t->up_errbuf[0] ? t->up_errbuf : curl_easy_strerror(c));
                split_stop(t);
        }
        return NULL;
}

/* Relay one stream over the split transport until both halves ended. */
static int split_relay(Tunnel *t) {
        pthread_t up;
        CURLcode c;
        long status = 0;
        int r;

        r = split_setup(t, t->down_curl, false);
        if (r >= 0)
                r = split_setup(t, t->up_curl, true);
        if (r < 0)
                return r;
        r = pthread_create(&up, NULL, split_up_thread, t);
        if (r != 0)
                return log_error_errno(-r, "Cannot start a thread: %m");
        c = curl_easy_perform(t->down_curl);
        curl_easy_getinfo(t->down_curl, CURLINFO_RESPONSE_CODE, &status);
        if (c == CURLE_OK && status == 200) {
                /* The device's fin, everything before it delivered. */
                if (t->local_socket)
                        (void)shutdown(t->out_fd, SHUT_WR);
                else {
                        close(t->out_fd); /* ssh (ProxyCommand) sees the end */
                        t->out_fd = -1;
                }
        } else {
                if (c == CURLE_OK) {
                        char text[TETHER_ERROR_TEXT_MAX + 1];

                        error_text(&t->down_error, text, sizeof(text));
                        log_error("tunnel %" PRIu64 ": receiving refused: %s", t->sid, text[0] ? text : "no reason");
                }
                /* Cut short: the stream was reset. The local side sees
                 * the end at once; the up half stops. */
                if (t->local_socket)
                        (void)shutdown(t->out_fd, SHUT_RDWR);
                else if (t->out_fd >= 0) {
                        close(t->out_fd);
                        t->out_fd = -1;
                }
                split_stop(t);
        }
        pthread_join(up, NULL);
        return tunnel_interrupted ? -EINTR : 0;
}

static void tunnel_done(Tunnel *t) {
        if (t->api.curl)
                curl_easy_cleanup(t->api.curl);
        if (t->report_curl)
                curl_easy_cleanup(t->report_curl);
        free(t->api.base);
        buffer_done(&t->api.body);
        free(t->up);
        free(t->down);
        if (t->down_curl)
                curl_easy_cleanup(t->down_curl);
        if (t->up_curl)
                curl_easy_cleanup(t->up_curl);
        curl_slist_free_all(t->down_headers);
        curl_slist_free_all(t->up_headers);
        buffer_done(&t->down_error);
        buffer_done(&t->up_body);
        for (int i = 0; i < 2; i++)
                if (t->stop_pipe[i] >= 0)
                        close(t->stop_pipe[i]);
        if (t->local_socket && t->in_fd >= 0)
                close(t->in_fd);
        *t = (Tunnel){ .in_fd = -1, .out_fd = -1, .stop_pipe = { -1, -1 } };
}

/* One local connection, start to end. 0 when a tunnel was relayed,
 * negative errno (reported) otherwise. */
static int tunnel_run(Tunnel *t) {
        int r;

        t->up = malloc(TUNNEL_BUF);
        t->down = malloc(TUNNEL_BUF);
        if (!t->up || !t->down)
                return log_error_errno(-ENOMEM, "Out of memory");
        if (t->o->split) {
                if (pipe2(t->stop_pipe, O_CLOEXEC | O_NONBLOCK) < 0)
                        return log_error_errno(-errno, "Failed to create a pipe: %m");
                r = split_open(t);
        } else
                r = tunnel_open(t);
        if (r < 0)
                return r;
        /* Under ssh (--stdio) our stderr is the user's terminal: quiet. */
        if (t->local_socket)
                log_info("tunnel %" PRIu64 " open to %s on %s", t->sid, t->o->target, t->o->device);
        else
                log_debug("tunnel %" PRIu64 " open to %s on %s", t->sid, t->o->target, t->o->device);
        r = t->o->split ? split_relay(t) : tunnel_relay(t);
        if (r == -EINTR)
                return 0;
        /* The cloud closed the connection or our side failed: either way
         * the stream is over, and the cloud knows why. */
        tunnel_report(t);
        return 0;
}

typedef struct Conn {
        Tunnel t;
        Listener *l;
} Conn;

static void *conn_thread(void *userdata) {
        Conn *c = userdata;
        Listener *l = c->l;

        (void)tunnel_run(&c->t);
        tunnel_done(&c->t);
        free(c);
        pthread_mutex_lock(&l->lock);
        l->active--;
        pthread_cond_broadcast(&l->cond);
        pthread_mutex_unlock(&l->lock);
        return NULL;
}

static int listen_socket(const char *endpoint, char *ret_shown, size_t size) {
        struct sockaddr_storage ss = {};
        socklen_t sl;
        char host[INET6_ADDRSTRLEN + 2];
        const char *colon = strrchr(endpoint, ':');
        int port = atoi(colon + 1), one = 1, fd;
        size_t hl = (size_t)(colon - endpoint);

        memcpy(host, endpoint, hl);
        host[hl] = '\0';
        if (host[0] == '[') {
                struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
                host[hl - 1] = '\0';
                s6->sin6_family = AF_INET6;
                s6->sin6_port = htons((uint16_t)port);
                inet_pton(AF_INET6, host + 1, &s6->sin6_addr);
                sl = sizeof(*s6);
        } else {
                struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
                s4->sin_family = AF_INET;
                s4->sin_port = htons((uint16_t)port);
                inet_pton(AF_INET, host, &s4->sin_addr);
                sl = sizeof(*s4);
        }
        fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0)
                return log_error_errno(-errno, "Failed to create a socket: %m");
        (void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(fd, (struct sockaddr *)&ss, sl) < 0 || listen(fd, 64) < 0) {
                int r = -errno;
                close(fd);
                return log_error_errno(r, "Cannot listen on %s: %m", endpoint);
        }
        if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0)
                port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                      : ((struct sockaddr_in *)&ss)->sin_port);
        snprintf(ret_shown, size, "%.*s:%d", (int)hl, endpoint, port);
        return fd;
}

static int tunnel_listen(Api *a, const TunnelOpts *o) {
        Listener l = { .lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER };
        _cleanup_close_ int fd = -1;
        char shown[96];
        int r = 0;

        fd = listen_socket(o->listen, shown, sizeof(shown));
        if (fd < 0)
                return fd;
        /* Tests wait for this line. */
        log_info("listening on %s -> %s %s", shown, o->device, o->target);

        while (!tunnel_interrupted) {
                struct pollfd p[2] = { { .fd = fd, .events = POLLIN }, { .fd = quit_pipe[0], .events = POLLIN } };
                pthread_attr_t attr;
                pthread_t th;
                Conn *c;
                int cfd, one = 1;

                if (poll(p, 2, -1) < 0) {
                        if (errno == EINTR)
                                continue;
                        r = log_error_errno(-errno, "poll() failed: %m");
                        break;
                }
                if (p[1].revents)
                        break;
                /* cppcheck-suppress nullPointer ; NULL: no peer address wanted */
                cfd = accept4(fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
                if (cfd < 0)
                        continue; /* the client went away, or EMFILE: try again on the next one */
                pthread_mutex_lock(&l.lock);
                if (l.active >= TUNNEL_CONNECTIONS_MAX) {
                        pthread_mutex_unlock(&l.lock);
                        log_warning("Warning: %u connections open already, refusing another", l.active);
                        close(cfd);
                        continue;
                }
                l.active++;
                pthread_mutex_unlock(&l.lock);
                (void)setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
                c = calloc(1, sizeof(*c));
                if (c) {
                        /* libcurl handles are not to be shared between
                         * threads: copies of a's are made here. */
                        c->l = &l;
                        c->t = (Tunnel){ .main = a, .o = o, .in_fd = cfd, .out_fd = cfd, .local_socket = true,
                                         .quit_fd = quit_pipe[0], .stop_pipe = { -1, -1 }, .api.curl = curl_easy_duphandle(a->curl),
                                         .report_curl = curl_easy_duphandle(a->curl) };
                }
                pthread_attr_init(&attr);
                pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
                if (!c || pthread_create(&th, &attr, conn_thread, c) != 0) {
                        log_warning("Warning: cannot serve a connection: out of resources");
                        if (c)
                                tunnel_done(&c->t); /* closes cfd */
                        else
                                close(cfd);
                        free(c);
                        pthread_mutex_lock(&l.lock);
                        l.active--;
                        pthread_mutex_unlock(&l.lock);
                }
                pthread_attr_destroy(&attr);
        }
        /* The quit pipe stays readable: every thread ends. */
        pthread_mutex_lock(&l.lock);
        while (l.active > 0)
                pthread_cond_wait(&l.cond, &l.lock);
        pthread_mutex_unlock(&l.lock);
        return r;
}

int cmd_tunnel(Api *a, char **args, int n) {
        static const struct option options[] = {
                { "listen", required_argument, NULL, 'l' },
                { "stdio", no_argument, NULL, 's' },
                { "transport", required_argument, NULL, 't' },
                { "help", no_argument, NULL, 'h' },
                {},
        };
        struct sigaction sa = { .sa_handler = tunnel_signal };
        TunnelOpts o = {};
        const char *listen_arg = NULL, *transport = NULL, *pos[2];
        int npos = 0, c, r;

        /* args[-1] is the word "tunnel": getopt's argv[0]. */
        optind = 0;
        opterr = 0;
        while ((c = getopt_long(n + 1, args - 1, ":h", options, NULL)) >= 0) {
                switch (c) {
                case 'l':
                        listen_arg = optarg;
                        break;
                case 's':
                        o.stdio = true;
                        break;
                case 't':
                        transport = optarg;
                        break;
                case 'h':
                        tunnel_help();
                        return 0;
                case ':':
                        return cli_usage_error("Option '%s' needs an argument", args[optind - 2]);
                default:
                        return cli_usage_error("Unknown option '%s' of 'tunnel'", args[optind - 2]);
                }
        }
        for (int i = optind; i < n + 1; i++) {
                if (npos >= 2)
                        return cli_usage_error("'tunnel' takes DEVICE [HOST:]PORT");
                pos[npos++] = args[i - 1];
        }
        if (npos != 2)
                return cli_usage_error("'tunnel' takes DEVICE [HOST:]PORT and --listen [ADDR:]PORT or --stdio");
        if (!listen_arg == !o.stdio)
                return cli_usage_error("Give one of --listen [ADDR:]PORT and --stdio");
        r = name_check(pos[0], PROTO_NAME_DEVICE);
        if (r < 0)
                return r;
        o.device = pos[0];
        if (parse_endpoint(pos[1], false, o.target) < 0)
                return cli_usage_error("Invalid target '%s': expected [HOST:]PORT, HOST an IPv4 address or an "
                                       "IPv6 address in brackets",
                                       pos[1]);
        if (listen_arg && parse_endpoint(listen_arg, true, o.listen) < 0)
                return cli_usage_error("Invalid --listen '%s': expected [ADDR:]PORT, ADDR an IPv4 address or an "
                                       "IPv6 address in brackets",
                                       listen_arg);
        /* Over HTTPS the upgrade is not usable (docs/cloud.md "Tunnels and
         * logs"); over HTTP it is the faster one. */
        if (!transport)
                o.split = startswith(a->base, "https://");
        else if (streq(transport, "split"))
                o.split = true;
        else if (!streq(transport, "upgrade"))
                return cli_usage_error("Invalid --transport '%s': expected upgrade or split", transport);
        r = api_url_parts(a, &o);
        if (r < 0)
                goto out;
        if (pipe2(quit_pipe, O_CLOEXEC | O_NONBLOCK) < 0) {
                r = log_error_errno(-errno, "Failed to create a pipe: %m");
                goto out;
        }
        sigemptyset(&sa.sa_mask);
        sigaction(SIGINT, &sa, NULL);
        sigaction(SIGTERM, &sa, NULL);
        /* ssh ends its ProxyCommand with SIGHUP. */
        sigaction(SIGHUP, &sa, NULL);

        if (o.stdio) {
                Tunnel t = { .main = a, .o = &o, .in_fd = STDIN_FILENO, .out_fd = STDOUT_FILENO,
                             .quit_fd = quit_pipe[0], .stop_pipe = { -1, -1 }, .api.curl = curl_easy_duphandle(a->curl),
                             .report_curl = curl_easy_duphandle(a->curl) };

                r = tunnel_run(&t);
                tunnel_done(&t);
                /* Refused: exit 1 whatever the reason (docs/cli.md). */
                if (r < 0 && r != -ECONNREFUSED && r != -EHOSTUNREACH && r != -ECONNABORTED && r != -EINVAL)
                        r = -EPROTO;
        } else
                r = tunnel_listen(a, &o);
out:
        signal(SIGINT, SIG_DFL);
        signal(SIGTERM, SIG_DFL);
        signal(SIGHUP, SIG_DFL);
        if (quit_pipe[0] >= 0) {
                close(quit_pipe[0]);
                close(quit_pipe[1]);
                quit_pipe[0] = quit_pipe[1] = -1;
        }
        free(o.host);
        free(o.path);
        return r;
}

void tunnel_help(void) {
        printf("Usage: tether [OPTIONS] tunnel DEVICE [HOST:]PORT (--listen [ADDR:]PORT | --stdio)\n"
               "                                  [--transport upgrade|split]\n"
               "\n"
               "Reach TCP port PORT of HOST (default 127.0.0.1) on the device through the cloud,\n"
               "like ssh -L. The device must allow the target ([Tunnel] Allow= in tetherd.conf).\n"
               "\n"
               "  --listen [ADDR:]PORT  accept connections on ADDR (default 127.0.0.1) and PORT\n"
               "                        (0: any free port), each one a tunnel; runs until\n"
               "                        interrupted\n"
               "  --stdio               one tunnel on standard input and output, as an ssh\n"
               "                        ProxyCommand:\n"
               "                          ssh -o ProxyCommand='tether tunnel %%n 22 --stdio' root@DEVICE\n"
               "  --transport upgrade|split\n"
               "                        how the bytes travel to the cloud: one upgraded\n"
               "                        connection (default over http://) or two plain\n"
               "                        requests (default over https://)\n");
}
