/* SPDX-License-Identifier: Apache-2.0 */
#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>

#include "debfile.h"
#include "util.h"

extern char **environ;

void debfile_control_done(DebControl *c) {
        if (!c)
                return;
        free(c->package);
        free(c->version);
        free(c->architecture);
        *c = (DebControl){};
}

void debfile_control_argv(const char *path, const char *argv[static 8]) {
        argv[0] = "dpkg-deb";
        argv[1] = "--field";
        argv[2] = path;
        argv[3] = "Package";
        argv[4] = "Version";
        argv[5] = "Architecture";
        argv[6] = "Installed-Size";
        argv[7] = NULL;
}

static bool field_value_ok(const char *v, size_t n) {
        if (n == 0 || n > 256)
                return false;
        for (size_t i = 0; i < n; i++)
                if ((unsigned char)v[i] <= ' ' || (unsigned char)v[i] >= 0x7f)
                        return false;
        return true;
}

int debfile_control_parse(const char *text, size_t len, DebControl *ret) {
        _cleanup_(debfile_control_done) DebControl c = {};
        const char *p, *end;

        if (!text || len > DEBFILE_CONTROL_MAX || memchr(text, 0, len))
                return -EBADMSG;
        p = text;
        end = text + len;
        while (p < end) {
                const char *nl = memchr(p, '\n', (size_t)(end - p)) ?: end;
                const char *colon = memchr(p, ':', (size_t)(nl - p)), *v;
                char **dst = NULL;
                size_t klen, vlen;

                if (!colon)
                        return -EBADMSG;
                klen = (size_t)(colon - p);
                for (v = colon + 1; v < nl && *v == ' '; v++)
                        ;
                vlen = (size_t)(nl - v);
                while (vlen > 0 && (v[vlen - 1] == ' ' || v[vlen - 1] == '\r'))
                        vlen--;
                if (klen == 7 && strncasecmp(p, "Package", 7) == 0)
                        dst = &c.package;
                else if (klen == 7 && strncasecmp(p, "Version", 7) == 0)
                        dst = &c.version;
                else if (klen == 12 && strncasecmp(p, "Architecture", 12) == 0)
                        dst = &c.architecture;
                else if (klen == 14 && strncasecmp(p, "Installed-Size", 14) == 0) {
                        unsigned long long kib = 0;

                        if (vlen == 0 || vlen > 15)
                                return -EBADMSG;
                        for (size_t i = 0; i < vlen; i++) {
                                if (v[i] < '0' || v[i] > '9')
                                        return -EBADMSG;
                                kib = kib * 10 + (unsigned long long)(v[i] - '0');
                        }
                        c.installed_size = kib;
                }
                if (dst) {
                        if (*dst || !field_value_ok(v, vlen))
                                return -EBADMSG;
                        *dst = strndup(v, vlen);
                        if (!*dst)
                                return -ENOMEM;
                }
                p = nl + 1;
        }
        if (!c.package || !c.version || !c.architecture)
                return -EBADMSG;
        *ret = c;
        /* cppcheck-suppress unreadVariable ; moved to *ret; the _cleanup_ handler reads it */
        c = (DebControl){};
        return 0;
}

