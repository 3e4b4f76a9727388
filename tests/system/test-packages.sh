#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# System test: the built .deb packages in a real Debian 12 booted with
# systemd-nspawn.
#
#   tests/system/test-packages.sh DEBDIR
#
# A Debian bookworm root is built with mmdebstrap (cached under
# $TETHER_ROOTFS_CACHE, default /var/cache/tether-test, keyed on a hash of
# its package list, which includes every dependency of the packages under
# test; with no mirror argument mmdebstrap reuses the host's apt sources),
# copied to a scratch directory and booted with
# "systemd-nspawn -b --register=no --keep-unit --private-network".
# Commands run inside with nsenter. The container has only a loopback
# network: the cloud and the agent talk to each other inside it.
#
# Steps, each logged with "==> [N] ...": install the packages, check the
# user, key and units, make a PKI and start tether-cloudd with the built-in
# signer, enroll the device as a gateway image does (a provisioning token
# in /etc/tether/provision-token, read by the packaged tetherd.conf at the
# agent's start), systemctl start tetherd until the device is online in the
# cloud, the STATUS line, the journal's
# structured fields and message catalogs, reload (agent, then
# cloud) keeping the connection, watchdog kill and restart of a stopped agent,
# `tether logs -f` showing a probe line within 1 s, apt-get remove
# (state kept) and purge (nothing left behind).
#
# Exit 77 (skip) with the reason when this machine cannot boot a container.
set -uo pipefail

debdir=${1:-}
cache=${TETHER_ROOTFS_CACHE:-/var/cache/tether-test}
suite=bookworm
# Packages the root gets besides what the .debs depend on.
BASE_PACKAGES=(systemd systemd-sysv dbus apt man-db)
. "$(dirname "$0")/lib.sh"

[ -n "$debdir" ] && [ -d "$debdir" ] || { echo "usage: $0 DEBDIR" >&2; exit 2; }
debdir=$(cd "$debdir" && pwd)
[ "$(id -u)" -eq 0 ] || skip "needs root (mmdebstrap, systemd-nspawn)"
for tool in mmdebstrap systemd-nspawn nsenter; do
    command -v "$tool" >/dev/null || skip "$tool is not installed (tools/dev packaging-deps)"
