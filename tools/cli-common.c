/* SPDX-License-Identifier: Apache-2.0 */
#include <stdarg.h>

#include "cli-common.h"
#include "log.h"

int cli_usage_error(const char *fmt, ...) {
        char msg[512];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);
        log_error("%s (see '%s --help')", msg, log_get_program());
        return -EINVAL;
}
