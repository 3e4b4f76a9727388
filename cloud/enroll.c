/* SPDX-License-Identifier: Apache-2.0 */
/* Enrollment and renewal on the device port (enroll.h). */
#include "config.h"

#include <arpa/inet.h>
#include <inttypes.h>
#include <jansson.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <time.h>

#include "enroll.h"
#include "log.h"
#include "proto.h"
#include "ratelimit.h"
#include "signer.h"
#include "stats.h"
#include "util.h"

#define USEC_PER_SEC 1000000ULL
#define ENROLL_BODY_MAX (SIGNER_CSR_MAX + 1024)

/* What a certificate is signed for: an enrollment with a provisioning
 * token, a renewal on the device's session, or a re-enrollment without a
 * token by the key the registry holds for the device. */
typedef enum Kind {
        KIND_ENROLL,
        KIND_RENEW,
        KIND_REENROLL,
} Kind;

static const char *const kind_name[] = {
        [KIND_ENROLL] = "enroll",
        [KIND_RENEW] = "renew",
        [KIND_REENROLL] = "reenroll",
};

typedef enum ResultState {
        RESULT_PENDING,
        RESULT_ISSUED,
        RESULT_FAILED,
} ResultState;

/* What an external signature for (kind, id, pubkey) became. */
typedef struct Result {
        Enroll *enroll;
        struct Result *prev, *next; /* oldest first */
        Kind kind;
        char id[PROTO_DEVICE_ID_MAX + 1];
        char pubkey[65];
        ResultState state;
        uint64_t created; /* CLOCK_MONOTONIC µs */
        SignerJob *job;   /* while pending */
        bool queued;      /* renewal, pending: the built-in signer makes it from the queue */
        SignerCsr csr;    /* while queued */
        unsigned char csr_digest[32]; /* SHA-256 of the CSR's text: a renewal sent again */
        char *token;      /* enroll, while pending: consumed when signed */
        bool reissue;     /* the registry holds this key: consume nothing */
        char address[INET6_ADDRSTRLEN];
        /* issued */
        SignerCert cert;
        /* failed */
        unsigned code;
        char reason[SIGNER_REASON_MAX];
} Result;

struct Enroll {
        sd_event *event;
        const CloudConfig *config;
        Store *store;
        Registry *registry;
        Provision *provision;
        EnrollHooks hooks;
        Signer *signer;
        RateLimit *rate_address, *rate_refused, *rate_renew;
        Result *head, *tail;
        size_t n_results;
        /* Built-in signatures: how many were made in the loop's turn
         * inline_turn (sd_event_get_iteration()); renewals queued beyond
         * ENROLL_INLINE_PER_TURN, signed by queue_source. */
        uint64_t inline_turn;
        unsigned inline_n;
        size_t n_queued;
        sd_event_source *queue_source;
};

/* ---- answers --------------------------------------------------------------- */

static void reply_text(coap_pdu_t *response, unsigned code, const char *text) {
        uint8_t buf[4];

        coap_pdu_set_code(response, (coap_pdu_code_t)code);
        coap_add_option(response, COAP_OPTION_CONTENT_FORMAT, coap_encode_var_safe(buf, sizeof(buf), PROTO_CF_TEXT),
                        buf);
        if (text && *text)
                coap_add_data(response, strlen(text), (const uint8_t *)text);
}

static void reply_retry(coap_pdu_t *response, unsigned code, uint64_t seconds, const char *text) {
        uint8_t buf[4];

        if (seconds < 1)
                seconds = 1;
        coap_pdu_set_code(response, (coap_pdu_code_t)code);
        coap_add_option(response, COAP_OPTION_CONTENT_FORMAT, coap_encode_var_safe(buf, sizeof(buf), PROTO_CF_TEXT),
                        buf);
        coap_add_option(response, COAP_OPTION_MAXAGE,
                        coap_encode_var_safe(buf, sizeof(buf), (unsigned)(seconds > 3600 ? 3600 : seconds)), buf);
        coap_add_data(response, strlen(text), (const uint8_t *)text);
}

