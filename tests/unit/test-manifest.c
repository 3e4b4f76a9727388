/* SPDX-License-Identifier: Apache-2.0 */
/* Unit tests for signed OTA manifests, the keyring and Debian version
 * order (lib/manifest.c, lib/debversion.c). Keys are made fresh with
 * OpenSSL for every run. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "debfile.h"
#include "debversion.h"
#include "manifest.h"
#include "util.h"

typedef struct KeyPair {
        char *priv, *pub;
        char id[MANIFEST_KEY_ID_LEN + 1];
} KeyPair;

static char *bio_text(BIO *b) {
        char *p;
        long n = BIO_get_mem_data(b, &p);
        char *s = strndup(p, (size_t)n);

        BIO_free(b);
        return s;
}

static void keypair_make(KeyPair *kp) {
        EVP_PKEY *k = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
        BIO *b1 = BIO_new(BIO_s_mem()), *b2 = BIO_new(BIO_s_mem());

        assert_non_null(k);
        assert_int_equal(PEM_write_bio_PrivateKey(b1, k, NULL, NULL, 0, NULL, NULL), 1);
        assert_int_equal(PEM_write_bio_PUBKEY(b2, k), 1);
        kp->priv = bio_text(b1);
        kp->pub = bio_text(b2);
        EVP_PKEY_free(k);
        assert_int_equal(manifest_key_id_pem(kp->pub, strlen(kp->pub), kp->id), 0);
}

static void keypair_done(KeyPair *kp) {
        free(kp->priv);
        free(kp->pub);
}

static char *sample_devices[] = { (char *)"gw-1", (char *)"gw-2" };
#define SAMPLE_NONCE "00112233445566778899aabbccddeeff"

static Manifest sample(const char *key_id) {
        return (Manifest){
                .nonce = (char *)SAMPLE_NONCE,
                .devices = sample_devices,
                .n_devices = ELEMENTSOF(sample_devices),
                .package = (char *)"tether-agent",
                .version = (char *)"0.2.0-1",
                .architecture = (char *)"amd64",
                .sha256 = (char *)"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                .url = (char *)"https://cloud.example:5685/ota/x.deb",
                .key_id = (char *)key_id,
                .min_version = (char *)"0.1.0-1",
                .size = 10485760,
                .installed_size = 20480,
                .expires = 4102444800, /* 2100-01-01 */
        };
}

/* Sign m's canonical body with kp; caller frees. */
static char *signed_envelope(const KeyPair *kp, const Manifest *m, size_t *ret_len) {
        _cleanup_free_ char *body = NULL;
        char *env = NULL;

        assert_int_equal(manifest_body_format(m, &body), 0);
        assert_int_equal(manifest_sign(kp->priv, strlen(kp->priv), body, strlen(body), &env, ret_len), 0);
        return env;
}

