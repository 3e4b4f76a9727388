#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# System test: OTA updates of the built packages under real dpkg and real
# systemd, in a Debian 12 booted with systemd-nspawn (the conventions of
# tests/system/test-packages.sh: a cached mmdebstrap root, nsenter into the
# container, every wait polled against a deadline).
#
#   tests/system/test-ota.sh DEBDIR FI_DEBDIR
#
# DEBDIR holds the built tether-agent, tether-cloud, tether-cli and
# tether-plugin-system .debs as they ship; FI_DEBDIR the test variant
# built with the OTA crash points (tools/dev deb --fault-injection). The
# packaged tether-agent is installed first ("1.0" below, whatever its
# version); 2.0, 3.0, ... are copies of it made with dpkg-deb, some of them
# broken on purpose. Only the steps that kill tetherd or the helper at a
# crash point (TETHER_OTA_CRASH_AT) run the test variant: an update to
# 2.1.5, a copy of it, switches to it, and 2.2 and 2.3 are copies of it;
# every other version is a copy of the shipped package, and no program in
# DEBDIR may contain the crash points (docs/design/fault-injection.md).
#
# What it shows (each a step, "==> [N] ..."):
#   - the shipped packages have no crash points, the test variant has;
#   - a 10 MB agent update through `tether ota` is committed: the helper,
#     started by tether-ota-helper.path, survives the postinst restarting
#     tetherd (its own cgroup), the new agent proves itself (connected for
#     TrialSec), the cloud has "committed" and dpkg the new version; the
#     time from `tether ota` to committed is printed;
#   - rolled back, with the reason, the old version running and online:
#     a new agent that cannot reach the cloud (unhealthy), one that
#     crash-loops (crash-loop, from systemd's NRestarts), a postinst that
#     fails (install-failed), a plugin package whose plugin does not load
#     (plugin); a good plugin update commits;
#   - rejected before anything is touched (dpkg's status file unchanged):
#     bad signature, unknown key, one flipped byte in the .deb, wrong
#     architecture, expired manifest, version below the minimum, not
#     enough space (the state directory on a 4 MB tmpfs);
#   - killed (SIGKILL) during the download, after it, during dpkg's unpack
#     (a blocking preinst), during the postinst, during the rollback,
#     during the trial: the device ends on a healthy version and reports it;
#   - the dpkg lock held by another process: deferred, the lock untouched;
#   - Launcher=transient (tetherd as root): the helper runs as the transient
#     tether-ota-install.service, whose name refuses a second start;
#   - a campaign (tether campaign create --target tag:...) with the cloud
#     restarted without [OTA] Port=: no second port listens, the device
#     fetches the 10 MB package over its CoAP connection, committed.
# Exit 77 (skip) with the reason when this machine cannot do it.
set -uo pipefail

debdir=${1:-}
fi_debdir=${2:-}
top=$(cd "$(dirname "$0")/../.." && pwd)
host_build=${top_builddir:-$top/build}
cache=${TETHER_ROOTFS_CACHE:-/var/cache/tether-test}
suite=bookworm
# python3: a dpkg lock holder that uses fcntl like apt (the lock step);
# dpkg-repack: tether-agent's Recommends (the rollback package when none
# was kept).
BASE_PACKAGES=(systemd systemd-sysv dbus apt passwd python3 dpkg-repack)
JOURNAL_LINES=120
. "$(dirname "$0")/lib.sh"

[ -n "$debdir" ] && [ -d "$debdir" ] || { echo "usage: $0 DEBDIR FI_DEBDIR" >&2; exit 2; }
debdir=$(cd "$debdir" && pwd)
[ -n "$fi_debdir" ] || skip "the crash-point steps need the packages built with fault injection" \
    "(tools/dev deb --fault-injection) as the second argument"
[ -d "$fi_debdir" ] || { echo "$0: no directory $fi_debdir" >&2; exit 2; }
fi_debdir=$(cd "$fi_debdir" && pwd)
[ "$(id -u)" -eq 0 ] || skip "needs root (mmdebstrap, systemd-nspawn)"
for tool in mmdebstrap systemd-nspawn nsenter dpkg-deb; do
    command -v "$tool" >/dev/null || skip "$tool is not installed (tools/dev packaging-deps)"
done
for b in tools/tether tools/tether-pki; do
    [ -x "$host_build/$b" ] || skip "$host_build/$b is not built"
done

scratch=$(mktemp -d /var/tmp/tether-systest-ota.XXXXXX)

