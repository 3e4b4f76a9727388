/* SPDX-License-Identifier: Apache-2.0 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "debversion.h"
#include "manifest.h"
#include "proto.h"
#include "util.h"

#define KEYRING_MAX 64
#define KEY_FILE_MAX 16384

static const char *const reject_names[_MANIFEST_REJECT_MAX] = {
        [MANIFEST_OK] = "ok",
        [MANIFEST_MALFORMED] = "malformed",
        [MANIFEST_UNKNOWN_KEY] = "unknown-key",
        [MANIFEST_BAD_SIGNATURE] = "bad-signature",
        [MANIFEST_EXPIRED] = "expired",
        [MANIFEST_ARCHITECTURE] = "architecture",
        [MANIFEST_BELOW_MINIMUM] = "below-minimum",
        [MANIFEST_NO_SPACE] = "no-space",
        [MANIFEST_SIZE] = "size",
        [MANIFEST_CHECKSUM] = "checksum",
        [MANIFEST_CONTROL] = "control",
        [MANIFEST_BUSY] = "busy",
        [MANIFEST_OLD_FORMAT] = "old-format",
        [MANIFEST_NOT_TARGETED] = "not-targeted",
        [MANIFEST_REPLAY] = "replay",
        [MANIFEST_DOWNGRADE] = "downgrade",
};

const char *manifest_reject_to_string(ManifestReject r) {
        return r >= 0 && r < _MANIFEST_REJECT_MAX ? reject_names[r] : "unknown";
}

static int unhex(char c) {
        if (c >= '0' && c <= '9')
                return c - '0';
        if (c >= 'a' && c <= 'f')
                return c - 'a' + 10;
        return -1; /* lowercase only: one spelling per signature */
}

/* Expect exactly "prefix" + n lowercase hex digits + "\n" at *p. */
static int take_hex_line(const uint8_t **p, const uint8_t *end, const char *prefix, size_t n, char *ret_text,
                         uint8_t *ret_bytes) {
        size_t pl = strlen(prefix);

        if ((size_t)(end - *p) < pl + n + 1 || memcmp(*p, prefix, pl) != 0 || (*p)[pl + n] != '\n')
                return -EBADMSG;
        for (size_t i = 0; i < n; i++)
                if (unhex((char)(*p)[pl + i]) < 0)
                        return -EBADMSG;
        if (ret_text) {
                memcpy(ret_text, *p + pl, n);
                ret_text[n] = 0;
        }
        if (ret_bytes)
                for (size_t i = 0; i < n / 2; i++)
                        ret_bytes[i] = (uint8_t)(unhex((char)(*p)[pl + 2 * i]) << 4 | unhex((char)(*p)[pl + 2 * i + 1]));
        *p += pl + n + 1;
        return 0;
}

int manifest_envelope_split(const uint8_t *buf, size_t len, ManifestEnvelope *ret) {
        static const char magic[] = MANIFEST_FORMAT "\n", old[] = MANIFEST_FORMAT_OLD "\n";
        const uint8_t *p, *end;
        ManifestEnvelope env = {};

        if (!buf)
                return -EBADMSG;
        p = buf;
        end = buf + len;
        if (len > MANIFEST_MAX)
                return -E2BIG;
        if (len >= sizeof(old) - 1 && memcmp(p, old, sizeof(old) - 1) == 0)
                return -EPROTONOSUPPORT;
        if (len < sizeof(magic) - 1 || memcmp(p, magic, sizeof(magic) - 1) != 0)
                return -EBADMSG;
        p += sizeof(magic) - 1;
        if (take_hex_line(&p, end, "key=", MANIFEST_KEY_ID_LEN, env.key_id, NULL) < 0 ||
            take_hex_line(&p, end, "signature=", 2 * MANIFEST_SIGNATURE_LEN, NULL, env.signature) < 0)
                return -EBADMSG;
        if (p >= end || *p != '\n')
                return -EBADMSG;
        p++;
        if (p >= end || (size_t)(end - p) > MANIFEST_BODY_MAX)
                return -EBADMSG;
        env.body = p;
        env.body_len = (size_t)(end - p);
        *ret = env;
        return 0;
}

