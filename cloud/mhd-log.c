/* SPDX-License-Identifier: Apache-2.0 */
/* libmicrohttpd's messages in our log (mhd-log.h). */
#include "config.h"

#include <stdio.h>
#include <string.h>

#include "log.h"
#include "mhd-log.h"

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wformat-nonliteral"
void mhd_log(bool running, const char *server, const char *fmt, va_list ap) {
        char buf[512];
        size_t n;

        vsnprintf(buf, sizeof(buf), fmt, ap);
        n = strlen(buf);
        while (n > 0 && buf[n - 1] == '\n')
                buf[--n] = 0;
        /* Once running, MHD mostly reports clients that went away or
         * failed their TLS handshake: not worth a warning each. */
        log_internal(running ? LOG_DEBUG : LOG_WARNING, 0, "libmicrohttpd%s: %s", server, buf);
}
#pragma GCC diagnostic pop
