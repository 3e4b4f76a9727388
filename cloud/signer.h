/* SPDX-License-Identifier: Apache-2.0 */
/* The certificate signer of enrollment and renewal (signer.c, prefix
 * signer_; docs/enrollment.md, "Signing"): checks a device's certificate
 * signing request and makes its certificate, either with the built-in CA
 * ([Enroll] CACertificate= and CAKey=, read and checked at start) or with
 * an external command ([Enroll] SignCommand=) run as a child of the loop.
 *
 * A CSR is accepted only when it is PEM PKCS#10 of at most SIGNER_CSR_MAX
 * bytes, signed by its own key, with an EC P-256 or RSA (>= 2048 bits) key
 * and a subject of exactly one commonName that is a valid device ID.
 *
 * The built-in signer signs at once (signer_sign()). The external command
 * never blocks the loop: signer_start() queues it (SIGNER_QUEUE_MAX jobs
 * at most, SignConcurrency= running at once), feeds it the CSR on stdin,
 * reads at most SIGNER_OUTPUT_MAX bytes of stdout, keeps the first line
 * of stderr for the error, and kills its process group at SignTimeoutSec=.
 * What it prints must chain to [Cloud] CAFile=, name the device ID as its
 * only CN, hold the CSR's public key and not be expired; else the job
 * fails with the reason. The Signer owns every child and kills them in
 * signer_free(). No logging but the external command's failures (which
 * name the device). Errors are negative errno values; ret_* parameters
 * are untouched on failure. */
#pragma once

#include <openssl/evp.h>
#include <openssl/x509.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <systemd/sd-event.h>

#include "cloud-config.h"
#include "proto.h"

#define SIGNER_CSR_MAX (16 * 1024)
#define SIGNER_OUTPUT_MAX (64 * 1024)
#define SIGNER_QUEUE_MAX 1024
#define SIGNER_REASON_MAX 256
/* Issued certificates start this much before now (clock skew). */
#define SIGNER_BACKDATE_SEC 300

typedef struct Signer Signer;
typedef struct SignerJob SignerJob;

/* A parsed, checked CSR. */
typedef struct SignerCsr {
        X509_REQ *req;
        char id[PROTO_DEVICE_ID_MAX + 1];
        char pubkey[65]; /* tls_pubkey_sha256() of its key */
        char *pem;       /* the request as received, NUL-terminated */
} SignerCsr;

/* Parse and check pem (len bytes, need not be NUL-terminated): 0 and *ret
 * (freed with signer_csr_done()), or -EBADMSG / -E2BIG / -EOPNOTSUPP with
 * the reason in words the device shows its user ("the CSR's signature does
 * not verify", ...), or -ENOMEM. */
int signer_csr_parse(const char *pem, size_t len, SignerCsr *ret, char reason[static SIGNER_REASON_MAX]);
void signer_csr_done(SignerCsr *csr);

/* An issued certificate. */
typedef struct SignerCert {
        char *pem; /* the leaf, then any chain */
        char serial[80];       /* hex, upper case */
        char fingerprint[65];  /* SHA-256 of the leaf's DER, hex */
        char pubkey[65];
        char issuer[256];      /* RFC 2253, as TlsPeer.issuer */
        int64_t not_before, not_after; /* Unix seconds */
} SignerCert;
void signer_cert_done(SignerCert *cert);

/* Read and check [Enroll] of config (borrowed, must outlive the Signer):
 * the CA certificate must be one of [Cloud] CAFile='s and a CA, the key
 * its own; SignCommand='s program must be executable. event is borrowed.
 * Logs what is wrong. */
int signer_new(sd_event *event, const CloudConfig *config, Signer **ret);
/* Kills and reaps every running command; no callback runs. NULL is fine. */
Signer *signer_free(Signer *s);
static inline void signer_freep(Signer **s) { signer_free(*s); }

/* Whether signatures are made by SignCommand= (signer_start()) rather
 * than at once (signer_sign()). */
bool signer_is_external(const Signer *s);
/* The lifetime of issued certificates (CertificateValiditySec=). */
int64_t signer_validity(const Signer *s);

/* Built-in: sign csr now. 0 and *ret, or -EIO with reason. */
int signer_sign(Signer *s, const SignerCsr *csr, SignerCert *ret, char reason[static SIGNER_REASON_MAX]);

/* External: done with error 0 and cert (the callee may take cert->pem),
 * or a negative errno and reason (-ETIMEDOUT, -EPROTO for output that is
 * not acceptable, -EIO for a failed command). Runs from the loop, never
 * inside signer_start(). */
typedef void (*signer_done_fn)(void *userdata, int error, SignerCert *cert, const char *reason);

/* Queue the command for csr (copied) with TETHER_REASON=why ("enroll" or
 * "renew"). -EBUSY when SIGNER_QUEUE_MAX jobs wait or run. cb runs exactly
 * once unless signer_cancel() is called first; *ret_job (may be NULL)
 * names the job until then. */
int signer_start(Signer *s, const SignerCsr *csr, const char *why, signer_done_fn cb, void *userdata,
                 SignerJob **ret_job);
/* Forget a job: its callback will not run (its command is killed). NULL
 * is fine. */
void signer_cancel(SignerJob *job);
/* Jobs waiting or running. */
size_t signer_jobs(const Signer *s);
