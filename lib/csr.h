/* SPDX-License-Identifier: Apache-2.0 */
/* Device keys, certificate requests and the facts of a device certificate,
 * shared by tetherd (enrollment, renewal: agent/enroll.c) and tetherctl
 * (genkey, csr). OpenSSL does the work; this only puts the pieces
 * together the same way for both. No logging, no event loop. Errors are
 * negative errno values: -errno of a file operation, -EBADMSG for a file
 * or PEM text without what it should hold, -ENOMEM, -EIO for an OpenSSL
 * failure (its error queue is cleared). */
#pragma once

#include <openssl/evp.h>
#include <openssl/x509.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "proto.h"

/* The default device ID: this many bytes of SHA-256 over the DER public
 * key, in hex (24 digits, like a Particle device ID). */
#define CSR_ID_BYTES 12
#define CSR_ID_SIZE (CSR_ID_BYTES * 2 + 1)

/* A new EC P-256 key. The caller owns *ret. */
int csr_key_generate(EVP_PKEY **ret);
/* Read the PEM private key at path. -ENOKEY if it is encrypted
 * ("Proc-Type: 4,ENCRYPTED", or PKCS#8 "ENCRYPTED PRIVATE KEY"): nobody is
 * asked for a passphrase, the key must be unencrypted. */
int csr_key_load(const char *path, EVP_PKEY **ret);
/* Why csr_key_load() failed, for a message: "no PEM private key in it",
 * "it is encrypted ...", or strerror(). */
const char *csr_key_load_problem(int r);
/* The key as PEM (PKCS#8, unencrypted): malloc'd, NUL-terminated. */
int csr_key_pem(EVP_PKEY *key, char **ret);
/* Write the key to path as a new file of mode 0600: through a temporary
 * file, fsync'd, then link()ed, so it never exists with a wider mode, is
 * never half written under its name and never replaces anything
 * (-EEXIST); the directory is fsync'd. */
int csr_key_write_new(EVP_PKEY *key, const char *path);

/* fsync the directory holding path (its parent; "." for a bare name), so
 * that a rename or link made there is on disk. Best effort: errors are
 * ignored (a file system that cannot sync a directory keeps what it
 * keeps). Also used by agent/certfile.c for the pair's renames. */
void csr_fsync_dir_of(const char *path);

/* The default device ID of a key (see CSR_ID_BYTES). */
int csr_key_id(EVP_PKEY *key, char ret[static CSR_ID_SIZE]);

/* A PKCS#10 request signed with key (SHA-256) whose subject is the single
 * CN id: PEM, malloc'd, NUL-terminated. id must be a valid device ID
 * (-EINVAL otherwise). */
int csr_make(EVP_PKEY *key, const char *id, char **ret_pem);

/* What the agent needs to know of a certificate. */
typedef struct CertInfo {
        char id[PROTO_DEVICE_ID_MAX + 1]; /* the single CN, "" if there is none that is a valid device ID */
        int64_t not_before, not_after;    /* seconds since the epoch */
} CertInfo;

/* The facts of the first certificate in a PEM file or buffer. */
int csr_cert_info(const char *path, CertInfo *ret);
int csr_cert_info_x509(X509 *x, CertInfo *ret);
/* Whether the first certificate of cert_path is for the key in
 * key_path: 1 yes, 0 no (or either file holds no such thing), or
 * -errno when a file cannot be opened. */
int csr_pair_matches(const char *cert_path, const char *key_path);
