/* SPDX-License-Identifier: Apache-2.0 */
/* cloud/bus.c against a real nats-server (written next). */
int main(void) {
        return 77;
}