static void test_sign_open(void **state) {
        KeyPair kp;
        Keyring *k = keyring_new();
        char id[MANIFEST_KEY_ID_LEN + 1];
        Manifest in, out = {};
        ManifestReject why = MANIFEST_OK;
        const char *err = NULL;
        char *env;
        size_t len;

        keypair_make(&kp);
        assert_int_equal(keyring_add_pem(k, kp.pub, strlen(kp.pub), id), 0);
        assert_string_equal(id, kp.id);
        assert_int_equal(keyring_add_pem(k, kp.pub, strlen(kp.pub), id), -EEXIST);
        /* A private key is not a public key in the keyring. */
        assert_int_equal(keyring_add_pem(k, kp.priv, strlen(kp.priv), id), -EBADMSG);
        /* Its id is the same, though. */
        assert_int_equal(manifest_key_id_pem(kp.priv, strlen(kp.priv), id), 0);
        assert_string_equal(id, kp.id);

        in = sample(kp.id);
        env = signed_envelope(&kp, &in, &len);
        assert_true(startswith(env, "tether-ota-manifest/2\nkey="));
        assert_int_equal(manifest_open(k, (const uint8_t *)env, len, &out, &why, &err), 0);
        assert_string_equal(out.package, "tether-agent");
        assert_string_equal(out.version, "0.2.0-1");
        assert_string_equal(out.architecture, "amd64");
        assert_string_equal(out.sha256, in.sha256);
        assert_string_equal(out.url, in.url);
        assert_string_equal(out.min_version, "0.1.0-1");
        assert_null(out.plugin);
        assert_int_equal(out.size, 10485760);
        assert_int_equal(out.installed_size, 20480);
        assert_int_equal(out.expires, 4102444800);
        assert_string_equal(out.nonce, SAMPLE_NONCE);
        assert_int_equal(out.n_devices, 2);
        assert_string_equal(out.devices[0], "gw-1");
        assert_string_equal(out.devices[1], "gw-2");
        assert_int_equal(out.n_tags, 0);
        assert_false(out.allow_downgrade);
        manifest_done(&out);

        /* Every single flipped bit of the body or signature is refused. */
        for (size_t i = strlen("tether-ota-manifest/2\nkey=") + MANIFEST_KEY_ID_LEN + 1; i < len; i++) {
                char saved = env[i];

                if (env[i] == '\n')
                        continue;
                env[i] ^= 0x01;
                assert_int_not_equal(manifest_open(k, (const uint8_t *)env, len, &out, &why, &err), 0);
                assert_true(why == MANIFEST_BAD_SIGNATURE || why == MANIFEST_MALFORMED);
                env[i] = saved;
        }
        /* A flipped byte in the body: the signature check says so, before
         * any JSON is looked at. */
        env[len - 3] ^= 0x20;
        assert_int_equal(manifest_open(k, (const uint8_t *)env, len, &out, &why, &err), -EKEYREJECTED);
        assert_int_equal(why, MANIFEST_BAD_SIGNATURE);
        assert_string_equal(manifest_reject_to_string(why), "bad-signature");
        env[len - 3] ^= 0x20;
        /* Truncated or extended: bad signature too. */
        assert_int_equal(manifest_open(k, (const uint8_t *)env, len - 1, &out, &why, &err), -EKEYREJECTED);
        free(env);
        keyring_free(k);
        keypair_done(&kp);
}

/* Without "url" the device fetches the artifact over its connection: the
 * body leaves the key out, and parses back without one; a url that is
 * there must still be https://. */
static void test_no_url(void **state) {
        KeyPair kp;
        Keyring *k = keyring_new();
        Manifest in, out = {};
        ManifestReject why = MANIFEST_OK;
        const char *err = NULL;
        _cleanup_free_ char *body = NULL;
        char *env;
        size_t len;

        keypair_make(&kp);
        assert_int_equal(keyring_add_pem(k, kp.pub, strlen(kp.pub), NULL), 0);
        in = sample(kp.id);
        in.url = NULL;
        assert_int_equal(manifest_body_format(&in, &body), 0);
        assert_null(strstr(body, "\"url\""));
        env = signed_envelope(&kp, &in, &len);
        assert_int_equal(manifest_open(k, (const uint8_t *)env, len, &out, &why, &err), 0);
        assert_null(out.url);
        assert_string_equal(out.sha256, in.sha256);
        manifest_done(&out);
        free(env);
        in.url = (char *)"http://cloud.example/x.deb";
        env = signed_envelope(&kp, &in, &len);
        assert_int_equal(manifest_open(k, (const uint8_t *)env, len, &out, &why, &err), -EBADMSG);
        assert_int_equal(why, MANIFEST_MALFORMED);
        free(env);
        keyring_free(k);
        keypair_done(&kp);
}

