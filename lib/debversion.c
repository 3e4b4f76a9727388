/* SPDX-License-Identifier: Apache-2.0 */
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "debversion.h"

#define DEBVERSION_MAX 128

static bool is_alnum(char c) {
        return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

int debversion_check(const char *s) {
        const char *colon, *hyphen, *upstream, *end;

        if (!s || !*s || strlen(s) > DEBVERSION_MAX)
                return -EINVAL;
        colon = strchr(s, ':');
        upstream = s;
        if (colon) {
                unsigned long e = 0;

                if (colon == s)
                        return -EINVAL;
                for (const char *p = s; p < colon; p++) {
                        if (*p < '0' || *p > '9')
                                return -EINVAL;
                        e = e * 10 + (unsigned long)(*p - '0');
                        if (e > INT_MAX)
                                return -EINVAL;
                }
                upstream = colon + 1;
        }
        hyphen = strrchr(upstream, '-');
        end = hyphen ? hyphen : upstream + strlen(upstream);
        if (upstream == end || !isdigit((unsigned char)*upstream))
                return -EINVAL;
        for (const char *p = upstream; p < end; p++)
                if (!is_alnum(*p) && !strchr(".+~-:", *p))
                        return -EINVAL;
        if (hyphen) {
                if (!hyphen[1])
                        return -EINVAL;
                for (const char *p = hyphen + 1; *p; p++)
                        if (!is_alnum(*p) && !strchr(".+~", *p))
                                return -EINVAL;
        }
        return 0;
}

/* dpkg's order of non-digit characters: '~' before everything, even the
 * end of the part; letters before non-letters. */
static int order(int c) {
        if (isdigit(c))
                return 0;
        if (isalpha(c))
                return c;
        if (c == '~')
                return -1;
        if (c)
                return c + 256;
        return 0;
}

/* dpkg's verrevcmp(), over [a, a_end) and [b, b_end). */
static int verrevcmp(const char *a, const char *a_end, const char *b, const char *b_end) {
        while (a < a_end || b < b_end) {
                int first_diff = 0;

                while ((a < a_end && !isdigit((unsigned char)*a)) || (b < b_end && !isdigit((unsigned char)*b))) {
                        int ac = a < a_end ? order((unsigned char)*a) : 0;
                        int bc = b < b_end ? order((unsigned char)*b) : 0;

                        if (ac != bc)
                                return ac - bc;
                        a++;
                        b++;
                }
                while (a < a_end && *a == '0')
                        a++;
                while (b < b_end && *b == '0')
                        b++;
                while (a < a_end && isdigit((unsigned char)*a) && b < b_end && isdigit((unsigned char)*b)) {
                        if (!first_diff)
                                first_diff = *a - *b;
                        a++;
                        b++;
                }
                if (a < a_end && isdigit((unsigned char)*a))
                        return 1;
                if (b < b_end && isdigit((unsigned char)*b))
                        return -1;
                if (first_diff)
                        return first_diff;
        }
        return 0;
}

typedef struct Parts {
        unsigned long epoch;
        const char *up, *up_end, *rev, *rev_end;
} Parts;

static void split(const char *s, Parts *p) {
        const char *colon = strchr(s, ':'), *hyphen;

        p->epoch = colon ? strtoul(s, NULL, 10) : 0;
        p->up = colon ? colon + 1 : s;
        hyphen = strrchr(p->up, '-');
        p->up_end = hyphen ? hyphen : p->up + strlen(p->up);
        p->rev = hyphen ? hyphen + 1 : p->up_end;
        p->rev_end = p->rev + strlen(p->rev);
}

int debversion_compare(const char *a, const char *b) {
        Parts pa, pb;
        int r;

        split(a, &pa);
        split(b, &pb);
        if (pa.epoch != pb.epoch)
                return pa.epoch < pb.epoch ? -1 : 1;
        r = verrevcmp(pa.up, pa.up_end, pb.up, pb.up_end);
        if (r)
                return r;
        return verrevcmp(pa.rev, pa.rev_end, pb.rev, pb.rev_end);
}