static void reply_cert(coap_pdu_t *response, const char *id, const SignerCert *cert) {
        _cleanup_free_ char *text = NULL;
        json_t *j;
        uint8_t buf[4];

        j = json_pack("{s:s, s:s, s:I, s:I, s:I}", "device_id", id, "certificate", cert->pem, "not_before",
                      (json_int_t)cert->not_before, "not_after", (json_int_t)cert->not_after, "renew_after",
                      (json_int_t)registry_renew_after(cert->not_before, cert->not_after));
        text = j ? json_dumps(j, JSON_COMPACT) : NULL;
        json_decref(j);
        if (!text) {
                reply_text(response, COAP_RESPONSE_CODE(500), "out of memory");
                return;
        }
        coap_pdu_set_code(response, COAP_RESPONSE_CODE(201));
        coap_add_option(response, COAP_OPTION_CONTENT_FORMAT, coap_encode_var_safe(buf, sizeof(buf), PROTO_CF_JSON),
                        buf);
        coap_add_data(response, strlen(text), (const uint8_t *)text);
}

/* ---- results of external signatures ------------------------------------------ */

static void result_free(Result *res) {
        Enroll *e = res->enroll;

        if (res->prev)
                res->prev->next = res->next;
        else
                e->head = res->next;
        if (res->next)
                res->next->prev = res->prev;
        else
                e->tail = res->prev;
        e->n_results--;
        if (res->queued)
                e->n_queued--;
        signer_csr_done(&res->csr);
        signer_cancel(res->job);
        if (res->token)
                OPENSSL_clear_free(res->token, strlen(res->token));
        signer_cert_done(&res->cert);
        free(res);
}

/* Drop what is older than ENROLL_RESULT_SEC (pending ones end by the
 * signer's timeout first). */
static void results_expire(Enroll *e) {
        uint64_t now = now_usec();

        while (e->head && e->head->state != RESULT_PENDING &&
               e->head->created + ENROLL_RESULT_SEC * USEC_PER_SEC <= now)
                result_free(e->head);
}

/* A renewal's (renew), else an enrollment's or re-enrollment's (both
 * on /enroll: the CSR proves the same key). */
static Result *result_find(Enroll *e, bool renew, const char *id, const char *pubkey) {
        for (Result *res = e->head; res; res = res->next)
                if ((res->kind == KIND_RENEW) == renew && streq(res->id, id) && streq(res->pubkey, pubkey))
                        return res;
        return NULL;
}

/* id's renewal for the CSR whose text has this digest: the same request
 * again, found without parsing and checking the CSR again. */
static Result *result_find_renewal(Enroll *e, const char *id, const unsigned char digest[static 32]) {
        for (Result *res = e->head; res; res = res->next)
                if (res->kind == KIND_RENEW && streq(res->id, id) && CRYPTO_memcmp(res->csr_digest, digest, 32) == 0)
                        return res;
        return NULL;
}

static void result_fail(Result *res, unsigned code, const char *reason) {
        res->state = RESULT_FAILED;
        res->code = code;
        snprintf(res->reason, sizeof(res->reason), "%s", reason);
        if (res->token) {
                OPENSSL_clear_free(res->token, strlen(res->token));
                res->token = NULL;
        }
}

/* Answer from a result: issued (kept for more retries), failed (dropped:
 * the next request starts again) or pending. */
static void result_reply(Result *res, coap_pdu_t *response) {
        switch (res->state) {
        case RESULT_ISSUED:
                reply_cert(response, res->id, &res->cert);
                return;
        case RESULT_FAILED:
                reply_text(response, res->code, res->reason);
                result_free(res);
                return;
        case RESULT_PENDING:
        default:
                reply_retry(response, COAP_RESPONSE_CODE(503),
                            res->queued ? ENROLL_QUEUED_RETRY_SEC : ENROLL_PENDING_RETRY_SEC,
                            "the certificate is being signed: send the same request again");
                return;
        }
}

/* A provisioning token's refusal (else the database failed). */
static bool token_refused(int r) {
        return r == -ENOKEY || r == -EKEYEXPIRED || r == -EUSERS || r == -EKEYREVOKED;
}

/* ---- issuing ------------------------------------------------------------------- */

