#!/usr/bin/env bash
# Prepares issue 6's one device call, here (no GPU needed): builds the CUDA kernel tests and the
# `rak` binary with `--features cuda`, bundles them (stripped, gzipped) with the wheels the GPU
# machine lacks into gpu-bundle/ (ignored by git), and prints the device call to make.
#
# On the GPU machine, scripts/gpu-run.sh then runs, in one call of under 10 minutes: the
# kernel tests of every cell on CUDA, `rak bench` at the issue's shapes (f32 and bf16, and the
# chunked form), bench/peers.py (PyTorch loop, flash-linear-attention, compute and memory
# floors), the seed's LM table (`rak train -m experiment=...` on the GPU, and a 4-layer D = 512
# step), `rak bench generate` and a sweep of the schedule's knobs (`--cube-dim`, `--sum-parts`),
# and packs the logs and the tables into $OUT/results.tar.gz after every step (each step under its
# own cap and a deadline 585 s into the call, in order of need: the sweep and the chunked form
# without fusion come last and get what the others leave).
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=gpu-bundle
rm -rf "$bundle"
mkdir -p "$bundle/whl"

# The GPU machine has driver 580 / CUDA 13.
export CUDARC_CUDA_VERSION=13000
cargo build --release --workspace --features cuda --bin rak
# The kernel tests and the model tests (the chunked form against the interpreter, the chunked
# path's kernels and the LM's strategies against each other, on burn's CUDA backend), as
# executables.
test_executables=$(cargo test --release --workspace --features cuda --test kernels --test model --no-run \
    --message-format=json 2>/dev/null |
    python3 -c 'import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if message.get("reason") == "compiler-artifact" and message.get("executable") and message["target"]["name"] in ("kernels", "model"):
        print(message["target"]["name"], message["executable"])')
cp target/release/rak "$bundle/rak"
while read -r name executable; do
    cp "$executable" "$bundle/$name-cuda"
done <<< "$test_executables"
strip "$bundle/rak" "$bundle/kernels-cuda" "$bundle/model-cuda"
gzip -9 "$bundle/rak" "$bundle/kernels-cuda" "$bundle/model-cuda"

# flash-linear-attention is pure Python (it needs torch, triton and einops, which are there).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$bundle/whl" fla-core==0.6.0

# What the bundle was built from, for the device's record (device.txt) and BENCHMARKS.md.
{
    git rev-parse HEAD
    git status --porcelain --untracked-files=no | grep -q . && echo "with uncommitted changes"
    date -u
} > "$bundle/commit.txt" || true

du -sh "$bundle"/*
# A device call sends the working tree (what git does not ignore) and the carried bundle: 64 MiB
# in all, or the call is refused. Say so here rather than there.
limit=$((64 * 1024 * 1024))
tree=$(git ls-files -z --cached --others --exclude-standard | { du -cb --files0-from=- 2>/dev/null || true; } | tail -1 | cut -f1)
carried=$(du -sb "$bundle" | cut -f1)
echo "travels: working tree $((tree / 1024)) KiB + $bundle $((carried / 1024)) KiB = $(((tree + carried) / 1024)) KiB of $((limit / 1024)) KiB"
if ((tree + carried > limit)); then
    echo "too large for a device call (64 MiB in all): make the bundle or the tree smaller" >&2
    exit 1
fi
cat <<'TXT'
Ready. Make one device call:
  command:   bash scripts/gpu-run.sh   (arguments pick steps: see the header of gpu-run.sh)
  carry:     ["gpu-bundle"]
  timeout_s: 600
The call returns results.tar.gz (every log and table; a device call brings back at most 8 files),
with device.txt and table.md beside it. Unpack it (tar xzf results.tar.gz -C some-folder), then copy
table.md into BENCHMARKS.md with the device, the date and the commit (device.txt has all three).
TXT
