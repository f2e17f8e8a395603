#!/usr/bin/env bash
# End-to-end throughput of the RLS gRPC endpoint, measured with h2load (Debian nghttp2-client):
# a release hivemind on loopback, one descriptor per request, a limit high enough that every call
# is admitted, 100 concurrent streams (10 connections x 10 streams), as in the reference figures
# for other Envoy RLS servers in the README. Client and server share the machine: compare ratios
# measured in one run, not absolute numbers across machines.
#
#   benches/rls_throughput.sh [--strategy NAME] [--over-limit] [DURATION_SECONDS]
#
# --strategy redis starts its own redis-server (Debian's; persistence off) on a free loopback
# port and points hivemind at it. --over-limit sets the limit to 100 per hour, so nearly every
# call is over the limit (to measure the redis over-limit cache: run it once more with
# HIVEMIND_REDIS__OVER_LIMIT_CACHE=false). HIVEMIND_* variables reach the server (e.g.
# HIVEMIND_REDIS__TIMEOUT=20ms). The strategy's /stats figures are printed at the end, because
# h2load counts gRPC errors (carried in trailers) as successes.
#
# HIVEMIND_BIN=path runs that binary instead of building target/release/hivemind (to compare
# two builds side by side).
set -euo pipefail
cd "$(dirname "$0")/.."

strategy=standalone
limit=4000000000
while [ "$#" -gt 0 ]; do
  case "$1" in
    --strategy) strategy=$2; shift 2 ;;
    --over-limit) limit=100; shift ;;
    *) break ;;
  esac
done
duration=${1:-10}
command -v h2load >/dev/null || { echo "h2load missing: apt-get install -y nghttp2-client" >&2; exit 1; }

bin=${HIVEMIND_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release --quiet
  bin=target/release/hivemind
fi
work=$(mktemp -d)
pid=
redis_pid=
trap 'kill $pid $redis_pid 2>/dev/null || true; wait $pid $redis_pid 2>/dev/null || true; rm -rf "$work"' EXIT

extra=()
if [ "$strategy" = redis ]; then
  command -v redis-server >/dev/null || {
    echo "redis-server missing: apt-get install -y redis-server redis-tools" >&2; exit 1; }
  redis_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize no --logfile "$work/redis.log" &
  redis_pid=$!
  for _ in $(seq 100); do
    redis-cli -p "$redis_port" ping 2>/dev/null | grep -q PONG && break; sleep 0.05
  done
  extra=(--redis-url "redis://127.0.0.1:$redis_port")
fi

cat > "$work/rules.yaml" <<'YAML'
domain: bench
descriptors:
  - key: generic_key
    value: bench
    rate_limit: { unit: hour, requests_per_unit: LIMIT }
YAML
sed -i "s/LIMIT/$limit/" "$work/rules.yaml"

# One gRPC frame: flag 0, big-endian length, then RateLimitRequest{domain: "bench",
# descriptors: [{entries: [{key: "generic_key", value: "bench"}]}]} in protobuf.
python3 - "$work/body.bin" <<'PY'
import struct, sys
def field(n, payload):            # length-delimited field n
    return bytes([n << 3 | 2, len(payload)]) + payload
entry = field(1, b"generic_key") + field(2, b"bench")
request = field(1, b"bench") + field(2, field(1, entry))
open(sys.argv[1], "wb").write(b"\0" + struct.pack(">I", len(request)) + request)
PY

"$bin" -c "$work/rules.yaml" -a 127.0.0.1:0 --admin-addr 127.0.0.1:0 \
  --mesh-addr 127.0.0.1:0 --strategy "$strategy" "${extra[@]}" > "$work/stdout" 2> "$work/stderr" &
pid=$!
for _ in $(seq 100); do grep -q 'listening' "$work/stdout" && break; sleep 0.1; done
addr=$(grep -o 'grpc=[^ ]*' "$work/stdout" | cut -d= -f2)
[ -n "$addr" ] || { cat "$work/stderr" >&2; exit 1; }

h2load -t 1 -c 10 -m 10 -D "$duration" --warm-up-time=1 -d "$work/body.bin" \
  -H 'content-type: application/grpc' -H 'te: trailers' --log-file="$work/run.tsv" \
  "http://$addr/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit" \
  | grep -E "^(finished in|requests:|status codes:)"
sort -n -k3 "$work/run.tsv" | awk '{ l[NR] = $3 } END {
  printf "latency p50 %.2f ms, p99 %.2f ms (%d calls)\n", l[int(NR*0.5)]/1000, l[int(NR*0.99)]/1000, NR }'
admin=$(grep -o 'admin=[^ ]*' "$work/stdout" | cut -d= -f2)
python3 - "$admin" <<'PY'
import json, sys, urllib.request
stats = json.load(urllib.request.urlopen(f"http://{sys.argv[1]}/stats"))
backend = stats.get("backend")
if backend:
    keys = ("state", "script_calls", "round_trips", "timeouts", "errors", "policy_answers", "over_limit_cache")
    print("strategy figures:", json.dumps({k: backend.get(k) for k in keys if k in backend}))
    # h2load counts a gRPC error as a success: say when calls were answered by the failure
    # policy instead of Redis, so such a run is not mistaken for Redis's throughput.
    if backend.get("policy_answers", 0) or backend.get("timeouts", 0):
        print(f"WARNING: {backend.get('policy_answers', 0)} calls answered by redis.on_failure "
              f"after {backend.get('timeouts', 0)} timeouts: calls/s above is not Redis's; rerun on "
              "a quieter machine or raise HIVEMIND_REDIS__TIMEOUT")
PY