static void test_unknown_key_and_rotation(void **state) {
        KeyPair old, cur, stranger;
        Keyring *k = keyring_new();
        ManifestReject why = MANIFEST_OK;
        const char *err = NULL;
        Manifest m, out = {};
        char *env;
        size_t len;

        keypair_make(&old);
        keypair_make(&cur);
        keypair_make(&stranger);
        assert_int_equal(keyring_add_pem(k, old.pub, strlen(old.pub), NULL), 0);
        assert_int_equal(keyring_add_pem(k, cur.pub, strlen(cur.pub), NULL), 0);
        assert_int_equal(keyring_size(k), 2);

        /* Either key of the keyring verifies (rotation). */
        m = sample(old.id);
        env = signed_envelope(&old, &m, &len);
        assert_int_equal(manifest_open(k, (const uint8_t *)env, len, &out, &why, &err), 0);
        manifest_done(&out);
        free(env);
        m = sample(cur.id);
        env = signed_envelope(&cur, &m, &len);
        assert_int_equal(manifest_open(k, (const uint8_t *)env, len, &out, &why, &err), 0);
        manifest_done(&out);
        free(env);

        /* A key outside the keyring. */
        m = sample(stranger.id);
        env = signed_envelope(&stranger, &m, &len);
        assert_int_equal(manifest_open(k, (const uint8_t *)env, len, &out, &why, &err), -ENOKEY);
        assert_int_equal(why, MANIFEST_UNKNOWN_KEY);
        free(env);

        /* Signed by a trusted key, but the body claims another key. */
        m = sample(cur.id);
        env = signed_envelope(&old, &m, &len);
        assert_int_equal(manifest_open(k, (const uint8_t *)env, len, &out, &why, &err), -EBADMSG);
        assert_int_equal(why, MANIFEST_MALFORMED);
        free(env);

        /* The header names a trusted key the signature is not from. */
        m = sample(cur.id);
        env = signed_envelope(&stranger, &m, &len);
        memcpy(env + strlen("tether-ota-manifest/2\nkey="), cur.id, MANIFEST_KEY_ID_LEN);
        assert_int_equal(manifest_open(k, (const uint8_t *)env, len, &out, &why, &err), -EKEYREJECTED);
        assert_int_equal(why, MANIFEST_BAD_SIGNATURE);
        free(env);

        keyring_free(k);
        keypair_done(&old);
        keypair_done(&cur);
        keypair_done(&stranger);
}

static void test_envelope_malformed(void **state) {
        static const char *const bad[] = {
                "",
                "tether-ota-manifest/3\n",
                "tether-ota-manifest/2\nkey=0123456789abcdef\nsignature=",
                "tether-ota-manifest/2\nkey=0123456789ABCDEF\n",
                "tether-ota-manifest/2\nkey=0123456789abcde\n",
                "tether-ota-manifest/2 \nkey=0123456789abcdef\n",
        };
        char sig[200], buf[600];
        ManifestEnvelope env;

        for (size_t i = 0; i < ELEMENTSOF(bad); i++)
                assert_int_equal(manifest_envelope_split((const uint8_t *)bad[i], strlen(bad[i]), &env), -EBADMSG);
        memset(sig, 'a', 128);
        sig[128] = 0;
        snprintf(buf, sizeof(buf), "tether-ota-manifest/2\nkey=0123456789abcdef\nsignature=%s\n\n{}", sig);
        assert_int_equal(manifest_envelope_split((const uint8_t *)buf, strlen(buf), &env), 0);
        assert_string_equal(env.key_id, "0123456789abcdef");
        assert_int_equal(env.signature[0], 0xaa);
        assert_int_equal(env.body_len, 2);
        assert_memory_equal(env.body, "{}", 2);
        /* no body */
        assert_int_equal(manifest_envelope_split((const uint8_t *)buf, strlen(buf) - 2, &env), -EBADMSG);
        /* no blank line */
        snprintf(buf, sizeof(buf), "tether-ota-manifest/2\nkey=0123456789abcdef\nsignature=%s\n{}", sig);
        assert_int_equal(manifest_envelope_split((const uint8_t *)buf, strlen(buf), &env), -EBADMSG);
        /* short signature */
        sig[127] = 0;
        snprintf(buf, sizeof(buf), "tether-ota-manifest/2\nkey=0123456789abcdef\nsignature=%s\n\n{}", sig);
        assert_int_equal(manifest_envelope_split((const uint8_t *)buf, strlen(buf), &env), -EBADMSG);
        {
                size_t n = MANIFEST_MAX + 1;
                uint8_t *big = calloc(1, n);
                assert_int_equal(manifest_envelope_split(big, n, &env), -E2BIG);
                free(big);
        }
}

static void expect_body_error(const char *body, const char *what) {
        Manifest m = {};
        const char *err = NULL;

        assert_int_equal(manifest_body_parse((const uint8_t *)body, strlen(body), &m, &err), -EBADMSG);
        assert_non_null(err);
        if (!strstr(err, what))
                fail_msg("'%s': expected an error about '%s', got '%s'", body, what, err);
        assert_null(m.package);
}

#define GOOD_TARGET "\"nonce\":\"" SAMPLE_NONCE "\",\"devices\":[\"gw-1\"],"
#define GOOD_HEAD "{\"format\":\"tether-ota-manifest/2\"," GOOD_TARGET "\"key\":\"0123456789abcdef\",\"package\":\"tether-agent\","
#define GOOD_SHA "\"sha256\":\"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\","

