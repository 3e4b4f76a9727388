/* Run by the integration harness under TEST_EMULATOR (cross builds): can
 * the emulator run a program that creates a thread? tetherd's name lookup
 * (getaddrinfo_a) and libcurl's resolver in tether both do. qemu-user 7.2
 * (Debian 12) was seen hanging in the first pthread_create on a 6.18
 * host kernel; the harness then skips with that reason instead of timing
 * out test by test. */
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