trap container_cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------
mkdir -p "$scratch/debs" "$scratch/ctr"
step "packages from $debdir"
shopt -s nullglob
base=("$debdir"/tether-agent_*.deb) plugin_base=("$debdir"/tether-plugin-system_*.deb)
fi_base=("$fi_debdir"/tether-agent_*.deb) shipped=("$debdir"/*.deb)
[ ${#base[@]} -eq 1 ] && [ ${#plugin_base[@]} -eq 1 ] ||
    fail "expected one tether-agent and one tether-plugin-system .deb in $debdir"
[ ${#fi_base[@]} -eq 1 ] || fail "expected one tether-agent .deb in $fi_debdir"
base=${base[0]} plugin_base=${plugin_base[0]} fi_base=${fi_base[0]}
shopt -u nullglob
arch=$(dpkg-deb -f "$base" Architecture)
[ "$arch" = "$(dpkg --print-architecture)" ] || skip "packages are for $arch, this machine is $(dpkg --print-architecture)"
dpkg-deb -c "$base" | grep tether-ota-helper >/dev/null || fail "$base does not ship tether-ota-helper"
for d in "$debdir"/tether-cloud_*.deb "$debdir"/tether-cli_*.deb; do
    [ -f "$d" ] || fail "no $d"
    dpkg-deb -x "$d" "$scratch/ctr"
done
ok "$(dpkg-deb -f "$base" Package Version Architecture | tr '\n' ' ')"

step "crash points: none in the ${#shipped[@]} shipped packages, in both programs of the test variant"
found=$("$top/tools/crash-points" "${shipped[@]}") || fail "cannot unpack the packages in $debdir"
[ -z "$found" ] || fail "the shipped packages in $debdir contain the crash points (TETHER_OTA_CRASH_AT) in:
$found"
ok "no program in the ${#shipped[@]} packages in $debdir has them"
found=$("$top/tools/crash-points" "$fi_base") || fail "cannot unpack $fi_base"
for p in /usr/sbin/tetherd /usr/libexec/tether/tether-ota-helper; do
    printf '%s\n' "$found" | grep -x "$p" >/dev/null || fail "$fi_base is not a fault-injection build: no crash points in $p"
done
ok "$(basename "$fi_base"): $(printf '%s' "$found" | tr '\n' ' ')"

# variant BASE NAME VERSION [OPTIONS]: a copy of BASE with another version
# as $scratch/debs/NAME_VERSION.deb. Options: filler=BYTES (a big file),
# dropin=TEXT (a tetherd.conf.d drop-in, a plain file: a downgrade removes
# it), postinst=TEXT (lines run at the end of the postinst), preinst=TEXT
# (a preinst), so=BYTES (replace the plugin's .so with that many bytes of
# garbage), arch=ARCH.
variant() {
    local from=$1 name=$2 v=$3 d="$scratch/v-$2-$3" opt
    shift 3
    rm -rf "$d"
    dpkg-deb -R "$from" "$d"
    sed -i "s/^Version: .*/Version: $v/" "$d/DEBIAN/control"
    for opt in "$@"; do
        case $opt in
        filler=*)
            mkdir -p "$d/usr/share/tether-ota-test"
            head -c "${opt#filler=}" /dev/urandom >"$d/usr/share/tether-ota-test/filler-$name-$v.bin" ;;
        dropin=*)
            mkdir -p "$d/etc/tether/tetherd.conf.d"
            printf '%b' "${opt#dropin=}" >"$d/etc/tether/tetherd.conf.d/99-ota-test.conf" ;;
        postinst=*)
            sed -i '/^exit 0$/d' "$d/DEBIAN/postinst"
            printf '%s\n' "${opt#postinst=}" >>"$d/DEBIAN/postinst" ;;
        preinst=*)
            printf '#!/bin/sh\nset -e\n%s\nexit 0\n' "${opt#preinst=}" >"$d/DEBIAN/preinst"
            chmod 755 "$d/DEBIAN/preinst" ;;
        so=*)
            local so
            so=$(find "$d" -name '*.so' | head -n1)
            [ -n "$so" ] || fail "no plugin in $from"
            head -c "${opt#so=}" /dev/urandom >"$so" ;;
        arch=*)
            sed -i "s/^Architecture: .*/Architecture: ${opt#arch=}/" "$d/DEBIAN/control" ;;
        esac
    done
    dpkg-deb --root-owner-group -Znone --build "$d" "$scratch/debs/${name}_$v.deb" >/dev/null ||
        fail "dpkg-deb --build $name $v failed"
    rm -rf "$d"
}
cp "$base" "$scratch/debs/tether-agent_1.0.deb"
cp "$plugin_base" "$scratch/debs/tether-plugin-system_1.0.deb"
A=tether-agent P=tether-plugin-system
variant "$base" $A 2.0 filler=$((10 * 1024 * 1024))
variant "$base" $A 3.0 'dropin=[Cloud]\nPort=1\n'
variant "$base" $A 3.1 'dropin=[Connection]\nKeepaliveSec=banana\n'
variant "$base" $A 3.2 'postinst=echo "postinst of 3.2: failing on purpose" >&2; exit 1'
variant "$base" $A 2.1
variant "$fi_base" $A 2.1.5
variant "$fi_base" $A 2.2 filler=$((10 * 1024 * 1024))
variant "$fi_base" $A 2.3
variant "$base" $A 2.4 'preinst=if [ "$1" = upgrade ]; then echo unpacking >/run/ota-test-marker; exec sleep 600; fi'
variant "$base" $A 2.5 'postinst=if [ "$1" = configure ]; then echo configuring >/run/ota-test-marker; exec sleep 600; fi'
variant "$base" $A 2.6 'postinst=exit 1'
variant "$base" $A 2.7
variant "$base" $A 2.8
variant "$base" $A 2.10 filler=$((10 * 1024 * 1024))
variant "$base" $A 2.9 arch=$([ "$arch" = arm64 ] && echo amd64 || echo arm64)
variant "$plugin_base" $P 2.0
variant "$plugin_base" $P 3.0 so=4096
ok "made $(cd "$scratch/debs" && ls | tr '\n' ' ')"

