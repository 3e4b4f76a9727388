/* SPDX-License-Identifier: Apache-2.0 */
/* GET /v1/devices, whole or by page (docs/cloud.md): the parameters of
 * Particle's product device list (page, per_page) and its response
 * ({"devices":[…],"meta":{"total_pages":N}}). A page costs its devices:
 * the registry keeps them in the order first seen (devices.c). No
 * logging. */
#include "config.h"

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <time.h>

#include "api.h"
#include "inventory.h"
#include "registry.h"
#include "tokens.h"
#include "util.h"

/* A whole number from 1 to max in plain decimal: no sign, no spaces, no
 * leading zeros beyond the number itself. */
static int api_page_number(const char *s, size_t max, size_t *ret) {
        size_t v = 0;

        if (!s || !*s || *s == '0')
                return -EINVAL;
        for (; *s; s++) {
                size_t d = (size_t)(*s - '0');

                if (*s < '0' || *s > '9')
                        return -EINVAL;
                /* Checked before it is computed: 10 * 10^9 wraps a 32-bit
                 * size_t. */
                if (v > (max - d) / 10)
                        return -ERANGE;
                v = v * 10 + d;
        }
        *ret = v;
        return 0;
}

int api_parse_page(const char *page, const char *per_page, ApiPage *ret, const char **ret_error) {
        ApiPage p = { .page = 1, .per_page = API_PAGE_DEFAULT_PER_PAGE };

        p.paged = page || per_page;
        if (page && api_page_number(page, API_PAGE_MAX, &p.page) < 0) {
                *ret_error = "page must be a whole number from 1 to 1000000000";
                return -EINVAL;
        }
        if (per_page && api_page_number(per_page, API_PAGE_MAX_PER_PAGE, &p.per_page) < 0) {
                *ret_error = "per_page must be a whole number from 1 to 1000";
                return -EINVAL;
        }
        *ret = p;
        return 0;
}

json_t *api_devices_list(Devices *devs, const ApiPage *p) {
        size_t n = devices_count(devs), offset;
        json_t *devices;

        if (!p->paged)
                return devices_to_json(devs); /* particle-cli reads the plain array */
        /* (page - 1) * per_page may not fit a 32-bit size_t: a page that
         * starts past the end is empty without computing where. */
        offset = p->page - 1 > n / p->per_page ? n : (p->page - 1) * p->per_page;
        devices = devices_page_to_json(devs, offset, p->per_page);
        if (!devices)
                return NULL;
        return api_page_json(devices, n, p);
}

json_t *api_page_json(json_t *page, size_t total, const ApiPage *p) {
        return json_pack("{s:o, s:{s:I, s:I, s:I, s:I}}", "devices", page, "meta", "total_pages",
                         (json_int_t)((total + p->per_page - 1) / p->per_page), "page", (json_int_t)p->page,
                         "per_page", (json_int_t)p->per_page, "total", (json_int_t)total);
}

static uint64_t now_realtime_usec(void) {
        struct timespec ts;

        clock_gettime(CLOCK_REALTIME, &ts);
        return (uint64_t)ts.tv_sec * 1000000ULL + (uint64_t)ts.tv_nsec / 1000ULL;
}

/* The filtered list being built: the page's devices and the count. */
typedef struct FilteredList {
        const InventoryFilter *f;
        Registry *reg;
        uint64_t now;
        size_t first, per_page, total;
        json_t *a;
        int error;
} FilteredList;

/* Take dev (a device object, taken) into l if it passes the filter. */
static void filtered_add(FilteredList *l, json_t *dev, uint64_t last_heard) {
        const char *id = json_string_value(json_object_get(dev, "id"));
        int r;

        if (!dev) {
                l->error = -ENOMEM;
                return;
        }
        r = registry_device_json(l->reg, id, dev, false);
        if (r < 0) {
                l->error = r;
                json_decref(dev);
                return;
        }
        if (!inventory_filter_match(l->f, dev, last_heard, l->now)) {
                json_decref(dev);
                return;
        }
        if (l->total >= l->first && l->total - l->first < l->per_page) {
                if (json_array_append_new(l->a, dev) < 0)
                        l->error = -ENOMEM;
        } else
                json_decref(dev);
        l->total++;
}

int api_devices_list_filtered(Devices *devs, Registry *reg, const TokenAuth *auth, const InventoryFilter *f,
                              const ApiPage *p, json_t **ret) {
        FilteredList l = { .f = f, .reg = reg, .now = now_realtime_usec(), .per_page = SIZE_MAX };
        json_t *j;

        if (p->paged) {
                l.first = p->page - 1 > SIZE_MAX / p->per_page ? SIZE_MAX : (p->page - 1) * p->per_page;
                l.per_page = p->per_page;
        }
        l.a = json_array();
        if (!l.a)
                return -ENOMEM;
        if (auth && tokens_restricted(auth)) {
                ApiPage whole = { .paged = false };
                json_t *list = NULL, *dev;
                size_t i;
                int r = api_devices_list_restricted(devs, reg, auth, &whole, &list);

                if (r < 0) {
                        json_decref(l.a);
                        return r;
                }
                json_array_foreach(list, i, dev) {
                        Device *d = devices_find(devs, json_string_value(json_object_get(dev, "id")));

                        if (l.error < 0)
                                break;
                        filtered_add(&l, json_incref(dev), d ? device_last_heard(d) : 0);
                }
                json_decref(list);
        } else
                for (size_t i = 0; l.error == 0 && devices_at(devs, i); i++) {
                        Device *d = devices_at(devs, i);

                        filtered_add(&l, device_to_json(d, false), device_last_heard(d));
                }
        if (l.error < 0) {
                json_decref(l.a);
                return l.error;
        }
        if (!p->paged) {
                *ret = l.a;
                return 0;
        }
        j = api_page_json(l.a, l.total, p);
        if (!j)
                return -ENOMEM;
        *ret = j;
        return 0;
}