/* ---- body ----------------------------------------------------------- */

bool manifest_sha256_valid(const char *s) {
        if (!s || strlen(s) != 64)
                return false;
        for (const char *p = s; *p; p++)
                if (unhex(*p) < 0)
                        return false;
        return true;
}

bool manifest_nonce_valid(const char *s) {
        if (!s || strlen(s) != MANIFEST_NONCE_LEN)
                return false;
        for (const char *p = s; *p; p++)
                if (unhex(*p) < 0)
                        return false;
        return true;
}

/* [A-Za-z0-9_.-]{1,MANIFEST_TAG_MAX} */
static bool tag_valid(const char *s) {
        size_t n = s ? strlen(s) : 0;

        if (n == 0 || n > MANIFEST_TAG_MAX)
                return false;
        for (const char *p = s; *p; p++)
                if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
                      strchr("_.-", *p)))
                        return false;
        return true;
}

bool manifest_package_valid(const char *s) {
        size_t n = s ? strlen(s) : 0;

        if (n < 2 || n > 128)
                return false;
        for (size_t i = 0; i < n; i++) {
                char c = s[i];
                bool ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || (i > 0 && strchr("+.-", c));
                if (!ok)
                        return false;
        }
        return true;
}

static bool arch_valid(const char *s) {
        size_t n = s ? strlen(s) : 0;

        if (n == 0 || n > 32)
                return false;
        for (const char *p = s; *p; p++)
                if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '-'))
                        return false;
        return true;
}

/* printable ASCII without spaces, quotes or backslashes */
static bool url_valid(const char *s) {
        size_t n = s ? strlen(s) : 0;

        if (n <= strlen("https://") || n > 2048 || !startswith(s, "https://"))
                return false;
        for (const char *p = s; *p; p++)
                if (*p <= ' ' || *p >= 0x7f || *p == '"' || *p == '\\')
                        return false;
        return true;
}

static bool plugin_valid(const char *s) {
        size_t n = s ? strlen(s) : 0;

        if (n == 0 || n > 64)
                return false;
        for (const char *p = s; *p; p++)
                if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
                      *p == '_' || *p == '-'))
                        return false;
        return true;
}

void manifest_done(Manifest *m) {
        if (!m)
                return;
        free(m->package);
        free(m->version);
        free(m->architecture);
        free(m->sha256);
        free(m->url);
        free(m->key_id);
        free(m->min_version);
        free(m->plugin);
        free(m->nonce);
        for (size_t i = 0; i < m->n_devices; i++)
                free(m->devices[i]);
        free(m->devices);
        for (size_t i = 0; i < m->n_tags; i++)
                free(m->tags[i]);
        free(m->tags);
        *m = (Manifest){};
}

static int get_string(json_t *o, const char *key, bool required, char **ret) {
        json_t *v = json_object_get(o, key);
        const char *s;

        if (!v) {
                if (required)
                        return -EBADMSG;
                *ret = NULL;
                return 0;
        }
        if (!json_is_string(v))
                return -EBADMSG;
        s = json_string_value(v);
        if (strlen(s) != json_string_length(v))
                return -EBADMSG; /* embedded NUL */
        *ret = strdup(s);
        return *ret ? 0 : -ENOMEM;
}

static int get_uint(json_t *o, const char *key, bool required, json_int_t max, uint64_t *ret) {
        json_t *v = json_object_get(o, key);

        if (!v) {
                if (required)
                        return -EBADMSG;
                *ret = 0;
                return 0;
        }
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > max)
                return -EBADMSG;
        *ret = (uint64_t)json_integer_value(v);
        return 0;
}

static int get_bool(json_t *o, const char *key, bool *ret) {
        json_t *v = json_object_get(o, key);

        if (!v) {
                *ret = false;
                return 0;
        }
        if (!json_is_boolean(v))
                return -EBADMSG;
        *ret = json_is_true(v);
        return 0;
}

