#!/usr/bin/env bash
# A local edge cluster: three `wasmlm serve` nodes labelled as an L40S, an A10G and a CPU box
# (all really running on this CPU) behind one `edge-gateway`, on loopback.
#
#   scripts/local-cluster.sh [BASE_PORT] [--keys FILE]
#
# The gateway listens on BASE_PORT (default 8080), the nodes on the next three ports. Its first
# line on stdout is the gateway's URL, printed once every node is healthy; logs go to files in
# a temporary folder (named on stderr). --keys FILE adds client keys, an admin key and limits:
# FILE is TOML (top-level `admin_key = ...` first, then [[keys]] tables, as in gateway.toml).
# SIGINT/SIGTERM stop everything.
set -euo pipefail
cd "$(dirname "$0")/.."

base=8080
keys=""
while [ $# -gt 0 ]; do
  case "$1" in
    --keys) keys="${2:?--keys needs a file}"; shift 2 ;;
    --keys=*) keys="${1#--keys=}"; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) base="$1"; shift ;;
  esac
done
case "$base" in ''|*[!0-9]*) echo "local-cluster: BASE_PORT must be a number, got '$base'" >&2; exit 2 ;; esac
[ -z "$keys" ] || [ -r "$keys" ] || { echo "local-cluster: cannot read $keys" >&2; exit 2; }

bin="${CARGO_TARGET_DIR:-target}/release"
if [ ! -x "$bin/wasmlm" ] || [ ! -x "$bin/edge-gateway" ]; then
  echo "local-cluster: building the release binaries" >&2
  cargo build --release -p wasmlm-host -p wasmlm-edge-gateway >&2
fi
# Fetch the default model once, so the three nodes do not race to fetch it.
"$bin/wasmlm" pull smollm2 >&2

logs="$(mktemp -d -t wasmlm-cluster.XXXXXX)"
echo "local-cluster: logs in $logs" >&2
pids=()
stop() {
  trap - INT TERM EXIT
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM
trap stop EXIT

i=1
for node in "l40s gpu=L40S" "a10g gpu=A10G" "cpu device=cpu"; do
  set -- $node
  port=$((base + i))
  "$bin/wasmlm" serve --listen "127.0.0.1:$port" --node-id "$1" --label "$2" --threads 1 \
    >"$logs/node-$1.log" 2>&1 &
  pids+=($!)
  i=$((i + 1))
done

config="$logs/gateway.toml"
{
  echo 'health_interval = "1s"'
  [ -z "$keys" ] || cat "$keys"
  for j in 1 2 3; do printf '[[nodes]]\nurl = "http://127.0.0.1:%d"\n' $((base + j)); done
  # The default model may run on these devices only (as our users' Qwen3-0.6B is catalogued for
  # L40S and A10G, not A100 or H100).
  printf '[[models]]\nname = "smollm2"\ndevices = ["L40S", "A10G", "cpu"]\n'
} >"$config"
"$bin/edge-gateway" --config "$config" --listen "127.0.0.1:$base" >"$logs/gateway.log" 2>&1 &
pids+=($!)

url="http://127.0.0.1:$base"
for _ in $(seq 600); do
  for p in "${pids[@]}"; do
    kill -0 "$p" 2>/dev/null || { echo "local-cluster: a process exited; see $logs" >&2; tail -n 5 "$logs"/*.log >&2; exit 1; }
  done
  up=$(python3 - "$url/health" <<'PY' 2>/dev/null || true
import json, sys, urllib.request
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=2)
    print(json.load(r)["nodes"]["ready"])
except Exception as e:
    print(json.loads(e.read())["nodes"]["ready"] if hasattr(e, "read") else 0)
PY
)
  if [ "$up" = "3" ]; then
    echo "$url"
    echo "local-cluster: 3 nodes healthy behind $url (Ctrl-C stops)" >&2
    wait
    exit 0
  fi
  sleep 0.5
done
echo "local-cluster: the nodes did not become healthy in 5 minutes; see $logs" >&2
exit 1