int debfile_run_capture(const char *const argv[], char *buf, size_t max, size_t *ret_len) {
        posix_spawn_file_actions_t fa;
        posix_spawnattr_t attr;
        sigset_t none;
        int pipefd[2], status, r;
        size_t len = 0;
        pid_t pid;

        if (pipe2(pipefd, O_CLOEXEC) < 0)
                return -errno;
        posix_spawn_file_actions_init(&fa);
        posix_spawn_file_actions_addopen(&fa, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
        posix_spawn_file_actions_adddup2(&fa, pipefd[1], STDOUT_FILENO);
        posix_spawn_file_actions_addopen(&fa, STDERR_FILENO, "/dev/null", O_WRONLY, 0);
        /* The child starts with no signal blocked, whatever our mask is. */
        sigemptyset(&none);
        posix_spawnattr_init(&attr);
        posix_spawnattr_setsigmask(&attr, &none);
        posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK);
        r = posix_spawnp(&pid, argv[0], &fa, &attr, (char *const *)argv, environ);
        posix_spawnattr_destroy(&attr);
        posix_spawn_file_actions_destroy(&fa);
        close(pipefd[1]);
        if (r != 0) {
                close(pipefd[0]);
                return -r;
        }
        for (;;) {
                char tmp[4096];
                ssize_t n = read(pipefd[0], tmp, sizeof(tmp));

                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0)
                        break;
                if (len + (size_t)n <= max) {
                        memcpy(buf + len, tmp, (size_t)n);
                        len += (size_t)n;
                } else
                        len = max + 1; /* too much: remember, keep draining */
        }
        close(pipefd[0]);
        while (waitpid(pid, &status, 0) < 0)
                if (errno != EINTR)
                        return -errno;
        if (len > max)
                return -E2BIG;
        *ret_len = len;
        if (!WIFEXITED(status))
                return 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
        /* posix_spawnp reports a missing program as exit 127 from the child. */
        return WEXITSTATUS(status);
}

int debfile_control_read(const char *path, DebControl *ret) {
        _cleanup_free_ char *buf = malloc(DEBFILE_CONTROL_MAX + 1);
        const char *argv[8];
        size_t len = 0;
        int r;

        if (!buf)
                return -ENOMEM;
        if (access(path, R_OK) < 0)
                return -errno;
        debfile_control_argv(path, argv);
        r = debfile_run_capture(argv, buf, DEBFILE_CONTROL_MAX, &len);
        if (r < 0)
                return r == -E2BIG ? -EBADMSG : r;
        if (r == 127)
                return -ENOENT;
        if (r != 0)
                return -EBADMSG;
        return debfile_control_parse(buf, len, ret);
}

int debfile_sha256_fd(int fd, char ret_hex[static 65], uint64_t *ret_size) {
        EVP_MD_CTX *ctx = EVP_MD_CTX_new();
        uint8_t md[32], buf[65536];
        unsigned mdlen = sizeof(md);
        uint64_t size = 0;
        int r = 0;

        if (!ctx || EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) != 1) {
                EVP_MD_CTX_free(ctx);
                return -ENOMEM;
        }
        for (;;) {
                ssize_t n = read(fd, buf, sizeof(buf));

                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0) {
                        r = -errno;
                        break;
                }
                if (n == 0)
                        break;
                EVP_DigestUpdate(ctx, buf, (size_t)n);
                size += (uint64_t)n;
        }
        if (r == 0 && EVP_DigestFinal_ex(ctx, md, &mdlen) != 1)
                r = -EIO;
        EVP_MD_CTX_free(ctx);
        if (r < 0)
                return r;
        hex_encode(md, 32, ret_hex);
        if (ret_size)
                *ret_size = size;
        return 0;
}

int debfile_sha256(const char *path, char ret_hex[static 65], uint64_t *ret_size) {
        _cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC);

        if (fd < 0)
                return -errno;
        return debfile_sha256_fd(fd, ret_hex, ret_size);
}

int debfile_native_arch(char **ret) {
        static const char *const argv[] = { "dpkg", "--print-architecture", NULL };
        char buf[64];
        size_t len = 0;
        int r;

        r = debfile_run_capture(argv, buf, sizeof(buf) - 1, &len);
        if (r < 0)
                return r;
        if (r != 0)
                return r == 127 ? -ENOENT : -EIO;
        while (len > 0 && (buf[len - 1] == '\n' || buf[len - 1] == ' '))
                len--;
        if (len == 0)
                return -EIO;
        buf[len] = 0;
        *ret = strdup(buf);
        return *ret ? 0 : -ENOMEM;
}
