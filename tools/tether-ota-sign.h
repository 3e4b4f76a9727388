/* SPDX-License-Identifier: Apache-2.0 */
/* Signing and uploading for "tether ota" and "tether campaign"
 * (tether-ota-sign.c): the operator's update key, a .deb's identity, a
 * signed manifest for it, the artifact upload. Everything logs its
 * errors and returns negative errno values. */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "debfile.h"
#include "tether-cli.h"

#define OTA_DEFAULT_VALID_SEC (7 * 86400LL)

/* The .deb's identity: control fields, size, SHA-256. */
typedef struct DebInfo {
        DebControl control;
        char sha256[65];
        uint64_t size;
} DebInfo;

/* The whole file path, at most max bytes, NUL-terminated. */
int cli_read_file(const char *path, size_t max, char **ret, size_t *ret_len);
/* --key, else $TETHER_OTA_KEY, else NULL. */
const char *ota_key_path(void);
int deb_info(const char *path, DebInfo *ret);
void deb_info_done(DebInfo *d);
/* A signed manifest (the envelope, *ret the caller's) for deb at url
 * (NULL: none), for devices and tags (at most MANIFEST_TARGETS_MAX
 * together), with the --min-version, --plugin, --allow-downgrade,
 * --expires/--valid-for options and the key of ota_key_path(). */
int ota_sign_manifest(const DebInfo *deb, const char *url, const char *const *devices, size_t n_devices,
                      const char *const *tags, size_t n_tags, char **ret, size_t *ret_len);
/* The size of the manifest body ota_sign_manifest() would sign for these
 * devices (no tags), for packing devices into manifests. */
int ota_manifest_body_size(const DebInfo *deb, const char *url, const char *const *devices, size_t n_devices,
                           size_t *ret);
/* The artifact's URL for devices; uploads the file at path unless the
 * cloud has it already (a progress bar on a terminal). */
int ota_upload_artifact(Api *a, const char *path, const DebInfo *deb, char **ret_url);
/* A progress bar on stderr: "\rwhat [####....] pct% done/total MB". */
void ota_bar(const char *what, uint64_t done, uint64_t total);
/* Back to a plain request after an upload on a->curl. */
void ota_curl_reset_method(Api *a);
