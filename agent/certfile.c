/* SPDX-License-Identifier: Apache-2.0 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "certfile.h"
#include "csr.h"
#include "util.h"

static int new_path(const char *path, char **ret) {
        return asprintf(ret, "%s" CERTFILE_NEW_SUFFIX, path) < 0 ? -ENOMEM : 0;
}

/* path with data, fsync'd; replaces a leftover file of that name. */
static int write_file(const char *path, const char *data, mode_t mode) {
        _cleanup_close_ int fd = -1;
        size_t len = strlen(data), done = 0;

        (void)unlink(path);
        fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode);
        if (fd < 0)
                return -errno;
        if (fchmod(fd, mode) < 0) /* whatever the umask */
                return -errno;
        while (done < len) {
                ssize_t n = write(fd, data + done, len - done);

                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0)
                        return n < 0 ? -errno : -EIO;
                done += (size_t)n;
        }
        if (fsync(fd) < 0)
                return -errno;
        return 0;
}

int certfile_install(const char *key_path, const char *cert_path, const char *key_pem, const char *cert_pem) {
        _cleanup_free_ char *key_new = NULL, *cert_new = NULL;
        int r;

        if (streq(key_path, cert_path))
                return -EINVAL;
        if (new_path(key_path, &key_new) < 0 || new_path(cert_path, &cert_new) < 0)
                return -ENOMEM;
        (void)unlink(key_new); /* no stale KEY.new may pair with the CERT.new below */
        if (key_pem) {
                r = write_file(key_new, key_pem, 0600);
                if (r < 0)
                        goto fail;
        }
        r = write_file(cert_new, cert_pem, 0644);
        if (r < 0)
                goto fail;
        /* Both .new files are on disk: from here on the new pair wins. */
        csr_fsync_dir_of(cert_new);
        if (key_pem) {
                if (rename(key_new, key_path) < 0) {
                        r = -errno;
                        goto fail;
                }
                /* The key's rename is on disk before the certificate's is
                 * made: else a crash could keep the certificate's (its
                 * directory may be another, or the file system may not
                 * keep the order) and lose the key's, leaving the new
                 * certificate with the old key and no CERT.new to
                 * recover from. */
                csr_fsync_dir_of(key_path);
        }
        if (rename(cert_new, cert_path) < 0) {
                CertfileRecovery rec;

                /* The new key is in place with the old certificate, a
                 * pair that cannot connect: complete the install at once
                 * as a start would (a failure that passed), else CERT.new
                 * stays for certfile_recover() at the next start. */
                r = -errno;
                if (certfile_recover(key_path, cert_path, &rec) == 0 && rec == CERTFILE_COMPLETED)
                        return 0;
                return r;
        }
        csr_fsync_dir_of(cert_path);
        return 0;
fail:
        (void)unlink(key_new);
        (void)unlink(cert_new);
        return r;
}

static bool exists(const char *path) {
        return access(path, F_OK) == 0;
}

int certfile_recover(const char *key_path, const char *cert_path, CertfileRecovery *ret) {
        _cleanup_free_ char *key_new = NULL, *cert_new = NULL;
        bool have_key_new, have_cert_new;
        int r;

        if (streq(key_path, cert_path))
                return -EINVAL;
        if (new_path(key_path, &key_new) < 0 || new_path(cert_path, &cert_new) < 0)
                return -ENOMEM;
        have_key_new = exists(key_new);
        have_cert_new = exists(cert_new);
        if (!have_key_new && !have_cert_new) {
                *ret = CERTFILE_NOTHING;
                return 0;
        }
        if (have_cert_new) {
                r = csr_pair_matches(cert_new, have_key_new ? key_new : key_path);
                if (r < 0 && r != -ENOENT)
                        return r;
                if (r > 0) {
                        if (have_key_new) {
                                if (rename(key_new, key_path) < 0)
                                        return -errno;
                                csr_fsync_dir_of(key_path); /* before the certificate's: see certfile_install() */
                        }
                        if (rename(cert_new, cert_path) < 0)
                                return -errno;
                        csr_fsync_dir_of(cert_path);
                        *ret = CERTFILE_COMPLETED;
                        return 0;
                }
        }
        if ((have_key_new && unlink(key_new) < 0 && errno != ENOENT) ||
            (have_cert_new && unlink(cert_new) < 0 && errno != ENOENT))
                return -errno;
        csr_fsync_dir_of(key_path);
        csr_fsync_dir_of(cert_path);
        *ret = CERTFILE_DISCARDED;
        return 0;
}

int64_t certfile_renew_at(int64_t not_before, int64_t not_after, unsigned percent, uint32_t rnd,
                          int64_t *ret_renew_after) {
        int64_t life = not_after > not_before ? not_after - not_before : 0;
        int64_t before = percent == 0 || percent >= 100 ? life * 2 / 3 : life * (int64_t)percent / 100;
        int64_t spread = before / 8;

        if (ret_renew_after)
                *ret_renew_after = not_before + before;
        return not_before + before + (spread > 0 ? (int64_t)(rnd % (uint64_t)spread) : 0);
}
