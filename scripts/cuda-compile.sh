#!/usr/bin/env bash
# Compiles every built-in cell's generated CUDA kernels, and the chunked path's own kernels, with
# NVRTC and ptxas, here, without a GPU (scripts/cuda_compile.py: forward, backward and step
# kernels, several sizes, f32, bf16 and f16, and the schedules the GPU sweep times), and prints
# each kernel's registers and spills as Markdown.
# Fails if a kernel does not compile, or if one that holds its states in registers spills under
# the default schedule.
#
# NVRTC, ptxas and the CUDA headers come from NVIDIA's CUDA 13.0 wheels on PyPI (the GPU machine
# has CUDA 13), unpacked once into target/cuda-13.0/ (ignored by git). Set RAK_CUDA to a CUDA
# root with lib/libnvrtc.so.13, bin/ptxas and include/ to use another.
#
# Usage: scripts/cuda-compile.sh [--rak PATH] [--jobs N]   (default: target/release/rak,
# as `cargo test --release --workspace` builds it)
set -euo pipefail
cd "$(dirname "$0")/.."

cuda=${RAK_CUDA:-}
if [ -z "$cuda" ]; then
    root=target/cuda-13.0
    cuda=$root/nvidia/cu13
    if [ ! -x "$cuda/bin/ptxas" ]; then
        rm -rf "$root"
        python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore \
            --no-deps --only-binary=:all: --target "$root" \
            nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96
    fi
fi
cuda=$(cd "$cuda" && pwd)
# NVRTC loads its builtins library from the library path.
export LD_LIBRARY_PATH="$cuda/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# `rak emit` builds the kernel definitions on a wgpu adapter (the CPU one will do).
export CUBECL_WGPU_DEFAULT_DEVICE=${CUBECL_WGPU_DEFAULT_DEVICE:-Cpu}
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
exec python3 scripts/cuda_compile.py --cuda "$cuda" "$@"
