/* SPDX-License-Identifier: Apache-2.0 */
#include <errno.h>
#include <fcntl.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ota-journal.h"
#include "ticket-keys.h"
#include "util.h"

typedef struct TicketKey {
        unsigned char name[TICKET_KEY_NAME_SIZE];
        unsigned char aes[32];
        unsigned char hmac[32];
} TicketKey;

struct TicketKeys {
        pthread_mutex_t lock;
        uint64_t rotate_sec;
        uint64_t created; /* of cur */
        TicketKey cur, prev;
        bool have_prev;
};

/* The file: magic, created (8 bytes, big endian), have_prev (1 byte),
 * then cur and prev. Fixed size. */
#define TICKET_KEYS_MAGIC "TTKEYS01"
#define TICKET_KEYS_FILE_SIZE (8 + 8 + 1 + 2 * sizeof(TicketKey))

static int key_fresh(TicketKey *key) {
        return RAND_bytes((unsigned char *)key, sizeof(*key)) == 1 ? 0 : -EIO;
}

int ticket_keys_new(uint64_t rotate_sec, uint64_t now, TicketKeys **ret) {
        TicketKeys *k = calloc(1, sizeof(*k));

        if (!k)
                return -ENOMEM;
        pthread_mutex_init(&k->lock, NULL);
        k->rotate_sec = rotate_sec;
        k->created = now;
        if (key_fresh(&k->cur) < 0) {
                ticket_keys_free(k);
                return -EIO;
        }
        *ret = k;
        return 0;
}

TicketKeys *ticket_keys_free(TicketKeys *k) {
        if (!k)
                return NULL;
        pthread_mutex_destroy(&k->lock);
        OPENSSL_cleanse(k, sizeof(*k));
        free(k);
        return NULL;
}

int ticket_keys_rotate(TicketKeys *k, uint64_t now, bool force) {
        TicketKey fresh;
        int r = 0;

        pthread_mutex_lock(&k->lock);
        if (force || now >= k->created + k->rotate_sec || now < k->created) {
                r = key_fresh(&fresh);
                if (r == 0) {
                        /* A key 2 * rotate_sec old opens nothing any more
                         * (the cloud was stopped for that long). */
                        k->have_prev = now < k->created + 2 * k->rotate_sec || now < k->created;
                        k->prev = k->cur;
                        if (!k->have_prev)
                                OPENSSL_cleanse(&k->prev, sizeof(k->prev));
                        k->cur = fresh;
                        k->created = now;
                        r = 1;
                }
                OPENSSL_cleanse(&fresh, sizeof(fresh));
        }
        pthread_mutex_unlock(&k->lock);
        return r;
}

int ticket_keys_reset(TicketKeys *k, uint64_t now) {
        TicketKey fresh;
        int r;

        r = key_fresh(&fresh);
        pthread_mutex_lock(&k->lock);
        if (r == 0) {
                k->cur = fresh;
                OPENSSL_cleanse(&k->prev, sizeof(k->prev));
                k->have_prev = false;
                k->created = now;
        }
        pthread_mutex_unlock(&k->lock);
        OPENSSL_cleanse(&fresh, sizeof(fresh));
        return r;
}

int ticket_keys_load(TicketKeys *k, const char *path) {
        unsigned char buf[TICKET_KEYS_FILE_SIZE + 1];
        uint64_t created = 0;
        ssize_t n;
        int fd, r = 0;

        fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        if (fd < 0)
                return -errno;
        n = read(fd, buf, sizeof(buf));
        if (n < 0)
                r = -errno;
        close(fd);
        if (r == 0 && (n != (ssize_t)TICKET_KEYS_FILE_SIZE || memcmp(buf, TICKET_KEYS_MAGIC, 8) != 0 || buf[16] > 1))
                r = -EBADMSG;
        if (r == 0) {
                for (int i = 0; i < 8; i++)
                        created = created << 8 | buf[8 + i];
                pthread_mutex_lock(&k->lock);
                k->created = created;
                k->have_prev = buf[16];
                memcpy(&k->cur, buf + 17, sizeof(TicketKey));
                memcpy(&k->prev, buf + 17 + sizeof(TicketKey), sizeof(TicketKey));
                if (!k->have_prev)
                        OPENSSL_cleanse(&k->prev, sizeof(k->prev));
                pthread_mutex_unlock(&k->lock);
        }
        OPENSSL_cleanse(buf, sizeof(buf));
        return r;
}

