#!/bin/sh
# Load for a Compose scenario (test/Makefile): waits until Envoy is ready, sends 5 requests per
# second to URL for SECONDS (default 6), prints how many got each status, and fails unless some
# were admitted (200) and some limited (429) and none failed otherwise. The rules
# (compose/ratelimit.yaml) admit 10 per minute on /generic, so a 6-second run sees both.
#
#   compose/drive.sh http://127.0.0.1:10000/generic http://127.0.0.1:9901 6
set -eu
url=${1:?usage: drive.sh URL ENVOY_ADMIN_URL [SECONDS]}
admin=${2:?usage: drive.sh URL ENVOY_ADMIN_URL [SECONDS]}
seconds=${3:-6}

# Envoy answers /ready once its listeners and the rls cluster are up; at most 60 s.
tries=0
until [ "$(curl -s -o /dev/null -w '%{http_code}' "$admin/ready")" = 200 ]; do
  tries=$((tries + 1))
  if [ "$tries" -ge 120 ]; then
    echo "drive.sh: Envoy at $admin not ready after 60 s" >&2
    exit 1
  fi
  sleep 0.5
done

admitted=0 limited=0 other=0
n=0
while [ "$n" -lt $((seconds * 5)) ]; do
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url" || true)
  case $code in
    200) admitted=$((admitted + 1)) ;;
    429) limited=$((limited + 1)) ;;
    *) other=$((other + 1)); echo "drive.sh: request $((n + 1)): status $code" >&2 ;;
  esac
  n=$((n + 1))
  sleep 0.2
done

echo "drive.sh: $n requests in ${seconds}s: $admitted admitted (200), $limited limited (429), $other other"
if [ "$admitted" -gt 0 ] && [ "$limited" -gt 0 ] && [ "$other" -eq 0 ]; then
  echo "drive.sh: ok"
else
  echo "drive.sh: FAILED: expected some 200, some 429 and nothing else" >&2
  exit 1
fi