static void test_body(void **state) {
        const char *good = GOOD_HEAD "\"version\":\"1:2.0~rc1-3\",\"architecture\":\"all\"," GOOD_SHA
                                     "\"url\":\"https://h/x.deb\",\"size\":5,\"expires\":100,\"plugin\":\"gpio\","
                                     "\"future_field\":[1,2]}";
        Manifest m = {};
        const char *err = NULL;

        assert_int_equal(manifest_body_parse((const uint8_t *)good, strlen(good), &m, &err), 0);
        assert_string_equal(m.version, "1:2.0~rc1-3");
        assert_string_equal(m.plugin, "gpio");
        assert_null(m.min_version);
        assert_int_equal(m.installed_size, 0);
        manifest_done(&m);

        expect_body_error("[]", "JSON object");
        {
                /* Too large says so, not "not a JSON object". */
                char big[MANIFEST_BODY_MAX + 2];

                memset(big, ' ', sizeof(big) - 1);
                big[0] = '{';
                big[sizeof(big) - 2] = '}';
                big[sizeof(big) - 1] = 0;
                expect_body_error(big, "larger than 4096 bytes");
        }
        expect_body_error("{", "JSON object");
        expect_body_error("{\"format\":\"tether-ota-manifest/9\"}", "format");
        expect_body_error(GOOD_HEAD "\"version\":\"1.0\"}", "architecture");
        expect_body_error(GOOD_HEAD "\"version\":\"one\",\"architecture\":\"amd64\"," GOOD_SHA
                                    "\"url\":\"https://h/x\",\"size\":5,\"expires\":1}",
                          "Debian version");
        expect_body_error(GOOD_HEAD "\"version\":\"1.0\",\"architecture\":\"amd64\"," GOOD_SHA
                                    "\"url\":\"http://h/x\",\"size\":5,\"expires\":1}",
                          "https://");
        expect_body_error(GOOD_HEAD "\"version\":\"1.0\",\"architecture\":\"amd64\"," GOOD_SHA
                                    "\"url\":\"https://h/x\",\"size\":-5,\"expires\":1}",
                          "size");
        expect_body_error(GOOD_HEAD "\"version\":\"1.0\",\"architecture\":\"amd64\"," GOOD_SHA
                                    "\"url\":\"https://h/x\",\"size\":0,\"expires\":1}",
                          "size");
        expect_body_error(GOOD_HEAD "\"version\":\"1.0\",\"architecture\":\"amd64\","
                                    "\"sha256\":\"0123\",\"url\":\"https://h/x\",\"size\":5,\"expires\":1}",
                          "sha256");
        expect_body_error(GOOD_HEAD "\"version\":\"1.0\",\"version\":\"2.0\"}", "JSON object");
        expect_body_error(GOOD_HEAD "\"version\":\"1.0\",\"architecture\":\"amd64\"," GOOD_SHA
                                    "\"url\":\"https://h/x\",\"size\":5,\"expires\":\"soon\"}",
                          "expires");
        expect_body_error(GOOD_HEAD "\"version\":\"1.0\",\"architecture\":\"AMD64\"," GOOD_SHA
                                    "\"url\":\"https://h/x\",\"size\":5,\"expires\":1}",
                          "architecture");
        expect_body_error(GOOD_HEAD "\"version\":\"1.0\",\"architecture\":\"amd64\"," GOOD_SHA
                                    "\"url\":\"https://h/x\",\"size\":5,\"expires\":1,\"plugin\":\"../x\"}",
                          "plugin");
        expect_body_error("{\"format\":\"tether-ota-manifest/2\"," GOOD_TARGET "\"key\":\"0123456789abcdef\",\"package\":\"Bad\","
                          "\"version\":\"1.0\",\"architecture\":\"amd64\"," GOOD_SHA
                          "\"url\":\"https://h/x\",\"size\":5,\"expires\":1}",
                          "package");
        expect_body_error(GOOD_HEAD "\"version\":\"1.0\",\"architecture\":\"amd64\"," GOOD_SHA
                                    "\"url\":\"https://h/x\\u0000y\",\"size\":5,\"expires\":1}",
                          "JSON object"); /* jansson refuses NUL without JSON_ALLOW_NUL */
        expect_body_error(GOOD_HEAD "\"version\":\"1.0\",\"architecture\":\"amd64\"," GOOD_SHA
                                    "\"url\":\"https://h/x y\",\"size\":5,\"expires\":1}",
                          "url");
}

