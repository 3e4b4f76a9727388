/* SPDX-License-Identifier: Apache-2.0 */
/* Debian package versions ([epoch:]upstream[-revision]) compared the way
 * dpkg compares them (deb-version(7)). Pure functions, no allocation. */
#pragma once

#include <stdbool.h>

/* 0 if s is a version dpkg accepts without complaint: optional numeric
 * epoch, an upstream part starting with a digit made of
 * [A-Za-z0-9.+~-:] (':' only with an epoch, '-' only with a revision), an
 * optional revision of [A-Za-z0-9.+~]; at most 128 bytes. -EINVAL
 * otherwise. */
int debversion_check(const char *s);

/* <0, 0 or >0 as a is older than, equal to or newer than b. Both must
 * pass debversion_check(). */
int debversion_compare(const char *a, const char *b);
