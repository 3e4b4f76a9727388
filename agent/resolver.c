/* SPDX-License-Identifier: Apache-2.0 */
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include "resolver.h"
#include "util.h"

typedef struct Lookup {
        struct Lookup *next;
        struct gaicb req;
        struct addrinfo hints;
        char host[];
} Lookup;

struct Resolver {
        int signo;
        resolver_done_fn done;
        void *userdata;
        sd_event_source *source;
        Lookup *lookup; /* the current one */
        Lookup *stale;  /* could not be cancelled: glibc still owns them */
};

static void lookup_free(Lookup *l) {
        if (l->req.ar_result)
                freeaddrinfo(l->req.ar_result);
        free(l);
}

static void reap_stale(Resolver *r) {
        for (Lookup **p = &r->stale; *p;) {
                Lookup *l = *p;

                if (gai_error(&l->req) == EAI_INPROGRESS) {
                        p = &l->next;
                        continue;
                }
                *p = l->next;
                lookup_free(l);
        }
}

void resolver_cancel(Resolver *r) {
        Lookup *l = r ? TAKE_PTR(r->lookup) : NULL;

        if (!l)
                return;
        if (gai_cancel(&l->req) == EAI_NOTCANCELED) {
                l->next = r->stale;
                r->stale = l;
                return;
        }
        lookup_free(l);
}

static int on_signal(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        Resolver *r = userdata;
        struct addrinfo *ai;
        int ret;

        reap_stale(r);
        if (!r->lookup || gai_error(&r->lookup->req) == EAI_INPROGRESS)
                return 0;
        ret = gai_error(&r->lookup->req);
        ai = TAKE_PTR(r->lookup->req.ar_result);
        lookup_free(TAKE_PTR(r->lookup));
        if (ret != 0 && ai) {
                freeaddrinfo(ai);
                ai = NULL;
        }
        if (ret == 0 && !ai)
                ret = EAI_NONAME;
        r->done(r->userdata, ret, ai);
        return 0;
}

int resolver_start(Resolver *r, const char *host) {
        struct sigevent sev = { .sigev_notify = SIGEV_SIGNAL, .sigev_signo = r->signo };
        struct gaicb *list[1];
        Lookup *l;

        resolver_cancel(r);
        l = calloc(1, sizeof(Lookup) + strlen(host) + 1);
        if (!l)
                return -ENOMEM;
        strcpy(l->host, host);
        l->hints = (struct addrinfo){ .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM };
        l->req = (struct gaicb){ .ar_name = l->host, .ar_request = &l->hints };
        list[0] = &l->req;
        if (getaddrinfo_a(GAI_NOWAIT, list, 1, &sev) != 0) {
                free(l);
                return -EAGAIN;
        }
        r->lookup = l;
        return 0;
}

int resolver_new(sd_event *event, int signo, resolver_done_fn done, void *userdata, Resolver **ret) {
        Resolver *r = calloc(1, sizeof(Resolver));
        int k;

        if (!r)
                return -ENOMEM;
        r->signo = signo;
        r->done = done;
        r->userdata = userdata;
        k = sd_event_add_signal(event, &r->source, signo, on_signal, r);
        if (k < 0) {
                free(r);
                return k;
        }
        *ret = r;
        return 0;
}

Resolver *resolver_free(Resolver *r) {
        if (!r)
                return NULL;
        resolver_cancel(r);
        reap_stale(r);
        sd_event_source_disable_unref(r->source);
        /* Lookups still on stale belong to glibc's helper until they end:
         * they are left allocated (see resolver.h). */
        free(r);
        return NULL;
}
