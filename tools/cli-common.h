/* SPDX-License-Identifier: Apache-2.0 */
/* What every tether command-line tool (tether, tetherctl, tether-pki)
 * shares: how a bad command line is reported. Each tool keeps its own
 * wording of the reasons. */
#pragma once

#include "util.h"

/* The exit status of a bad command line, in every tool. */
#define CLI_EXIT_USAGE 2

/* Log "reason (see 'PROGRAM --help')", PROGRAM being the name given to
 * log_open(). Returns -EINVAL. */
int cli_usage_error(const char *fmt, ...) _printf_(1, 2);
