/* Logging for tether daemons and tools. Messages go to stderr; when
 * stderr is connected to the journal (JOURNAL_STREAM matches it) each line
 * carries a "<N>" priority prefix that journald parses, otherwise a plain
 * "program: " prefix. Library-like code (codecs, parsers) does not log. */
#pragma once

#include <syslog.h>
#include "util.h"

void log_open(const char *program);
void log_set_max_level(int level);
int log_get_max_level(void);
/* The name given to log_open() ("tether" before). */
const char *log_get_program(void);
/* Returns -abs(error) (or 0 when error is 0), so callers can
 * "return log_error_errno(r, ...)". errno is set to abs(error) for %m. */
int log_internal(int level, int error, const char *fmt, ...) _printf_(3, 4);

#define log_debug(...) log_internal(LOG_DEBUG, 0, __VA_ARGS__)
#define log_info(...) log_internal(LOG_INFO, 0, __VA_ARGS__)
#define log_notice(...) log_internal(LOG_NOTICE, 0, __VA_ARGS__)
#define log_warning(...) log_internal(LOG_WARNING, 0, __VA_ARGS__)
#define log_error(...) log_internal(LOG_ERR, 0, __VA_ARGS__)
#define log_debug_errno(e, ...) log_internal(LOG_DEBUG, (e), __VA_ARGS__)
#define log_warning_errno(e, ...) log_internal(LOG_WARNING, (e), __VA_ARGS__)
#define log_error_errno(e, ...) log_internal(LOG_ERR, (e), __VA_ARGS__)
