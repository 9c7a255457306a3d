#!/usr/bin/env bash
# GPU speed: wasmlm on CUDA vs PyTorch transformers, side by side on one GPU machine.
#
#   bench/gpu.sh prepare     # here (no GPU): build the CUDA binary, pack what the GPU machine
#                            # needs into target/gpu-carry (≤ 64 MiB: it travels with `carry`)
#   bench/gpu.sh models      # there: make the random Qwen3-0.6B-shaped models (bf16 folder,
#                            # q8_0 GGUF) from carried tokenizer files; numpy only
#   bench/gpu.sh run         # there: transformers, then ours, on both models; prints the table
#   bench/gpu.sh all         # there: models + run
#   DEVICE=cpu PROMPT=16 GEN=8 ROUNDS=1 STREAMS=2 bench/gpu.sh all
#                            # here: a dry run of the whole script on the CPU (needs torch and
#                            # transformers in $PY), to catch its mistakes before a GPU session
#
# What `run` measures (PROMPT=512 prompt tokens, GEN=128 greedy tokens, ROUNDS=3, STREAMS=8):
# prefill and decode tok/s at batch 1 through the component (`wasmlm bench`), and from them the
# time to the first token of a PROMPT-token prompt; the aggregate tok/s of STREAMS concurrent
# requests to a node (`wasmlm bench-serve`, over HTTP); and the same for transformers (bf16,
# one forward pass for the prompt, `generate` for the rest, batch 1 and STREAMS). The decode roofline is the device's copy bandwidth (bytes
# read + written per second, measured by torch) over the model's weight bytes per token (its
# file's size; the tied embedding counts once, as the output projection that reads it all).
#
# The GPU machine has the CUDA driver, a toolkit, PyTorch and transformers but no Rust and no
# registry; WORK (default /tmp/wasmlm-gpu) holds the models and the unpacked binary.
set -euo pipefail
cd "$(dirname "$0")/.."

CARRY=${CARRY:-target/gpu-carry}
WORK=${WORK:-/tmp/wasmlm-gpu}
PROMPT=${PROMPT:-512}
GEN=${GEN:-128}
ROUNDS=${ROUNDS:-3}
STREAMS=${STREAMS:-8}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda:0}
TF_DEVICE=cuda
[ "$DEVICE" = cpu ] && TF_DEVICE=cpu

prepare() {
  scripts/build-cuda.sh
  rm -rf "$CARRY" && mkdir -p "$CARRY/py"
  local bin=target/x86_64-unknown-linux-gnu/release/wasmlm
  strip -o "$CARRY/wasmlm" "$bin"
  gzip -9 "$CARRY/wasmlm"
  ./target/release/wasmlm pull qwen3-tokenizer >&2 || "$bin" pull qwen3-tokenizer >&2
  local models=${WASMLM_MODELS:-$HOME/.cache/wasmlm/models}
  mkdir -p "$CARRY/qwen3-tokenizer"
  for f in tokenizer.json tokenizer_config.json; do
    gzip -9 -c "$models/qwen3-tokenizer/$f" > "$CARRY/qwen3-tokenizer/$f.gz"
  done
  # gguf-py (pure Python) and what it imports, for making the GGUF there.
  local venv=target/bench/venv
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -c "import gguf" 2>/dev/null || "$venv/bin/python" -m pip install -q gguf==0.19.0 numpy
  local site
  site=$("$venv/bin/python" -c "import gguf, os; print(os.path.dirname(os.path.dirname(gguf.__file__)))")
  for p in gguf yaml tqdm; do
    cp -r "$site/$p" "$CARRY/py/"
  done
  find "$CARRY/py" -name '__pycache__' -type d -prune -exec rm -rf {} +
  find "$CARRY/py" -name '*.so' -delete
  du -sh "$CARRY"
  local kib
  kib=$(du -sk "$CARRY" | cut -f1)
  if [ "$kib" -gt $((60 * 1024)) ]; then
    echo "gpu.sh: $CARRY is ${kib} KiB, over what a call may carry" >&2
    exit 1
  fi
}

unpack() {
  mkdir -p "$WORK"
  if [ ! -x "$WORK/wasmlm" ] || [ "$CARRY/wasmlm.gz" -nt "$WORK/wasmlm" ]; then
    gunzip -c "$CARRY/wasmlm.gz" > "$WORK/wasmlm"
    chmod +x "$WORK/wasmlm"
  fi
  mkdir -p "$WORK/qwen3-tokenizer"
  for f in tokenizer.json tokenizer_config.json; do
    [ -f "$WORK/qwen3-tokenizer/$f" ] || gunzip -c "$CARRY/qwen3-tokenizer/$f.gz" > "$WORK/qwen3-tokenizer/$f"
  done
}

