# SPDX-License-Identifier: Apache-2.0
# What the system tests share (sourced, not run): logging, waits, and a
# Debian root made with mmdebstrap (cached), booted with
#   systemd-nspawn -b --register=no --keep-unit --private-network
# and entered with nsenter. The caller sets $scratch (its scratch
# directory) before calling container_root or container_boot, and may set
# JOURNAL_LINES (how much of the journal a failure prints).

STEP=0
T0=$SECONDS
nspawn_pid=
init_pid=

log() { echo "$(printf '%4ds' $((SECONDS - T0))) $*"; }
step() { STEP=$((STEP + 1)); log "==> [$STEP] $*"; }
ok() { log "    ok: $*"; }
fail() { log "FAIL: $*"; exit 1; }
skip() { echo "SKIP: $*"; exit 77; }

# Run a command inside the container (all its namespaces), clean env.
ctr() {
    nsenter -t "$init_pid" -a env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        LANG=C.UTF-8 SYSTEMD_PAGER= SYSTEMD_COLORS=0 TERM=dumb "$@"
}

# wait_for TIMEOUT DESCRIPTION COMMAND...: the command's state has no
# notification we can block on from outside, so poll it against a deadline.
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

# The EXIT trap: on failure the container's journal, then power off (or
# kill) the container and remove the scratch directory, unless
# TETHER_TEST_KEEP is set and the test failed.
container_cleanup() {
    local rc=$?
    if [ -n "$init_pid" ] && kill -0 "$init_pid" 2>/dev/null; then
        if [ $rc -ne 0 ] && [ $rc -ne 77 ]; then
            echo "--- journal of the failed run (last ${JOURNAL_LINES:-80} lines) ---"
            ctr journalctl --no-pager -n "${JOURNAL_LINES:-80}" -o short-monotonic 2>/dev/null | sed 's/^/    /'
        fi
        # SIGRTMIN+4 asks systemd for poweroff.target, no bus needed.
        kill -s SIGRTMIN+4 "$init_pid" 2>/dev/null
    fi
    if [ -n "$nspawn_pid" ]; then
        for _ in $(seq 75); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$nspawn_pid" 2>/dev/null; then
            log "container did not power off in 15 s, killing it"
            [ -n "$init_pid" ] && kill -KILL "$init_pid" 2>/dev/null
            kill -TERM "$nspawn_pid" 2>/dev/null
            for _ in $(seq 50); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.2; done
            kill -KILL "$nspawn_pid" 2>/dev/null
        fi
        wait "$nspawn_pid" 2>/dev/null
    fi
    if [ -n "${TETHER_TEST_KEEP:-}" ] && [ $rc -ne 0 ]; then
        echo "kept $scratch"
    else
        rm -rf "$scratch"
    fi
    log "cleaned up (exit $rc)"
    exit $rc
}

# container_root SUITE PACKAGES TAG: a bookworm root with PACKAGES (comma
# separated), cached in $TETHER_ROOTFS_CACHE (default
# /var/cache/tether-test) under a hash of the three, copied to
# $scratch/root. mmdebstrap reuses the host's apt sources; it makes no
# /etc/hosts, so the hook writes one (IPv4 localhost, like this machine).
container_root() {
    local suite=$1 packages=$2 tag=$3 cache=${TETHER_ROOTFS_CACHE:-/var/cache/tether-test} key root start
    key=$(printf '%s\n%s\n%s\n' "$suite" "$packages" "$tag" | sha256sum | cut -c1-16)
    root="$cache/rootfs-$suite-$key"
    log "    packages: $packages"
    if [ -d "$root" ]; then
        ok "cache hit: $root"
    else
        mkdir -p "$cache"
        rm -rf "$root.tmp"
        start=$SECONDS
        if ! mmdebstrap --variant=apt --include="$packages" --format=directory \
            --customize-hook='printf "127.0.0.1\tlocalhost\n::1\tip6-localhost ip6-loopback\n" > "$1/etc/hosts"' \
            --customize-hook='chroot "$1" systemctl mask console-getty.service getty@.service systemd-networkd-wait-online.service >/dev/null 2>&1 || true' \
            "$suite" "$root.tmp" >"$scratch/mmdebstrap.log" 2>&1; then
            tail -n 30 "$scratch/mmdebstrap.log"
            rm -rf "$root.tmp"
            fail "mmdebstrap failed"
        fi
        mv "$root.tmp" "$root"
        ok "built $root in $((SECONDS - start)) s"
    fi
    cp -a "$root" "$scratch/root"
}

# container_boot MACHINE [NSPAWN OPTIONS...]: boot $scratch/root and wait
# until its systemd is running; sets init_pid (the container's PID 1 as
# seen from here). Skips where systemd-nspawn cannot boot a container.
container_boot() {
    local machine=$1 deadline state
    shift
    systemd-nspawn -D "$scratch/root" -b --register=no --keep-unit --private-network -M "$machine" \
        --console=pipe "$@" </dev/null >"$scratch/boot.log" 2>&1 &
    nspawn_pid=$!
    deadline=$((SECONDS + 30))
    # nspawn forks helpers first; the container's init is the child that
    # has become systemd.
    until init_pid=$(pgrep -P "$nspawn_pid" | head -n1) && [ -n "$init_pid" ] &&
        [ "$(cat "/proc/$init_pid/comm" 2>/dev/null)" = systemd ]; do
        if ! kill -0 "$nspawn_pid" 2>/dev/null; then
            tail -n 20 "$scratch/boot.log"
            init_pid=
            skip "systemd-nspawn cannot boot a container here (see the boot log above)"
        fi
        [ $SECONDS -lt $deadline ] || { tail -n 20 "$scratch/boot.log"; fail "no container init after 30 s"; }
        sleep 0.1
    done
    # systemctl needs the manager's socket; it appears early in the boot.
    bus_up() { nsenter -t "$init_pid" -a test -S /run/systemd/private; }
    wait_for 30 "manager socket up" bus_up ||
        { tail -n 30 "$scratch/boot.log"; skip "the container's systemd did not come up"; }
    state=$(timeout 90 nsenter -t "$init_pid" -a systemctl is-system-running --wait 2>"$scratch/state.err")
    case $state in
    running) ok "booted: system is running (container init is host PID $init_pid)" ;;
    degraded) ok "booted: degraded; failed units: $(ctr systemctl --failed --no-legend --plain | awk '{print $1}' | tr '\n' ' ')" ;;
    *)
        tail -n 30 "$scratch/boot.log" "$scratch/state.err"
        skip "the container did not finish booting (state '${state:-none}')"
        ;;
    esac
}
