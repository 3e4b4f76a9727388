/* SPDX-License-Identifier: Apache-2.0 */
/* Unit tests for the web console's file server (cloud/console.c): the
 * name rules (no dot first, no '/', no byte off [A-Za-z0-9._-], at most
 * CONSOLE_NAME_MAX), the content types, and console_respond() over a
 * scratch directory holding what must be refused next to what is served
 * (a symlink in and out, a subdirectory, a FIFO, a file over 4 MiB, a
 * name through '..'): the status, the security headers on every answer,
 * the ETag and 304. tests/integration/test-console.py does the same over
 * HTTP. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cloud/console.h"
#include "lib/util.h"

static char dir[] = "/tmp/tether-console-XXXXXX";

static void put(const char *name, const char *text) {
        char p[PATH_MAX];
        FILE *f;

        snprintf(p, sizeof(p), "%s/%s", dir, name);
        f = fopen(p, "w");
        assert_non_null(f);
        fputs(text, f);
        fclose(f);
}

static int setup(void **state) {
        char p[PATH_MAX], q[PATH_MAX];

        (void)state;
        assert_non_null(mkdtemp(dir));
        snprintf(p, sizeof(p), "%s/console", dir);
        assert_int_equal(mkdir(p, 0755), 0);
        put("secret.js", "secret");
        put("console/index.html", "<!doctype html>");
        put("console/app.js", "export {};");
        put("console/x.txt", "text");
        put("console/.hidden.js", "hidden");
        snprintf(p, sizeof(p), "%s/console/sub", dir);
        assert_int_equal(mkdir(p, 0755), 0);
        put("console/sub/inner.js", "inner");
        snprintf(p, sizeof(p), "%s/console/out.js", dir);
        snprintf(q, sizeof(q), "%s/secret.js", dir);
        assert_int_equal(symlink(q, p), 0);
        snprintf(p, sizeof(p), "%s/console/in.js", dir);
        assert_int_equal(symlink("app.js", p), 0);
        snprintf(p, sizeof(p), "%s/console/fifo.js", dir);
        assert_int_equal(mkfifo(p, 0644), 0);
        snprintf(p, sizeof(p), "%s/console/big.js", dir);
        {
                int fd = open(p, O_CREAT | O_WRONLY | O_CLOEXEC, 0644);

                assert_true(fd >= 0);
                assert_int_equal(ftruncate(fd, CONSOLE_FILE_MAX + 1), 0);
                close(fd);
        }
        return 0;
}

static int teardown(void **state) {
        char cmd[PATH_MAX + 16];

        (void)state;
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
        assert_int_equal(system(cmd), 0);
        return 0;
}

static void test_names(void **state) {
        char longest[CONSOLE_NAME_MAX + 2];

        (void)state;
        assert_true(console_name_ok("index.html"));
        assert_true(console_name_ok("a-b_c.1.js"));
        assert_false(console_name_ok(""));
        assert_false(console_name_ok("."));
        assert_false(console_name_ok(".."));
        assert_false(console_name_ok("..js"));
        assert_false(console_name_ok(".hidden.js"));
        assert_false(console_name_ok("../x.js"));
        assert_false(console_name_ok("a/b.js"));
        assert_false(console_name_ok("a\\b.js"));
        assert_false(console_name_ok("a b.js"));
        assert_false(console_name_ok("a%2e.js"));
        assert_false(console_name_ok("a;.js"));
        assert_false(console_name_ok("\xc3\xa9.js"));
        memset(longest, 'a', sizeof(longest));
        longest[CONSOLE_NAME_MAX] = 0;
        assert_true(console_name_ok(longest));
        longest[CONSOLE_NAME_MAX] = 'a';
        longest[CONSOLE_NAME_MAX + 1] = 0;
        assert_false(console_name_ok(longest));
}

static void test_types(void **state) {
        (void)state;
        assert_string_equal(console_content_type("a.js"), "text/javascript; charset=utf-8");
        assert_string_equal(console_content_type("a.html"), "text/html; charset=utf-8");
        assert_string_equal(console_content_type("a.css"), "text/css; charset=utf-8");
        assert_string_equal(console_content_type("a.md"), "text/plain; charset=utf-8");
        assert_string_equal(console_content_type("a.svg"), "image/svg+xml");
        assert_null(console_content_type(".js"));
        assert_null(console_content_type("a.txt"));
        assert_null(console_content_type("a.js.map"));
        assert_null(console_content_type("a"));
}

static void test_owns(void **state) {
        (void)state;
        assert_true(console_owns("/console"));
        assert_true(console_owns("/console/"));
        assert_true(console_owns("/console/app.js"));
        assert_false(console_owns("/consolex"));
        assert_false(console_owns("/v1/console"));
        assert_false(console_owns("/"));
}

/* The status of method on url; every answer carries the headers. */
static unsigned respond(Console *c, const char *method, const char *url, const char *inm, char *etag, size_t n) {
        struct MHD_Response *resp = NULL;
        unsigned status = 0;
        const char *v;

        assert_int_equal(console_respond(c, url, method, inm, &resp, &status), 0);
        assert_non_null(resp);
        v = MHD_get_response_header(resp, "Content-Security-Policy");
        assert_non_null(v);
        assert_string_equal(v, CONSOLE_CSP);
        assert_non_null(MHD_get_response_header(resp, "X-Content-Type-Options"));
        assert_non_null(MHD_get_response_header(resp, "X-Frame-Options"));
        assert_non_null(MHD_get_response_header(resp, "Referrer-Policy"));
        assert_non_null(MHD_get_response_header(resp, "Cache-Control"));
        v = MHD_get_response_header(resp, "ETag");
        if (etag && v)
                snprintf(etag, n, "%s", v);
        MHD_destroy_response(resp);
        return status;
}

