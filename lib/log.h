/* SPDX-License-Identifier: Apache-2.0 */
/* Logging for tether daemons and tools. Messages go to stderr; when
 * stderr is connected to the journal (JOURNAL_STREAM matches it) each line
 * carries a "<N>" priority prefix that journald parses, otherwise a plain
 * "program: " prefix. Library-like code (codecs, parsers) does not log.
 *
 * log_struct() is for the few events an operator filters on (connected,
 * disconnected, refused, OTA committed and rolled back): when stderr is the
 * journal and the daemon installed a sender (log_set_journal_sender()), the
 * message goes to the journal with a MESSAGE_ID and TETHER_* fields, see
 * docs/man/tetherd.8 and docs/man/tether-cloudd.8; otherwise it is an
 * ordinary line on stderr like any other. */
#pragma once

#include <sys/uio.h>
#include <syslog.h>
#include "util.h"

/* MESSAGE_IDs (journalctl MESSAGE_ID=...): fixed once, never changed.
 * The cloud's are explained in etc/tether-cloud.catalog, the agent's in
 * etc/tether-agent.catalog. */
/* tether-cloudd: a device connected, disconnected, was refused. */
#define LOG_MESSAGE_DEVICE_CONNECTED "8ccaab62229c43b483c3c0e7fac4b6b0"
#define LOG_MESSAGE_DEVICE_DISCONNECTED "3473fcfe0d5d42d8b454b0f4f0fe7447"
#define LOG_MESSAGE_DEVICE_REFUSED "3dbf9d5ac43a48ef9ef8221e0f35b15f"
/* tetherd: connected to the cloud, disconnected from it. */
#define LOG_MESSAGE_CLOUD_CONNECTED "e9689acb650d4e52bfa51c62bd3e3f88"
#define LOG_MESSAGE_CLOUD_DISCONNECTED "646e3774ebaa4fa19d25f9036071b16a"
/* tetherd: an OTA job ended committed, or rolled back. */
#define LOG_MESSAGE_OTA_COMMITTED "151f530498d74ab6959bd926ca2b7a49"
#define LOG_MESSAGE_OTA_ROLLED_BACK "ad6856305bc1453ebbb9d1ee79fb567d"

/* The fields of a structured message; NULL ones are left out. The strings
 * are borrowed for the call. */
typedef struct LogFields {
        const char *message_id; /* a LOG_MESSAGE_* */
        const char *device_id;  /* TETHER_DEVICE_ID= */
        const char *job_id;     /* TETHER_JOB_ID= (an OTA job) */
        const char *peer;       /* TETHER_PEER= address[:port] of the other side */
} LogFields;

/* MESSAGE, PRIORITY, SYSLOG_IDENTIFIER and the four above. */
#define LOG_FIELDS_MAX 7
/* TETHER_* values longer than this are cut. */
#define LOG_FIELD_VALUE_MAX 256

void log_open(const char *program);
void log_set_max_level(int level);
int log_get_max_level(void);
/* The name given to log_open() ("tether" before). */
const char *log_get_program(void);
/* Returns -abs(error) (or 0 when error is 0), so callers can
 * "return log_error_errno(r, ...)". errno is set to abs(error) for %m. */
int log_internal(int level, int error, const char *fmt, ...) _printf_(3, 4);

/* Like log_internal(), with fields for the journal. */
int log_struct_internal(int level, int error, const LogFields *fields, const char *fmt, ...) _printf_(4, 5);
/* log_struct(level, fields, fmt, ...); fields may be a compound literal. */
#define log_struct(level, ...) log_struct_internal((level), 0, __VA_ARGS__)

/* Where log_struct() sends when stderr is the journal: sd_journal_sendv
 * (the daemons pass it; tools, which do not link libsystemd, pass
 * nothing and log_struct() writes to stderr). */
void log_set_journal_sender(int (*send)(const struct iovec *iov, int n));

/* The journal fields of one structured message as "KEY=value" strings:
 * MESSAGE=message, PRIORITY=level, SYSLOG_IDENTIFIER=program,
 * then those of f that are set. Values of MESSAGE_ID and TETHER_* fields
 * may come from peers: bytes outside printable ASCII become '?' and they
 * are cut at LOG_FIELD_VALUE_MAX bytes. Fills ret_fields[0..n-1] with
 * malloc'd strings (free with log_fields_free()) and returns n, or -ENOMEM
 * with ret_fields untouched. */
int log_fields_format(int level, const char *program, const LogFields *f, const char *message,
                      char *ret_fields[LOG_FIELDS_MAX]);
void log_fields_free(char **fields, int n);

#define log_debug(...) log_internal(LOG_DEBUG, 0, __VA_ARGS__)
#define log_info(...) log_internal(LOG_INFO, 0, __VA_ARGS__)
#define log_notice(...) log_internal(LOG_NOTICE, 0, __VA_ARGS__)
#define log_warning(...) log_internal(LOG_WARNING, 0, __VA_ARGS__)
#define log_error(...) log_internal(LOG_ERR, 0, __VA_ARGS__)
#define log_debug_errno(e, ...) log_internal(LOG_DEBUG, (e), __VA_ARGS__)
#define log_warning_errno(e, ...) log_internal(LOG_WARNING, (e), __VA_ARGS__)
#define log_error_errno(e, ...) log_internal(LOG_ERR, (e), __VA_ARGS__)
