/* SPDX-License-Identifier: Apache-2.0 */
/* What the parts of the tether CLI share: the command line, the HTTP
 * client on one libcurl easy handle, and the error reporting of
 * docs/cli.md (one "tether: reason" line, exit codes by errno). */
#pragma once

#include <curl/curl.h>
#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "cli-common.h"
#include "proto.h"
#include "util.h"

#define TETHER_RESPONSE_MAX (8u << 20) /* bytes of one JSON response */
#define TETHER_ERROR_TEXT_MAX 300      /* bytes of server error text we print */

/* Exit codes, documented in docs/cli.md. */
enum {
        EXIT_FAILURE_ = 1,  /* anything else */
        EXIT_USAGE = CLI_EXIT_USAGE, /* bad command line or invalid name, nothing sent */
        EXIT_NOT_FOUND = 3, /* HTTP 404: unknown device, function or variable */
        EXIT_OFFLINE = 4,   /* HTTP 503: device offline or busy */
        EXIT_AUTH = 5,      /* HTTP 401/403: missing or bad token */
        EXIT_TIMEOUT = 6,   /* HTTP 504 or no answer in time */
        EXIT_CONNECT = 7,   /* could not reach the API (refused, DNS, TLS) */
        EXIT_NOT_COMMITTED = 8, /* ota: the update ended without a commit */
        EXIT_NOT_ENABLED = 9, /* HTTP 501: the cloud's configuration does not enable it */
};

#define CLI_OTA_TARGETS_MAX 256 /* MANIFEST_TARGETS_MAX */

typedef struct CliArgs {
        const char *api;
        const char *token;
        const char *cacert;
        const char *device; /* subscribe --device */
        const char *reason; /* revoke --reason */
        long timeout_ms;    /* -1: the command's default */
        long long ttl;      /* -1: not given */
        unsigned long count;
        bool json;
        bool private_;
        bool resume; /* subscribe --resume */
        /* ota */
        const char *ota_key;      /* --key: the update signing key */
        const char *ota_url;      /* --url */
        const char *ota_manifest; /* --manifest: a manifest signed beforehand */
        const char *ota_output;   /* --output */
        const char *ota_min_version;
        const char *ota_plugin;
        long long ota_expires;    /* --expires (Unix time), -1: --valid-for */
        long long ota_valid_for;  /* --valid-for seconds, 0: default */
        bool ota_no_wait;
        bool ota_allow_downgrade;               /* --allow-downgrade */
        const char *ota_devices[CLI_OTA_TARGETS_MAX]; /* --device, repeatable (ota sign) */
        size_t n_ota_devices;
        const char *ota_tags[CLI_OTA_TARGETS_MAX]; /* --tag, repeatable */
        size_t n_ota_tags;
        /* tokens create (also --device and --tag above) */
        const char *scopes[16];
        size_t n_scopes;
        const char *token_name;
        long long token_expires; /* --expires seconds, 0: never */
        /* provision create (also --name, --tag above) */
        long long provision_uses;    /* --uses, 0: not given */
        long long provision_expires; /* --expires seconds, 0: not given */
        /* webhooks create (also --name and --tag above) */
        const char *webhook_prefix;
        const char *webhook_secret;
        /* audit */
        bool audit_follow;
        const char *audit_action, *audit_target;
        long long audit_after;
        /* list filters (also --tag above) */
        int list_connected; /* -1: either */
        const char *list_packages[16];
        size_t n_list_packages;
        long long list_heard_within, list_not_heard_within; /* seconds, -1: not given */
} CliArgs;

extern CliArgs arg;

typedef struct Buffer {
        char *data;
        size_t len, cap, max;
} Buffer;

void buffer_done(Buffer *b);
int buffer_append(Buffer *b, const char *p, size_t n);

typedef struct Api {
        CURL *curl;
        struct curl_slist *headers;
        char *base; /* API URL without trailing '/' */
        char errbuf[CURL_ERROR_SIZE];
        Buffer body;
        long status;
        const char *what_400; /* how to word an HTTP 400 for this request */
} Api;

/* in as one line of text into out: C0, DEL and C1 controls (U+0080..U+009F)
 * become spaces, trailing spaces go; cut to size. */
void one_line(const char *in, char *out, size_t size);

int name_check(const char *name, ProtoNameKind kind);
int exit_code_from_errno(int r);
/* The server's diagnostic from a JSON error body, on one line. */
void error_text(const Buffer *body, char *out, size_t size);
/* Log an HTTP error status (a->status, a->body) once; negative errno. */
int http_error(Api *a, const char *what);
int curl_error(Api *a, CURLcode c);
size_t body_write(char *p, size_t size, size_t n, void *userdata);
void api_set_timeouts(Api *a, long total_ms);
/* GET (form == NULL) or POST a form; on 2xx *ret is the JSON body. */
int api_request(Api *a, const char *path, const char *form, json_t **ret);
int print_raw_body(const Api *a);
/* j as one line of compact JSON on stdout: 0 or -ENOMEM (logged). */
int print_json(json_t *j);
/* GET path (request_json()): on success *ret is a JSON array; a body that
 * is not one is logged ("expected a list of what") and -EBADMSG. */
int request_list(Api *a, const char *path, const char *what, json_t **ret);
/* DELETE path (request_json()); with --json the answer is printed. 0 or
 * negative errno (logged). */
int request_delete(Api *a, const char *path);
char *form_field(Api *a, const char *name, const char *value);
const char *json_string_or(json_t *o, const char *key, const char *fallback);

/* tether-admin.c: "tether tokens ...", "tether audit" */
int cmd_tokens(Api *a, char **args, int n);
int cmd_audit(Api *a, char **args, int n);

/* tether-provision.c: "tether provision ..." */
int cmd_provision(Api *a, char **args, int n);
/* A request with a JSON body (NULL: none) and method; *ret as
 * api_request()'s. */
int request_json(Api *a, const char *method, const char *path, json_t *body, json_t **ret);
/* A --expires DURATION: whole seconds, or a number with one of the
 * suffixes s, m, h, d, w; 1 s to 10 years. 0, -EINVAL (malformed) or
 * -ERANGE. */
int provision_duration_parse(const char *s, long long *ret);

/* tether-webhooks.c: "tether webhooks ...", "tether integrations list" */
int cmd_webhooks(Api *a, char **args, int n);
int cmd_integrations(Api *a, char **args, int n);

/* tether-inventory.c: "tether rename|notes|tag|untag" */
int cmd_rename(Api *a, char **args, int n);
int cmd_notes(Api *a, char **args, int n);
int cmd_tag(Api *a, char **args, int n);
int cmd_untag(Api *a, char **args, int n);
/* tether-campaign.c: "tether campaign ..." (its options follow the word) */
int cmd_campaign(Api *a, char **args, int n);
void campaign_help(void);

/* tether-ota.c: "tether ota ..." */
int cmd_ota(Api *a, char **args, int n);
void ota_help(void);

/* tether-tunnel.c: "tether tunnel ..." (its options follow the word) */
int cmd_tunnel(Api *a, char **args, int n);
void tunnel_help(void);

/* tether-logs.c: "tether logs ..." (its options follow the word) */
int cmd_logs(Api *a, char **args, int n);
void logs_help(void);
