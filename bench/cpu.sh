#!/usr/bin/env bash
# CPU speed, ours vs llama.cpp, side by side in one run on this machine.
#
#   bench/cpu.sh            # every model, 1 and 2 threads, 3 rounds each
#   ROUNDS=1 MODELS="smollm2-q4_1" THREADS="2" bench/cpu.sh
#
# Sets up target/bench (a Python venv with llama-cpp-python 0.3.36, which builds llama.cpp
# from source for this CPU, plus gguf and numpy), makes the benchmark models there (SmolLM2
# re-quantized to Q8_0; a Qwen3-0.6B-shaped random GGUF at Q8_0 and Q4_K_M), then for each
# model and thread count runs llama.cpp and `wasmlm bench` back to back, alternating, on a
# 512-token prompt and 128 greedy tokens. Prints one line per pair and a Markdown table of
# the ratios (ours / llama.cpp), and the component/native ratio of our two paths.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-"1 2"}
MODELS=${MODELS:-"smollm2-q4_1 smollm2-q8_0 qwen3-shape-q8_0 qwen3-shape-q4_k_m"}
PROMPT=${PROMPT:-512}
GEN=${GEN:-128}
dir=target/bench
venv=$dir/venv
py=$venv/bin/python

if ! "$py" -c "import llama_cpp, gguf, numpy" 2>/dev/null; then
  echo "setting up $venv (builds llama.cpp from source: several minutes)" >&2
  python3 -m venv "$venv"
  "$py" -m pip install -q llama-cpp-python==0.3.36 gguf==0.19.0 numpy
fi
cargo build --release --locked -q
wasmlm=./target/release/wasmlm
"$wasmlm" pull smollm2 qwen3-tokenizer >&2
models=${WASMLM_MODELS:-$HOME/.cache/wasmlm/models}

model_file() {
  case "$1" in
    smollm2-q4_1) echo "$models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf" ;;
    smollm2-q8_0)
      f=$dir/smollm2-135m-q8_0.gguf
      [ -f "$f" ] || "$py" bench/requantize.py "$(model_file smollm2-q4_1)" "$f" q8_0 >&2
      echo "$f" ;;
    qwen3-shape-q8_0|qwen3-shape-q4_k_m)
      kind=${1#qwen3-shape-}
      f=$dir/qwen3-0.6b-shape-$kind.gguf
      [ -f "$f" ] || "$py" bench/make_qwen3_gguf.py "$models/qwen3-tokenizer" "$f" "$kind" >&2
      echo "$f" ;;
    *) echo "unknown model $1" >&2; exit 2 ;;
  esac
}

field() { grep -Eo "$1=[0-9.]+" | head -1 | cut -d= -f2; }

rows=()
echo "date=$(date -u +%F) cpu=\"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)\" rounds=$ROUNDS prompt=$PROMPT gen=$GEN"
for m in $MODELS; do
  f=$(model_file "$m")
  for t in $THREADS; do
    lp=0 ld=0 op=0 od=0 cr=""
    for r in $(seq "$ROUNDS"); do
      # Alternate which engine goes first, so drift on a shared machine favours neither.
      run_llama() {
        out=$("$py" bench/llama_cpp_bench.py "$f" --threads "$t" --prompt-tokens "$PROMPT" --gen-tokens "$GEN" --rounds 1)
        lp=$(printf '%s\n%s\n' "$lp" "$(echo "$out" | field prefill_tok_s)" | sort -g | tail -1)
        ld=$(printf '%s\n%s\n' "$ld" "$(echo "$out" | field decode_tok_s)" | sort -g | tail -1)
      }
      run_ours() {
        out=$("$wasmlm" bench --model "$f" --threads "$t" --prompt-tokens "$PROMPT" --gen-tokens "$GEN" --rounds 1)
        best=$(echo "$out" | grep '^best')
        op=$(printf '%s\n%s\n' "$op" "$(echo "$best" | field native_prefill_tok_s)" | sort -g | tail -1)
        od=$(printf '%s\n%s\n' "$od" "$(echo "$best" | field native_decode_tok_s)" | sort -g | tail -1)
        cr="$cr $(echo "$out" | grep '^median' | grep -Eo 'decode=[0-9.]+' | cut -d= -f2)"
      }
      if [ $((r % 2)) -eq 1 ]; then run_llama; run_ours; else run_ours; run_llama; fi
    done
    ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }
    echo "model=$m threads=$t llama_prefill=$lp ours_prefill=$op llama_decode=$ld ours_decode=$od component_over_native_decode=[${cr# }]"
    rows+=("| $m | $t | $lp | $op | **$(ratio "$op" "$lp")** | $ld | $od | **$(ratio "$od" "$ld")** |")
  done
done
echo
echo "| model | threads | llama.cpp prefill tok/s | ours | ours/llama.cpp | llama.cpp decode tok/s | ours | ours/llama.cpp |"
echo "|---|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