static void test_check(void **state) {
        Manifest m = sample("0123456789abcdef");
        char *text = NULL;

        assert_int_equal(manifest_check(&m, 1000, "amd64", NULL, &text), MANIFEST_OK);
        assert_null(text);
        assert_int_equal(manifest_check(&m, 4102444800, "amd64", NULL, &text), MANIFEST_EXPIRED);
        assert_non_null(strstr(text, "2100-01-01T00:00:00Z"));
        free(text);
        assert_int_equal(manifest_check(&m, 1000, "arm64", NULL, &text), MANIFEST_ARCHITECTURE);
        assert_non_null(strstr(text, "amd64"));
        free(text);
        m.architecture = (char *)"all";
        assert_int_equal(manifest_check(&m, 1000, "arm64", NULL, &text), MANIFEST_OK);
        /* the device's floor is higher than the manifest's own minimum */
        assert_int_equal(manifest_check(&m, 1000, "arm64", "0.3", &text), MANIFEST_BELOW_MINIMUM);
        assert_non_null(strstr(text, "0.3"));
        free(text);
        assert_int_equal(manifest_check(&m, 1000, "arm64", "0.2.0-1", &text), MANIFEST_OK);
        /* a manifest below its own minimum */
        m.min_version = (char *)"1:0";
        assert_int_equal(manifest_check(&m, 1000, "arm64", NULL, &text), MANIFEST_BELOW_MINIMUM);
        free(text);
}

static void test_old_format(void **state) {
        static const char body1[] = "{\"format\":\"tether-ota-manifest/1\",\"key\":\"0123456789abcdef\"}";
        char sig[129], buf[600];
        ManifestEnvelope env;
        ManifestReject why = MANIFEST_OK;
        const char *err = NULL;
        Manifest m = {};
        Keyring *k = keyring_new();

        memset(sig, 'a', 128);
        sig[128] = 0;
        snprintf(buf, sizeof(buf), "tether-ota-manifest/1\nkey=0123456789abcdef\nsignature=%s\n\n%s", sig, body1);
        assert_int_equal(manifest_envelope_split((const uint8_t *)buf, strlen(buf), &env), -EPROTONOSUPPORT);
        assert_int_equal(manifest_open(k, (const uint8_t *)buf, strlen(buf), &m, &why, &err), -EPROTONOSUPPORT);
        assert_int_equal(why, MANIFEST_OLD_FORMAT);
        assert_string_equal(manifest_reject_to_string(why), "old-format");
        assert_non_null(strstr(err, "sign it again"));
        expect_body_error(body1, "format 1");
        keyring_free(k);
}

#define BODY_REST "\"version\":\"1.0\",\"architecture\":\"amd64\"," GOOD_SHA "\"url\":\"https://h/x\",\"size\":5,\"expires\":1"
#define BODY_START "{\"format\":\"tether-ota-manifest/2\",\"key\":\"0123456789abcdef\",\"package\":\"tether-agent\","

