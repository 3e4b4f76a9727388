/* SPDX-License-Identifier: Apache-2.0 */
/* lib/ticket-keys.c: the current key seals and opens, the previous one
 * only opens and asks for a new ticket, an unknown name is refused, a
 * rotation happens when due (and drops a key too old to open), keys survive a save and load (mode 0600),
 * and a damaged file is refused without touching the keys. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ticket-keys.h"

static const unsigned char plain[32] = "a session ticket, sealed here.";

typedef struct Sealed {
        unsigned char name[TICKET_KEY_NAME_SIZE];
        unsigned char iv[EVP_MAX_IV_LENGTH];
        unsigned char data[64];
        int len;
        unsigned char mac[32];
} Sealed;

static EVP_MAC_CTX *mac_new(void) {
        EVP_MAC *mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
        EVP_MAC_CTX *m;

        assert_non_null(mac);
        m = EVP_MAC_CTX_new(mac);
        EVP_MAC_free(mac);
        assert_non_null(m);
        return m;
}

static void mac_of(EVP_MAC_CTX *m, const unsigned char *data, int len, unsigned char out[32]) {
        size_t n = 0;

        assert_int_equal(EVP_MAC_init(m, NULL, 0, NULL), 1);
        assert_int_equal(EVP_MAC_update(m, data, (size_t)len), 1);
        assert_int_equal(EVP_MAC_final(m, out, &n, 32), 1);
        assert_int_equal(n, 32);
}

static void seal(TicketKeys *k, Sealed *s) {
        EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
        EVP_MAC_CTX *m = mac_new();
        int n = 0;

        assert_int_equal(ticket_keys_crypt(k, s->name, s->iv, c, m, 1), 1);
        assert_int_equal(EVP_EncryptUpdate(c, s->data, &n, plain, sizeof(plain)), 1);
        s->len = n;
        assert_int_equal(EVP_EncryptFinal_ex(c, s->data + n, &n), 1);
        s->len += n;
        mac_of(m, s->data, s->len, s->mac);
        EVP_CIPHER_CTX_free(c);
        EVP_MAC_CTX_free(m);
}

/* ticket_keys_crypt()'s answer for s; when it opens, it must open right. */
static int open_sealed(TicketKeys *k, const Sealed *s) {
        EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
        EVP_MAC_CTX *m = mac_new();
        unsigned char name[TICKET_KEY_NAME_SIZE], iv[EVP_MAX_IV_LENGTH], out[64], mac[32];
        int r, n = 0, len;

        memcpy(name, s->name, sizeof(name));
        memcpy(iv, s->iv, sizeof(iv));
        r = ticket_keys_crypt(k, name, iv, c, m, 0);
        if (r > 0) {
                mac_of(m, s->data, s->len, mac);
                assert_memory_equal(mac, s->mac, 32);
                assert_int_equal(EVP_DecryptUpdate(c, out, &n, s->data, s->len), 1);
                len = n;
                assert_int_equal(EVP_DecryptFinal_ex(c, out + n, &n), 1);
                len += n;
                assert_int_equal(len, sizeof(plain));
                assert_memory_equal(out, plain, sizeof(plain));
        }
        EVP_CIPHER_CTX_free(c);
        EVP_MAC_CTX_free(m);
        return r;
}

static void test_rotation(void **state) {
        TicketKeys *k = NULL;
        Sealed a, b;

        (void)state;
        assert_int_equal(ticket_keys_new(100, 1000, &k), 0);
        assert_int_equal(ticket_keys_lifetime(k), 200);
        seal(k, &a);
        assert_int_equal(open_sealed(k, &a), 1);
        /* Not due yet. */
        assert_int_equal(ticket_keys_rotate(k, 1099, false), 0);
        assert_int_equal(open_sealed(k, &a), 1);
        /* Due: a's key is the previous one, it opens and asks for a renewal. */
        assert_int_equal(ticket_keys_rotate(k, 1100, false), 1);
        assert_int_equal(ticket_keys_created(k), 1100);
        assert_int_equal(open_sealed(k, &a), 2);
        seal(k, &b);
        assert_memory_not_equal(a.name, b.name, TICKET_KEY_NAME_SIZE);
        assert_int_equal(open_sealed(k, &b), 1);
        /* Once more: a's key is gone. */
        assert_int_equal(ticket_keys_rotate(k, 1200, false), 1);
        assert_int_equal(open_sealed(k, &a), 0);
        assert_int_equal(open_sealed(k, &b), 2);
        /* A clock that went back rotates too (a key never looks younger). */
        assert_int_equal(ticket_keys_rotate(k, 500, false), 1);
        /* A reset drops both. */
        seal(k, &a);
        assert_int_equal(ticket_keys_reset(k, 600), 0);
        assert_int_equal(open_sealed(k, &a), 0);
        ticket_keys_free(k);
}