# ---------------------------------------------------------------------------
step "Debian $suite root (mmdebstrap, cached in $cache)"
deps=$(for d in "$base" "$plugin_base" "$debdir"/tether-cloud_*.deb "$debdir"/tether-cli_*.deb; do
    dpkg-deb -f "$d" Depends; echo; done | tr ',' '\n' | sed -e 's/(.*)//' -e 's/|.*//' -e 's/[[:space:]]//g' | grep -v '^$')
packages=$(printf '%s\n' "${BASE_PACKAGES[@]}" $deps | grep -v '^tether' | sort -u | tr '\n' ',' | sed 's/,$//')
container_root "$suite" "$packages" ota-v2
# The root's /lib is a symlink to usr/lib (merged /usr): keep it.
tar -C "$scratch/ctr" -cf - . | tar -C "$scratch/root" -xf - --keep-directory-symlink ||
    fail "cannot copy the cloud and CLI packages' files into the root"

# PKI, update keys and configuration, made on the host.
pki="$scratch/root/etc/tether/pki"
"$host_build/tools/tether-pki" ca "$pki" >/dev/null
"$host_build/tools/tether-pki" server "$pki" localhost 127.0.0.1 >/dev/null
dev=$("$host_build/tools/tether-pki" device "$pki" | tail -n1 | awk '{print $NF}')
"$host_build/tools/tether-pki" token "$scratch/root/etc/tether/api-tokens" >"$scratch/token"
token=$(tail -n1 "$scratch/token" | awk '{print $NF}')
mkdir -p "$scratch/root/etc/tether/ota-keys" "$scratch/root/root"
"$host_build/tools/tether" ota keygen "$scratch/root/root/update.key" "$scratch/root/etc/tether/ota-keys/update.pem" \
    >/dev/null 2>&1 || fail "tether ota keygen failed"
# A key the device does not trust.
"$host_build/tools/tether" ota keygen "$scratch/other.key" "$scratch/other.pem" >/dev/null 2>&1 ||
    fail "tether ota keygen failed"
