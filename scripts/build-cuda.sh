#!/usr/bin/env bash
# Builds `wasmlm` with candle's CUDA backend on a machine with no GPU and no CUDA toolkit, for a
# GPU machine with a CUDA driver (any CUDA 11.8+ driver; the one we target has CUDA 13).
#
#   scripts/build-cuda.sh            # → target/x86_64-unknown-linux-gnu/release/wasmlm
#
# What it takes, and why:
# - nvcc compiles candle's kernels to PTX at build time. Debian's non-free nvidia-cuda-toolkit
#   (CUDA 11.8) is the one nvcc a registry offers here; it is installed when missing (as root).
#   Kernels are made for compute capability 8.0 (`CUDA_COMPUTE_CAP`) as PTX, which the driver
#   JIT-compiles for any GPU of that generation or newer: A10G (8.6), L40S (8.9), H100/H200
#   (9.0). candle also compiles its quantized mat-vec kernels (libmoe) to sm_80 machine code,
#   which an sm_90 GPU cannot run; NVCC_APPEND_FLAGS adds their PTX beside it. (Asking for 90
#   instead would not help: candle's builder turns it into sm_90a, which CUDA 11.8 lacks.)
# - cudarc (candle's CUDA bindings) is switched from linking the CUDA libraries to loading them
#   at run time (`--cfg feature="dynamic-loading"`, its own mechanism, which candle's features
#   do not expose). A linked binary would need this machine's CUDA 11.8 sonames
#   (libcublas.so.11) on the GPU machine; a loading one finds whatever libcuda/libcublas/
#   libcurand/libnvrtc the driver and toolkit there provide (`bench/gpu.sh` points
#   LD_LIBRARY_PATH at them), and still starts, CPU models and all, where there are none.
# - libmoe calls the CUDA runtime (libcudart), which candle links as a shared library; the
#   runtime is linked statically instead (as nvcc itself does by default): CUDA_ROOT points
#   cudarc's link search at a folder where `-lcudart` finds libcudart_static.a.
# - `--target` keeps those flags off build scripts (cudarc's own would refuse the mix), and the
#   CPU level stays x86-64-v3 as in .cargo/config.toml: the GPU machine's CPU is not this one.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvcc >/dev/null; then
  if [ "$(id -u)" != 0 ]; then
    echo "build-cuda: nvcc is missing; install Debian's nvidia-cuda-toolkit (non-free) or run as root" >&2
    exit 1
  fi
  # Debian's own source list, with the non-free component the toolkit lives in.
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    sed -i 's/^Components: main$/Components: main contrib non-free/' /etc/apt/sources.list.d/debian.sources
  fi
  if [ -f /etc/apt/sources.list ]; then
    sed -i -E 's/^(deb [^#]* main)$/\1 contrib non-free/' /etc/apt/sources.list
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nvidia-cuda-toolkit
fi
nvcc --version | tail -n 2

export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
export NVCC_APPEND_FLAGS="-gencode=arch=compute_${CUDA_COMPUTE_CAP},code=compute_${CUDA_COMPUTE_CAP}"
link_dir="$PWD/target/cuda-link"
static_rt=""
for d in /usr/lib/x86_64-linux-gnu /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -f "$d/libcudart_static.a" ] && static_rt="$d/libcudart_static.a" && break
done
[ -n "$static_rt" ] || { echo "build-cuda: libcudart_static.a not found" >&2; exit 1; }
mkdir -p "$link_dir/lib"
ln -sf "$static_rt" "$link_dir/lib/libcudart.a"
export CUDA_ROOT="$link_dir"
export RUSTFLAGS="-C target-cpu=x86-64-v3 --cfg feature=\"dynamic-loading\""
triple=x86_64-unknown-linux-gnu
cargo build --release --locked --target "$triple" -p wasmlm-host --features cuda --bin wasmlm "$@"

bin="target/$triple/release/wasmlm"
# The proof that nothing CUDA is linked: the binary must start on a machine without CUDA.
needed=$(readelf -d "$bin" | grep NEEDED || true)
if grep -Eq '(cuda|cublas|curand|nvrtc)' <<<"$needed"; then
  echo "build-cuda: $bin links CUDA libraries directly; it would not start elsewhere:" >&2
  echo "$needed" >&2
  exit 1
fi
echo "$needed"
ls -l "$bin"
echo "build-cuda: $bin (CUDA, PTX for compute capability ${CUDA_COMPUTE_CAP:0:1}.${CUDA_COMPUTE_CAP:1})"