static void test_targets_nonce_body(void **state) {
        const char *good = BODY_START BODY_REST ",\"nonce\":\"" SAMPLE_NONCE "\",\"tags\":[\"site-a\",\"x.y_z-1\"],"
                           "\"devices\":[],\"allow_downgrade\":true}";
        _cleanup_free_ char *many = NULL, *body = NULL;
        Manifest m = {};
        const char *err = NULL;
        size_t len;
        FILE *f;

        assert_int_equal(manifest_body_parse((const uint8_t *)good, strlen(good), &m, &err), 0);
        assert_int_equal(m.n_devices, 0);
        assert_int_equal(m.n_tags, 2);
        assert_string_equal(m.tags[1], "x.y_z-1");
        assert_true(m.allow_downgrade);
        /* what manifest_body_format() writes parses back the same */
        assert_int_equal(manifest_body_format(&m, &body), 0);
        assert_non_null(strstr(body, "\"allow_downgrade\":true"));
        assert_non_null(strstr(body, "\"tags\":[\"site-a\",\"x.y_z-1\"]"));
        assert_null(strstr(body, "\"devices\""));
        manifest_done(&m);

        expect_body_error(BODY_START BODY_REST ",\"devices\":[\"gw\"]}", "nonce");
        expect_body_error(BODY_START BODY_REST ",\"devices\":[\"gw\"],\"nonce\":\"00112233445566778899AABBCCDDEEFF\"}",
                          "nonce");
        expect_body_error(BODY_START BODY_REST ",\"devices\":[\"gw\"],\"nonce\":\"0011\"}", "nonce");
        expect_body_error(BODY_START BODY_REST ",\"devices\":[\"gw\"],\"nonce\":7}", "nonce");
        expect_body_error(BODY_START "\"nonce\":\"" SAMPLE_NONCE "\"," BODY_REST "}", "no target");
        expect_body_error(BODY_START "\"nonce\":\"" SAMPLE_NONCE "\"," BODY_REST ",\"devices\":[],\"tags\":[]}",
                          "no target");
        expect_body_error(BODY_START BODY_REST ",\"nonce\":\"" SAMPLE_NONCE "\",\"devices\":[\"gw\",\"gw\"]}", "devices");
        expect_body_error(BODY_START BODY_REST ",\"nonce\":\"" SAMPLE_NONCE "\",\"devices\":[\"a/b\"]}", "devices");
        expect_body_error(BODY_START BODY_REST ",\"nonce\":\"" SAMPLE_NONCE "\",\"devices\":[\"api\"]}", "devices");
        expect_body_error(BODY_START BODY_REST ",\"nonce\":\"" SAMPLE_NONCE "\",\"devices\":\"gw\"}", "devices");
        expect_body_error(BODY_START BODY_REST ",\"nonce\":\"" SAMPLE_NONCE "\",\"devices\":[1]}", "devices");
        expect_body_error(BODY_START BODY_REST ",\"nonce\":\"" SAMPLE_NONCE "\",\"tags\":[\"a b\"]}", "tags");
        expect_body_error(BODY_START BODY_REST ",\"nonce\":\"" SAMPLE_NONCE "\",\"tags\":[\"\"]}", "tags");
        expect_body_error(BODY_START BODY_REST ",\"nonce\":\"" SAMPLE_NONCE "\",\"devices\":[\"gw\"],"
                                                "\"allow_downgrade\":\"yes\"}",
                          "allow_downgrade");
        expect_body_error(BODY_START BODY_REST ",\"nonce\":\"" SAMPLE_NONCE "\",\"devices\":[\"gw\"],"
                                                "\"allow_downgrade\":1}",
                          "allow_downgrade");
        /* 257 targets (short ids so that it fits in the body) */
        f = open_memstream(&many, &len);
        assert_non_null(f);
        fputs(BODY_START BODY_REST ",\"nonce\":\"" SAMPLE_NONCE "\",\"devices\":[", f);
        for (int i = 0; i < 200; i++)
                fprintf(f, "%s\"%x\"", i ? "," : "", i);
        fputs("],\"tags\":[", f);
        for (int i = 0; i < 57; i++)
                fprintf(f, "%s\"%x\"", i ? "," : "", i);
        fputs("]}", f);
        fclose(f);
        assert_true(len <= MANIFEST_BODY_MAX);
        expect_body_error(many, "too many targets");
}

static void test_check_target(void **state) {
        Manifest m = sample("0123456789abcdef");
        char *tags_here[] = { (char *)"site-b", (char *)"site-a" }, *tags_m[] = { (char *)"site-a" };
        char *text = NULL;

        assert_int_equal(manifest_check_target(&m, "gw-2", NULL, 0, &text), MANIFEST_OK);
        assert_null(text);
        assert_int_equal(manifest_check_target(&m, "gw-3", NULL, 0, &text), MANIFEST_NOT_TARGETED);
        assert_string_equal(manifest_reject_to_string(MANIFEST_NOT_TARGETED), "not-targeted");
        assert_non_null(strstr(text, "'gw-3'"));
        free(text);
        assert_int_equal(manifest_check_target(&m, NULL, NULL, 0, &text), MANIFEST_NOT_TARGETED);
        free(text);
        /* prefixes are not matches */
        assert_int_equal(manifest_check_target(&m, "gw-", NULL, 0, &text), MANIFEST_NOT_TARGETED);
        free(text);
        /* tags: a match only with a tag the device carries */
        m.tags = tags_m;
        m.n_tags = 1;
        assert_int_equal(manifest_check_target(&m, "gw-3", NULL, 0, &text), MANIFEST_NOT_TARGETED);
        assert_non_null(strstr(text, "knows no tags"));
        free(text);
        assert_int_equal(manifest_check_target(&m, "gw-3", tags_here, 1, &text), MANIFEST_NOT_TARGETED);
        free(text);
        assert_int_equal(manifest_check_target(&m, "gw-3", tags_here, 2, &text), MANIFEST_OK);
        assert_null(text);
}

