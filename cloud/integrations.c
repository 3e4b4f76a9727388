/* SPDX-License-Identifier: Apache-2.0 */
/* Outbound integrations (integrations.h): being written. */
#include "integrations.h"
