#!/usr/bin/env bash
# System test: OTA self-updates of the agent under real systemd, in a
# Debian 12 booted with systemd-nspawn (the conventions of
# tests/system/test-packages.sh: a cached mmdebstrap root, nsenter into the
# container, every wait polled against a deadline).
#
#   tests/system/test-ota.sh [DEBDIR]
#
# The agent package: with DEBDIR, its tether-agent_*.deb (the packaging
# work's; it must ship tether-ota-helper and its units); without, one made
# here from "make install" of a build for /usr, /etc, /var with a minimal
# tetherd.service (runs as user tether, Type=notify, Restart=on-failure,
# ProtectSystem=strict) and a postinst that restarts tetherd like
# debhelper's does. Versions 2.0, 3.0, ... are made from it with dpkg-deb.
#
# What it shows (each a step, "==> [N] ..."):
#   - a 10 MB agent update through `tether ota` is committed: the helper,
#     started by tether-ota-helper.path, survives the postinst restarting
#     tetherd (its own cgroup), the new agent proves itself (connected for
#     TrialSec), the cloud has "committed" and dpkg the new version;
#     the time from `tether ota` to committed is printed;
#   - rolled back, with the reason, the old version running and online:
#     a new agent that cannot reach the cloud (unhealthy), one that
#     crash-loops (crash-loop, from systemd's NRestarts), a postinst that
#     fails (install-failed);
#   - the agent killed (SIGKILL to its cgroup) during the trial: the
#     update still ends, committed;
#   - Launcher=transient (tetherd as root): the helper runs as the transient
#     tether-ota-install.service, whose name refuses a second start.
# Exit 77 (skip) with the reason when this machine cannot do it.
set -uo pipefail

debdir=${1:-}
top=$(cd "$(dirname "$0")/../.." && pwd)
host_build=${top_builddir:-$top/build}
cache=${TETHER_ROOTFS_CACHE:-/var/cache/tether-test}
suite=bookworm
BASE_PACKAGES=(systemd systemd-sysv dbus apt passwd)
STEP=0
T0=$SECONDS

log() { echo "$(printf '%4ds' $((SECONDS - T0))) $*"; }
step() { STEP=$((STEP + 1)); log "==> [$STEP] $*"; }
ok() { log "    ok: $*"; }
fail() { log "FAIL: $*"; exit 1; }
skip() { echo "SKIP: $*"; exit 77; }

[ "$(id -u)" -eq 0 ] || skip "needs root (mmdebstrap, systemd-nspawn)"
for tool in mmdebstrap systemd-nspawn nsenter dpkg-deb; do
    command -v "$tool" >/dev/null || skip "$tool is not installed (tools/dev packaging-deps)"
done
for b in tools/tether tools/tether-pki; do
    [ -x "$host_build/$b" ] || skip "$host_build/$b is not built"
done

scratch=$(mktemp -d /var/tmp/tether-systest-ota.XXXXXX)
nspawn_pid=
init_pid=

ctr() {
    nsenter -t "$init_pid" -a env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        LANG=C.UTF-8 SYSTEMD_PAGER= SYSTEMD_COLORS=0 TERM=dumb "$@"
}

wait_for() {
    local timeout=$1 what=$2 start=$SECONDS
    shift 2
    local deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.2
    done
    log "    ($what after $((SECONDS - start)) s)"
}