static void audit_issued(Enroll *e, Kind kind, const char *id, const char *prov_id, const SignerCert *cert,
                         const char *address) {
        char actor[PROTO_DEVICE_ID_MAX + 16], action[32];
        json_t *detail;

        if (kind != KIND_ENROLL)
                snprintf(actor, sizeof(actor), "device:%s", id);
        else
                snprintf(actor, sizeof(actor), "provision:%s", prov_id ? prov_id : "-");
        snprintf(action, sizeof(action), "device.%s", kind_name[kind]);
        detail = json_pack("{s:s?, s:s, s:I, s:s?}", "token", kind == KIND_ENROLL ? prov_id : NULL, "serial",
                           cert->serial, "not_after", (json_int_t)cert->not_after, "address", address);
        (void)store_audit(e->store, actor, action, id, detail, address);
        json_decref(detail);
        if (kind != KIND_RENEW)
                (void)store_commit(e->store);
        stats_certificate_issued(kind == KIND_RENEW);
        if (kind == KIND_RENEW)
                log_info("Device '%s' renewed its certificate (serial %s, valid until %" PRId64 ").", id, cert->serial,
                         cert->not_after);
        else if (kind == KIND_REENROLL)
                log_info("Device '%s' re-enrolled from %s with the key the registry holds for it (serial %s, "
                         "valid until %" PRId64 ").", id, address ?: "-", cert->serial, cert->not_after);
        else
                log_info("Device '%s' enrolled from %s with provisioning token %s (serial %s, valid until %" PRId64
                         ").", id, address ?: "-", prov_id ?: "-", cert->serial, cert->not_after);
}

/* The registry's rules at the time of issuing: 0 and *ret_ident, or the
 * code and reason of the refusal. A renewal (its key is new by design)
 * is refused only for a revoked device. A re-enrollment needs the key the
 * registry holds (4.01, checked first: whoever lacks the key learns
 * nothing of the device), then a device that is not revoked. */
static unsigned identity_check(Enroll *e, Kind kind, const char *id, const char *pubkey,
                               RegistryIdentity *ret_ident, char reason[static SIGNER_REASON_MAX]) {
        RegistryIdentity ident;

        if (registry_identity(e->registry, id, &ident) < 0) {
                snprintf(reason, SIGNER_REASON_MAX, "the device registry cannot be read");
                return COAP_RESPONSE_CODE(500);
        }
        if (kind == KIND_REENROLL && !(ident.has_key && ident.pubkey[0] && streq(ident.pubkey, pubkey))) {
                snprintf(reason, SIGNER_REASON_MAX, "a provisioning token is required");
                return COAP_RESPONSE_CODE(401);
        }
        if (ident.revoked) {
                snprintf(reason, SIGNER_REASON_MAX, "device '%s' is revoked", id);
                return COAP_RESPONSE_CODE(403);
        }
        if (kind == KIND_ENROLL && ident.has_key && !streq(ident.pubkey, pubkey)) {
                snprintf(reason, SIGNER_REASON_MAX, "device '%s' is already enrolled with another key", id);
                return COAP_RESPONSE_CODE(403);
        }
        *ret_ident = ident;
        return 0;
}

/* A certificate for id is signed: consume the token's use (an
 * enrollment, unless reissue), record it, audit. 0, or the code and
 * reason why it may not be handed out after all. */