int ticket_keys_save(TicketKeys *k, const char *path) {
        _cleanup_free_ char *dir = NULL;
        unsigned char buf[TICKET_KEYS_FILE_SIZE];
        const char *slash = strrchr(path, '/'), *name = slash ? slash + 1 : path;
        uint64_t created;
        int r;

        dir = slash ? strndup(path, (size_t)(slash - path)) : strdup(".");
        if (!dir || !*name)
                return dir ? -EINVAL : -ENOMEM;
        pthread_mutex_lock(&k->lock);
        memcpy(buf, TICKET_KEYS_MAGIC, 8);
        created = k->created;
        for (int i = 7; i >= 0; i--, created >>= 8)
                buf[8 + i] = (unsigned char)(created & 0xff);
        buf[16] = k->have_prev;
        memcpy(buf + 17, &k->cur, sizeof(TicketKey));
        memcpy(buf + 17 + sizeof(TicketKey), &k->prev, sizeof(TicketKey));
        pthread_mutex_unlock(&k->lock);

        /* One temporary name (.NAME.tmp, not followed if a symlink): a
         * save cut short by a crash leaves at most that file, which the
         * next save overwrites, never a trail of files holding old keys. */
        r = ota_write_file_atomic(*dir ? dir : "/", name, (const char *)buf, sizeof(buf), 0600, (uid_t)-1,
                                  (gid_t)-1);
        OPENSSL_cleanse(buf, sizeof(buf));
        return r;
}

int ticket_keys_crypt(TicketKeys *k, unsigned char key_name[TICKET_KEY_NAME_SIZE], unsigned char *iv,
                      EVP_CIPHER_CTX *cctx, EVP_MAC_CTX *hctx, int enc) {
        OSSL_PARAM params[3];
        char digest[] = "SHA256";
        const TicketKey *key = NULL;
        TicketKey copy;
        int r = -1;

        pthread_mutex_lock(&k->lock);
        if (enc) {
                copy = k->cur;
                key = &copy;
                r = 1;
        } else if (CRYPTO_memcmp(key_name, k->cur.name, TICKET_KEY_NAME_SIZE) == 0) {
                copy = k->cur;
                key = &copy;
                r = 1;
        } else if (k->have_prev && CRYPTO_memcmp(key_name, k->prev.name, TICKET_KEY_NAME_SIZE) == 0) {
                copy = k->prev;
                key = &copy;
                r = 2;
        } else
                r = 0;
        pthread_mutex_unlock(&k->lock);
        if (!key)
                return r;

        params[0] = OSSL_PARAM_construct_octet_string(OSSL_MAC_PARAM_KEY, (void *)copy.hmac, sizeof(copy.hmac));
        params[1] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0);
        params[2] = OSSL_PARAM_construct_end();
        if (enc) {
                memcpy(key_name, copy.name, TICKET_KEY_NAME_SIZE);
                if (RAND_bytes(iv, EVP_CIPHER_get_iv_length(EVP_aes_256_cbc())) != 1 ||
                    EVP_EncryptInit_ex(cctx, EVP_aes_256_cbc(), NULL, copy.aes, iv) != 1)
                        r = -1;
        } else if (EVP_DecryptInit_ex(cctx, EVP_aes_256_cbc(), NULL, copy.aes, iv) != 1)
                r = -1;
        if (r > 0 && EVP_MAC_CTX_set_params(hctx, params) != 1)
                r = -1;
        OPENSSL_cleanse(&copy, sizeof(copy));
        OPENSSL_cleanse(params, sizeof(params));
        return r;
}

uint64_t ticket_keys_lifetime(const TicketKeys *k) {
        return 2 * k->rotate_sec;
}

uint64_t ticket_keys_created(TicketKeys *k) {
        uint64_t c;

        pthread_mutex_lock(&k->lock);
        c = k->created;
        pthread_mutex_unlock(&k->lock);
        return c;
}