static void test_respond(void **state) {
        _cleanup_(console_freep) Console *c = NULL;
        char p[PATH_MAX], etag[128] = "", etag2[128] = "";
        static const char *const refused[] = {
                "/console/x.txt", "/console/.hidden.js", "/console/sub/inner.js", "/console/sub",
                "/console/out.js", "/console/in.js", "/console/fifo.js", "/console/big.js", "/console/none.js",
                "/console/../secret.js", "/console/./app.js", "/console//app.js", "/console/app.js/",
                "/console/..", "/console/.",
        };

        (void)state;
        snprintf(p, sizeof(p), "%s/console", dir);
        assert_int_equal(console_new(p, &c), 0);
        assert_non_null(c);
        assert_int_equal(respond(c, "GET", "/console", NULL, NULL, 0), MHD_HTTP_MOVED_PERMANENTLY);
        assert_int_equal(respond(c, "GET", "/console/", NULL, NULL, 0), MHD_HTTP_OK);
        assert_int_equal(respond(c, "HEAD", "/console/app.js", NULL, NULL, 0), MHD_HTTP_OK);
        assert_int_equal(respond(c, "POST", "/console/app.js", NULL, NULL, 0), MHD_HTTP_METHOD_NOT_ALLOWED);
        for (size_t i = 0; i < sizeof(refused) / sizeof(refused[0]); i++)
                if (respond(c, "GET", refused[i], NULL, NULL, 0) != MHD_HTTP_NOT_FOUND)
                        fail_msg("%s was not refused", refused[i]);
        assert_int_equal(respond(c, "GET", "/console/app.js", NULL, etag, sizeof(etag)), MHD_HTTP_OK);
        assert_true(etag[0] == '"');
        assert_int_equal(respond(c, "GET", "/console/app.js", etag, NULL, 0), MHD_HTTP_NOT_MODIFIED);
        assert_int_equal(respond(c, "GET", "/console/app.js", "*", NULL, 0), MHD_HTTP_NOT_MODIFIED);
        assert_int_equal(respond(c, "GET", "/console/app.js", "\"x\"", NULL, 0), MHD_HTTP_OK);
        put("console/app.js", "export const changed = 1;");
        assert_int_equal(respond(c, "GET", "/console/app.js", etag, etag2, sizeof(etag2)), MHD_HTTP_OK);
        assert_string_not_equal(etag, etag2);
}

static void test_off(void **state) {
        Console *c = (Console *)1;

        (void)state;
        assert_int_equal(console_new("", &c), 0);
        assert_null(c);
        assert_int_equal(console_new(NULL, &c), 0);
        assert_null(c);
        assert_int_equal(respond(NULL, "GET", "/console/", NULL, NULL, 0), MHD_HTTP_NOT_FOUND);
        assert_int_equal(console_new("/nonexistent/tether-console", &c), -ENOENT);
}

int main(int argc, char **argv) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_names),
                cmocka_unit_test(test_types),
                cmocka_unit_test(test_owns),
                cmocka_unit_test(test_respond),
                cmocka_unit_test(test_off),
        };

        if (argc > 1)
                cmocka_set_test_filter(argv[1]);
        return cmocka_run_group_tests(tests, setup, teardown);
}
