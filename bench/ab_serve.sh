#!/usr/bin/env bash
# Runs a client benchmark against `wasmlm serve` with two components in turn, alternating
# rounds, so that both see the same machine noise (docs/perf.md says why).
#
#   bench/ab_serve.sh OLD.wasm NEW.wasm ROUNDS [SERVE_ARGS...] -- CLIENT_CMD...
#
# In CLIENT_CMD, `{url}` stands for the node's base URL (http://127.0.0.1:PORT/v1), e.g.
#   bench/ab_serve.sh old.wasm new.wasm 2 --slots 1 -- python3 bench/json_pattern.py {url}
# The host binary is target/release/wasmlm (WASMLM overrides it); PORT defaults to 8090.
set -euo pipefail
[ $# -ge 4 ] || { sed -n 5,9p "$0" >&2; exit 2; }
old=$1 new=$2 rounds=$3
shift 3
serve_args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do serve_args+=("$1"); shift; done
[ $# -gt 1 ] || { echo "ab_serve.sh: no client command after --" >&2; exit 2; }
shift
wasmlm=${WASMLM:-target/release/wasmlm}
port=${PORT:-8090}
client=()
for arg in "$@"; do client+=("${arg//\{url\}/http://127.0.0.1:$port/v1}"); done
for round in $(seq "$rounds"); do
  for side in old new; do
    component=$old
    [ "$side" = new ] && component=$new
    "$wasmlm" serve --component "$component" --listen "127.0.0.1:$port" "${serve_args[@]}" \
      > "${TMPDIR:-/tmp}/ab_serve-$side.log" 2>&1 &
    pid=$!
    trap 'kill $pid 2>/dev/null' EXIT
    for _ in $(seq 120); do
      curl -sf "127.0.0.1:$port/health" > /dev/null && break
      kill -0 $pid 2>/dev/null || { cat "${TMPDIR:-/tmp}/ab_serve-$side.log" >&2; exit 1; }
      sleep 1
    done
    echo "== round $round: $side ($component)"
    "${client[@]}"
    kill $pid
    wait $pid 2>/dev/null || true
  done
done