static unsigned issue(Enroll *e, Kind kind, const char *id, const char *token, bool reissue, const char *address,
                      const SignerCert *cert, char reason[static SIGNER_REASON_MAX]) {
        char prov_id[PROVISION_ID_MAX + 1] = "", actor[PROVISION_ID_MAX + 16];
        json_t *tags = NULL;
        RegistryCert rc;
        int r;

        if (kind == KIND_ENROLL && !reissue) {
                char why[PROVISION_REASON_MAX] = "";

                r = provision_consume(e->provision, token, id, prov_id, &tags, why);
                if (r < 0 && !token_refused(r)) {
                        snprintf(reason, SIGNER_REASON_MAX, "the provisioning tokens cannot be read now");
                        return COAP_RESPONSE_CODE(503);
                }
                if (r < 0) {
                        snprintf(reason, SIGNER_REASON_MAX, "%s", why[0] ? why : "provisioning token refused");
                        return COAP_RESPONSE_CODE(401);
                }
        } else if (kind == KIND_ENROLL) {
                char why[PROVISION_REASON_MAX];

                /* The same key again (a lost answer): the device keeps the
                 * tags it enrolled with. This token is not used up, so its
                 * tags must not pass to a device that merely holds it. */
                (void)provision_check(e->provision, token, prov_id, NULL, why);
        }
        snprintf(actor, sizeof(actor), "provision:%s", prov_id);
        rc = (RegistryCert){ .serial = cert->serial, .fingerprint = cert->fingerprint, .pubkey = cert->pubkey,
                             .issuer = cert->issuer,
                             .not_before = cert->not_before, .not_after = cert->not_after,
                             .how = kind_name[kind] };
        /* A re-enrollment is recorded as a renewal (the device is known:
         * its key is), and committed at once by audit_issued(). */
        r = registry_issued(e->registry, id, &rc, kind == KIND_ENROLL, actor, tags);
        json_decref(tags);
        if (r < 0) {
                /* The token's use is gone; the device asks again with the
                 * same key, which the registry may not know: logged. */
                log_error_errno(r, "Failed to record the certificate issued to device '%s': %m", id);
                snprintf(reason, SIGNER_REASON_MAX, "the cloud failed to record the certificate");
                return COAP_RESPONSE_CODE(500);
        }
        audit_issued(e, kind, id, kind == KIND_ENROLL ? prov_id : NULL, cert, address);
        if (kind == KIND_RENEW)
                e->hooks.renewed(e->hooks.userdata, id, cert->not_after);
        return 0;
}

static void signed_cb(void *userdata, int error, SignerCert *cert, const char *reason) {
        Result *res = userdata;
        Enroll *e = res->enroll;
        RegistryIdentity ident;
        char why[SIGNER_REASON_MAX];
        unsigned code;

        res->job = NULL;
        res->created = now_usec(); /* kept from now on */
        if (error < 0) {
                result_fail(res, COAP_RESPONSE_CODE(500), reason);
                return;
        }
        /* Revoked, or another key recorded, while it was signed. */
        code = identity_check(e, res->kind, res->id, res->pubkey, &ident, why);
        if (code == 0)
                code = issue(e, res->kind, res->id, res->token, res->reissue, res->address, cert, why);
        if (code != 0) {
                result_fail(res, code, why);
                return;
        }
        res->state = RESULT_ISSUED;
        res->cert = *cert;
        *cert = (SignerCert){};
        if (res->token) {
                OPENSSL_clear_free(res->token, strlen(res->token));
                res->token = NULL;
        }
}

/* A pending result for csr, at the end of the list; NULL with the answer
 * given. */
static Result *result_new(Enroll *e, Kind kind, const SignerCsr *csr, const char *token, bool reissue,
                          const char *address, coap_pdu_t *response) {
        unsigned n = 0;
        Result *res;

        if (e->n_results >= ENROLL_RESULTS_MAX) {
                reply_retry(response, COAP_RESPONSE_CODE(503), ENROLL_PENDING_RETRY_SEC * 5,
                            "too many certificates are being signed: try again later");
                return NULL;
        }
        res = calloc(1, sizeof(*res));
        if (!res || (kind == KIND_ENROLL && !(res->token = strdup(token))) ||
            !EVP_Digest(csr->pem, strlen(csr->pem), res->csr_digest, &n, EVP_sha256(), NULL)) {
                free(res ? res->token : NULL);
                free(res);
                reply_text(response, COAP_RESPONSE_CODE(500), "out of memory");
                return NULL;
        }
        res->enroll = e;
        res->kind = kind;
        res->reissue = reissue;
        res->state = RESULT_PENDING;
        res->created = now_usec();
        snprintf(res->id, sizeof(res->id), "%s", csr->id);
        snprintf(res->pubkey, sizeof(res->pubkey), "%s", csr->pubkey);
        snprintf(res->address, sizeof(res->address), "%s", address ?: "");
        res->prev = e->tail;
        if (e->tail)
                e->tail->next = res;
        else
                e->head = res;
        e->tail = res;
        e->n_results++;
        return res;
}