/* An optional array of distinct strings that pass valid(); *ret_n may be 0. */
static int get_string_list(json_t *o, const char *key, bool (*valid)(const char *), char ***ret, size_t *ret_n) {
        json_t *v = json_object_get(o, key), *e;
        char **list;
        size_t i, n;

        *ret = NULL;
        *ret_n = 0;
        if (!v)
                return 0;
        n = json_is_array(v) ? json_array_size(v) : 0;
        if (!json_is_array(v) || n > MANIFEST_TARGETS_MAX)
                return -EBADMSG;
        if (n == 0)
                return 0;
        list = calloc(n, sizeof(char *));
        if (!list)
                return -ENOMEM;
        json_array_foreach(v, i, e) {
                const char *s = json_string_value(e);

                if (!s || strlen(s) != json_string_length(e) || !valid(s))
                        goto bad;
                for (size_t k = 0; k < i; k++)
                        if (streq(list[k], s))
                                goto bad; /* one spelling per manifest */
                list[i] = strdup(s);
                if (!list[i]) {
                        for (size_t k = 0; k < i; k++)
                                free(list[k]);
                        free(list);
                        return -ENOMEM;
                }
        }
        *ret = list;
        *ret_n = n;
        return 0;
bad:
        for (size_t k = 0; k < n; k++)
                free(list[k]);
        free(list);
        return -EBADMSG;
}

static bool device_id_valid(const char *s) {
        return proto_name_check(s, strlen(s), PROTO_NAME_DEVICE) == 0;
}

int manifest_body_parse(const uint8_t *body, size_t len, Manifest *ret, const char **ret_error) {
        _cleanup_(manifest_done) Manifest m = {};
        const char *error = "the manifest is not a JSON object";
        _cleanup_free_ char *format = NULL;
        json_t *o;
        uint64_t expires = 0;
        int r;

        if (len > MANIFEST_BODY_MAX) {
                _Static_assert(MANIFEST_BODY_MAX == 4096, "the text below names MANIFEST_BODY_MAX");
                error = "the manifest's body is larger than 4096 bytes";
                goto bad_noobj;
        }
        if (!body || len == 0)
                goto bad_noobj;
        o = json_loadb((const char *)body, len, JSON_REJECT_DUPLICATES, NULL);
        if (!json_is_object(o)) {
                json_decref(o);
                goto bad_noobj;
        }
#define STEP(call, what)               \
        do {                           \
                r = (call);            \
                if (r == -ENOMEM)      \
                        goto oom;      \
                if (r < 0) {           \
                        error = (what); \
                        goto bad;      \
                }                      \
        } while (0)
        STEP(get_string(o, "format", true, &format), "missing or invalid \"format\"");
        if (streq(format, MANIFEST_FORMAT_OLD)) {
                error = "manifest format 1 (no target devices, no nonce) is no longer accepted: sign it again";
                goto bad;
        }
        if (!streq(format, MANIFEST_FORMAT)) {
                error = "unsupported manifest format";
                goto bad;
        }
        STEP(get_string(o, "key", true, &m.key_id), "missing or invalid \"key\"");
        STEP(get_string(o, "package", true, &m.package), "missing or invalid \"package\"");
        STEP(get_string(o, "version", true, &m.version), "missing or invalid \"version\"");
        STEP(get_string(o, "architecture", true, &m.architecture), "missing or invalid \"architecture\"");
        STEP(get_string(o, "sha256", true, &m.sha256), "missing or invalid \"sha256\"");
        STEP(get_string(o, "url", false, &m.url), "invalid \"url\"");
        STEP(get_string(o, "min_version", false, &m.min_version), "invalid \"min_version\"");
        STEP(get_string(o, "plugin", false, &m.plugin), "invalid \"plugin\"");
        STEP(get_uint(o, "size", true, (json_int_t)MANIFEST_SIZE_MAX, &m.size), "missing or invalid \"size\"");
        STEP(get_uint(o, "installed_size", false, (json_int_t)MANIFEST_SIZE_MAX, &m.installed_size),
             "invalid \"installed_size\"");
        STEP(get_uint(o, "expires", true, (json_int_t)INT64_MAX, &expires), "missing or invalid \"expires\"");
        STEP(get_string(o, "nonce", true, &m.nonce), "missing or invalid \"nonce\"");
        STEP(get_string_list(o, "devices", device_id_valid, &m.devices, &m.n_devices),
             "invalid \"devices\" (an array of distinct device ids)");
        STEP(get_string_list(o, "tags", tag_valid, &m.tags, &m.n_tags),
             "invalid \"tags\" (an array of distinct tags, [A-Za-z0-9_.-]{1,64})");
        STEP(get_bool(o, "allow_downgrade", &m.allow_downgrade), "invalid \"allow_downgrade\" (true or false)");
#undef STEP
        json_decref(o);
        o = NULL;
        m.expires = (int64_t)expires;

        if (strlen(m.key_id) != MANIFEST_KEY_ID_LEN || strspn(m.key_id, "0123456789abcdef") != MANIFEST_KEY_ID_LEN)
                error = "\"key\" is not 16 lowercase hex digits";
        else if (!manifest_sha256_valid(m.sha256))
                error = "\"sha256\" is not 64 lowercase hex digits";
        else if (!manifest_package_valid(m.package))
                error = "\"package\" is not a Debian package name";
        else if (debversion_check(m.version) < 0)
                error = "\"version\" is not a Debian version";
        else if (m.min_version && debversion_check(m.min_version) < 0)
                error = "\"min_version\" is not a Debian version";
        else if (!arch_valid(m.architecture))
                error = "\"architecture\" is not a Debian architecture";
        else if (m.url && !url_valid(m.url))
                error = "\"url\" is not an https:// URL";
        else if (m.size == 0)
                error = "\"size\" is 0";
        else if (m.plugin && !plugin_valid(m.plugin))
                error = "\"plugin\" is not a plugin name";
        else if (!manifest_nonce_valid(m.nonce))
                error = "\"nonce\" is not 32 lowercase hex digits";
        else if (m.n_devices + m.n_tags == 0)
                error = "the manifest names no target: \"devices\" or \"tags\" is required";
        else if (m.n_devices + m.n_tags > MANIFEST_TARGETS_MAX)
                error = "too many targets in \"devices\" and \"tags\"";
        else {
                *ret = m;
                /* cppcheck-suppress unreadVariable ; moved to *ret; the _cleanup_ handler reads it */
                m = (Manifest){};
                return 0;
        }
        goto bad_noobj;
bad:
        json_decref(o);
bad_noobj:
        if (ret_error)
                *ret_error = error;
        return -EBADMSG;
oom:
        json_decref(o);
        return -ENOMEM;
}

