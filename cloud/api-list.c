/* SPDX-License-Identifier: Apache-2.0 */
/* GET /v1/devices, whole or by page (docs/cloud.md): the parameters of
 * Particle's product device list (page, per_page) and its response
 * ({"devices":[…],"meta":{"total_pages":N}}). A page costs its devices:
 * the registry keeps them in the order first seen (devices.c). No
 * logging. */
#include "config.h"

#include <errno.h>
#include <limits.h>

#include "api.h"

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
        return json_pack("{s:o, s:{s:I, s:I, s:I, s:I}}", "devices", devices, "meta", "total_pages",
                         (json_int_t)((n + p->per_page - 1) / p->per_page), "page", (json_int_t)p->page, "per_page",
                         (json_int_t)p->per_page, "total", (json_int_t)n);
}