/* May the built-in signer sign now, inside this turn of the loop? Not
 * past ENROLL_INLINE_PER_TURN signatures, nor while renewals wait in the
 * queue (they go first). */
static bool inline_allowed(Enroll *e) {
        uint64_t turn = 0;

        (void)sd_event_get_iteration(e->event, &turn);
        if (turn != e->inline_turn) {
                e->inline_turn = turn;
                e->inline_n = 0;
        }
        return e->inline_n < ENROLL_INLINE_PER_TURN && e->n_queued == 0;
}

/* Sign queued renewals, oldest first, for ENROLL_QUEUE_USEC at most (at
 * least one) per turn of the loop. */
static int queue_cb(sd_event_source *s, void *userdata) {
        Enroll *e = userdata;
        uint64_t start = now_usec();
        bool first = true;

        for (Result *res = e->head, *next; res && e->n_queued > 0; res = next) {
                _cleanup_(signer_cert_done) SignerCert cert = {};
                char reason[SIGNER_REASON_MAX];
                int r;

                next = res->next;
                if (!res->queued)
                        continue;
                if (!first && now_usec() - start >= ENROLL_QUEUE_USEC)
                        break;
                first = false;
                res->queued = false;
                e->n_queued--;
                r = signer_sign(e->signer, &res->csr, &cert, reason);
                signer_csr_done(&res->csr);
                if (r < 0)
                        log_error("Failed to sign a certificate for device '%s': %s.", res->id, reason);
                /* Marks res issued or failed; frees nothing. */
                signed_cb(res, r, r < 0 ? NULL : &cert, reason);
        }
        if (e->n_queued > 0)
                (void)sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
        return 0;
}

/* Queue the renewal of csr (taken) for the built-in signer: 5.03 now, the
 * certificate when the device asks again. */
static void queue_renewal(Enroll *e, SignerCsr *csr, const char *address, coap_pdu_t *response) {
        Result *res;
        int r;

        res = result_new(e, KIND_RENEW, csr, NULL, false, address, response);
        if (!res)
                return;
        r = sd_event_source_set_enabled(e->queue_source, SD_EVENT_ONESHOT);
        if (r < 0) {
                result_free(res);
                reply_text(response, COAP_RESPONSE_CODE(500), "the renewal could not be queued");
                return;
        }
        res->queued = true;
        res->csr = *csr;
        *csr = (SignerCsr){};
        e->n_queued++;
        reply_retry(response, COAP_RESPONSE_CODE(503), ENROLL_QUEUED_RETRY_SEC,
                    "the certificate is being signed: send the same request again");
}

/* Sign csr (checks passed) and answer: at once with the built-in signer,
 * else start the command and answer 5.03. */
static void sign_and_reply(Enroll *e, Kind kind, const SignerCsr *csr, const char *token, bool reissue,
                           const char *address, coap_pdu_t *response) {
        char reason[SIGNER_REASON_MAX];
        unsigned code;
        Result *res;
        int r;

        if (!signer_is_external(e->signer)) {
                _cleanup_(signer_cert_done) SignerCert cert = {};

                e->inline_n++;
                r = signer_sign(e->signer, csr, &cert, reason);
                if (r < 0) {
                        log_error("Failed to sign a certificate for device '%s': %s.", csr->id, reason);
                        reply_text(response, COAP_RESPONSE_CODE(500), reason);
                        return;
                }
                code = issue(e, kind, csr->id, token, reissue, address, &cert, reason);
                if (code != 0)
                        reply_text(response, code, reason);
                else
                        reply_cert(response, csr->id, &cert);
                return;
        }
        res = result_new(e, kind, csr, token, reissue, address, response);
        if (!res)
                return;
        r = signer_start(e->signer, csr, kind_name[kind], signed_cb, res, &res->job);
        if (r < 0) {
                result_free(res);
                if (r == -EBUSY)
                        reply_retry(response, COAP_RESPONSE_CODE(503), ENROLL_PENDING_RETRY_SEC * 5,
                                    "too many certificates are being signed: try again later");
                else
                        reply_text(response, COAP_RESPONSE_CODE(500), "the signing command could not be queued");
                return;
        }
        reply_retry(response, COAP_RESPONSE_CODE(503), ENROLL_PENDING_RETRY_SEC,
                    "the certificate is being signed: send the same request again");
}

