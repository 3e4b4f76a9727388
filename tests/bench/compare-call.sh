#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Side by side in one run (docs/design/benchmarks.md): a tether function
# call through tether-cloudd's HTTP API to tetherd and back, against an MQTT
# v5 request/response through Mosquitto (QoS 0 and 1), all on loopback with
# TLS client certificates. Repetitions are interleaved so machine noise
# hits every contender alike. Prints figures; never pass/fail.
#
#   tests/bench/compare-call.sh [BUILD_DIR] [REPS] [CALLS]
#
# Needs: make bench (in BUILD_DIR, default build/), mosquitto.
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
build=$(cd "${1:-$top/build}" && pwd)
reps=${2:-3}
calls=${3:-2000}
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || { echo "needs mosquitto (apt-get install mosquitto)"; exit 77; }
[ -x "$build/tests/bench/bench-mqtt" ] || { echo "run 'make bench' in $build first (needs libmosquitto-dev)"; exit 77; }

tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

pki=$build/tools/tether-pki
"$pki" ca "$tmp/pki" >/dev/null
"$pki" server "$tmp/pki" localhost 127.0.0.1 >/dev/null
dev=$("$pki" device "$tmp/pki" | awk '{print $NF}')
mq=$("$pki" device "$tmp/pki" | awk '{print $NF}')
token=$("$pki" token "$tmp/tokens" | awk '{print $NF}')
coap=$(port); api=$(port); mport=$(port)

cat > "$tmp/cloud.conf" <<EOF
[Cloud]
Listen=127.0.0.1
Port=$coap
CAFile=$tmp/pki/ca.crt
Certificate=$tmp/pki/server.crt
Key=$tmp/pki/server.key
[API]
Port=$api
TokenFile=$tmp/tokens
# Calls back to back, thousands a second: not the API's rate limits.
RateLimitPerAddress=0
RateLimitPerToken=0
EOF
cat > "$tmp/agent.conf" <<EOF
[Cloud]
Host=localhost
Port=$coap
CAFile=$tmp/pki/ca.crt
[Device]
Certificate=$tmp/pki/devices/$dev.crt
Key=$tmp/pki/devices/$dev.key
[Plugins]
Directory=$build/plugins/example/.libs
[Plugin example]
IntervalSec=0
EOF
cat > "$tmp/mosquitto.conf" <<EOF
listener $mport 127.0.0.1
cafile $tmp/pki/ca.crt
certfile $tmp/pki/server.crt
keyfile $tmp/pki/server.key
require_certificate true
set_tcp_nodelay true
persistence false
user root
allow_anonymous true
log_dest none
EOF

"$build/cloud/tether-cloudd" --config "$tmp/cloud.conf" 2>"$tmp/cloud.log" & pids+=($!); cloud_pid=$!
"$build/agent/tetherd" --config "$tmp/agent.conf" 2>"$tmp/agent.log" & pids+=($!); agent_pid=$!
$(command -v mosquitto || echo /usr/sbin/mosquitto) -c "$tmp/mosquitto.conf" & pids+=($!)
export TETHER_API=http://127.0.0.1:$api TETHER_TOKEN=$token
for _ in $(seq 150); do
    "$build/tools/tether" describe "$dev" >/dev/null 2>&1 && break
    sleep 0.1
done
"$build/tools/tether" describe "$dev" >/dev/null || { cat "$tmp"/*.log; exit 1; }

echo "# $(nproc) cores, $(uname -r), $reps interleaved repetitions of $calls calls each"
summary=()
for r in $(seq "$reps"); do
    out=$("$build/tests/bench/bench-call" --device "$dev" --function add --arg 1,2 -n "$calls" --reps 1 \
          --agent-pid "$agent_pid" --cloud-pid "$cloud_pid")
    summary+=("tether call (HTTP->cloud->CoAP/TLS->agent)  rep $r: $(awk '$1=="all"{print "median "$2" ms, p99 "$4" ms"}' <<<"$out")")
    [ "$r" = 1 ] && grep -E "RssAnon|bytes" <<<"$out" | sed 's/^/# /'
    for q in 0 1; do
        out=$("$build/tests/bench/bench-mqtt" --port "$mport" --qos "$q" -n "$calls" --reps 1 \
              --cafile "$tmp/pki/ca.crt" --cert "$tmp/pki/devices/$mq.crt" --key "$tmp/pki/devices/$mq.key")
        summary+=("MQTT v5 req/resp via Mosquitto, QoS $q           rep $r: $(awk '$1=="all"{print "median "$2" ms, p99 "$4" ms"}' <<<"$out")")
    done
done
printf '%s\n' "${summary[@]}" | sort -s -k1,5