# The binary loads the CUDA libraries at run time (scripts/build-cuda.sh): point it at the
# driver's and the toolkit's (or PyTorch's wheels'), under the unversioned names it asks first.
cuda_libs() {
  local dir="$WORK/cuda-libs"
  mkdir -p "$dir"
  local search=(/usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/cuda/lib64
    /usr/local/cuda/targets/x86_64-linux/lib)
  local torch_nvidia
  torch_nvidia=$("$PY" -c "import nvidia, os; print(' '.join(os.path.join(p, d, 'lib') for p in nvidia.__path__ for d in os.listdir(p)))" 2>/dev/null || true)
  for lib in cuda cublas cublasLt curand nvrtc; do
    local found=""
    for d in "${search[@]}" $torch_nvidia; do
      found=$(ls -1 "$d"/lib$lib.so* 2>/dev/null | sort -V | tail -1 || true)
      [ -n "$found" ] && break
    done
    if [ -z "$found" ]; then
      echo "gpu.sh: lib$lib.so not found (searched ${search[*]} $torch_nvidia)" >&2
      continue
    fi
    ln -sf "$found" "$dir/lib$lib.so"
    echo "gpu.sh: lib$lib.so -> $found" >&2
  done
  export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

models() {
  unpack
  [ -f "$WORK/qwen3-hf/model.safetensors" ] ||
    "$PY" bench/make_qwen3_safetensors.py "$WORK/qwen3-tokenizer" "$WORK/qwen3-hf"
  [ -f "$WORK/qwen3-q8_0.gguf" ] ||
    PYTHONPATH="$(cd "$CARRY" && pwd)/py${PYTHONPATH:+:$PYTHONPATH}" \
      "$PY" bench/make_qwen3_gguf.py "$WORK/qwen3-tokenizer" "$WORK/qwen3-q8_0.gguf" q8_0
}

field() { grep -Eo "$1=[0-9.]+" | tail -1 | cut -d= -f2; }

run() {
  unpack
  cuda_libs
  local bin="$WORK/wasmlm"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  echo "date=$(date -u +%F) prompt=$PROMPT gen=$GEN rounds=$ROUNDS streams=$STREAMS"

  local tf
  tf=$("$PY" bench/transformers_bench.py "$WORK/qwen3-hf" --prompt "$PROMPT" --gen "$GEN" \
    --batch "1,$STREAMS" --rounds "$ROUNDS" --device "$TF_DEVICE" | tee /dev/stderr)
  local bw tf_d1 tf_dn tf_p1 tf_ttft
  bw=$(echo "$tf" | field copy_bandwidth_gb_s)
  tf_p1=$(echo "$tf" | grep "batch=1 " | field prefill_tok_s)
  tf_d1=$(echo "$tf" | grep "batch=1 " | field decode_tok_s)
  tf_ttft=$(echo "$tf" | grep "batch=1 " | field ttft_ms)
  tf_dn=$(echo "$tf" | grep "batch=$STREAMS " | field decode_tok_s)

  printf '\n| model | prefill tok/s (vs transformers) | decode tok/s (vs transformers) | decode / roofline | %s streams tok/s (vs transformers) | first token after %s prompt tokens, ms (transformers) |\n|---|---|---|---|---|---|\n' "$STREAMS" "$PROMPT" > "$WORK/table.md"
  for m in qwen3-hf qwen3-q8_0.gguf; do
    local path="$WORK/$m" bytes
    if [ -d "$path" ]; then bytes=$(stat -c %s "$path/model.safetensors"); else bytes=$(stat -c %s "$path"); fi
    local b s
    b=$("$bin" bench --model "$path" --device "$DEVICE" --prompt-tokens "$PROMPT" \
      --gen-tokens "$GEN" --rounds "$ROUNDS" | tee /dev/stderr)
    s=$("$bin" bench-serve --model "$path" --device "$DEVICE" --streams "1,$STREAMS" \
      --gen-tokens "$GEN" --rounds 1 | tee /dev/stderr)
    local p d agg ttft
    p=$(echo "$b" | grep '^best' | field component_prefill_tok_s)
    d=$(echo "$b" | grep '^best' | field component_decode_tok_s)
    agg=$(echo "$s" | grep "^streams=$STREAMS " | field aggregate_tok_s)
    ttft=$("$PY" -c "import sys; print(1e3 * $PROMPT / float(sys.argv[1]))" "$p")
    "$PY" - "$m" "$p" "$d" "$agg" "$ttft" "$bytes" "$bw" "$tf_p1" "$tf_d1" "$tf_dn" "$tf_ttft" >> "$WORK/table.md" <<'EOF'
import sys
m, p, d, agg, ttft, size, bw, tp, td, tn, tt = sys.argv[1:]
f = lambda x: float(x) if x else float("nan")
p, d, agg, ttft, size, bw, tp, td, tn, tt = map(f, (p, d, agg, ttft, size, bw, tp, td, tn, tt))
roof = bw * 1e9 / size
print(f"| {m} | {p:.0f} ({p / tp:.2f}×) | {d:.1f} ({d / td:.2f}×) | {d / roof:.0%} of {roof:.0f} "
      f"| {agg:.0f} ({agg / tn:.2f}×) | {ttft:.1f} ({tt:.1f}) |")
EOF
  done
  cat "$WORK/table.md"
  if [ -n "${OUT:-}" ]; then cp "$WORK/table.md" "$OUT/"; fi
}

case "${1:-all}" in
  prepare) prepare ;;
  models) models ;;
  run) run ;;
  all) models && run ;;
  *) echo "usage: bench/gpu.sh prepare|models|run|all" >&2; exit 2 ;;
esac