/* ---- requests ---------------------------------------------------------------------- */

/* The request's JSON object, or NULL with the answer given. */
static json_t *request_json(const coap_pdu_t *request, coap_pdu_t *response) {
        const uint8_t *data = NULL;
        size_t len = 0, offset, total;
        coap_opt_iterator_t it;
        coap_opt_t *opt;
        json_t *j;

        opt = coap_check_option(request, COAP_OPTION_CONTENT_FORMAT, &it);
        if (opt && coap_decode_var_bytes(coap_opt_value(opt), coap_opt_length(opt)) != PROTO_CF_JSON) {
                reply_text(response, COAP_RESPONSE_CODE(415), "the request must be JSON (Content-Format 50)");
                return NULL;
        }
        if (!coap_get_data_large(request, &len, &data, &offset, &total) || len == 0) {
                reply_text(response, COAP_RESPONSE_CODE(400), "the request has no JSON body");
                return NULL;
        }
        if (len > ENROLL_BODY_MAX || total > ENROLL_BODY_MAX) {
                reply_text(response, COAP_RESPONSE_CODE(413), "the request is too large");
                return NULL;
        }
        j = json_loadb((const char *)data, len, JSON_REJECT_DUPLICATES, NULL);
        if (!json_is_object(j)) {
                json_decref(j);
                reply_text(response, COAP_RESPONSE_CODE(400), "the request is not a JSON object");
                return NULL;
        }
        return j;
}

/* The CSR of j, parsed, or false with the answer given. */
static bool request_csr(json_t *j, SignerCsr *ret, coap_pdu_t *response) {
        json_t *csr = json_object_get(j, "csr");
        char reason[SIGNER_REASON_MAX];

        if (!json_is_string(csr)) {
                reply_text(response, COAP_RESPONSE_CODE(400), "the request has no \"csr\" string");
                return false;
        }
        if (signer_csr_parse(json_string_value(csr), json_string_length(csr), ret, reason) < 0) {
                reply_text(response, COAP_RESPONSE_CODE(400), reason);
                return false;
        }
        return true;
}

/* The rate limits' key of address: an IPv4 address, or an IPv6
 * address's /64 (one host usually has the whole /64 to pick from, as in
 * the API's limits, cloud/api.c). */
static size_t address_key(const char *address, uint8_t key[static 16]) {
        if (inet_pton(AF_INET6, address, key) == 1)
                return 8;
        if (inet_pton(AF_INET, address, key) == 1)
                return 4;
        return 0;
}

/* POST /enroll without a token for csr (checked), from address (its rate
 * limits' key): a certificate for the key the registry holds for csr's
 * device, or the refusal. Refusals count as refused tokens. */
static void reenroll_request(Enroll *e, const SignerCsr *csr, const char *address, const uint8_t *key,
                             size_t key_len, coap_pdu_t *response) {
        char reason[SIGNER_REASON_MAX];
        RegistryIdentity ident;
        uint64_t wait;
        unsigned code;

        code = identity_check(e, KIND_REENROLL, csr->id, csr->pubkey, &ident, reason);
        if (code == COAP_RESPONSE_CODE(401) && key_len > 0 &&
            (wait = ratelimit_take(e->rate_refused, key, key_len, now_usec())) > 0) {
                reply_retry(response, COAP_RESPONSE_CODE(429), (wait + USEC_PER_SEC - 1) / USEC_PER_SEC,
                            "too many refused enrollment requests from this address");
                return;
        }
        if (code != 0) {
                reply_text(response, code, reason);
                return;
        }
        sign_and_reply(e, KIND_REENROLL, csr, NULL, false, address, response);
}

