/* SPDX-License-Identifier: Apache-2.0 */
/* Outbound integrations (integrations.h): being written. */
#include <errno.h>
#include <stdlib.h>

#include "integrations.h"

IntegrationConfig *integration_config_free(IntegrationConfig *c) {
        free(c);
        return NULL;
}
