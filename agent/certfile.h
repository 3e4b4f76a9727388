/* SPDX-License-Identifier: Apache-2.0 */
/* The device's key and certificate files: installing a new pair so that a
 * crash at any point leaves a pair that works (the old one or the new
 * one), completing an install a crash interrupted, and when to renew.
 *
 * Install: KEY.new and CERT.new are written and fsync'd (and CERT.new's
 * directory), then KEY.new is renamed over KEY and KEY's directory
 * fsync'd, then CERT.new is renamed over CERT and its directory fsync'd:
 * the renames reach the disk in that order, whether the two files share a
 * directory or not. A crash before the first rename leaves the old pair (and a
 * .new pair); between the renames, the new key with the old certificate
 * and CERT.new, which certfile_recover() completes at the next start.
 * File I/O and OpenSSL only: no logging, no event loop. Errors are
 * negative errno values. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#define CERTFILE_NEW_SUFFIX ".new"

/* Install cert_pem (and key_pem, unless NULL: the key is kept) as
 * cert_path and key_path, in the order above. The key file is created
 * with mode 0600, the certificate 0644. -EINVAL if the two paths are the
 * same. On failure before the first rename the old pair is untouched and
 * the .new files are removed. When the certificate's rename fails after
 * the key's, certfile_recover() runs at once (it renames CERT.new again);
 * if that fails too, the error is returned and the new key is in place
 * with the old certificate and CERT.new, for certfile_recover() at the
 * next start. */
int certfile_install(const char *key_path, const char *cert_path, const char *key_pem, const char *cert_pem);

/* What certfile_recover() found. */
typedef enum CertfileRecovery {
        CERTFILE_NOTHING,   /* no .new file */
        CERTFILE_COMPLETED, /* a matching .new pair (or CERT.new matching KEY) was installed */
        CERTFILE_DISCARDED, /* .new files that do not make a pair with a key were removed */
} CertfileRecovery;

/* At start: finish an install a crash interrupted. CERT.new is completed
 * when it holds a certificate for KEY.new (both are renamed, key first)
 * or, without KEY.new, for KEY (the crash came between the renames).
 * Anything else left over (a torn or lone .new file) is removed: the
 * files in place are then the old pair, untouched. */
int certfile_recover(const char *key_path, const char *cert_path, CertfileRecovery *ret);

/* When a certificate valid from not_before to not_after (seconds since
 * the epoch) is renewed: at percent of its lifetime (0 means two thirds,
 * the cloud's renew_after), plus a jitter of rnd modulo an eighth of
 * that time (for the default, a twelfth of the lifetime) so that a fleet
 * spreads its renewals. *ret_renew_after is the time without jitter.
 * Returns the time with jitter. */
int64_t certfile_renew_at(int64_t not_before, int64_t not_after, unsigned percent, uint32_t rnd,
                          int64_t *ret_renew_after);
