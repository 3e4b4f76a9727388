/* SPDX-License-Identifier: Apache-2.0 */
/* Signed OTA manifests (docs/ota.md is the reference) and the keyring of
 * trusted update keys.
 *
 * A signed manifest ("envelope") is text:
 *
 *     tether-ota-manifest/2\n
 *     key=<16 hex digits: the signing key's id>\n
 *     signature=<128 hex digits: Ed25519 signature of BODY>\n
 *     \n
 *     BODY (a JSON object, the manifest proper)
 *
 * The signature covers exactly the BODY bytes. Verification order is
 * fixed: split the fixed header (manifest_envelope_split, no JSON),
 * verify the signature over the exact body bytes (keyring_verify), and only
 * then parse the body (manifest_body_parse). manifest_open() does all three.
 *
 * Format 2 added the target devices and tags, the job nonce and
 * allow_downgrade to the body; format 1 manifests (which name no device
 * and can be replayed) are refused with MANIFEST_OLD_FORMAT.
 *
 * Library code: no logging; negative errno; ret_* untouched on failure. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MANIFEST_FORMAT "tether-ota-manifest/2"
#define MANIFEST_FORMAT_OLD "tether-ota-manifest/1" /* refused: no targets, no nonce */
#define MANIFEST_BODY_MAX 4096u     /* bytes of the JSON body */
#define MANIFEST_MAX (MANIFEST_BODY_MAX + 256u) /* whole envelope */
#define MANIFEST_KEY_ID_LEN 16      /* hex digits */
#define MANIFEST_SIGNATURE_LEN 64   /* Ed25519 */
#define MANIFEST_SIZE_MAX (1ULL << 36) /* 64 GiB: sanity bound on "size" */
#define MANIFEST_NONCE_LEN 32       /* hex digits: 128 random bits */
#define MANIFEST_TARGETS_MAX 256    /* entries in "devices" plus "tags" */
#define MANIFEST_TAG_MAX 64         /* bytes of a tag */

/* Why a manifest or its artifact was refused; reported to the cloud as
 * "code" next to a human "reason" (docs/protocol.md). */
typedef enum ManifestReject {
        MANIFEST_OK = 0,
        MANIFEST_MALFORMED,     /* "malformed" */
        MANIFEST_UNKNOWN_KEY,   /* "unknown-key" */
        MANIFEST_BAD_SIGNATURE, /* "bad-signature" */
        MANIFEST_EXPIRED,       /* "expired" */
        MANIFEST_ARCHITECTURE,  /* "architecture" */
        MANIFEST_BELOW_MINIMUM, /* "below-minimum" */
        MANIFEST_NO_SPACE,      /* "no-space" */
        MANIFEST_SIZE,          /* "size": artifact size differs */
        MANIFEST_CHECKSUM,      /* "checksum": artifact sha256 differs */
        MANIFEST_CONTROL,       /* "control": the .deb's control fields differ */
        MANIFEST_BUSY,          /* "busy": another job runs */
        MANIFEST_OLD_FORMAT,    /* "old-format": tether-ota-manifest/1 */
        MANIFEST_NOT_TARGETED,  /* "not-targeted": names neither this device nor one of its tags */
        MANIFEST_REPLAY,        /* "replay": this nonce was accepted before */
        MANIFEST_DOWNGRADE,     /* "downgrade": below the installed version, not allowed */
        _MANIFEST_REJECT_MAX,
} ManifestReject;

const char *manifest_reject_to_string(ManifestReject r);

/* Views into the caller's buffer (body) and copies of the header fields. */
typedef struct ManifestEnvelope {
        char key_id[MANIFEST_KEY_ID_LEN + 1];
        uint8_t signature[MANIFEST_SIGNATURE_LEN];
        const uint8_t *body;
        size_t body_len;
} ManifestEnvelope;

/* Split the fixed header off. -EBADMSG if malformed, -E2BIG if over
 * MANIFEST_MAX, -EPROTONOSUPPORT for a format 1 envelope. Touches nothing
 * but *ret (body points into buf). */
int manifest_envelope_split(const uint8_t *buf, size_t len, ManifestEnvelope *ret);

