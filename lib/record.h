/* SPDX-License-Identifier: Apache-2.0 */
/* Framed, checksummed records for append-only state files: the agent's
 * outbox and the cloud's event journal. The codec is pure (no I/O, no
 * logging); record_file_replace() is the one helper that touches the disk.
 *
 * A record on disk, integers little-endian:
 *
 *   magic   u32   kind of file (each file type has its own)
 *   length  u32   payload bytes, at most RECORD_PAYLOAD_MAX
 *   crc     u32   CRC-32 (zlib) over the length field and the payload
 *   payload length bytes
 *
 * A writer appends whole records at the end of the file. A crash can leave
 * a torn record at the end; damage elsewhere (a lost page after a power cut)
 * is skipped by scanning forward to the next record that checks out. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define RECORD_HEADER_SIZE 12u
#define RECORD_PAYLOAD_MAX (1u << 20)

/* Bytes a record with this payload occupies. */
static inline size_t record_size(size_t payload_len) {
        return RECORD_HEADER_SIZE + payload_len;
}

/* Fill in the header of the record at buf: the payload_len bytes of
 * payload must already be at buf + RECORD_HEADER_SIZE. */
void record_seal(uint32_t magic, uint8_t *buf, size_t payload_len);

/* Look at the record starting at buf[0]. 0: valid, *ret_payload and
 * *ret_payload_len point into buf, *ret_size is the whole record's size.
 * -EAGAIN: buf ends before the record does (a torn tail if at EOF).
 * -EBADMSG: no valid record starts here. */
int record_parse(uint32_t magic, const uint8_t *buf, size_t len, const uint8_t **ret_payload,
                 size_t *ret_payload_len, size_t *ret_size);

/* Walk every record of buf[0..len). cb sees each valid payload and its
 * record's offset; a negative return from cb stops the walk and is
 * returned. Damaged bytes are skipped up to the next valid record; the
 * totals go to *ret_skipped (bytes) and *ret_damaged (places), the offset
 * of the first damage to *ret_first_damage (len if none). Returns the
 * offset just past the last valid record: where a writer continues. */
typedef int (*record_fn)(const uint8_t *payload, size_t len, size_t offset, void *userdata);
int64_t record_scan(uint32_t magic, const uint8_t *buf, size_t len, record_fn cb, void *userdata,
                    size_t *ret_skipped, size_t *ret_damaged, size_t *ret_first_damage);

/* Building a payload: append fields; a write past cap sets overflow and
 * is otherwise ignored, so callers check once at the end. */
typedef struct RecordWriter {
        uint8_t *buf;
        size_t len, cap;
        bool overflow;
} RecordWriter;

void record_put_u8(RecordWriter *w, uint8_t v);
void record_put_u32(RecordWriter *w, uint32_t v);
void record_put_u64(RecordWriter *w, uint64_t v);
/* u32 length, then the bytes. */
void record_put_bytes(RecordWriter *w, const void *p, size_t n);

/* Reading a payload: every getter returns -EBADMSG when the payload is too
 * short, and leaves its output untouched then. */
typedef struct RecordReader {
        const uint8_t *p;
        size_t left;
} RecordReader;

int record_get_u8(RecordReader *r, uint8_t *ret);
int record_get_u32(RecordReader *r, uint32_t *ret);
int record_get_u64(RecordReader *r, uint64_t *ret);
/* Points into the payload; at most max bytes accepted. */
int record_get_bytes(RecordReader *r, size_t max, const uint8_t **ret, size_t *ret_len);

/* Replacing a state file atomically: record_file_begin() opens
 * dir/NAME.tmp (truncated, mode 0600); the caller writes it; then
 * record_file_commit() fsyncs it, renames it over dir/NAME and fsyncs the
 * directory. The fd stays open and refers to the new file. On any failure
 * the old file is untouched; record_file_abort() closes and removes the
 * temporary file. Negative errno on failure. */
int record_file_begin(int dir_fd, const char *name, int *ret_fd);
int record_file_commit(int dir_fd, const char *name, int fd);
void record_file_abort(int dir_fd, const char *name, int fd);
/* pwrite() all of buf at off: -EIO on a short write that made no progress,
 * else the errno of the failing call. */
int record_pwrite_all(int fd, const void *buf, size_t len, uint64_t off);
/* The same through fn, pwrite() or a stand-in with its contract (tests
 * make it write part of a record, then crash or fail). */
typedef ssize_t (*record_pwrite_fn)(int fd, const void *buf, size_t n, off_t off);
int record_pwrite_all_with(record_pwrite_fn fn, int fd, const void *buf, size_t len, uint64_t off);