cp "$pki/ca.crt" "$scratch/root/etc/tether/ca.crt"
cp "$pki/devices/$dev.crt" "$scratch/root/etc/tether/device.crt"
cp "$pki/devices/$dev.key" "$scratch/root/etc/tether/device.key"
# The packaged tetherd.conf is a conffile: the test's settings go into a
# drop-in (read after it).
mkdir -p "$scratch/root/etc/tether/tetherd.conf.d"
cat >"$scratch/root/etc/tether/tetherd.conf.d/00-ota-test.conf" <<EOF
[Cloud]
Host=localhost
CAFile=/etc/tether/ca.crt
[Device]
Certificate=/etc/tether/device.crt
Key=/etc/tether/device.key
[Connection]
ReconnectMinSec=0.2
ReconnectMaxSec=1
StartJitterSec=0
[OTA]
Keyring=/etc/tether/ota-keys
TrialSec=3
HealthTimeoutSec=20
LockTimeoutSec=5
ProgressIntervalSec=0.5
EOF
cat >"$scratch/root/root/cloud.conf" <<EOF
[Cloud]
Listen=127.0.0.1
CAFile=/etc/tether/pki/ca.crt
Certificate=/etc/tether/pki/server.crt
Key=/etc/tether/pki/server.key
[API]
TokenFile=/etc/tether/api-tokens
[State]
Directory=/root/cloud-state
[OTA]
ArtifactDirectory=/root/artifacts
# The rejection steps sign manifests with the HTTPS artifact server's URL;
# tether ota DEVICE signs without url (over the device's connection).
Port=5685
EOF
cp "$scratch"/debs/*.deb "$scratch/root/root/"

# ---------------------------------------------------------------------------
step "boot it: systemd-nspawn -b --register=no --keep-unit --private-network"
container_boot "tether-ota-$$"

step "cloud (transient unit), tether-agent and tether-plugin-system installed with dpkg, device online"
ctr mkdir -p /root/cloud-state
ctr systemd-run --quiet --unit=test-cloud --property=Type=notify /usr/sbin/tether-cloudd \
    --config /root/cloud.conf || fail "cannot start tether-cloudd"
ctr useradd --system --home-dir /var/lib/tether --no-create-home tether 2>/dev/null
ctr sh -c 'chgrp tether /etc/tether/device.key && chmod 0640 /etc/tether/device.key'
ctr env DEBIAN_FRONTEND=noninteractive dpkg -i /root/tether-agent_1.0.deb /root/tether-plugin-system_1.0.deb \
    >"$scratch/install.log" 2>&1 || { cat "$scratch/install.log"; fail "dpkg -i failed"; }
# The plugin package's tetherd.service.d drop-in applies from a restart on.
ctr systemctl daemon-reload
ctr systemctl restart tetherd
tether_ctr() { ctr env TETHER_API=http://127.0.0.1:8080 TETHER_TOKEN="$token" tether "$@"; }
online() { tether_ctr list | awk -v d="$dev" '$1 == d && $2 == "online" { f = 1 } END { exit !f }'; }
wait_for 30 "device online" online || fail "device not online: $(tether_ctr list 2>&1)"
[ "$(ctr systemctl is-active tether-ota-helper.path)" = active ] || fail "tether-ota-helper.path is not active"
[ "$(ctr systemctl is-enabled tether-ota-helper.path)" = enabled ] || fail "tether-ota-helper.path is not enabled"
uptime_ok() { tether_ctr get "$dev" system.uptime >/dev/null 2>&1; }
wait_for 10 "system.uptime readable" uptime_ok || fail "the system plugin does not serve"
ok "tetherd $(ctr systemctl is-active tetherd), tether-ota-helper.path enabled and active, system plugin serving"
# The plugin's package is kept by hand; the agent's is not: the first
# update rebuilds it with dpkg-repack (checked after the first rollback).
ctr /usr/libexec/tether/tether-ota-helper seed /root/tether-plugin-system_1.0.deb >/dev/null ||
    fail "seeding tether-plugin-system failed"
ok "tether-plugin-system 1.0 kept for rollback in /var/lib/tether-ota/pkgs"

installed() { ctr dpkg-query -W -f='${Version} ${db:Status-Abbrev}' "${1:-tether-agent}" | sed 's/ *$//'; }
# update PACKAGE_VERSION [tether ota options]: run `tether ota` in the
# container; sets $out, $rc, $took, $job_json.
update() {
    local f=$1 t0 t1
    shift
    t0=$(date +%s.%N)
    out=$(tether_ctr ota "$dev" "/root/$f.deb" --key /root/update.key --json --timeout 180 "$@" 2>"$scratch/ota.err")
    rc=$?
    t1=$(date +%s.%N)
    took=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
    job_json=$(printf '%s\n' "$out" | tail -n1)
    log "    tether ota $f: exit $rc in ${took} s: $(field state) $(field code)"
}
field() { printf '%s' "$job_json" | grep -o "\"$1\":\"[^\"]*\"" | head -n1 | cut -d'"' -f4; }
history() { printf '%s' "$job_json" | grep -o '"state":"[a-z-]*","at"' | cut -d'"' -f4 | tr '\n' ' '; }
expect_job() { # STATE [CODE]
    [ "$(field state)" = "$1" ] && { [ -z "${2:-}" ] || [ "$(field code)" = "$2" ]; } ||
        { cat "$scratch/ota.err"; fail "expected $1${2:+/$2}, got $(field state)/$(field code): $(field reason)"; }
}
back_online() { # VERSION [PACKAGE]
    [ "$(ctr systemctl is-active tetherd)" = active ] || fail "tetherd is $(ctr systemctl is-active tetherd) after the job"
    wait_for 30 "device online" online || fail "device not online after the job"
    [ "$(installed "${2:-}")" = "$1 ii" ] || fail "dpkg says '$(installed "${2:-}")', expected $1"
    tether_ctr get "$dev" system.uptime >/dev/null || fail "the device does not serve system.uptime"
    ok "${2:-tether-agent} $(installed "${2:-}"), tetherd active, device online and serving"
}
# start_job MANIFEST_FILE: PUT /v1/devices/DEV from the host, in the
# container's network namespace; sets $job.
netx() { nsenter -t "$init_pid" -n "$@"; }
start_job() {
    python3 -c 'import json,sys; print(json.dumps({"manifest": open(sys.argv[1]).read()}))' "$1" >"$scratch/put.json"
    job=$(netx curl -sS -X PUT -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
        --data-binary @"$scratch/put.json" "http://127.0.0.1:8080/v1/devices/$dev" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["job"]["job"])') || fail "PUT /v1/devices/$dev failed"
}
job_final() { job_json=$(tether_ctr ota status "$job" --json) && [[ $job_json == *'"final":true'* ]]; }
wait_final() { wait_for "${1:-90}" "job final" job_final || fail "job $job did not end: $(tether_ctr ota status "$job" 2>&1)"; }
host_tether() { netx env TETHER_API=http://127.0.0.1:8080 TETHER_TOKEN="$token" "$host_build/tools/tether" "$@"; }
dpkg_status() { ctr sha256sum /var/lib/dpkg/status | cut -c1-64; }
# crash_env UNIT POINT: the next run of UNIT kills itself at POINT, once.
crash_env() {
    local unit=$1 point=$2 flag
    flag=$([ "$unit" = tetherd ] && echo /var/lib/tether/ota-test-crash || echo /run/ota-test-crash)
    ctr mkdir -p "/etc/systemd/system/$unit.service.d"
    ctr sh -c "printf '[Service]\nEnvironment=TETHER_OTA_CRASH_AT=$point TETHER_OTA_CRASH_ONCE=$flag\n' \
        >/etc/systemd/system/$unit.service.d/50-ota-test-crash.conf && touch $flag"
    [ "$unit" = tetherd ] && ctr chown tether:tether "$flag"
    ctr systemctl daemon-reload
}
crash_env_off() {
    ctr rm -f /etc/systemd/system/tetherd.service.d/50-ota-test-crash.conf \
        /etc/systemd/system/tether-ota-helper.service.d/50-ota-test-crash.conf
    ctr systemctl daemon-reload
}

# ---------------------------------------------------------------------------
step "self-update to 2.0 (10 MB): committed"
main_pid=$(ctr systemctl show -p MainPID --value tetherd)
update tether-agent_2.0
[ $rc -eq 0 ] || { cat "$scratch/ota.err"; fail "tether ota exit $rc"; }
expect_job committed
log "    history: $(history)"
[ "$(ctr systemctl show -p MainPID --value tetherd)" != "$main_pid" ] || fail "tetherd was not restarted by the update"
back_online 2.0
ctr journalctl -u tether-ota-helper.service -o cat --no-pager | grep 'trial -> committed' >/dev/null ||
    fail "the helper's journal has no commit"
log "    figure: 10 MB agent package, tether ota start to committed: ${took} s (TrialSec=3)"
ctr journalctl -u tether-ota-helper.service -o cat --no-pager | grep "Rebuilt tether-agent .* with dpkg-repack" >/dev/null ||
    fail "the helper did not rebuild the installed tether-agent with dpkg-repack"
ok "the installed tether-agent was rebuilt with dpkg-repack for rollback"

step "3.0, an agent that cannot reach the cloud: rolled back (unhealthy)"
update tether-agent_3.0
[ $rc -eq 8 ] || fail "tether ota exit $rc, expected 8"
expect_job rolled-back unhealthy
log "    reason: $(field reason)"
back_online 2.0

step "3.1, an agent that crash-loops: rolled back (crash-loop)"
update tether-agent_3.1
[ $rc -eq 8 ] || fail "tether ota exit $rc, expected 8"
expect_job rolled-back crash-loop
log "    reason: $(field reason)"
back_online 2.0

step "3.2, a postinst that fails: rolled back (install-failed)"
update tether-agent_3.2
[ $rc -eq 8 ] || fail "tether ota exit $rc, expected 8"
expect_job rolled-back install-failed
log "    reason: $(field reason)"
back_online 2.0

step "plugin package 2.0 (--plugin system): committed"
update tether-plugin-system_2.0 --plugin system
[ $rc -eq 0 ] || { cat "$scratch/ota.err"; fail "tether ota exit $rc"; }
expect_job committed
back_online 2.0 tether-plugin-system

step "plugin package 3.0 whose plugin does not load: rolled back (plugin)"
update tether-plugin-system_3.0 --plugin system
[ $rc -eq 8 ] || fail "tether ota exit $rc, expected 8"
expect_job rolled-back plugin
log "    reason: $(field reason)"
back_online 2.0 tether-plugin-system

# ---------------------------------------------------------------------------
step "rejected before touching anything: bad signature, unknown key, flipped byte, architecture, expired, below minimum"
before=$(dpkg_status)
good=$scratch/root/root/tether-agent_2.1.deb
url=$(host_tether ota upload "$good") || fail "upload failed"
reject() { # WHY CODE MANIFEST
    start_job "$3"
    wait_final 30
    [ "$(field state)" = rejected ] && [ "$(field code)" = "$2" ] ||
        fail "$1: expected rejected/$2, got $(field state)/$(field code): $(field reason)"
    [ "$(dpkg_status)" = "$before" ] || fail "$1: dpkg's status file changed"
    log "    $1: rejected/$2: $(field reason)"
}
sign() { rm -f "$scratch/m"; "$host_build/tools/tether" ota sign "$@" --device "$dev" --output "$scratch/m" >/dev/null || fail "tether ota sign $*"; }
sign "$good" --key "$scratch/root/root/update.key" --url "$url"
sed -i 's/"version":"2.1"/"version":"3.1"/' "$scratch/m"
reject "bad signature" bad-signature "$scratch/m"
sign "$good" --key "$scratch/other.key" --url "$url"
reject "unknown key" unknown-key "$scratch/m"
python3 - "$good" "$scratch/flipped.deb" <<'EOF'
import sys
data = bytearray(open(sys.argv[1], "rb").read())
data[len(data) // 2] ^= 0x01
open(sys.argv[2], "wb").write(data)
EOF
sign "$good" --key "$scratch/root/root/update.key" --url "$(host_tether ota upload "$scratch/flipped.deb")"
reject "one flipped byte in the .deb" checksum "$scratch/m"
foreign=$scratch/root/root/tether-agent_2.9.deb
sign "$foreign" --key "$scratch/root/root/update.key" --url "$(host_tether ota upload "$foreign")"
reject "wrong architecture" architecture "$scratch/m"
sign "$good" --key "$scratch/root/root/update.key" --url "$url" --expires $(($(date +%s) - 60))
reject "expired manifest" expired "$scratch/m"
sign "$good" --key "$scratch/root/root/update.key" --url "$url" --min-version 3.0
reject "version below the minimum" below-minimum "$scratch/m"
back_online 2.0

step "not enough space: the agent's state directory on a 4 MB tmpfs, a 10 MB package"
ctr sh -c 'mount -t tmpfs -o "size=4m,uid=$(id -u tether),gid=$(id -g tether),mode=0750" tether-ota-test /var/lib/tether/ota'
ctr systemctl restart tetherd
wait_for 30 "device online" online || fail "device not online with the tmpfs"
update tether-agent_2.2
expect_job rejected no-space
log "    reason: $(field reason)"
[ "$(dpkg_status)" = "$before" ] || fail "dpkg's status file changed"
ctr umount /var/lib/tether/ota
ctr systemctl restart tetherd
back_online 2.0

step "dpkg lock held by another process: deferred, the lock never removed"
ctr sh -c 'rm -f /run/ota-test-locked; systemd-run --quiet --unit=test-dpkg-lock python3 -c "
import fcntl, os, time
fd = os.open(\"/var/lib/dpkg/lock-frontend\", os.O_RDWR | os.O_CREAT, 0o640)
fcntl.lockf(fd, fcntl.LOCK_EX)
open(\"/run/ota-test-locked\", \"w\").write(str(os.getpid()))
while True:
    time.sleep(3600)
"'
locked() { ctr test -s /run/ota-test-locked; }
wait_for 10 "lock held" locked || fail "the lock holder did not start"
holder=$(ctr cat /run/ota-test-locked)
update tether-agent_2.1
[ $rc -eq 8 ] || fail "tether ota exit $rc, expected 8"
expect_job deferred dpkg-locked
log "    reason: $(field reason)"
[[ $(field reason) == *"$holder"* ]] || fail "the reason does not name the holder $holder"
ctr test -e /var/lib/dpkg/lock-frontend || fail "the lock file was removed"
[ "$(ctr systemctl is-active test-dpkg-lock)" = active ] || fail "the lock holder is gone"
[ "$(dpkg_status)" = "$before" ] || fail "dpkg's status file changed"
ctr systemctl stop test-dpkg-lock
back_online 2.0

# ---------------------------------------------------------------------------
# From here to the helper's crash, 2.1.5, 2.2 and 2.3 are the test variant
# with crash points; rollbacks go back to one of them.
step "2.1.5, the test variant with crash points: committed"
update tether-agent_2.1.5
[ $rc -eq 0 ] || { cat "$scratch/ota.err"; fail "tether ota exit $rc"; }
expect_job committed
back_online 2.1.5

step "killed during the download (tetherd, after its first 4 MiB checkpoint): resumed, committed"
crash_env tetherd download-checkpoint
ctr systemctl restart tetherd
wait_for 30 "device online" online || fail "device not online"
update tether-agent_2.2
expect_job committed
ctr journalctl -u tetherd -o cat --no-pager | grep "(resuming)" >/dev/null || fail "the download did not resume"
crash_env_off
back_online 2.2

step "killed after the download (tetherd, state downloaded): committed"
crash_env tetherd downloaded
ctr systemctl restart tetherd
wait_for 30 "device online" online || fail "device not online"
update tether-agent_2.3
expect_job committed
crash_env_off
back_online 2.3

kill_in_dpkg() { # VERSION WORD
    ctr rm -f /run/ota-test-marker
    tether_ctr ota "$dev" "/root/tether-agent_$1.deb" --key /root/update.key --no-wait >"$scratch/job" 2>"$scratch/ota.err" ||
        { cat "$scratch/ota.err"; fail "cannot start the $1 job"; }
    job=$(cat "$scratch/job")
    marker() { [ "$(ctr cat /run/ota-test-marker 2>/dev/null)" = "$2" ]; }
    wait_for 60 "dpkg $2" marker "$@" || fail "dpkg never reached the blocking script"
    # power cut for the update: helper, dpkg, the script and the agent
    ctr systemctl kill --signal=SIGKILL tether-ota-helper.service tetherd.service
    log "    killed; dpkg says '$(installed)'"
    wait_final 120
    log "    history: $(history)"
}
step "killed during dpkg's unpack (a preinst that blocks): rolled back"
kill_in_dpkg 2.4 unpacking
expect_job rolled-back
log "    code: $(field code), reason: $(field reason)"
back_online 2.3

step "killed during the postinst: rolled back"
kill_in_dpkg 2.5 configuring
expect_job rolled-back
log "    code: $(field code), reason: $(field reason)"
back_online 2.3

step "the helper killed during the rollback (crash point rolling-back): rolled back"
crash_env tether-ota-helper rolling-back
update tether-agent_2.6
expect_job rolled-back install-failed
ctr journalctl -u tether-ota-helper.service -o cat --no-pager | grep "rolling-back" >/dev/null ||
    fail "no rollback in the helper's journal"
ctr test -e /run/ota-test-crash && fail "the helper never reached its crash point"
crash_env_off
log "    history: $(history)"
back_online 2.3

step "the agent killed (SIGKILL, whole cgroup) during the trial: committed"
tether_ctr ota "$dev" /root/tether-agent_2.7.deb --key /root/update.key --no-wait >"$scratch/job" 2>"$scratch/ota.err" ||
    { cat "$scratch/ota.err"; fail "cannot start the 2.7 job"; }
job=$(cat "$scratch/job")
in_trial() { ctr grep -q '"state": "trial"' /var/lib/tether/ota/job.json; }
wait_for 60 "job in trial" in_trial || fail "2.7 never reached the trial"
ctr systemctl kill --signal=SIGKILL tetherd
wait_final 90
expect_job committed
log "    history: $(history)"
back_online 2.7

step "2.8 with Launcher=transient (tetherd as root): StartTransientUnit, the unit name as the lock"
ctr mkdir -p /etc/systemd/system/tetherd.service.d
# Root with the right to manage units (systemd checks CAP_SYS_ADMIN of a
# root caller); the packaged unit's sandbox drops every capability, and
# its system call filter refuses chown, which dpkg-deb's tar does as root.
ctr sh -c 'printf "[Service]\nUser=root\nGroup=root\nPrivateUsers=no\nCapabilityBoundingSet=CAP_SYS_ADMIN CAP_DAC_OVERRIDE CAP_CHOWN CAP_FOWNER\nSystemCallFilter=\n" >/etc/systemd/system/tetherd.service.d/50-ota-test-root.conf'
ctr sh -c 'printf "[OTA]\nLauncher=transient\n" >/etc/tether/tetherd.conf.d/50-ota-test-transient.conf'
ctr systemctl daemon-reload
ctr systemctl restart tetherd
wait_for 30 "device online as root" online || fail "device not online after the restart as root"
tether_ctr ota "$dev" /root/tether-agent_2.8.deb --key /root/update.key --no-wait >"$scratch/job" 2>"$scratch/ota.err" ||
    { cat "$scratch/ota.err"; fail "cannot start the 2.8 job"; }
job=$(cat "$scratch/job")
wait_for 60 "job in trial" in_trial || fail "2.8 never reached the trial"
[ "$(ctr systemctl is-active tether-ota-install.service)" = active ] ||
    fail "the helper does not run as tether-ota-install.service"
if ctr systemd-run --quiet --unit=tether-ota-install.service /bin/true 2>"$scratch/second.err"; then
    fail "a second tether-ota-install.service could be started"
fi
ok "a second start is refused: $(head -n1 "$scratch/second.err")"
wait_final 90
expect_job committed
ctr journalctl -o cat --no-pager | grep "Started tether-ota-install.service" >/dev/null ||
    fail "no tether-ota-install.service in the journal"
ctr rm -f /etc/systemd/system/tetherd.service.d/50-ota-test-root.conf /etc/tether/tetherd.conf.d/50-ota-test-transient.conf
ctr chown -R tether:tether /var/lib/tether
ctr systemctl daemon-reload
ctr systemctl restart tetherd
back_online 2.8

step "campaign to tag:site=systest, the cloud without [OTA] Port=: fetched over the CoAP connection, committed"
grep -v '^Port=5685$' "$scratch/root/root/cloud.conf" >"$scratch/root/root/cloud-noport.conf"
ctr systemctl stop test-cloud
ctr systemd-run --quiet --unit=test-cloud-noport --property=Type=notify /usr/sbin/tether-cloudd \
    --config /root/cloud-noport.conf || fail "cannot start tether-cloudd without [OTA] Port="
# 5685 = 0x1635: no socket of the container listens (state 0A) on it.
listening() { ctr cat /proc/net/tcp /proc/net/tcp6 | awk '$2 ~ /:1635$/ && $4 == "0A" { f = 1 } END { exit !f }'; }
listening && fail "something listens on 5685 with no [OTA] Port="
wait_for 30 "device online again" online || fail "device not online after the cloud restart"
tether_ctr tag "$dev" site=systest >/dev/null || fail "tether tag failed"
t0=$(date +%s.%N)
tether_ctr campaign create --target tag:site=systest --package /root/tether-agent_2.10.deb --key /root/update.key \
    --phases 100 --max-failure-rate 0 --name systest --follow >"$scratch/campaign.out" 2>"$scratch/campaign.err" ||
    { cat "$scratch/campaign.out" "$scratch/campaign.err"; fail "the campaign did not finish (exit $?)"; }
took=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
camp=$(head -n1 "$scratch/campaign.out")
camp_json=$(tether_ctr --json campaign show "$camp") || fail "tether campaign show $camp failed"
printf '%s' "$camp_json" | python3 -c '
import json, sys
c = json.load(sys.stdin)
n = c["counts"]
assert c["state"] == "finished" and n.get("committed") == 1 and sum(n.values()) == 1, c
' || fail "campaign $camp did not end with the device committed: $camp_json"
back_online 2.10
ctr journalctl -u tetherd -o cat --no-pager | grep -E "downloading artifact [0-9a-f]{64} over the connection to the cloud" >/dev/null ||
    fail "tetherd did not download over its connection"
listening && fail "something listens on 5685 after the campaign"
log "    figure: campaign of one device, 10 MB over the CoAP connection, created to finished in ${took} s"
ok "campaign $camp finished, 1 committed; $(ctr journalctl -u tetherd -o cat --no-pager | grep -o '[0-9]* bytes in [0-9]* block requests of [0-9]* bytes' | tail -n1)"

step "no job was left looping: the helper is idle, no request is pending"
[ "$(ctr systemctl is-active tether-ota-helper.service)" != active ] || fail "the helper still runs"
ctr test -e /var/lib/tether/ota/request && fail "a request file is left"
ok "$(tether_ctr ota jobs 2>/dev/null | wc -l) jobs listed by the cloud"

log "PASS: all $STEP steps in $((SECONDS - T0)) s"
