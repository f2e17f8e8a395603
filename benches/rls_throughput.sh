#!/usr/bin/env bash
# End-to-end throughput of the RLS gRPC endpoint, measured with h2load (Debian nghttp2-client):
# a release hivemind on loopback, one descriptor per request, a limit high enough that every call
# is admitted, 100 concurrent streams (10 connections x 10 streams), as in the reference figures
# for other Envoy RLS servers in the README. Client and server share the machine: compare ratios
# measured in one run, not absolute numbers across machines.
#
#   benches/rls_throughput.sh [--strategy NAME] [--over-limit] [--threads N] [--floor]
#                             [--rps CALLS_PER_SECOND] [--connections N] [DURATION_SECONDS]
#
# --strategy redis starts its own redis-server (Debian's; persistence off) on a free loopback
# port and points hivemind at it. --over-limit sets the limit to 100 per hour, so nearly every
# call is over the limit (to measure the redis over-limit cache: run it once more with
# HIVEMIND_REDIS__OVER_LIMIT_CACHE=false). HIVEMIND_* variables reach the server (e.g.
# HIVEMIND_REDIS__TIMEOUT=20ms); an unknown one makes it refuse to start (its stderr is printed).
# The strategy's /stats figures are printed at the end, because h2load counts gRPC errors
# (carried in trailers) as successes.
#
# --threads N passes `--threads N` (server.threads: gRPC event loops; 0 = one shared
# multi-thread runtime) to hivemind and the floor. --floor also measures the floor, the
# constant-answer server of examples/rls_floor.rs on the same gRPC stack and serving model,
# in the same run. --rps fixes the offered load (total, split over the connections) so that
# server CPU per call compares like with like; without it h2load sends as fast as it can.
# --connections N opens N client connections instead of 10 (each with 10 streams), to show an
# unbalanced accept. Server CPU per call is utime+stime (/proc/PID/stat fields 14-15) over the measured h2load run
# (after a 1 s warm-up run), divided by the calls.
#
# RLS_BENCH_BIN=path runs that binary instead of building target/release/hivemind, and
# RLS_FLOOR_BIN=path that floor instead of target/release/examples/rls_floor (to compare two
# builds side by side). Not HIVEMIND_BIN: every HIVEMIND_* variable is a setting.
set -euo pipefail
cd "$(dirname "$0")/.."

strategy=standalone
limit=4000000000
threads=
floor=false
rps=
connections=10
while [ "$#" -gt 0 ]; do
  case "$1" in
    --strategy) strategy=$2; shift 2 ;;
    --over-limit) limit=100; shift ;;
    --threads) threads=$2; shift 2 ;;
    --floor) floor=true; shift ;;
    --rps) rps=$2; shift 2 ;;
    --connections) connections=$2; shift 2 ;;
    *) break ;;
  esac
done
duration=${1:-10}
command -v h2load >/dev/null || { echo "h2load missing: apt-get install -y nghttp2-client" >&2; exit 1; }

bin=${RLS_BENCH_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release --quiet --bin hivemind
  bin=target/release/hivemind
fi
floor_bin=${RLS_FLOOR_BIN:-}
if [ "$floor" = true ] && [ -z "$floor_bin" ]; then
  cargo build --release --quiet --example rls_floor
  floor_bin=target/release/examples/rls_floor
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
thread_args=()
[ -n "$threads" ] && thread_args=(--threads "$threads")

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

# Starts "$@" in the background (pid in $pid), waits for its `listening` line; on failure
# prints its stderr and exits.
start_server() {
  "$@" > "$work/stdout" 2> "$work/stderr" &
  pid=$!
  for _ in $(seq 100); do
    grep -q 'listening' "$work/stdout" && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  addr=$(grep -o 'grpc=[^ ]*' "$work/stdout" | cut -d= -f2 || true)
  if [ -z "$addr" ]; then
    echo "server failed to start: $*" >&2
    cat "$work/stderr" >&2
    exit 1
  fi
}

# utime + stime of $pid in clock ticks (/proc/PID/stat fields 14 and 15; the command name,
# field 2, is cut off first because it may hold spaces).
cpu_ticks() {
  sed 's/^.*) //' "/proc/$pid/stat" | awk '{ print $12 + $13 }'
}

# Runs h2load against $addr, prints throughput, latency and server CPU per call; the summary
# line goes to $work/summary.
measure() {
  local name=$1 rate_args=()
  if [ -n "$rps" ]; then rate_args=(--rps "$(( (rps + connections - 1) / connections ))"); fi
  local url="http://$addr/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
  local h2=(h2load -t 1 -c "$connections" -m 10 -d "$work/body.bin"
    -H 'content-type: application/grpc' -H 'te: trailers' "${rate_args[@]}")
  "${h2[@]}" -D 1 "$url" > /dev/null
  local before after
  rm -f "$work/run.tsv"
  before=$(cpu_ticks)
  "${h2[@]}" -D "$duration" --log-file="$work/run.tsv" "$url" > "$work/h2load.out"
  after=$(cpu_ticks)
  echo "== $name"
  grep -E "^(finished in|requests:|status codes:)" "$work/h2load.out"
  sort -n -k3 "$work/run.tsv" | awk -v name="$name" -v ticks=$((after - before)) \
    -v hz="$(getconf CLK_TCK)" -v secs="$duration" '{ l[NR] = $3 } END {
    cpu = ticks / hz * 1e6 / NR
    printf "latency p50 %.2f ms, p99 %.2f ms (%d calls); server cpu %.2f us/call (%.2f cores)\n",
      l[int(NR*0.5)]/1000, l[int(NR*0.99)]/1000, NR, cpu, ticks / hz / secs
    printf "| %s | %.1fk | %.2f ms | %.2f ms | %.2f us |\n", name, NR / secs / 1000,
      l[int(NR*0.5)]/1000, l[int(NR*0.99)]/1000, cpu >> "'"$work/summary"'" }'
}

stop_server() {
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  pid=
}

label="hivemind $strategy${threads:+ threads=$threads} c=$connections"
start_server "$bin" -c "$work/rules.yaml" -a 127.0.0.1:0 --admin-addr 127.0.0.1:0 \
  --mesh-addr 127.0.0.1:0 --strategy "$strategy" "${thread_args[@]}" "${extra[@]}"
measure "$label"
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
server = stats.get("server")
if server:
    print("serving:", json.dumps(server))
PY
stop_server

if [ "$floor" = true ]; then
  start_server "$floor_bin" --addr 127.0.0.1:0 "${thread_args[@]}"
  measure "floor${threads:+ threads=$threads} c=$connections"
  stop_server
fi

echo
echo "| server | calls/s | p50 | p99 | server cpu/call |"
echo "| --- | --- | --- | --- | --- |"
cat "$work/summary"
