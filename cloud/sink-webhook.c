/* SPDX-License-Identifier: Apache-2.0 */
/* The webhook sink of the outbound integrations (integrations.h): being
 * written; until then making one fails with -EOPNOTSUPP. */
#include <errno.h>

#include "integrations.h"
#include "log.h"

static int sink_webhook_new(sd_event *event, const IntegrationConfig *config, const char *node, Integration *owner,
                         void **ret) {
        return log_error_errno(-EOPNOTSUPP, "Integration %s: this build has no webhook sink.", config->name);
}

const SinkOps sink_webhook_ops = {
        .kind = "webhook",
        .new = sink_webhook_new,
};