/* A rotation long overdue (the cloud was stopped for longer than twice
 * the rotation): the current key is too old even to open, so it does not
 * become the previous one (it would open for as long again). */
static void test_rotation_after_downtime(void **state) {
        TicketKeys *k = NULL;
        Sealed a, b;

        (void)state;
        assert_int_equal(ticket_keys_new(100, 1000, &k), 0);
        seal(k, &a);
        assert_int_equal(ticket_keys_rotate(k, 1199, false), 1);
        assert_int_equal(open_sealed(k, &a), 2);
        seal(k, &b);
        assert_int_equal(ticket_keys_rotate(k, 1199 + 200, false), 1);
        assert_int_equal(ticket_keys_created(k), 1399);
        assert_int_equal(open_sealed(k, &a), 0);
        assert_int_equal(open_sealed(k, &b), 0);
        ticket_keys_free(k);
}

static void test_unknown_name(void **state) {
        TicketKeys *k = NULL, *other = NULL;
        Sealed a;

        (void)state;
        assert_int_equal(ticket_keys_new(100, 1000, &k), 0);
        assert_int_equal(ticket_keys_new(100, 1000, &other), 0);
        seal(other, &a);
        assert_int_equal(open_sealed(k, &a), 0);
        memset(a.name, 0, sizeof(a.name));
        assert_int_equal(open_sealed(other, &a), 0);
        ticket_keys_free(k);
        ticket_keys_free(other);
}

static void test_persistence(void **state) {
        char dir[] = "/tmp/test-ticket-keys-XXXXXX", path[64], bad[300];
        TicketKeys *k = NULL, *loaded = NULL;
        struct stat st;
        Sealed a, b;
        FILE *f;

        (void)state;
        assert_non_null(mkdtemp(dir));
        snprintf(path, sizeof(path), "%s/ticket-keys", dir);
        assert_int_equal(ticket_keys_new(100, 1000, &k), 0);
        seal(k, &a);
        assert_int_equal(ticket_keys_rotate(k, 1100, false), 1);
        seal(k, &b);
        assert_int_equal(ticket_keys_save(k, path), 0);
        assert_int_equal(stat(path, &st), 0);
        assert_int_equal(st.st_mode & 0777, 0600);

        assert_int_equal(ticket_keys_new(100, 5000, &loaded), 0);
        assert_int_equal(ticket_keys_load(loaded, "/nonexistent/ticket-keys"), -ENOENT);
        assert_int_equal(ticket_keys_load(loaded, path), 0);
        assert_int_equal(ticket_keys_created(loaded), 1100);
        assert_int_equal(open_sealed(loaded, &b), 1);
        assert_int_equal(open_sealed(loaded, &a), 2);

        /* A short file, then one of the right size with another magic:
         * refused, the keys loaded before stay. */
        f = fopen(path, "w");
        assert_non_null(f);
        fputs("garbage", f);
        fclose(f);
        assert_int_equal(ticket_keys_load(loaded, path), -EBADMSG);
        assert_int_equal(ticket_keys_save(k, path), 0);
        f = fopen(path, "r+");
        assert_non_null(f);
        fputc('X', f);
        fclose(f);
        assert_int_equal(ticket_keys_load(loaded, path), -EBADMSG);
        f = fopen(path, "a");
        assert_non_null(f);
        fputc('X', f);
        fclose(f);
        assert_int_equal(ticket_keys_load(loaded, path), -EBADMSG);
        assert_int_equal(open_sealed(loaded, &b), 1);

        snprintf(bad, sizeof(bad), "rm -rf '%s'", dir);
        assert_int_equal(system(bad), 0);
        ticket_keys_free(k);
        ticket_keys_free(loaded);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_rotation),
                cmocka_unit_test(test_rotation_after_downtime),
                cmocka_unit_test(test_unknown_name),
                cmocka_unit_test(test_persistence),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