typedef struct Manifest {
        char *package;      /* Debian package name */
        char *version;      /* Debian version */
        char *architecture; /* dpkg architecture or "all" */
        char *sha256;       /* 64 lowercase hex digits of the .deb */
        char *url;          /* https:// URL of the .deb; NULL: download over the device's connection */
        char *key_id;       /* must equal the envelope's key */
        char *min_version;  /* optional: versions below are refused from now on */
        char *plugin;       /* optional: plugin that must load after install */
        char *nonce;        /* MANIFEST_NONCE_LEN lowercase hex digits, unique per job */
        char **devices;     /* target device ids (n_devices, may be 0 if n_tags > 0) */
        char **tags;        /* target tags (n_tags) */
        size_t n_devices, n_tags;
        bool allow_downgrade; /* optional: may install below the installed version */
        uint64_t size;           /* bytes of the .deb */
        uint64_t installed_size; /* KiB (control field Installed-Size), 0 if unknown */
        int64_t expires;         /* Unix time (UTC seconds) */
} Manifest;

/* Parse and validate a body (JSON). No signature check: callers use
 * manifest_open(). -EBADMSG with *ret_error (static text) on bad input. */
int manifest_body_parse(const uint8_t *body, size_t len, Manifest *ret, const char **ret_error);
void manifest_done(Manifest *m);

/* Canonical body text for m (sorted keys, compact); caller frees. */
int manifest_body_format(const Manifest *m, char **ret);

/* ---- keys ----------------------------------------------------------- */

typedef struct Keyring Keyring;

Keyring *keyring_new(void);
Keyring *keyring_free(Keyring *k);
static inline void keyring_freep(Keyring **k) {
        keyring_free(*k);
}
/* Add the Ed25519 public key in PEM text; its id is returned in ret_id
 * (MANIFEST_KEY_ID_LEN + 1 bytes, or NULL). -EBADMSG not an Ed25519 public key, -EEXIST already
 * there, -E2BIG the keyring is full (64 keys). */
int keyring_add_pem(Keyring *k, const char *pem, size_t len, char *ret_id);
/* Add every "*.pem" in dir. A file that is not a key is skipped and
 * passed to bad() (may be NULL) with the error. Returns the number of keys
 * added, or -errno if dir cannot be read (-ENOENT: no keyring). */
int keyring_load_dir(Keyring *k, const char *dir, void (*bad)(const char *path, int error, void *userdata),
                     void *userdata);
size_t keyring_size(const Keyring *k);
bool keyring_has(const Keyring *k, const char *key_id);
/* 0 if env is signed by the key it names. -ENOKEY: no such key in the
 * keyring; -EKEYREJECTED: the signature does not verify. */
int keyring_verify(const Keyring *k, const ManifestEnvelope *env);

/* Split, verify, parse, and check that the body names the key that signed
 * it. On failure *ret_reject says which check failed and *ret_error is a
 * static diagnostic. */
int manifest_open(const Keyring *k, const uint8_t *buf, size_t len, Manifest *ret, ManifestReject *ret_reject,
                  const char **ret_error);

/* The id of an Ed25519 key (public or private): the first 8 bytes of the
 * SHA-256 of its raw public key, in lowercase hex. */
int manifest_key_id_pem(const char *pem, size_t len, char ret_id[static MANIFEST_KEY_ID_LEN + 1]);

/* Sign body with the Ed25519 private key in PEM text and return the
 * envelope (malloc'd, NUL terminated). -EBADMSG: not an Ed25519 private
 * key. */
int manifest_sign(const char *key_pem, size_t key_len, const char *body, size_t body_len, char **ret,
                  size_t *ret_len);

/* Checks that need the device's context, in the order the agent applies
 * them. now: Unix time; arch: dpkg --print-architecture; floor: the
 * lowest version allowed for m->package on this device (NULL: none).
 * MANIFEST_OK or the reason, with a human text in ret_text (caller
 * frees; NULL on OOM). */
ManifestReject manifest_check(const Manifest *m, int64_t now, const char *arch, const char *floor,
                              char **ret_text);

/* Whether m is meant for this device: its id is in m->devices, or one of
 * its tags (n_tags of them; an agent that knows none passes 0) is in
 * m->tags. device_id NULL (unknown) matches no id. MANIFEST_OK or
 * MANIFEST_NOT_TARGETED with a human text in ret_text, as manifest_check(). */
ManifestReject manifest_check_target(const Manifest *m, const char *device_id, char *const *tags, size_t n_tags,
                                     char **ret_text);

/* Against the version of m->package installed now (NULL: not installed):
 * a lower version is MANIFEST_DOWNGRADE unless m->allow_downgrade. Text as
 * manifest_check(). */
ManifestReject manifest_check_installed(const Manifest *m, const char *installed, char **ret_text);

/* Whether s is MANIFEST_NONCE_LEN lowercase hex digits. */
bool manifest_nonce_valid(const char *s);
/* Whether s is 64 lowercase hex digits. */
bool manifest_sha256_valid(const char *s);
/* Debian package name: [a-z0-9][a-z0-9+.-]+, at most 128 bytes. */
bool manifest_package_valid(const char *s);