int manifest_body_format(const Manifest *m, char **ret) {
        json_t *o = json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:I, s:I, s:s?}", "format", MANIFEST_FORMAT, "key",
                              m->key_id, "package", m->package, "version", m->version, "architecture",
                              m->architecture, "sha256", m->sha256, "size", (json_int_t)m->size, "expires",
                              (json_int_t)m->expires, "nonce", m->nonce);
        json_t *devices = NULL, *tags = NULL;
        char *s;

        if (!o)
                return -EINVAL;
        if ((m->url && json_object_set_new(o, "url", json_string(m->url)) < 0) ||
            (m->installed_size && json_object_set_new(o, "installed_size", json_integer((json_int_t)m->installed_size)) < 0) ||
            (m->min_version && json_object_set_new(o, "min_version", json_string(m->min_version)) < 0) ||
            (m->plugin && json_object_set_new(o, "plugin", json_string(m->plugin)) < 0) ||
            (m->allow_downgrade && json_object_set_new(o, "allow_downgrade", json_true()) < 0))
                goto oom;
        if (m->n_devices > 0 && (!(devices = json_array()) || json_object_set_new(o, "devices", devices) < 0))
                goto oom;
        for (size_t i = 0; i < m->n_devices; i++)
                if (json_array_append_new(devices, json_string(m->devices[i])) < 0)
                        goto oom;
        if (m->n_tags > 0 && (!(tags = json_array()) || json_object_set_new(o, "tags", tags) < 0))
                goto oom;
        for (size_t i = 0; i < m->n_tags; i++)
                if (json_array_append_new(tags, json_string(m->tags[i])) < 0)
                        goto oom;
        s = json_dumps(o, JSON_COMPACT | JSON_SORT_KEYS);
        json_decref(o);
        if (!s)
                return -ENOMEM;
        *ret = s;
        return 0;
