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
# Usage: scripts/cuda-compile.sh [--sass] [--rak PATH] [--jobs N]   (default: target/release/rak,
# as `cargo test --release --workspace` builds it)
# --sass: also disassemble each kernel (cuobjdump and nvdisasm from NVIDIA's wheels, unpacked once
# into target/cuda-sass-tools/; the 13.0 releases are not on PyPI, later ones read sm_90a code
# alike) and report the size of its time loop and the spills inside it.
set -euo pipefail
cd "$(dirname "$0")/.."

args=()
for arg in "$@"; do
    if [ "$arg" = --sass ]; then
        tools=target/cuda-sass-tools
        if [ ! -x "$tools/nvidia/cu13/bin/nvdisasm" ]; then
            rm -rf "$tools"
            python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore \
                --no-deps --only-binary=:all: --target "$tools" \
                nvidia-cuda-cuobjdump==13.2.86 nvidia-cuda-nvdisasm==13.5.37
            chmod +x "$tools"/nvidia/cu13/bin/*
        fi
        args+=(--sass-tools "$(cd "$tools/nvidia/cu13/bin" && pwd)")
    else
        args+=("$arg")
    fi
done
set -- "${args[@]+"${args[@]}"}"

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