void enroll_request(Enroll *e, const char *address, const coap_pdu_t *request, coap_pdu_t *response) {
        _cleanup_(signer_csr_done) SignerCsr csr = {};
        char prov_id[PROVISION_ID_MAX + 1] = "", why[PROVISION_REASON_MAX] = "", reason[SIGNER_REASON_MAX];
        RegistryIdentity ident;
        uint8_t key[16];
        size_t key_len = address_key(address, key);
        uint64_t wait;
        json_t *j, *token;
        unsigned code;
        bool reissue;
        Result *res;
        int r;

        results_expire(e);
        if (key_len > 0 && (wait = ratelimit_take(e->rate_address, key, key_len, now_usec())) > 0) {
                reply_retry(response, COAP_RESPONSE_CODE(429), (wait + USEC_PER_SEC - 1) / USEC_PER_SEC,
                            "too many enrollment requests from this address");
                return;
        }
        j = request_json(request, response);
        if (!j)
                return;
        /* No "token": a re-enrollment, by the key the registry holds. */
        token = json_object_get(j, "token");
        if (token && (!json_is_string(token) || json_string_length(token) == 0 || json_string_length(token) > 256 ||
                      strlen(json_string_value(token)) != json_string_length(token))) {
                json_decref(j);
                reply_text(response, COAP_RESPONSE_CODE(400), "the request has no \"token\" string");
                return;
        }
        if (!request_csr(j, &csr, response)) {
                json_decref(j);
                return;
        }
        /* A retry while the command signs, or of an answer that got lost. */
        res = result_find(e, false, csr.id, csr.pubkey);
        if (res) {
                json_decref(j);
                result_reply(res, response);
                return;
        }
        if (!token) {
                json_decref(j);
                reenroll_request(e, &csr, address, key, key_len, response);
                return;
        }
        r = provision_check(e->provision, json_string_value(token), prov_id, NULL, why);
        if (r < 0 && token_refused(r)) {
                /* Reissue for the key already recorded under this token:
                 * the device lost the answer after the last use. */
                RegistryIdentity id0;
                char expect[PROVISION_ID_MAX + 16];

                snprintf(expect, sizeof(expect), "provision:%s", prov_id);
                if (!(r == -EUSERS && prov_id[0] && registry_identity(e->registry, csr.id, &id0) == 0 &&
                      id0.has_key && streq(id0.pubkey, csr.pubkey) && !id0.revoked &&
                      streq(id0.registered_by, expect))) {
                        if (key_len > 0 && (wait = ratelimit_take(e->rate_refused, key, key_len, now_usec())) > 0)
                                reply_retry(response, COAP_RESPONSE_CODE(429),
                                            (wait + USEC_PER_SEC - 1) / USEC_PER_SEC,
                                            "too many refused provisioning tokens from this address");
                        else
                                reply_text(response, COAP_RESPONSE_CODE(401), why[0] ? why : "provisioning token refused");
                        json_decref(j);
                        return;
                }
        } else if (r < 0) {
                json_decref(j);
                reply_retry(response, COAP_RESPONSE_CODE(503), ENROLL_PENDING_RETRY_SEC * 5,
                            "the provisioning tokens cannot be read now: try again later");
                return;
        }
        code = identity_check(e, KIND_ENROLL, csr.id, csr.pubkey, &ident, reason);
        if (code != 0) {
                json_decref(j);
                reply_text(response, code, reason);
                return;
        }
        reissue = ident.has_key; /* and it is this key */
        sign_and_reply(e, KIND_ENROLL, &csr, json_string_value(token), reissue, address, response);
        json_decref(j);
}