static void test_check_installed(void **state) {
        Manifest m = sample("0123456789abcdef"); /* 0.2.0-1 */
        char *text = NULL;

        assert_int_equal(manifest_check_installed(&m, NULL, &text), MANIFEST_OK);
        assert_int_equal(manifest_check_installed(&m, "0.1.9", &text), MANIFEST_OK);
        assert_int_equal(manifest_check_installed(&m, "0.2.0-1", &text), MANIFEST_OK);
        assert_null(text);
        assert_int_equal(manifest_check_installed(&m, "0.2.0-2", &text), MANIFEST_DOWNGRADE);
        assert_string_equal(manifest_reject_to_string(MANIFEST_DOWNGRADE), "downgrade");
        assert_non_null(strstr(text, "0.2.0-2"));
        free(text);
        assert_int_equal(manifest_check_installed(&m, "1:0.1", &text), MANIFEST_DOWNGRADE);
        free(text);
        m.allow_downgrade = true;
        assert_int_equal(manifest_check_installed(&m, "1:0.1", &text), MANIFEST_OK);
        assert_null(text);
}

static void bad_file(const char *path, int error, void *userdata) {
        (*(int *)userdata)++;
}

static void test_keyring_dir(void **state) {
        char dir[] = "/tmp/tether-keyring-XXXXXX", path[256];
        KeyPair a, b;
        Keyring *k = keyring_new();
        int bad = 0;
        FILE *f;

        assert_non_null(mkdtemp(dir));
        keypair_make(&a);
        keypair_make(&b);
        snprintf(path, sizeof(path), "%s/a.pem", dir);
        f = fopen(path, "w");
        fputs(a.pub, f);
        fclose(f);
        snprintf(path, sizeof(path), "%s/b.pem", dir);
        f = fopen(path, "w");
        fputs(b.pub, f);
        fclose(f);
        snprintf(path, sizeof(path), "%s/junk.pem", dir);
        f = fopen(path, "w");
        fputs("not a key\n", f);
        fclose(f);
        snprintf(path, sizeof(path), "%s/ignored.txt", dir);
        f = fopen(path, "w");
        fputs(a.pub, f);
        fclose(f);

        assert_int_equal(keyring_load_dir(k, dir, bad_file, &bad), 2);
        assert_int_equal(bad, 1);
        assert_true(keyring_has(k, a.id));
        assert_true(keyring_has(k, b.id));
        assert_int_equal(keyring_load_dir(k, "/nonexistent/keys", NULL, NULL), -ENOENT);
        keyring_free(k);
        keypair_done(&a);
        keypair_done(&b);
        assert_int_equal(system(NULL) != 0, 1);
        snprintf(path, sizeof(path), "rm -rf '%s'", dir);
        assert_int_equal(system(path), 0);
}