oom:
        json_decref(o);
        return -ENOMEM;
}

/* ---- keys ----------------------------------------------------------- */

typedef struct Key {
        char id[MANIFEST_KEY_ID_LEN + 1];
        EVP_PKEY *pkey;
} Key;

struct Keyring {
        Key keys[KEYRING_MAX];
        size_t n;
};

Keyring *keyring_new(void) {
        return calloc(1, sizeof(Keyring));
}

Keyring *keyring_free(Keyring *k) {
        if (!k)
                return NULL;
        for (size_t i = 0; i < k->n; i++)
                EVP_PKEY_free(k->keys[i].pkey);
        free(k);
        return NULL;
}

static int key_id(EVP_PKEY *pkey, char ret[static MANIFEST_KEY_ID_LEN + 1]) {
        uint8_t raw[32], digest[32];
        size_t n = sizeof(raw);
        unsigned dn = sizeof(digest);

        if (EVP_PKEY_get_raw_public_key(pkey, raw, &n) != 1 || n != sizeof(raw))
                return -EBADMSG;
        if (!EVP_Digest(raw, n, digest, &dn, EVP_sha256(), NULL))
                return -EIO;
        hex_encode(digest, MANIFEST_KEY_ID_LEN / 2, ret);
        return 0;
}

/* PEM text to a key; private if want_private. NULL if not Ed25519. */
static EVP_PKEY *pem_to_key(const char *pem, size_t len, bool want_private) {
        BIO *b = BIO_new_mem_buf(pem, (int)len);
        EVP_PKEY *k;

        if (!b)
                return NULL;
        k = want_private ? PEM_read_bio_PrivateKey(b, NULL, NULL, NULL) : PEM_read_bio_PUBKEY(b, NULL, NULL, NULL);
        BIO_free(b);
        if (k && EVP_PKEY_id(k) != EVP_PKEY_ED25519) {
                EVP_PKEY_free(k);
                return NULL;
        }
        return k;
}

int manifest_key_id_pem(const char *pem, size_t len, char ret_id[static MANIFEST_KEY_ID_LEN + 1]) {
        EVP_PKEY *k = pem_to_key(pem, len, false);
        int r;

        if (!k)
                k = pem_to_key(pem, len, true);
        if (!k)
                return -EBADMSG;
        r = key_id(k, ret_id);
        EVP_PKEY_free(k);
        return r;
}

int keyring_add_pem(Keyring *k, const char *pem, size_t len, char *ret_id) {
        EVP_PKEY *pkey = pem_to_key(pem, len, false);
        char id[MANIFEST_KEY_ID_LEN + 1];
        int r;

        if (!pkey)
                return -EBADMSG;
        r = key_id(pkey, id);
        if (r >= 0 && keyring_has(k, id))
                r = -EEXIST;
        if (r >= 0 && k->n >= KEYRING_MAX)
                r = -E2BIG;
        if (r < 0) {
                EVP_PKEY_free(pkey);
                return r;
        }
        memcpy(k->keys[k->n].id, id, sizeof(id));
        k->keys[k->n++].pkey = pkey;
        if (ret_id)
                memcpy(ret_id, id, sizeof(id));
        return 0;
}

static int read_small_file(int dirfd, const char *name, char **ret, size_t *ret_len) {
        _cleanup_close_ int fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        _cleanup_free_ char *buf = NULL;
        struct stat st;
        ssize_t n;

        if (fd < 0)
                return -errno;
        if (fstat(fd, &st) < 0)
                return -errno;
        if (!S_ISREG(st.st_mode))
                return -EBADMSG;
        if (st.st_size > KEY_FILE_MAX)
                return -E2BIG;
        buf = malloc((size_t)st.st_size + 1);
        if (!buf)
                return -ENOMEM;
        n = read(fd, buf, (size_t)st.st_size);
        if (n < 0)
                return -errno;
        buf[n] = 0;
        *ret_len = (size_t)n;
        *ret = TAKE_PTR(buf);
        return 0;
}