done
shopt -s nullglob
debs=()
for d in "$debdir"/tether-{agent,cloud,cli}_*.deb; do debs+=("$d"); done
[ ${#debs[@]} -eq 3 ] || fail "expected tether-agent, tether-cloud and tether-cli .debs in $debdir, found: ${debs[*]:-none}"
arch=$(dpkg-deb -f "${debs[0]}" Architecture)
[ "$arch" = "$(dpkg --print-architecture)" ] || skip "packages are for $arch, this machine is $(dpkg --print-architecture)"

scratch=$(mktemp -d /var/tmp/tether-systest.XXXXXX)
machine="tether-systest-$$"

trap container_cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------
step "Debian $suite root (mmdebstrap, cached in $cache)"
# The plugin packages' dependencies too (the container has no network);
# dependencies on our own packages come from the .debs themselves.
deps=$(for d in "${debs[@]}" "$debdir"/tether-plugin-*_*.deb; do dpkg-deb -f "$d" Depends; done | tr ',' '\n' |
    sed -e 's/(.*)//' -e 's/|.*//' -e 's/:any//' -e 's/[[:space:]]//g' | grep -v '^$' | grep -v '^tether-')
packages=$(printf '%s\n' "${BASE_PACKAGES[@]}" $deps | sort -u | tr '\n' ',' | sed 's/,$//')
container_root "$suite" "$packages" v4
ok "copied to $scratch/root"

# ---------------------------------------------------------------------------
step "boot it: systemd-nspawn -b --register=no --keep-unit --private-network"
container_boot "$machine" --bind-ro="$debdir":/debs
ctr systemctl --version | head -n1 | sed 's/^/    /'

# Files before anything of ours is installed, to prove purge leaves none
# (caches and logs of other tools excluded: apt, dpkg, man-db, journal).
snapshot() {
    ctr find / -xdev \( -path /proc -o -path /sys -o -path /dev -o -path /run -o -path /tmp -o -path /var/tmp \
        -o -path /var/log -o -path /var/cache/apt -o -path /var/cache/debconf -o -path /var/lib/apt \
        -o -path /var/lib/dpkg -o -path /var/cache/ldconfig -o -path /var/cache/man -o -path /debs -o -path /root \
        -o -path /var/lib/systemd/catalog -o -path /var/lib/systemd/random-seed \) -prune -o -print |
        grep -v -E '^/etc/(passwd|group|shadow|gshadow)-?$' | sort
}
snapshot >"$scratch/files-before"

# ---------------------------------------------------------------------------
step "apt-get install ./tether-{agent,cloud,cli}_*.deb"
names=()
for d in "${debs[@]}"; do names+=("/debs/$(basename "$d")"); done
ctr env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${names[@]}" \
    >"$scratch/install.log" 2>&1 || { tail -n 30 "$scratch/install.log"; fail "apt-get install failed"; }
grep -E '^(Setting up|Unpacking) tether' "$scratch/install.log" | sed 's/^/    /'
ctr dpkg-query -W -f='    ${Package} ${Version} ${Status}\n' tether-agent tether-cloud tether-cli

step "user, groups, device key, directories"
ctr id tether | grep -q '(gpio)' || fail "user tether is not ctr group gpio: $(ctr id tether)"
ok "$(ctr id tether)"
ctr id tether-cloud >/dev/null || fail "no user tether-cloud"
keystat=$(ctr stat -c '%a %U:%G' /var/lib/tether/device.key) || fail "no device key after install"
[ "$keystat" = "600 tether:tether" ] || fail "device key is $keystat, expected 600 tether:tether"
ok "device key /var/lib/tether/device.key: $keystat"
key_sum=$(ctr sha256sum /var/lib/tether/device.key | cut -d' ' -f1)
dirstat=$(ctr stat -c '%a %U:%G' /var/lib/tether)
[ "$dirstat" = "750 tether:tether" ] || fail "/var/lib/tether is $dirstat"
ok "/var/lib/tether: $dirstat"
ctr grep -q '^/etc/tether/tetherd.conf$' /var/lib/dpkg/info/tether-agent.conffiles || fail "tetherd.conf is not a conffile"
ok "conffiles: $(ctr cat /var/lib/dpkg/info/tether-agent.conffiles /var/lib/dpkg/info/tether-cloud.conffiles | tr '\n' ' ')"

step "units: enabled state, systemd-analyze verify and security"
[ "$(ctr systemctl is-enabled tetherd.service)" = enabled ] || fail "tetherd.service not enabled by the package"
[ "$(ctr systemctl is-enabled tether-cloudd.service)" = disabled ] || fail "tether-cloudd.service should be installed disabled"
ok "tetherd.service enabled, tether-cloudd.service disabled (needs its PKI first)"
for u in tetherd.service tether-cloudd.service; do
    out=$(ctr systemd-analyze verify "$u" 2>&1)
    [ -z "$out" ] || fail "systemd-analyze verify $u: $out"
    ok "systemd-analyze verify $u: clean"
done
for u in tetherd.service tether-cloudd.service; do
    ctr systemd-analyze security --no-pager "$u" >"$scratch/security-$u.txt" 2>&1
    exposure=$(grep -o 'Overall exposure level for .*' "$scratch/security-$u.txt")
    log "    systemd-analyze security: $exposure"
    grep -E '^✗' "$scratch/security-$u.txt" | sed 's/^/        /' | head -n 20
done
# Freshly installed, before enrollment, the agent is up (READY=1) and says
# where it connects (it retries until its CA and certificate are there).
[ "$(ctr systemctl is-active tetherd)" = active ] || fail "tetherd is $(ctr systemctl is-active tetherd) after install"
status_text=$(ctr systemctl show -p StatusText --value tetherd)
[[ $status_text == "Not enrolled"*"/etc/tether/provision-token"* ]] ||
    fail "before enrollment the status does not say how to enroll: $status_text"
ok "before enrollment: tetherd active, status: $status_text"

# ---------------------------------------------------------------------------
step "cloud: PKI with tether-pki, systemctl enable --now tether-cloudd"
ctr tether-pki ca /etc/tether/pki >/dev/null
ctr tether-pki server /etc/tether/pki localhost 127.0.0.1 >/dev/null
ctr sh -ec 'install -m 0644 /etc/tether/pki/ca.crt /etc/tether/ca.crt
    install -m 0644 /etc/tether/pki/server.crt /etc/tether/cloud.crt
    install -m 0640 -g tether-cloud /etc/tether/pki/server.key /etc/tether/cloud.key
    tether-pki token /etc/tether/api-tokens > /etc/tether/token
    chgrp tether-cloud /etc/tether/api-tokens; chmod 0640 /etc/tether/api-tokens
    chgrp tether-cloud /etc/tether/pki/ca.key; chmod 0640 /etc/tether/pki/ca.key
    printf "\n[Enroll]\nCACertificate=/etc/tether/pki/ca.crt\nCAKey=/etc/tether/pki/ca.key\n" >> /etc/tether/tether-cloudd.conf'
token=$(ctr cat /etc/tether/token | tail -n1)
# The packaged configuration serves the API over HTTPS with cloud.crt.
api_env=(TETHER_API=https://127.0.0.1:8080 TETHER_CACERT=/etc/tether/ca.crt)
ctr systemctl enable --now tether-cloudd.service 2>&1 | sed 's/^/    /'
[ "$(ctr systemctl is-active tether-cloudd)" = active ] || fail "tether-cloudd is $(ctr systemctl is-active tether-cloudd)"
ok "tether-cloudd active: $(ctr systemctl show -p StatusText --value tether-cloudd)"
wait_for 10 "the HTTPS API" ctr env "${api_env[@]}" TETHER_TOKEN="$token" tether list ||
    fail "the packaged API does not answer over HTTPS: $(ctr env "${api_env[@]}" TETHER_TOKEN="$token" tether list 2>&1)"
ctr env TETHER_API=http://127.0.0.1:8080 TETHER_TOKEN="$token" tether list >/dev/null 2>&1 &&
    fail "the packaged API answered plain HTTP"
ok "the API answers over HTTPS (CA /etc/tether/ca.crt) and not over plain HTTP"

step "enroll the device as a gateway image does: a provisioning token in /etc/tether/provision-token"
# The image's first boot: the token is in place before the agent starts.
ctr systemctl stop tetherd.service
ptoken=$(ctr env "${api_env[@]}" TETHER_TOKEN="$token" tether provision create --uses 1 --expires 1h \
    --tag site=systest --name image-batch 2>"$scratch/provision.err") ||
    fail "tether provision create: $(cat "$scratch/provision.err")"
[[ $ptoken == tprov_* ]] || fail "tether provision create printed '$ptoken'"
ctr sh -ec "umask 027; printf '# the image batch token\\n%s\\n' '$ptoken' > /etc/tether/provision-token
    chgrp tether /etc/tether/provision-token"
# The ID the device will ask for: derived from the key the package made.
ctr sh -c 'tetherctl csr >/dev/null' 2>"$scratch/csr.err" || fail "tetherctl csr: $(cat "$scratch/csr.err")"
dev=$(awk '{print $NF}' "$scratch/csr.err")
ctr test -e /var/lib/tether/device.crt && fail "a certificate exists before enrollment"
ok "token $(cut -c1-10 <<<"$ptoken")... (1 use, 1 h, tag site=systest) in /etc/tether/provision-token (0640 root:tether); device $dev has no certificate"

# ---------------------------------------------------------------------------
step "systemctl start tetherd: active, and online in the cloud"
ctr systemctl start tetherd.service || fail "systemctl start tetherd failed"
[ "$(ctr systemctl is-active tetherd)" = active ] || fail "tetherd is $(ctr systemctl is-active tetherd)"
ok "tetherd.service active (Type=notify: READY=1 received)"
online() { ctr env "${api_env[@]}" TETHER_TOKEN="$token" tether list | awk -v d="$dev" '$1 == d && $2 == "online" { f = 1 } END { exit !f }'; }
wait_for 30 "device online" online || fail "device $dev not online in the cloud: $(ctr env "${api_env[@]}" TETHER_TOKEN="$token" tether list 2>&1) $(ctr journalctl -u tetherd -o cat | tail -n 5)"
ok "$(ctr env "${api_env[@]}" TETHER_TOKEN="$token" tether list | sed -n 2p)"
ctr env "${api_env[@]}" TETHER_TOKEN="$token" tether list | sed 's/^/    /'
enrolled() { ctr journalctl -u tetherd -o cat | grep "Enrolled as device '$dev'" >/dev/null; }
enrolled || fail "the agent did not log its enrollment: $(ctr journalctl -u tetherd -o cat | tail -n 5)"
[ "$(ctr stat -c '%U %a' /var/lib/tether/device.crt)" = "tether 644" ] ||
    fail "device.crt is $(ctr stat -c '%U %a' /var/lib/tether/device.crt), not tether 644"
describe=$(ctr env "${api_env[@]}" TETHER_TOKEN="$token" tether describe "$dev" 2>&1)
grep -q 'site' <<<"$describe" && grep -q 'systest' <<<"$describe" || fail "tether describe shows no tag site=systest: $describe"
state=$(ctr env "${api_env[@]}" TETHER_TOKEN="$token" tether provision list 2>&1)
grep -q 'used-up' <<<"$state" || fail "the single-use token is not used up: $state"
ok "enrolled from the token file at start (journal: Enrolled as device '$dev'), device.crt owned by tether, tag site=systest, token used up"
grep -iE 'cert|tag|site' <<<"$describe" | sed 's/^/    /'

step "systemctl status shows the STATUS line naming the cloud"
ctr systemctl status --no-pager tetherd >"$scratch/status.txt" 2>&1
status_line=$(grep -E '^ +Status: ' "$scratch/status.txt") || { cat "$scratch/status.txt"; fail "no Status: line"; }
echo "$status_line" | grep -q 'Connected to localhost:5684' || fail "status line does not name the cloud: $status_line"
sed -n '1,6p' "$scratch/status.txt" | sed 's/^/    /'
ctr tetherctl status | sed 's/^/    /'

step "tetherctl as a member of group tether, and refused as another user"
# Through the shipped unit's sandbox (PrivateUsers=: peer credentials are
# seen through the agent's user namespace).
ctr systemd-sysusers --inline 'u tethertest-op - "operator"' 'm tethertest-op tether' 'u tethertest-other - "someone else"'
ctr runuser -u tethertest-op -- tetherctl status >/dev/null || fail "a member of group tether cannot use tetherctl"
ctr runuser -u tethertest-op -- tetherctl publish shell/test hello || fail "a member of group tether cannot publish"
ok "tethertest-op (in group tether): status and publish allowed"
rc=0
ctr runuser -u tethertest-other -- tetherctl status >/dev/null 2>"$scratch/denied.err" || rc=$?
[ $rc -eq 3 ] || fail "a user outside group tether got exit $rc: $(cat "$scratch/denied.err")"
ok "tethertest-other: exit 3, $(cat "$scratch/denied.err")"
ctr journalctl -u tetherd -o cat | grep 'refused a request' | tail -n 1 | sed 's/^/    | /'
ctr sh -c 'for u in tethertest-op tethertest-other; do sed -i "/^$u:/d" /etc/passwd /etc/shadow /etc/group /etc/gshadow; done; sed -i "s/,tethertest-op//; s/:tethertest-op$/:/" /etc/group /etc/gshadow'

# ---------------------------------------------------------------------------
step "journal: connections found by MESSAGE_ID and TETHER_DEVICE_ID, explained by the catalogs"
# The ids of lib/log.h (docs/man/tetherd.8, tether-cloudd.8, "JOURNAL").
id_device_connected=8ccaab62229c43b483c3c0e7fac4b6b0
id_cloud_connected=e9689acb650d4e52bfa51c62bd3e3f88
# Output is captured before grep looks at it: a grep -q that stops early
# would kill journalctl with SIGPIPE and, under pipefail, fail the test.
for side in cloud agent; do
    if [ $side = cloud ]; then id=$id_device_connected unit=tether-cloudd.service text="Device '$dev' connected from "
    else id=$id_cloud_connected unit=tetherd.service text="Connected to localhost:5684"; fi
    found() { out=$(ctr journalctl -o verbose MESSAGE_ID=$id TETHER_DEVICE_ID="$dev" 2>&1); [[ $out == *"$text"* ]]; }
    wait_for 10 "$side's connected message in the journal" found ||
        fail "journalctl MESSAGE_ID=$id TETHER_DEVICE_ID=$dev has no '$text': $out"
    for field in "_SYSTEMD_UNIT=$unit" "TETHER_PEER=" "SYSLOG_IDENTIFIER=${unit%.service}" "PRIORITY=6"; do
        [[ $out == *"$field"* ]] || fail "the $side's connected message has no $field: $out"
    done
    ok "$side: journalctl MESSAGE_ID=$id TETHER_DEVICE_ID=$dev -> $(grep -o 'TETHER_PEER=.*' <<<"$out" | head -n 1), from $unit"
done
# A device id that never connected finds nothing: the match is on the field.
out=$(ctr journalctl -o cat MESSAGE_ID=$id_device_connected TETHER_DEVICE_ID=no-such-device 2>&1)
[[ $out == *"connected"* ]] && fail "TETHER_DEVICE_ID=no-such-device matched: $out"
# The catalogs: installed by the packages, compiled by systemd's dpkg trigger.
catalog=$(ctr journalctl --list-catalog 2>&1)
for id in $id_device_connected 3473fcfe0d5d42d8b454b0f4f0fe7447 3dbf9d5ac43a48ef9ef8221e0f35b15f \
          $id_cloud_connected 646e3774ebaa4fa19d25f9036071b16a 151f530498d74ab6959bd926ca2b7a49 \
          ad6856305bc1453ebbb9d1ee79fb567d; do
    grep -E "^$id tether: " >/dev/null <<<"$catalog" || fail "journalctl --list-catalog has no tether entry $id"
done
ok "journalctl --list-catalog: all 7 tether ids"
grep ' tether: ' <<<"$catalog" | sed 's/^/    | /'
# (The explanation comes with the "short" output, not with -o cat.)
explained=$(ctr journalctl --catalog --no-pager MESSAGE_ID=$id_device_connected TETHER_DEVICE_ID="$dev" 2>&1)
[[ $explained == *"Subject: Device $dev connected to the tether cloud"* ]] ||
    fail "journalctl --catalog does not explain the cloud's message with the device filled in: $explained"
sed -n '1,6p' <<<"$explained" | sed 's/^/    | /'
explained=$(ctr journalctl --catalog --no-pager MESSAGE_ID=$id_cloud_connected TETHER_DEVICE_ID="$dev" 2>&1)
[[ $explained == *"Subject: tetherd connected to the tether cloud as $dev"* ]] ||
    fail "journalctl --catalog does not explain the agent's message: $explained"
sed -n '1,6p' <<<"$explained" | sed 's/^/    | /'
ok "journalctl --catalog explains both, with @TETHER_DEVICE_ID@ filled in"

# ---------------------------------------------------------------------------
step "systemctl reload tetherd keeps the connection"
pid_before=$(ctr systemctl show -p MainPID --value tetherd)
# Journal positions, so only what follows is looked at.
cursor() { ctr journalctl -n 1 --show-cursor -o cat | sed -n 's/^-- cursor: //p'; }
since=$(cursor)
connected_before=$(ctr tetherctl status --json | grep -o '"connected_sec": [0-9.]*' | awk '{print $2}')
ctr systemctl reload tetherd || fail "systemctl reload failed"
reloaded() { ctr journalctl -u tetherd --after-cursor "$since" -o cat | grep 'Reloaded configuration' >/dev/null; }
wait_for 10 "reload logged" reloaded ||
    fail "no 'Reloaded configuration' in the journal"
pid_after=$(ctr systemctl show -p MainPID --value tetherd)
[ "$pid_before" = "$pid_after" ] || fail "MainPID changed on reload ($pid_before -> $pid_after)"
ctr journalctl -u tetherd --after-cursor "$since" -o cat | grep Disconnected >/dev/null && fail "the agent reconnected on reload"
ctr journalctl -u tether-cloudd --after-cursor "$since" -o cat | grep "$dev.*disconnected" >/dev/null && fail "the cloud saw the device go"
connected_after=$(ctr tetherctl status --json | grep -o '"connected_sec": [0-9.]*' | awk '{print $2}')
awk -v a="$connected_after" -v b="$connected_before" 'BEGIN { exit !(a > b) }' ||
    fail "connected_sec went from $connected_before to $connected_after: the connection restarted"
ok "same MainPID $pid_after, no disconnect in agent or cloud journal, connected for $(printf %.2f "$connected_before") s -> $(printf %.2f "$connected_after") s"
ctr journalctl -u tetherd --after-cursor "$since" -o cat | sed 's/^/    | /'

# ---------------------------------------------------------------------------
step "systemctl reload tether-cloudd: a new API token works, the device stays connected"
cloud_pid=$(ctr systemctl show -p MainPID --value tether-cloudd)
since=$(cursor)
new_token=$(ctr tether-pki token /etc/tether/api-tokens 2>/dev/null | tail -n 1)
[ -n "$new_token" ] || fail "tether-pki token made no token"
ctr env "${api_env[@]}" TETHER_TOKEN="$new_token" tether list >/dev/null 2>&1 && fail "a token not loaded yet was accepted"
ctr systemctl reload tether-cloudd || fail "systemctl reload tether-cloudd failed"
cloud_reloaded() { ctr journalctl -u tether-cloudd --after-cursor "$since" -o cat | grep 'Reloaded 2 API token(s)' >/dev/null; }
wait_for 10 "cloud reload logged" cloud_reloaded || fail "no 'Reloaded 2 API token(s)' in the cloud's journal"
[ "$(ctr systemctl show -p MainPID --value tether-cloudd)" = "$cloud_pid" ] || fail "tether-cloudd's MainPID changed on reload"
[ "$(ctr systemctl is-active tether-cloudd)" = active ] || fail "tether-cloudd is $(ctr systemctl is-active tether-cloudd) after reload"
ctr env "${api_env[@]}" TETHER_TOKEN="$new_token" tether list >/dev/null || fail "the new token is refused after the reload"
online || fail "device $dev not online after the cloud's reload"
ctr journalctl -u tetherd --after-cursor "$since" -o cat | grep Disconnected >/dev/null && fail "the agent reconnected on the cloud's reload"
ctr journalctl -u tether-cloudd --after-cursor "$since" -o cat | grep "$dev.*disconnected" >/dev/null && fail "the cloud dropped the device on reload"
ok "same MainPID $cloud_pid, the new token works, the device stayed online without reconnecting"
ctr journalctl -u tether-cloudd --after-cursor "$since" -o cat | sed 's/^/    | /'

# ---------------------------------------------------------------------------
step "tether revoke: the packaged agent's session ends and its certificate is refused; tether unrevoke lets it back"
since=$(cursor)
ctr env "${api_env[@]}" TETHER_TOKEN="$token" tether revoke "$dev" --reason "system test" >/dev/null || fail "tether revoke failed"
listed_revoked() { ctr env "${api_env[@]}" TETHER_TOKEN="$token" tether list | awk -v d="$dev" '$1 == d && $2 == "revoked" { f = 1 } END { exit !f }'; }
wait_for 10 "device listed revoked" listed_revoked || fail "device $dev not listed revoked: $(ctr env "${api_env[@]}" TETHER_TOKEN="$token" tether list 2>&1)"
refused_revoked() { ctr journalctl -u tether-cloudd --after-cursor "$since" -o cat | grep "Refused a session from .*device '$dev' is revoked (system test)" >/dev/null; }
wait_for 60 "the agent's next handshake refused" refused_revoked ||
    fail "no refusal of the revoked device in the cloud's journal: $(ctr journalctl -u tether-cloudd --after-cursor "$since" -o cat | tail -n 5)"
[ "$(ctr systemctl is-active tetherd)" = active ] || fail "tetherd is $(ctr systemctl is-active tetherd) while revoked"
audited() { ctr env "${api_env[@]}" TETHER_TOKEN="$token" tether audit --action device.revoke --json | grep -q "\"$dev\""; }
audited || fail "no device.revoke record in tether audit"
ok "revoked: listed as revoked, its reconnect refused at the handshake, in the audit log; tetherd keeps retrying"
ctr journalctl -u tether-cloudd --after-cursor "$since" -o cat | grep -E "revoked|Refused" | head -n 3 | sed 's/^/    | /'
ctr env "${api_env[@]}" TETHER_TOKEN="$token" tether unrevoke "$dev" >/dev/null || fail "tether unrevoke failed"
wait_for 90 "device online again after unrevoke" online || fail "device $dev not online after unrevoke: $(ctr env "${api_env[@]}" TETHER_TOKEN="$token" tether list 2>&1)"
ok "unrevoked: $dev online again, without a restart of tetherd"

# ---------------------------------------------------------------------------
step "a hung agent (SIGSTOP) is killed by the watchdog and restarted"
log "    shipped WatchdogUSec=$(ctr systemctl show -p WatchdogUSec --value tetherd); a runtime drop-in shortens it to 3s for the test"
ctr mkdir -p /run/systemd/system/tetherd.service.d
ctr sh -c 'printf "[Service]\nWatchdogSec=3\n" > /run/systemd/system/tetherd.service.d/50-test-watchdog.conf'
ctr systemctl daemon-reload
ctr systemctl restart tetherd
wait_for 30 "device online again" online || fail "device not online after restart"
pid=$(ctr systemctl show -p MainPID --value tetherd)
restarts=$(ctr systemctl show -p NRestarts --value tetherd)
since=$(cursor)
ctr kill -STOP "$pid"
log "    sent SIGSTOP to tetherd (PID $pid in the container), NRestarts=$restarts"
restarted() {
    local p n
    p=$(ctr systemctl show -p MainPID --value tetherd)
    n=$(ctr systemctl show -p NRestarts --value tetherd)
    [ "$n" -gt "$restarts" ] && [ "$p" != "$pid" ] && [ "$p" != 0 ] && [ "$(ctr systemctl is-active tetherd)" = active ]
}
wait_for 30 "killed and restarted" restarted || fail "tetherd was not restarted: $(ctr systemctl status --no-pager tetherd 2>&1 | head -n 12)"
ctr journalctl -u tetherd --after-cursor "$since" -o cat | grep -E 'Watchdog timeout|Main process exited|Scheduled restart|Started' |
    sed 's/^/    | /'
# PID 1's line can reach the journal after the restart is visible.
# (The whole journal, not -u/--after-cursor: PID 1's line was seen missing
# from that view while present in the journal. The 3 s watchdog exists only
# in this step, so any such line is this step's.)
watchdog_logged() { ctr journalctl -o cat | grep 'tetherd.service: Watchdog timeout' >/dev/null; }
wait_for 10 "watchdog timeout in the journal" watchdog_logged || fail "no watchdog timeout in the journal"
wait_for 30 "device online after the restart" online || fail "device not online after the watchdog restart"
ok "NRestarts=$(ctr systemctl show -p NRestarts --value tetherd), new MainPID $(ctr systemctl show -p MainPID --value tetherd), device online"
ctr rm -rf /run/systemd/system/tetherd.service.d
ctr systemctl daemon-reload

# ---------------------------------------------------------------------------
step "tether logs -f: a line written under a unit of [Logs] Units= reaches the CLI within 1 s"
# The packaged agent reads the system journal (SupplementaryGroups=
# systemd-journal); [Logs] Units= lets `tether logs --unit` read the probe's
# unit, and a reload applies to new streams.
since=$(cursor)
ctr sh -c 'printf "\n[Logs]\nUnits=tether-probe.service\n" >>/etc/tether/tetherd.conf' || fail "cannot edit tetherd.conf"
ctr systemctl reload tetherd || fail "systemctl reload tetherd failed"
wait_for 10 "reload logged" reloaded || fail "no 'Reloaded configuration' after adding [Logs] Units="
probe() { ctr systemd-run --unit=tether-probe --quiet --wait --collect sh -c "echo $1 | systemd-cat -t tether-probe"; }
# Ends by itself (--timeout) so that nothing outlives the step.
ctr env "${api_env[@]}" TETHER_TOKEN="$token" tether --timeout 60 logs "$dev" --unit tether-probe.service -n 0 -f --json \
    >"$scratch/logs.out" 2>"$scratch/logs.err" &
logs_pid=$!
# The stream is open once a probe line comes through.
streaming() { probe "ready-$RANDOM" && grep -q '"message":"ready-' "$scratch/logs.out"; }
wait_for 30 "tether logs -f streaming" streaming ||
    fail "tether logs -f printed no probe line: $(cat "$scratch/logs.err") $(ctr journalctl -u tetherd -o cat | tail -n 5)"
nonce="probe-$$-$RANDOM"
t0=$(date +%s%N)
probe "$nonce" || fail "systemd-run of the probe failed"
seen=""
until seen=$(grep -m1 "\"message\":\"$nonce\"" "$scratch/logs.out"); [ -n "$seen" ]; do
    [ $(( ($(date +%s%N) - t0) / 1000000 )) -lt 10000 ] || fail "tether logs -f did not print '$nonce' within 10 s: $(tail -n 3 "$scratch/logs.out")"
    sleep 0.01
done
t1=$(date +%s%N)
written_us=$(sed -n 's/.*"realtime":\([0-9]*\).*/\1/p' <<<"$seen")
delay_ms=$(( (t1 / 1000 - written_us) / 1000 ))
total_ms=$(( (t1 - t0) / 1000000 ))
[ "$delay_ms" -le 1000 ] || fail "the probe line took $delay_ms ms from the journal to tether logs -f (bound 1000 ms)"
ok "probe line printed $delay_ms ms after its journal timestamp ($total_ms ms after systemd-run started)"
kill "$logs_pid" 2>/dev/null
wait "$logs_pid" 2>/dev/null

# ---------------------------------------------------------------------------
step "plugin packages: tether-plugin-{gpio,sensors,system} load inside tetherd's sandbox"
plugin_debs=()
for d in "$debdir"/tether-plugin-{gpio,sensors,system}_*.deb; do plugin_debs+=("/debs/$(basename "$d")"); done
plugin_pkgs=""
if [ ${#plugin_debs[@]} -eq 3 ]; then
    plugin_pkgs="tether-plugin-gpio tether-plugin-sensors tether-plugin-system"
    ctr env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${plugin_debs[@]}" \
        >"$scratch/plugins.log" 2>&1 || { tail -n 30 "$scratch/plugins.log"; fail "installing the plugin packages failed"; }
    ctr systemctl daemon-reload
    # The drop-ins change the sandbox, which needs a restart, not a reload.
    ctr systemctl restart tetherd
    wait_for 30 "device online with the plugins" online || fail "device not online after installing plugins"
    have_uptime() { ctr env "${api_env[@]}" TETHER_TOKEN="$token" tether get "$dev" system.uptime >/dev/null 2>&1; }
    wait_for 30 "system.uptime readable through the cloud" have_uptime ||
        fail "system.uptime not readable: $(ctr env "${api_env[@]}" TETHER_TOKEN="$token" tether get "$dev" system.uptime 2>&1)"
    ok "system.uptime = $(ctr env "${api_env[@]}" TETHER_TOKEN="$token" tether get "$dev" system.uptime) s, system.load1 = $(ctr env "${api_env[@]}" TETHER_TOKEN="$token" tether get "$dev" system.load1)"
    ctr journalctl -u tetherd -o cat | grep -E "Loaded plugin" | tail -n 3 | sed 's/^/    | /'
    for p in gpio sensors system; do
        ctr journalctl -u tetherd -o cat | grep "Loaded plugin '$p'" >/dev/null || fail "plugin '$p' did not load in the sandbox"
    done
    ok "all three plugins loaded; drop-ins: $(ctr ls /lib/systemd/system/tetherd.service.d | tr '\n' ' ')"
else
    log "    plugin packages not in $debdir: skipped"
fi

# ---------------------------------------------------------------------------
step "apt-get remove: services gone, state and configuration kept"
ctr env DEBIAN_FRONTEND=noninteractive apt-get remove -y tether-agent tether-cloud tether-cli $plugin_pkgs >"$scratch/remove.log" 2>&1 ||
    { tail -n 20 "$scratch/remove.log"; fail "apt-get remove failed"; }
for u in tetherd tether-cloudd; do
    st=$(ctr systemctl show -p LoadState --value "$u.service")
    [ "$st" = not-found ] || fail "$u.service still loaded ($st) after remove"
done
ctr pgrep -x tetherd >/dev/null && fail "tetherd still running after remove"
ctr pgrep -x tether-cloudd >/dev/null && fail "tether-cloudd still running after remove"
[ "$(ctr sha256sum /var/lib/tether/device.key | cut -d' ' -f1)" = "$key_sum" ] || fail "device key changed or gone after remove"
ctr test -f /var/lib/tether/device.crt || fail "device certificate gone after remove"
ctr test -f /etc/tether/tetherd.conf || fail "tetherd.conf gone after remove"
ok "units not-found, no processes; kept: device key (same sha256), device.crt, /etc/tether/tetherd.conf"
ctr dpkg-query -W -f='    ${Package} ${Status}\n' 'tether-*' 2>/dev/null
# Packages without conffiles (tether-cli) are gone already; purge the rest.
left_pkgs=$(ctr dpkg-query -W -f='${Package} ${db:Status-Abbrev}\n' 'tether-*' 2>/dev/null | awk '$2 == "rc" { print $1 }')

step "apt-get purge: nothing left behind"
ctr env DEBIAN_FRONTEND=noninteractive apt-get purge -y $left_pkgs >"$scratch/purge.log" 2>&1 ||
    { tail -n 20 "$scratch/purge.log"; fail "apt-get purge failed"; }
ctr test -e /var/lib/tether && fail "/var/lib/tether left after purge"
ctr test -e /etc/tether/tetherd.conf && fail "/etc/tether/tetherd.conf left after purge"
# What the test itself put there as the cloud's operator is the operator's to delete.
log "    operator files the test made (not the packages'): $(ctr find /etc/tether -type f | sort | tr '\n' ' ')"
ctr rm -rf /etc/tether/pki /etc/tether/ca.crt /etc/tether/cloud.crt /etc/tether/cloud.key /etc/tether/api-tokens \
    /etc/tether/provision-token \
    /etc/tether/token /tmp/device.csr
ctr rmdir /etc/tether 2>/dev/null
snapshot >"$scratch/files-after"
left=$(comm -13 "$scratch/files-before" "$scratch/files-after")
[ -z "$left" ] || fail "left behind after purge: $left"
[ -z "$(ctr dpkg-query -W 'tether-*' 2>/dev/null)" ] || fail "dpkg still knows: $(ctr dpkg-query -W 'tether-*' 2>&1)"
ok "no file or directory that was not there before install; dpkg knows no tether package"
ok "kept on purge by Debian convention (system users are never deleted): $(ctr getent passwd tether tether-cloud | cut -d: -f1 | tr '\n' ' ')"

log "PASS: all $STEP steps in $((SECONDS - T0)) s"