cleanup() {
    local rc=$?
    if [ -n "$init_pid" ] && kill -0 "$init_pid" 2>/dev/null; then
        if [ $rc -ne 0 ] && [ $rc -ne 77 ]; then
            echo "--- journal of the failed run (last 120 lines) ---"
            ctr journalctl --no-pager -n 120 -o short-monotonic 2>/dev/null | sed 's/^/    /'
        fi
        kill -s SIGRTMIN+4 "$init_pid" 2>/dev/null
    fi
    if [ -n "$nspawn_pid" ]; then
        for _ in $(seq 75); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$nspawn_pid" 2>/dev/null; then
            [ -n "$init_pid" ] && kill -KILL "$init_pid" 2>/dev/null
            kill -TERM "$nspawn_pid" 2>/dev/null
            for _ in $(seq 50); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.2; done
            kill -KILL "$nspawn_pid" 2>/dev/null
        fi
        wait "$nspawn_pid" 2>/dev/null
    fi
    [ -n "${TETHER_TEST_KEEP:-}" ] && [ $rc -ne 0 ] && { echo "kept $scratch"; exit $rc; }
    rm -rf "$scratch"
    log "cleaned up (exit $rc)"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------
mkdir -p "$scratch/debs" "$scratch/ctr"
if [ -n "$debdir" ]; then
    step "agent package from $debdir"
    base=$(ls "$debdir"/tether-agent_*.deb 2>/dev/null | head -n1)
    [ -n "$base" ] || fail "no tether-agent_*.deb in $debdir"
    dpkg-deb -c "$base" | grep tether-ota-helper >/dev/null || fail "$base does not ship tether-ota-helper"

    for d in "$debdir"/tether-cloud_*.deb "$debdir"/tether-cli_*.deb; do
        [ -f "$d" ] || fail "no $d"
        dpkg-deb -x "$d" "$scratch/ctr"
    done
else
    step "build for /usr, /etc, /var and make the tether-agent package"
    mkdir -p "$scratch/build"
    (cd "$scratch/build" && "$top/configure" -q --prefix=/usr --sysconfdir=/etc --localstatedir=/var \
        --libexecdir=/usr/libexec >/dev/null && make -s -j"$(nproc)" >/dev/null 2>&1 &&
        make -s install DESTDIR="$scratch/stage" >/dev/null 2>&1) || fail "building for the container failed"
    pkg="$scratch/pkg-base"
    mkdir -p "$pkg/DEBIAN" "$pkg/usr/sbin" "$pkg/usr/libexec/tether" "$pkg/usr/lib/tether/plugins" \
        "$pkg/lib/systemd/system"
    cp "$scratch/stage/usr/sbin/tetherd" "$pkg/usr/sbin/"
    cp "$scratch/stage/usr/libexec/tether/tether-ota-helper" "$pkg/usr/libexec/tether/"
    cp "$scratch/stage/usr/lib/tether/plugins/example.so" "$pkg/usr/lib/tether/plugins/"
    cp "$scratch/build/units/tether-ota-helper.service" "$scratch/build/units/tether-ota-helper.path" \
        "$pkg/lib/systemd/system/"
    cat >"$pkg/lib/systemd/system/tetherd.service" <<'EOF'
[Unit]
Description=tether device agent (OTA system test)
StartLimitIntervalSec=300
StartLimitBurst=20
[Service]
Type=notify
ExecStart=/usr/sbin/tetherd
Restart=on-failure
RestartSec=1
User=tether
Group=tether
StateDirectory=tether
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
[Install]
WantedBy=multi-user.target
EOF
    cat >"$pkg/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    getent passwd tether >/dev/null || useradd --system --home-dir /var/lib/tether --no-create-home tether
    systemctl daemon-reload
    systemctl enable tether-ota-helper.path tetherd.service >/dev/null 2>&1 || true
    systemctl start tether-ota-helper.path || true
    # what debhelper's postinst does: restart the agent, ignore a failure
    systemctl restart tetherd.service >/dev/null 2>&1 || true
fi
exit 0
EOF
    chmod 755 "$pkg/DEBIAN/postinst"
    cat >"$pkg/DEBIAN/control" <<EOF
Package: tether-agent
Version: 1.0
Architecture: $(dpkg --print-architecture)
Maintainer: tether tests <tests@example.org>
Description: tether agent (OTA system test build)
 test
EOF
    base="$scratch/debs/tether-agent_1.0.deb"
    dpkg-deb --root-owner-group -Zxz --build "$pkg" "$base" >/dev/null || fail "dpkg-deb failed"
    mkdir -p "$scratch/ctr/usr/local/sbin" "$scratch/ctr/usr/local/bin"
    cp "$scratch/stage/usr/sbin/tether-cloudd" "$scratch/ctr/usr/local/sbin/"
    cp "$scratch/stage/usr/bin/tether" "$scratch/stage/usr/bin/tether-pki" "$scratch/ctr/usr/local/bin/"
fi
ok "$(dpkg-deb -f "$base" Package Version Architecture | tr '\n' ' ')"
# The version installed first is called 1.0 below, whatever its number.
[ "$base" = "$scratch/debs/tether-agent_1.0.deb" ] || cp "$base" "$scratch/debs/tether-agent_1.0.deb"

# variant VERSION [FILLER_BYTES] [DROPIN_TEXT] [POSTINST_TAIL]: a copy of the
# base package with another version and, optionally, a big file, a tetherd
# drop-in (a plain file, not a conffile: a downgrade removes it) and a line
# appended to the postinst.
variant() {
    local v=$1 filler=${2:-0} dropin=${3:-} tail=${4:-} d="$scratch/v-$1"
    rm -rf "$d"
    dpkg-deb -R "$base" "$d"
    sed -i "s/^Version: .*/Version: $v/" "$d/DEBIAN/control"
    if [ "$filler" -gt 0 ]; then
        mkdir -p "$d/usr/share/tether-ota-test"
        head -c "$filler" /dev/urandom >"$d/usr/share/tether-ota-test/filler-$v.bin"
    fi
    if [ -n "$dropin" ]; then
        mkdir -p "$d/etc/tether/tetherd.conf.d"
        printf '%b' "$dropin" >"$d/etc/tether/tetherd.conf.d/99-ota-test.conf"
    fi
    if [ -n "$tail" ]; then
        sed -i '/^exit 0$/d' "$d/DEBIAN/postinst"
        printf '%s\n' "$tail" >>"$d/DEBIAN/postinst"
    fi
    dpkg-deb --root-owner-group -Znone --build "$d" "$scratch/debs/tether-agent_$v.deb" >/dev/null
    rm -rf "$d"
}
variant 2.0 $((10 * 1024 * 1024))
variant 3.0 0 '[Cloud]\nPort=1\n'
variant 3.1 0 '[Connection]\nKeepaliveSec=banana\n'
variant 3.2 0 '' 'echo "postinst of 3.2: failing on purpose" >&2; exit 1'
variant 2.1 0
variant 2.2 0
ok "made $(cd "$scratch/debs" && ls | tr '\n' ' ')"

# ---------------------------------------------------------------------------
step "Debian $suite root (mmdebstrap, cached in $cache)"
libs=$(for f in "$scratch/ctr"/usr/local/sbin/* "$scratch/ctr"/usr/local/bin/* "$scratch"/stage/usr/sbin/tetherd \
    "$scratch"/stage/usr/libexec/tether/tether-ota-helper; do [ -f "$f" ] && ldd "$f"; done 2>/dev/null |
    awk '$3 ~ /^\// {print $3}' | sort -u | while read -r l; do dpkg -S "$(readlink -f "$l")" 2>/dev/null ||
    dpkg -S "$l" 2>/dev/null; done | cut -d: -f1 | sort -u)
deps=$(for d in "$base" ${debdir:+"$debdir"/tether-cloud_*.deb "$debdir"/tether-cli_*.deb}; do
    dpkg-deb -f "$d" Depends; echo; done | tr ',' '\n' | sed -e 's/(.*)//' -e 's/|.*//' -e 's/[[:space:]]//g' | grep -v '^$')
packages=$(printf '%s\n' "${BASE_PACKAGES[@]}" $libs $deps | grep -v '^tether' | sort -u | tr '\n' ',' | sed 's/,$//')
key=$(printf '%s\n%s\n%s\n' "$suite" "$packages" "ota-v1" | sha256sum | cut -c1-16)
root="$cache/rootfs-$suite-$key"
log "    packages: $packages"
if [ -d "$root" ]; then
    ok "cache hit: $root"
else
    mkdir -p "$cache"
    rm -rf "$root.tmp"
    if ! mmdebstrap --variant=apt --include="$packages" --format=directory \
        --customize-hook='chroot "$1" systemctl mask console-getty.service getty@.service systemd-networkd-wait-online.service >/dev/null 2>&1 || true' \
        "$suite" "$root.tmp" >"$scratch/mmdebstrap.log" 2>&1; then
        tail -n 30 "$scratch/mmdebstrap.log"
        rm -rf "$root.tmp"
        skip "mmdebstrap failed (no mirror reachable?)"
    fi
    mv "$root.tmp" "$root"
    ok "built $root"
fi
cp -a "$root" "$scratch/root"
cp -a "$scratch/ctr/." "$scratch/root/"
# The agent and the cloud certificate use the name localhost.
grep -qs '^127.0.0.1[[:space:]].*localhost' "$scratch/root/etc/hosts" ||
    printf '127.0.0.1 localhost\n' >>"$scratch/root/etc/hosts"

# PKI, update key and configuration, made on the host.
pki="$scratch/root/etc/tether/pki"
"$host_build/tools/tether-pki" ca "$pki" >/dev/null
"$host_build/tools/tether-pki" server "$pki" localhost 127.0.0.1 >/dev/null
dev=$("$host_build/tools/tether-pki" device "$pki" | tail -n1 | awk '{print $NF}')
"$host_build/tools/tether-pki" token "$scratch/root/etc/tether/api-tokens" >"$scratch/token"
token=$(tail -n1 "$scratch/token" | awk '{print $NF}')
mkdir -p "$scratch/root/etc/tether/ota-keys" "$scratch/root/root"
"$host_build/tools/tether" ota keygen "$scratch/root/root/update.key" "$scratch/root/etc/tether/ota-keys/update.pem" \
    >/dev/null 2>&1 || fail "tether ota keygen failed"
cp "$pki/ca.crt" "$scratch/root/etc/tether/ca.crt"
cp "$pki/devices/$dev.crt" "$scratch/root/etc/tether/device.crt"
cp "$pki/devices/$dev.key" "$scratch/root/etc/tether/device.key"
# The packaged tetherd.conf is a conffile: the test's settings go into a
# drop-in there (read after it); the minimal package has no tetherd.conf.
conf="$scratch/root/etc/tether/tetherd.conf"
if [ -n "$debdir" ]; then
    mkdir -p "$scratch/root/etc/tether/tetherd.conf.d"
    conf="$scratch/root/etc/tether/tetherd.conf.d/00-ota-test.conf"
fi
cat >"$conf" <<EOF
[Cloud]
Host=localhost
CAFile=/etc/tether/ca.crt
[Device]
Certificate=/etc/tether/device.crt
Key=/etc/tether/device.key
[Connection]
ReconnectMinSec=0.2
ReconnectMaxSec=1
[OTA]
Keyring=/etc/tether/ota-keys
TrialSec=3
HealthTimeoutSec=30
LockTimeoutSec=10
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
[OTA]
ArtifactDirectory=/root/artifacts
EOF
cp "$scratch"/debs/*.deb "$scratch/root/root/"

# ---------------------------------------------------------------------------
step "boot it: systemd-nspawn -b --register=no --keep-unit --private-network"
systemd-nspawn -D "$scratch/root" -b --register=no --keep-unit --private-network -M "tether-ota-$$" \
    --console=pipe </dev/null >"$scratch/boot.log" 2>&1 &
nspawn_pid=$!
deadline=$((SECONDS + 30))
until init_pid=$(pgrep -P "$nspawn_pid" | head -n1) && [ -n "$init_pid" ] &&
    [ "$(cat "/proc/$init_pid/comm" 2>/dev/null)" = systemd ]; do
    if ! kill -0 "$nspawn_pid" 2>/dev/null; then
        tail -n 20 "$scratch/boot.log"
        init_pid=
        skip "systemd-nspawn cannot boot a container here"
    fi
    [ $SECONDS -lt $deadline ] || fail "no container init after 30 s"
    sleep 0.1
done
bus_up() { nsenter -t "$init_pid" -a test -S /run/systemd/private; }
wait_for 30 "manager socket up" bus_up || skip "the container's systemd did not come up"
state=$(timeout 90 nsenter -t "$init_pid" -a systemctl is-system-running --wait 2>/dev/null)
case $state in running | degraded) ok "booted ($state), container init is host PID $init_pid" ;;
*) skip "the container did not finish booting (state '${state:-none}')" ;; esac

step "cloud (transient unit), agent 1.0 installed with dpkg, device online"
ctr systemd-run --quiet --unit=test-cloud --property=Type=notify /usr/local/sbin/tether-cloudd \
    --config /root/cloud.conf || ctr systemd-run --quiet --unit=test-cloud --property=Type=notify \
    /usr/sbin/tether-cloudd --config /root/cloud.conf || fail "cannot start tether-cloudd"
ctr useradd --system --home-dir /var/lib/tether --no-create-home tether 2>/dev/null
ctr sh -c 'chgrp tether /etc/tether/device.key && chmod 0640 /etc/tether/device.key'
ctr env DEBIAN_FRONTEND=noninteractive dpkg -i /root/tether-agent_1.0.deb >"$scratch/install.log" 2>&1 ||
    { cat "$scratch/install.log"; fail "dpkg -i 1.0 failed"; }
tether_ctr() { ctr env TETHER_API=http://127.0.0.1:8080 TETHER_TOKEN="$token" tether "$@"; }
online() { tether_ctr list | awk -v d="$dev" '$1 == d && $2 == "online" { f = 1 } END { exit !f }'; }
wait_for 30 "device online" online || fail "device not online: $(tether_ctr list 2>&1)"
[ "$(ctr systemctl is-active tether-ota-helper.path)" = active ] || fail "tether-ota-helper.path is not active"
ok "tetherd $(ctr systemctl is-active tetherd), tether-ota-helper.path active"
ctr /usr/libexec/tether/tether-ota-helper seed /root/tether-agent_1.0.deb >/dev/null ||
    fail "seeding the rollback cache failed"
ok "1.0 kept for rollback in /var/lib/tether-ota/pkgs"

installed() { ctr dpkg-query -W -f='${Version} ${db:Status-Abbrev}' tether-agent; }
# update VERSION: run `tether ota` in the container; sets $out, $rc, $took.
update() {
    local start=$SECONDS
    local t0 t1
    t0=$(date +%s.%N)
    out=$(tether_ctr ota "$dev" "/root/tether-agent_$1.deb" --key /root/update.key --json --timeout 180 2>"$scratch/ota.err")
    rc=$?
    t1=$(date +%s.%N)
    took=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
    job_json=$(printf '%s\n' "$out" | tail -n1)
    log "    tether ota $1: exit $rc in ${took} s: $(printf '%s' "$job_json" | grep -o '"state":"[a-z-]*"' | head -n1) $(printf '%s' "$job_json" | grep -o '"code":"[a-z-]*"' | head -n1)"
}
field() { printf '%s' "$job_json" | grep -o "\"$1\":\"[^\"]*\"" | head -n1 | cut -d'"' -f4; }
history() { printf '%s' "$job_json" | grep -o '"state":"[a-z-]*","at"' | cut -d'"' -f4 | tr '\n' ' '; }
back_online() {
    local want=$1
    [ "$(ctr systemctl is-active tetherd)" = active ] || fail "tetherd is $(ctr systemctl is-active tetherd) after the job"
    wait_for 30 "device online again" online || fail "device not online after the job"
    [ "$(installed)" = "$want ii " ] || [ "$(installed)" = "$want ii" ] || fail "dpkg says '$(installed)', expected $want"
    ok "tether-agent $(installed), tetherd active, device online"
}

# ---------------------------------------------------------------------------
step "self-update to 2.0 (10 MB): committed"
main_pid=$(ctr systemctl show -p MainPID --value tetherd)
update 2.0
[ $rc -eq 0 ] && [ "$(field state)" = committed ] || { cat "$scratch/ota.err"; fail "2.0 not committed (exit $rc)"; }
log "    history: $(history)"
new_pid=$(ctr systemctl show -p MainPID --value tetherd)
[ "$new_pid" != "$main_pid" ] || fail "tetherd was not restarted by the update"
back_online 2.0
ctr journalctl -u tether-ota-helper.service -o cat --no-pager | grep -q 'trial -> committed' ||
    fail "the helper's journal has no commit"
log "    figure: 10 MB agent package, tether ota start to committed: ${took} s (TrialSec=3)"

step "3.0, an agent that cannot reach the cloud: rolled back (unhealthy)"
update 3.0
[ $rc -eq 8 ] && [ "$(field state)" = rolled-back ] && [ "$(field code)" = unhealthy ] ||
    { cat "$scratch/ota.err"; fail "3.0: exit $rc, $(field state)/$(field code)"; }
log "    reason: $(field reason)"
back_online 2.0

step "3.1, an agent that crash-loops: rolled back (crash-loop)"
update 3.1
[ $rc -eq 8 ] && [ "$(field state)" = rolled-back ] && [ "$(field code)" = crash-loop ] ||
    { cat "$scratch/ota.err"; fail "3.1: exit $rc, $(field state)/$(field code): $(field reason)"; }
log "    reason: $(field reason)"
ctr systemctl reset-failed tetherd 2>/dev/null
back_online 2.0

step "3.2, a postinst that fails: rolled back (install-failed)"
update 3.2
[ $rc -eq 8 ] && [ "$(field state)" = rolled-back ] && [ "$(field code)" = install-failed ] ||
    { cat "$scratch/ota.err"; fail "3.2: exit $rc, $(field state)/$(field code): $(field reason)"; }
log "    reason: $(field reason)"
back_online 2.0

step "2.1, the agent killed (SIGKILL, whole cgroup) during the trial: committed"
tether_ctr ota "$dev" /root/tether-agent_2.1.deb --key /root/update.key --no-wait >"$scratch/job" 2>"$scratch/ota.err" ||
    { cat "$scratch/ota.err"; fail "cannot start the 2.1 job"; }
job=$(cat "$scratch/job")
in_trial() { ctr grep -q '"state": "trial"' /var/lib/tether/ota/job.json; }
wait_for 60 "job in trial" in_trial || fail "2.1 never reached the trial"
ctr systemctl kill --signal=SIGKILL tetherd
final() { tether_ctr ota status "$job" --json | grep -q '"final":true'; }
wait_for 90 "job final" final || fail "2.1 did not end: $(tether_ctr ota status "$job" 2>&1)"
job_json=$(tether_ctr ota status "$job" --json)
[ "$(field state)" = committed ] || fail "2.1 ended $(field state): $(field reason)"
log "    history: $(history)"
back_online 2.1

step "2.2 with Launcher=transient (tetherd as root): StartTransientUnit, the unit name as the lock"
ctr mkdir -p /etc/systemd/system/tetherd.service.d /etc/tether/tetherd.conf.d
# Root with the right to manage units (systemd checks CAP_SYS_ADMIN of a
# root caller); the packaged unit's sandbox drops every capability, and
# its system call filter refuses chown, which dpkg-deb's tar does as root.
ctr sh -c 'printf "[Service]\nUser=root\nGroup=root\nPrivateUsers=no\nCapabilityBoundingSet=CAP_SYS_ADMIN CAP_DAC_OVERRIDE CAP_CHOWN CAP_FOWNER\nSystemCallFilter=\n" >/etc/systemd/system/tetherd.service.d/50-ota-test-root.conf'
ctr sh -c 'printf "[OTA]\nLauncher=transient\n" >/etc/tether/tetherd.conf.d/50-ota-test-transient.conf'
ctr systemctl daemon-reload
ctr systemctl restart tetherd
wait_for 30 "device online as root" online || fail "device not online after the restart as root"
tether_ctr ota "$dev" /root/tether-agent_2.2.deb --key /root/update.key --no-wait >"$scratch/job" 2>"$scratch/ota.err" ||
    { cat "$scratch/ota.err"; fail "cannot start the 2.2 job"; }
job=$(cat "$scratch/job")
wait_for 60 "job in trial" in_trial || fail "2.2 never reached the trial"
[ "$(ctr systemctl is-active tether-ota-install.service)" = active ] ||
    fail "the helper does not run as tether-ota-install.service"
if ctr systemd-run --quiet --unit=tether-ota-install.service /bin/true 2>"$scratch/second.err"; then
    fail "a second tether-ota-install.service could be started"
fi
ok "a second start is refused: $(head -n1 "$scratch/second.err")"
wait_for 90 "job final" final || fail "2.2 did not end"
job_json=$(tether_ctr ota status "$job" --json)
[ "$(field state)" = committed ] || fail "2.2 ended $(field state): $(field reason)"
ctr journalctl -o cat --no-pager | grep -q "Started tether-ota-install.service" ||
    fail "no tether-ota-install.service in the journal"
ctr rm -f /etc/systemd/system/tetherd.service.d/50-ota-test-root.conf /etc/tether/tetherd.conf.d/50-ota-test-transient.conf
ctr chown -R tether:tether /var/lib/tether
ctr systemctl daemon-reload
ctr systemctl restart tetherd
back_online 2.2

log "PASS: all $STEP steps in $((SECONDS - T0)) s"
