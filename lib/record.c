/* SPDX-License-Identifier: Apache-2.0 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "record.h"

static void put_le32(uint8_t *p, uint32_t v) {
        p[0] = (uint8_t)v;
        p[1] = (uint8_t)(v >> 8);
        p[2] = (uint8_t)(v >> 16);
        p[3] = (uint8_t)(v >> 24);
}

static uint32_t get_le32(const uint8_t *p) {
        return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

void record_seal(uint32_t magic, uint8_t *buf, size_t payload_len) {
        put_le32(buf, magic);
        put_le32(buf + 4, (uint32_t)payload_len);
        /* The CRC field sits between length and payload: compute around it. */
        {
                uLong c = crc32(0L, Z_NULL, 0);
                c = crc32(c, buf + 4, 4);
                if (payload_len > 0)
                        c = crc32(c, buf + RECORD_HEADER_SIZE, (uInt)payload_len);
                put_le32(buf + 8, (uint32_t)c);
        }
}

int record_parse(uint32_t magic, const uint8_t *buf, size_t len, const uint8_t **ret_payload,
                 size_t *ret_payload_len, size_t *ret_size) {
        uint8_t m[4];
        uint32_t n;
        uLong c;

        if (len == 0)
                return -EAGAIN;
        put_le32(m, magic);
        if (len < 4)
                return memcmp(buf, m, len) == 0 ? -EAGAIN : -EBADMSG;
        if (get_le32(buf) != magic)
                return -EBADMSG;
        if (len < RECORD_HEADER_SIZE)
                return -EAGAIN;
        n = get_le32(buf + 4);
        if (n > RECORD_PAYLOAD_MAX)
                return -EBADMSG;
        if (len - RECORD_HEADER_SIZE < n)
                return -EAGAIN;
        c = crc32(0L, Z_NULL, 0);
        c = crc32(c, buf + 4, 4);
        if (n > 0)
                c = crc32(c, buf + RECORD_HEADER_SIZE, n);
        if ((uint32_t)c != get_le32(buf + 8))
                return -EBADMSG;
        *ret_payload = buf + RECORD_HEADER_SIZE;
        *ret_payload_len = n;
        *ret_size = RECORD_HEADER_SIZE + n;
        return 0;
}

int64_t record_scan(uint32_t magic, const uint8_t *buf, size_t len, record_fn cb, void *userdata,
                    size_t *ret_skipped, size_t *ret_damaged, size_t *ret_first_damage) {
        size_t off = 0, end = 0, skipped = 0, damaged = 0, first = len;
        bool in_damage = false;

        while (off < len) {
                const uint8_t *payload;
                size_t plen, size;
                int r = record_parse(magic, buf + off, len - off, &payload, &plen, &size);

                if (r == 0) {
                        r = cb ? cb(payload, plen, off, userdata) : 0;
                        if (r < 0)
                                return r;
                        in_damage = false;
                        off += size;
                        end = off;
                        continue;
                }
                /* Not a record here: a torn tail or damage. Either way skip
                 * one byte and look again; what is skipped is counted. */
                if (!in_damage) {
                        damaged++;
                        if (first == len)
                                first = off;
                        in_damage = true;
                }
                skipped++;
                off++;
        }
        if (ret_skipped)
                *ret_skipped = skipped;
        if (ret_damaged)
                *ret_damaged = damaged;
        if (ret_first_damage)
                *ret_first_damage = first;
        return (int64_t)end;
}

void record_put_u8(RecordWriter *w, uint8_t v) {
        if (w->overflow || w->cap - w->len < 1) {
                w->overflow = true;
                return;
        }
        w->buf[w->len++] = v;
}

void record_put_u32(RecordWriter *w, uint32_t v) {
        if (w->overflow || w->cap - w->len < 4) {
                w->overflow = true;
                return;
        }
        put_le32(w->buf + w->len, v);
        w->len += 4;
}

void record_put_u64(RecordWriter *w, uint64_t v) {
        record_put_u32(w, (uint32_t)v);
        record_put_u32(w, (uint32_t)(v >> 32));
}

void record_put_bytes(RecordWriter *w, const void *p, size_t n) {
        if (n > UINT32_MAX) {
                w->overflow = true;
                return;
        }
        record_put_u32(w, (uint32_t)n);
        if (w->overflow || w->cap - w->len < n) {
                w->overflow = true;
                return;
        }
        if (n > 0)
                memcpy(w->buf + w->len, p, n);
        w->len += n;
}

int record_get_u8(RecordReader *r, uint8_t *ret) {
        if (r->left < 1)
                return -EBADMSG;
        *ret = r->p[0];
        r->p++;
        r->left--;
        return 0;
}

int record_get_u32(RecordReader *r, uint32_t *ret) {
        if (r->left < 4)
                return -EBADMSG;
        *ret = get_le32(r->p);
        r->p += 4;
        r->left -= 4;
        return 0;
}

int record_get_u64(RecordReader *r, uint64_t *ret) {
        uint32_t lo, hi;

        if (r->left < 8)
                return -EBADMSG;
        lo = get_le32(r->p);
        hi = get_le32(r->p + 4);
        r->p += 8;
        r->left -= 8;
        *ret = (uint64_t)hi << 32 | lo;
        return 0;
}

int record_get_bytes(RecordReader *r, size_t max, const uint8_t **ret, size_t *ret_len) {
        uint32_t n;

        if (r->left < 4)
                return -EBADMSG;
        n = get_le32(r->p);
        if (n > max || r->left - 4 < n)
                return -EBADMSG;
        *ret = r->p + 4;
        *ret_len = n;
        r->p += 4 + n;
        r->left -= 4 + n;
        return 0;
}

static int tmp_name(const char *name, char buf[static 256]) {
        int n = snprintf(buf, 256, "%s.tmp", name);

        return n < 0 || n >= 256 ? -ENAMETOOLONG : 0;
}

int record_file_begin(int dir_fd, const char *name, int *ret_fd) {
        char tmp[256];
        int fd, r;

        r = tmp_name(name, tmp);
        if (r < 0)
                return r;
        fd = openat(dir_fd, tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
        if (fd < 0)
                return -errno;
        *ret_fd = fd;
        return 0;
}

int record_file_commit(int dir_fd, const char *name, int fd) {
        char tmp[256];
        int r;

        r = tmp_name(name, tmp);
        if (r < 0)
                return r;
        if (fsync(fd) < 0)
                return -errno;
        if (renameat(dir_fd, tmp, dir_fd, name) < 0)
                return -errno;
        if (fsync(dir_fd) < 0)
                return -errno;
        return 0;
}

void record_file_abort(int dir_fd, const char *name, int fd) {
        char tmp[256];

        if (fd >= 0)
                close(fd);
        if (tmp_name(name, tmp) == 0)
                (void)unlinkat(dir_fd, tmp, 0);
}

int record_pwrite_all(int fd, const void *buf, size_t len, uint64_t off) {
        return record_pwrite_all_with(pwrite, fd, buf, len, off);
}

int record_pwrite_all_with(record_pwrite_fn fn, int fd, const void *buf, size_t len, uint64_t off) {
        const uint8_t *p = buf;

        while (len > 0) {
                ssize_t n = fn(fd, p, len, (off_t)off);

                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                if (n == 0)
                        return -EIO;
                p += n;
                len -= (size_t)n;
                off += (uint64_t)n;
        }
        return 0;
}
