/* SPDX-License-Identifier: Apache-2.0 */
/* libmicrohttpd's messages in our log (mhd-log.c, prefix mhd_log): one
 * place for the policy both HTTP servers share, the API (api.c) and the
 * OTA artifact server (ota.c), so that neither includes the other. No
 * state; safe to call from any MHD_OPTION_EXTERNAL_LOGGER. */
#pragma once

#include <stdarg.h>
#include <stdbool.h>

/* Log a libmicrohttpd message (its MHD_OPTION_EXTERNAL_LOGGER): a warning
 * while starting, debug once running. server is appended to
 * "libmicrohttpd" in the line ("" or " (OTA)"). */
void mhd_log(bool running, const char *server, const char *fmt, va_list ap);
