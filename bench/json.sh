#!/usr/bin/env bash
# JSON mode's cost, ours vs llama.cpp's, in one run on this machine: each engine's greedy
# decode in JSON mode over its own free-text decode of the same request (a JSON list of 40
# countries, so both ways write much the same tokens).
#
#   bench/json.sh                      # SmolLM2 Q4_1 and the Qwen3-0.6B-shaped Q8_0, 3 rounds
#   ROUNDS=1 MODELS="smollm2-q4_1" bench/json.sh
#
# Uses bench/cpu.sh's venv (llama-cpp-python 0.3.36) and models under target/bench; run
# bench/cpu.sh once first to make them.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-2}
MODELS=${MODELS:-"smollm2-q4_1 qwen3-shape-q8_0"}
py=target/bench/venv/bin/python
models=${WASMLM_MODELS:-$HOME/.cache/wasmlm/models}
"$py" -c "import llama_cpp" 2>/dev/null || { echo "run bench/cpu.sh first (it sets up $py)" >&2; exit 2; }
cargo build --release --locked -q

for m in $MODELS; do
  case "$m" in
    smollm2-q4_1) f=$models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf; gen=128 ;;
    qwen3-shape-q8_0) f=target/bench/qwen3-0.6b-shape-q8_0.gguf; gen=64 ;;
    *) echo "unknown model $m" >&2; exit 2 ;;
  esac
  echo "== $m ($gen tokens, $THREADS threads)"
  ./target/release/wasmlm bench-serve --model "$f" --gen-tokens "$gen" --rounds "$ROUNDS" \
    --streams 1 --threads "$THREADS" 2>/dev/null | grep -Eo "(json_[a-z_]+=[0-9.]+ ?)+|json mode/free text decode=[0-9.]+"
  "$py" bench/llama_cpp_json.py "$f" "$gen" "$ROUNDS" "$THREADS"
done
