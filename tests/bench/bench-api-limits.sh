#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# What the API's rate limits cost a client that stays under them: function
# calls through tether-cloudd with the limits off (RateLimitPerAddress=0,
# RateLimitPerToken=0) beside the same calls with them on, set high enough
# never to answer 429, so every request takes its tokens from both
# buckets. Two clouds, each with its own tetherd, run at once; bench-call
# alternates between them in each repetition (docs/design/benchmarks.md).
#   tests/bench/bench-api-limits.sh [BUILD_DIR] [REPS] [CALLS]
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
build=$(cd "${1:-$top/build}" && pwd)
reps=${2:-5}
calls=${3:-3000}
[ -x "$build/tests/bench/bench-call" ] || { echo "run 'make bench' in $build first"; exit 77; }

tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

pki=$build/tools/tether-pki
"$pki" ca "$tmp/pki" >/dev/null
"$pki" server "$tmp/pki" localhost 127.0.0.1 >/dev/null
token=$("$pki" token "$tmp/tokens" | awk '{print $NF}')
declare -A dev api cloud_pid agent_pid
for mode in off on; do
    dev[$mode]=$("$pki" device "$tmp/pki" | awk '{print $NF}')
    coap=$(port); api[$mode]=$(port)
    if [ "$mode" = off ]; then
        limits=$'RateLimitPerAddress=0\nRateLimitPerToken=0'
    else
        limits=$'RateLimitPerAddress=1000000\nRateLimitPerToken=1000000'
    fi
    cat > "$tmp/cloud-$mode.conf" <<EOF
[Cloud]
Listen=127.0.0.1
Port=$coap
CAFile=$tmp/pki/ca.crt
Certificate=$tmp/pki/server.crt
Key=$tmp/pki/server.key
[API]
Port=${api[$mode]}
TokenFile=$tmp/tokens
$limits
[State]
Directory=$tmp/state-$mode
EOF
    cat > "$tmp/agent-$mode.conf" <<EOF
[Cloud]
Host=localhost
Port=$coap
CAFile=$tmp/pki/ca.crt
[Device]
Certificate=$tmp/pki/devices/${dev[$mode]}.crt
Key=$tmp/pki/devices/${dev[$mode]}.key
[State]
Directory=$tmp/agent-state-$mode
[Plugins]
Directory=$build/plugins/example/.libs
[Plugin example]
IntervalSec=0
EOF
    "$build/cloud/tether-cloudd" --config "$tmp/cloud-$mode.conf" 2>"$tmp/cloud-$mode.log" & pids+=($!)
    cloud_pid[$mode]=$!
    "$build/agent/tetherd" --config "$tmp/agent-$mode.conf" 2>"$tmp/agent-$mode.log" & pids+=($!)
    agent_pid[$mode]=$!
done
export TETHER_TOKEN=$token
for mode in off on; do
    for _ in $(seq 150); do
        TETHER_API=http://127.0.0.1:${api[$mode]} "$build/tools/tether" describe "${dev[$mode]}" >/dev/null 2>&1 && break
        sleep 0.1
    done
    TETHER_API=http://127.0.0.1:${api[$mode]} "$build/tools/tether" describe "${dev[$mode]}" >/dev/null ||
        { cat "$tmp"/*.log; exit 1; }
done

echo "# $(nproc) cores, $(uname -r), $reps interleaved repetitions of $calls calls each, one kept-alive client"
declare -A med p99 rate
for r in $(seq "$reps"); do
    for mode in off on; do
        out=$(TETHER_API=http://127.0.0.1:${api[$mode]} "$build/tests/bench/bench-call" --api "http://127.0.0.1:${api[$mode]}" \
              --device "${dev[$mode]}" --function add --arg 1,2 -n "$calls" --reps 1 2>&1) || { echo "$out"; exit 1; }
        line=$(awk '$1=="all"' <<<"$out")
        [ "$(awk '{print $7}' <<<"$line")" = 0 ] || { echo "errors in run: $line"; exit 1; }
        med[$mode]+="$(awk '{print $2}' <<<"$line") "
        p99[$mode]+="$(awk '{print $4}' <<<"$line") "
        rate[$mode]+="$(awk '{print $6}' <<<"$line") "
    done
done
grep -h "429\|rate_limited" "$tmp"/cloud-*.log && { echo "a limit was reached: the figures are not 'under the limits'"; exit 1; }
mmm() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{v[NR]=$1} END {printf "%s / %s / %s", v[1], v[int((NR+1)/2)], v[NR]}'; }
printf '%-34s %-26s %-26s %s\n' "API rate limits" "median ms (min/med/max)" "p99 ms (min/med/max)" "calls/s (min/med/max)"
for mode in off on; do
    printf '%-34s %-26s %-26s %s\n' "$mode" "$(mmm "${med[$mode]}")" "$(mmm "${p99[$mode]}")" "$(mmm "${rate[$mode]}")"
done
