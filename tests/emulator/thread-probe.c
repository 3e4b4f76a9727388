/* SPDX-License-Identifier: Apache-2.0 */
/* Run by the integration harness under TEST_EMULATOR (cross builds): can
 * the emulator run a program that creates a thread? tetherd's name lookup
 * (getaddrinfo_a) and libcurl's resolver in tether both do. If it cannot,
 * the harness skips with that reason instead of timing
 * out test by test. Seen: qemu-aarch64 7.2 with -L /usr/aarch64-linux-gnu
 * (the cross toolchain's ld.so) while the multiarch libc6:arm64 was also
 * installed: the loader of one build with the libc.so of another hung in
 * pthread_create; configure now picks one sysroot. */
#include <pthread.h>
#include <stdio.h>

static void *run(void *arg) {
        return arg;
}

int main(void) {
        pthread_t t;

        if (pthread_create(&t, NULL, run, NULL) != 0 || pthread_join(t, NULL) != 0)
                return 1;
        printf("threads ok\n");
        return 0;
}