int keyring_load_dir(Keyring *k, const char *dir, void (*bad)(const char *path, int error, void *userdata),
                     void *userdata) {
        struct dirent *de;
        DIR *d = opendir(dir);
        int added = 0;

        if (!d)
                return -errno;
        while ((de = readdir(d))) {
                _cleanup_free_ char *pem = NULL, *path = NULL;
                size_t n = strlen(de->d_name), len = 0;
                int r;

                if (de->d_name[0] == '.' || n < 5 || !streq(de->d_name + n - 4, ".pem"))
                        continue;
                r = read_small_file(dirfd(d), de->d_name, &pem, &len);
                if (r >= 0)
                        r = keyring_add_pem(k, pem, len, NULL);
                if (r >= 0)
                        added++;
                else if (bad && asprintf(&path, "%s/%s", dir, de->d_name) >= 0)
                        bad(path, r, userdata);
        }
        closedir(d);
        return added;
}

size_t keyring_size(const Keyring *k) {
        return k ? k->n : 0;
}

static const Key *keyring_find(const Keyring *k, const char *id) {
        for (size_t i = 0; k && i < k->n; i++)
                if (streq(k->keys[i].id, id))
                        return &k->keys[i];
        return NULL;
}

bool keyring_has(const Keyring *k, const char *key_id) {
        return keyring_find(k, key_id) != NULL;
}

int keyring_verify(const Keyring *k, const ManifestEnvelope *env) {
        const Key *key = keyring_find(k, env->key_id);
        EVP_MD_CTX *ctx;
        int ok;

        if (!key)
                return -ENOKEY;
        ctx = EVP_MD_CTX_new();
        if (!ctx)
                return -ENOMEM;
        /* Ed25519 is one-shot: no digest, one EVP_DigestVerify(). */
        ok = EVP_DigestVerifyInit(ctx, NULL, NULL, NULL, key->pkey) == 1 &&
             EVP_DigestVerify(ctx, env->signature, MANIFEST_SIGNATURE_LEN, env->body, env->body_len) == 1;
        EVP_MD_CTX_free(ctx);
        return ok ? 0 : -EKEYREJECTED;
}

int manifest_open(const Keyring *k, const uint8_t *buf, size_t len, Manifest *ret, ManifestReject *ret_reject,
                  const char **ret_error) {
        ManifestEnvelope env;
        Manifest m = {};
        const char *error = NULL;
        ManifestReject why;
        int r;

        r = manifest_envelope_split(buf, len, &env);
        if (r == -EPROTONOSUPPORT) {
                why = MANIFEST_OLD_FORMAT;
                error = "manifest format 1 (no target devices, no nonce) is no longer accepted: sign it again";
                goto fail;
        }
        if (r < 0) {
                why = MANIFEST_MALFORMED;
                error = r == -E2BIG ? "the signed manifest is too large" : "not a signed tether manifest";
                goto fail;
        }
        r = keyring_verify(k, &env);
        if (r == -ENOKEY) {
                why = MANIFEST_UNKNOWN_KEY;
                error = "the manifest is signed with a key that is not in the keyring";
                goto fail;
        }
        if (r < 0) {
                why = r == -ENOMEM ? MANIFEST_MALFORMED : MANIFEST_BAD_SIGNATURE;
                error = "the signature does not match the manifest";
                goto fail;
        }
        r = manifest_body_parse(env.body, env.body_len, &m, &error);
        if (r < 0) {
                why = MANIFEST_MALFORMED;
                if (r == -ENOMEM)
                        error = "out of memory";
                goto fail;
        }
        if (!streq(m.key_id, env.key_id)) {
                manifest_done(&m);
                why = MANIFEST_MALFORMED;
                error = "the manifest names another key than the one that signed it";
                r = -EBADMSG;
                goto fail;
        }
        *ret = m;
        return 0;
fail:
        if (ret_reject)
                *ret_reject = why;
        if (ret_error)
                *ret_error = error;
        return r;
}

