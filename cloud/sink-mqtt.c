/* SPDX-License-Identifier: Apache-2.0 */
/* The mqtt sink of the outbound integrations (integrations.h): being
 * written; until then making one fails with -EOPNOTSUPP. */
#include <errno.h>

#include "integrations.h"
#include "log.h"

static int sink_mqtt_new(sd_event *event, const IntegrationConfig *config, const char *node, Integration *owner,
                         void **ret) {
        return log_error_errno(-EOPNOTSUPP, "Integration %s: this build has no mqtt sink.", config->name);
}

const SinkOps sink_mqtt_ops = {
        .kind = "mqtt",
        .new = sink_mqtt_new,
};