void enroll_cert_request(Enroll *e, const char *id, const char *pubkey, const char *address,
                         const coap_pdu_t *request, coap_pdu_t *response) {
        _cleanup_(signer_csr_done) SignerCsr csr = {};
        RegistryIdentity ident;
        char reason[SIGNER_REASON_MAX];
        unsigned char digest[EVP_MAX_MD_SIZE];
        unsigned n = 0;
        uint64_t wait = USEC_PER_SEC;
        json_t *j;
        Result *res;

        results_expire(e);
        j = request_json(request, response);
        if (!j)
                return;
        /* The same request again (5.03 said so, or its answer got lost). */
        if (json_is_string(json_object_get(j, "csr")) &&
            EVP_Digest(json_string_value(json_object_get(j, "csr")), json_string_length(json_object_get(j, "csr")),
                       digest, &n, EVP_sha256(), NULL) &&
            (res = result_find_renewal(e, id, digest)) && !(pubkey && streq(res->pubkey, pubkey))) {
                json_decref(j);
                result_reply(res, response);
                return;
        }
        if (!request_csr(j, &csr, response)) {
                json_decref(j);
                return;
        }
        json_decref(j);
        if (!streq(csr.id, id)) {
                reply_text(response, COAP_RESPONSE_CODE(403), "the CSR's commonName is not this device's ID");
                return;
        }
        if (pubkey && streq(csr.pubkey, pubkey)) {
                reply_text(response, COAP_RESPONSE_CODE(400),
                           "the CSR has the key of this session's certificate: renewal needs a new key");
                return;
        }
        res = result_find(e, true, csr.id, csr.pubkey);
        if (res) {
                result_reply(res, response);
                return;
        }
        if (!EVP_Digest(id, strlen(id), digest, &n, EVP_sha256(), NULL) ||
            (wait = ratelimit_take(e->rate_renew, digest, n, now_usec())) > 0) {
                reply_retry(response, COAP_RESPONSE_CODE(429), (wait + USEC_PER_SEC - 1) / USEC_PER_SEC,
                            "too many renewals for this device");
                return;
        }
        if (registry_identity(e->registry, id, &ident) < 0) {
                reply_text(response, COAP_RESPONSE_CODE(500), "the device registry cannot be read");
                return;
        }
        if (ident.revoked) {
                snprintf(reason, sizeof(reason), "device '%s' is revoked", id);
                reply_text(response, COAP_RESPONSE_CODE(403), reason);
                return;
        }
        /* Renewals come in waves (a fleet's certificates were issued
         * together): past ENROLL_INLINE_PER_TURN signatures in this turn
         * of the loop the rest wait in a queue, so that the loop's other
         * work (calls, events, handshakes) goes on in between. */
        if (!signer_is_external(e->signer) && !inline_allowed(e)) {
                queue_renewal(e, &csr, address, response);
                return;
        }
        sign_and_reply(e, KIND_RENEW, &csr, NULL, false, address, response);
}

/* ---- the object ---------------------------------------------------------------------- */

Enroll *enroll_free(Enroll *e) {
        if (!e)
                return NULL;
        while (e->head)
                result_free(e->head);
        e->queue_source = sd_event_source_disable_unref(e->queue_source);
        signer_free(e->signer);
        ratelimit_free(e->rate_address);
        ratelimit_free(e->rate_refused);
        ratelimit_free(e->rate_renew);
        free(e);
        return NULL;
}

int enroll_new(sd_event *event, const CloudConfig *config, Store *store, Registry *registry, Provision *provision,
               const EnrollHooks *hooks, Enroll **ret) {
        _cleanup_(enroll_freep) Enroll *e = NULL;
        int r;

        e = calloc(1, sizeof(*e));
        if (!e)
                return log_error_errno(-ENOMEM, "Out of memory.");
        e->event = event;
        e->config = config;
        e->store = store;
        e->registry = registry;
        e->provision = provision;
        e->hooks = *hooks;
        r = signer_new(event, config, &e->signer);
        if (r < 0)
                return r;
        r = sd_event_add_defer(event, &e->queue_source, queue_cb, e);
        if (r >= 0)
                r = sd_event_source_set_enabled(e->queue_source, SD_EVENT_OFF);
        if (r < 0)
                return log_error_errno(r, "Failed to set up the renewal queue: %m");
        r = ratelimit_new(ENROLL_RATE, ENROLL_BURST, ENROLL_RATE_KEYS, &e->rate_address);
        if (r >= 0)
                r = ratelimit_new(ENROLL_REFUSED_RATE, ENROLL_REFUSED_BURST, ENROLL_RATE_KEYS, &e->rate_refused);
        if (r >= 0)
                r = ratelimit_new(ENROLL_RENEW_RATE, ENROLL_RENEW_BURST, ENROLL_RATE_KEYS, &e->rate_renew);
        if (r < 0)
                return log_error_errno(r, "Failed to set up the enrollment rate limits: %m");
        log_info("Enrollment is on: certificates valid %us, signed %s.", config->cert_validity_sec,
                 signer_is_external(e->signer) ? "by the SignCommand" : "by the built-in CA");
        *ret = TAKE_PTR(e);
        return 0;
}