int manifest_sign(const char *key_pem, size_t key_len, const char *body, size_t body_len, char **ret,
                  size_t *ret_len) {
        EVP_PKEY *key = pem_to_key(key_pem, key_len, true);
        uint8_t sig[MANIFEST_SIGNATURE_LEN];
        char id[MANIFEST_KEY_ID_LEN + 1], sighex[2 * MANIFEST_SIGNATURE_LEN + 1];
        size_t siglen = sizeof(sig);
        EVP_MD_CTX *ctx = NULL;
        char *out = NULL;
        int r, n;

        if (!key)
                return -EBADMSG;
        if (body_len == 0 || body_len > MANIFEST_BODY_MAX) {
                r = -E2BIG;
                goto out;
        }
        r = key_id(key, id);
        if (r < 0)
                goto out;
        ctx = EVP_MD_CTX_new();
        if (!ctx || EVP_DigestSignInit(ctx, NULL, NULL, NULL, key) != 1 ||
            EVP_DigestSign(ctx, sig, &siglen, (const uint8_t *)body, body_len) != 1 || siglen != sizeof(sig)) {
                r = -EIO;
                goto out;
        }
        hex_encode(sig, sizeof(sig), sighex);
        n = asprintf(&out, "%s\nkey=%s\nsignature=%s\n\n%.*s", MANIFEST_FORMAT, id, sighex, (int)body_len, body);
        if (n < 0) {
                r = -ENOMEM;
                goto out;
        }
        *ret = out;
        if (ret_len)
                *ret_len = (size_t)n;
        r = 0;
out:
        EVP_MD_CTX_free(ctx);
        EVP_PKEY_free(key);
        return r;
}

ManifestReject manifest_check(const Manifest *m, int64_t now, const char *arch, const char *floor,
                              char **ret_text) {
        char when[32] = "?";
        time_t t = (time_t)m->expires;
        struct tm tm;
        const char *min = NULL;
        int n;

        *ret_text = NULL;
        if (now >= m->expires) {
                if (gmtime_r(&t, &tm))
                        strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm);
                n = asprintf(ret_text, "the manifest expired at %s", when);
                if (n < 0)
                        *ret_text = NULL;
                return MANIFEST_EXPIRED;
        }
        if (!streq(m->architecture, "all") && (!arch || !streq(m->architecture, arch))) {
                if (asprintf(ret_text, "the package is for %s, this device is %s", m->architecture,
                             arch ? arch : "unknown") < 0)
                        *ret_text = NULL;
                return MANIFEST_ARCHITECTURE;
        }
        /* The higher of the manifest's own minimum and the device's floor. */
        if (m->min_version)
                min = m->min_version;
        if (floor && debversion_check(floor) == 0 && (!min || debversion_compare(floor, min) > 0))
                min = floor;
        if (min && debversion_compare(m->version, min) < 0) {
                if (asprintf(ret_text, "version %s of %s is below the minimum allowed version %s", m->version,
                             m->package, min) < 0)
                        *ret_text = NULL;
                return MANIFEST_BELOW_MINIMUM;
        }
        return MANIFEST_OK;
}

ManifestReject manifest_check_target(const Manifest *m, const char *device_id, char *const *tags, size_t n_tags,
                                     char **ret_text) {
        *ret_text = NULL;
        for (size_t i = 0; device_id && i < m->n_devices; i++)
                if (streq(m->devices[i], device_id))
                        return MANIFEST_OK;
        for (size_t i = 0; i < m->n_tags; i++)
                for (size_t k = 0; k < n_tags; k++)
                        if (streq(m->tags[i], tags[k]))
                                return MANIFEST_OK;
        if (asprintf(ret_text, "the manifest is for %zu other device(s)%s, not for '%s'%s", m->n_devices,
                     m->n_tags ? " and tags this device does not carry" : "", device_id ? device_id : "?",
                     m->n_tags && n_tags == 0 ? " (this agent knows no tags of its own)" : "") < 0)
                *ret_text = NULL;
        return MANIFEST_NOT_TARGETED;
}

ManifestReject manifest_check_installed(const Manifest *m, const char *installed, char **ret_text) {
        *ret_text = NULL;
        if (!installed || m->allow_downgrade || debversion_check(installed) < 0 ||
            debversion_compare(m->version, installed) >= 0)
                return MANIFEST_OK;
        if (asprintf(ret_text, "version %s of %s is below the installed %s and the manifest does not allow a downgrade",
                     m->version, m->package, installed) < 0)
                *ret_text = NULL;
        return MANIFEST_DOWNGRADE;
}
