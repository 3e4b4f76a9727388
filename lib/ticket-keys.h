/* SPDX-License-Identifier: Apache-2.0 */
/* The keys that seal a TLS server's session tickets (RFC 8446 4.6.1):
 * tickets are stateless, so whoever holds these keys can resume any
 * session they sealed. A TicketKeys owns two: the current one, which
 * seals new tickets and opens them, and the previous one, which only
 * opens (a client resuming with it is given a new ticket). Each key is a
 * 16-byte name, an AES-256-CBC key and an HMAC-SHA256 key from
 * RAND_bytes(). Keys are zeroed when dropped. Safe to use from several
 * threads (a mutex guards the keys). */
#pragma once

#include <openssl/evp.h>
#include <stdbool.h>
#include <stdint.h>

#define TICKET_KEY_NAME_SIZE 16

typedef struct TicketKeys TicketKeys;

/* New keys: a fresh current key made at now (seconds since the epoch)
 * and no previous one. rotate_sec is how long a key seals before it is
 * kept only to open for as long again. The caller owns *ret. 0 or
 * -ENOMEM / -EIO. */
int ticket_keys_new(uint64_t rotate_sec, uint64_t now, TicketKeys **ret);
TicketKeys *ticket_keys_free(TicketKeys *k);

/* Make a new current key (the current one becomes the previous one, the
 * previous one is dropped) if the current one is rotate_sec old at now.
 * A current key already 2 * rotate_sec old is dropped too (a rotation
 * long overdue: the cloud was stopped). force: rotate now. 1 if rotated,
 * 0 if not, or -EIO. */
int ticket_keys_rotate(TicketKeys *k, uint64_t now, bool force);

/* Drop both keys and start with a fresh one (a change of trust). */
int ticket_keys_reset(TicketKeys *k, uint64_t now);

/* Load keys saved by ticket_keys_save() from path, replacing these. 0;
 * -ENOENT when there is no file; -EBADMSG when it is damaged (wrong
 * size or magic); another -errno when it cannot be read. These keys are
 * unchanged on error. A key made in the future is loaded as it is: see
 * ticket_keys_created(). */
int ticket_keys_load(TicketKeys *k, const char *path);

/* Save the keys to path atomically (a temporary file in the same
 * directory, mode 0600, synced and renamed over path). 0 or -errno. */
int ticket_keys_save(TicketKeys *k, const char *path);

/* The ticket key callback of OpenSSL 3 (SSL_CTX_set_tlsext_ticket_key_evp_cb)
 * with the keys as an argument: enc=1 seals with the current key (1, or
 * -1 on error); enc=0 opens with the key named key_name: 1 with the
 * current one, 2 (renew) with the previous one, 0 for an unknown name,
 * -1 on error. */
int ticket_keys_crypt(TicketKeys *k, unsigned char key_name[TICKET_KEY_NAME_SIZE], unsigned char *iv,
                      EVP_CIPHER_CTX *cctx, EVP_MAC_CTX *hctx, int enc);

/* The lifetime to give tickets: twice the rotation (a ticket sealed just
 * before a rotation opens until the next one). */
uint64_t ticket_keys_lifetime(const TicketKeys *k);
/* When the current key was made (seconds since the epoch). */
uint64_t ticket_keys_created(TicketKeys *k);