static void test_versions(void **state) {
        /* pairs with a < b, from deb-version(7) and dpkg's own test suite */
        static const char *const lt[][2] = {
                { "1.0", "1.1" },       { "1.0~rc1", "1.0" },     { "1.0", "1.0-1" },
                { "1.0-1", "1.0-2" },   { "1.0-9", "1.0-10" },    { "0:9", "1:0" },
                { "2.0", "10.0" },      { "1.0a", "1.0b" },       { "1.0", "1.0a" },
                { "1.0~~", "1.0~" },    { "1.0~", "1.0" },        { "1.0+b1", "1.0.1" },
                { "1.2.3", "1.2.3.1" }, { "1.0-1~bpo1", "1.0-1" }, { "0.1.0-1", "0.2.0-1" },
                { "1.0a", "1.0+" },     { "1.001", "1.2" },
        };
        static const char *const eq[][2] = { { "1.0", "1.0" }, { "0:1.0", "1.0" }, { "1.01", "1.1" },
                                             { "1.0-0", "1.0-0" } };
        static const char *const invalid[] = { "", "a1", "1.0-", ":1", "1:", "1 0", "1.0_1", "-1", "x:1" };

        for (size_t i = 0; i < ELEMENTSOF(lt); i++) {
                assert_int_equal(debversion_check(lt[i][0]), 0);
                assert_int_equal(debversion_check(lt[i][1]), 0);
                if (!(debversion_compare(lt[i][0], lt[i][1]) < 0 && debversion_compare(lt[i][1], lt[i][0]) > 0))
                        fail_msg("expected %s < %s", lt[i][0], lt[i][1]);
        }
        for (size_t i = 0; i < ELEMENTSOF(eq); i++)
                assert_int_equal(debversion_compare(eq[i][0], eq[i][1]), 0);
        for (size_t i = 0; i < ELEMENTSOF(invalid); i++)
                if (debversion_check(invalid[i]) == 0)
                        fail_msg("'%s' accepted as a version", invalid[i]);

        /* The same answers as the real dpkg, where it is installed. */
        if (access("/usr/bin/dpkg", X_OK) == 0) {
                static const char *const all[] = { "1.0", "1.0~rc1", "1.0-1", "1:0.5", "1.0+b1", "1.0.1",
                                                   "1.0a", "2", "10", "1.0-1~bpo1", "0.9~~", "1.0~" };
                for (size_t i = 0; i < ELEMENTSOF(all); i++)
                        for (size_t j = 0; j < ELEMENTSOF(all); j++) {
                                char cmd[200];
                                int ours = debversion_compare(all[i], all[j]), st;

                                snprintf(cmd, sizeof(cmd), "dpkg --compare-versions '%s' lt '%s'", all[i], all[j]);
                                st = system(cmd);
                                assert_true(WIFEXITED(st));
                                if ((WEXITSTATUS(st) == 0) != (ours < 0))
                                        fail_msg("dpkg and we disagree on %s < %s", all[i], all[j]);
                        }
        }
}

static void test_control_parse(void **state) {
        static const char good[] = "Package: tether-agent\nVersion: 1:0.2.0-1\nArchitecture: arm64\n"
                                   "Installed-Size: 1234\n";
        DebControl c = {};

        assert_int_equal(debfile_control_parse(good, strlen(good), &c), 0);
        assert_string_equal(c.package, "tether-agent");
        assert_string_equal(c.version, "1:0.2.0-1");
        assert_string_equal(c.architecture, "arm64");
        assert_int_equal(c.installed_size, 1234);
        debfile_control_done(&c);
        /* Installed-Size is optional, the others are not */
        assert_int_equal(debfile_control_parse("Package: a\nVersion: 1\nArchitecture: all\n", 40, &c), 0);
        assert_int_equal(c.installed_size, 0);
        debfile_control_done(&c);
        assert_int_equal(debfile_control_parse("Package: a\nVersion: 1\n", 22, &c), -EBADMSG);
        assert_int_equal(debfile_control_parse("Package: a\nPackage: b\nVersion: 1\nArchitecture: all\n", 51, &c),
                         -EBADMSG);
        assert_int_equal(debfile_control_parse("Package: a b\nVersion: 1\nArchitecture: all\n", 42, &c),
                         -EBADMSG);
        assert_int_equal(debfile_control_parse("garbage", 7, &c), -EBADMSG);
        assert_int_equal(debfile_control_parse("Package: a\nVersion: 1\nArchitecture: all\nInstalled-Size: x\n",
                                               58, &c),
                         -EBADMSG);
}

int main(int argc, char **argv) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_sign_open),      cmocka_unit_test(test_no_url),      cmocka_unit_test(test_unknown_key_and_rotation),
                cmocka_unit_test(test_envelope_malformed), cmocka_unit_test(test_body),
                cmocka_unit_test(test_check),          cmocka_unit_test(test_keyring_dir),
                cmocka_unit_test(test_versions),       cmocka_unit_test(test_control_parse),
                cmocka_unit_test(test_old_format),     cmocka_unit_test(test_targets_nonce_body),
                cmocka_unit_test(test_check_target),   cmocka_unit_test(test_check_installed),
        };
        /* One test, or those a glob matches: test-foo NAME (HACKING.md). */
        if (argc > 1)
                cmocka_set_test_filter(argv[1]);
        return cmocka_run_group_tests(tests, NULL, NULL);
}
