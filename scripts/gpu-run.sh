#!/usr/bin/env bash
# Runs on the GPU machine (see scripts/gpu-check.sh, which prepares gpu-bundle/ here).
# Usage: bash scripts/gpu-run.sh [STEP...]: the steps named (each a `step_*` function below),
# in that order, or by default `warm rak chunked chunked-bf16 peers lm generate` (issue 6's
# run, meant to end within 8 minutes) and then, in what time is left, `backward-sums tiles
# checkpoints profile sweep no-fusion`.
#
# What takes the time is compiling, not measuring: NVRTC compiles every kernel rak launches,
# Triton some 250 configurations of chunk_gla per element type and K, one after the other. So the
# first step, `warm`, runs side by side, on the 16 cores: the CUDA kernel tests (five processes),
# Triton compile-only processes per element type and K (bench/peers.py --compile-only: each
# configuration launched once into Triton's cache, nothing timed, no autotuning result kept; two
# per type at K = 128, each with half of the configurations) and one untimed pass of every rak
# measurement (kernels into cubecl's PTX cache, which the cubecl.toml written here turns on;
# matmul autotuning results into cubecl's cache). The steps after it time one thing at a time,
# alone on the GPU, and find their kernels compiled. (The only results taken while other work ran
# are the tests', which time nothing, and the autotuning picks of rak's matrix products, which can
# only have made rak slower; fla autotunes alone, in the peers step.)
#
# It writes into a results folder: device.txt (GPU, date, the bundle's commit, CUDA libraries
# found, the steps asked for), kernel-tests*.log, model-tests*.log, warm-*.log, fla-compile-*.log,
# rak-bench.md/.jsonl, chunked.md, rak-chunked.jsonl, chunked-bf16.md, peers.jsonl,
# peers.log, table.md, lm.log, lm-table.md, lm-d512.md, generate.md, tiles.md/.jsonl,
# checkpoints.md/.jsonl, backward-sums.md/.jsonl, kernel-profile.md/.log, sweep.md/.jsonl, chunked-no-fusion.md, rak-chunked-no-fusion.jsonl,
# steps.log (each step's exit status, time, and seconds since the start). A device call
# returns at most 8 files of $OUT, so the folder is packed into $OUT/results.tar.gz after every
# step (a call cut short still returns what the finished steps wrote), and device.txt and
# table.md (remade from what is measured so far) are copied beside it.
#
# Every command runs under a timeout: its own cap, and never past the call's deadline (585 s
# after the start, within the device call's 600 s); a command that finds no time left is
# skipped and says so in steps.log. (RAK_GPU_DEADLINE_S sets another deadline, for a dry run.)
set -uo pipefail
out=${OUT:-/tmp/rak-gpu-out}
res=/tmp/rak-gpu-results
rm -rf "$res" /tmp/rak-runs
mkdir -p "$out" "$res"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
deadline=$((SECONDS + ${RAK_GPU_DEADLINE_S:-585}))
# `within CAP COMMAND…`: runs COMMAND under `timeout`, for at most CAP seconds and never past
# the deadline; logs each step's exit status and time to steps.log.
within() {
    local cap=$1 left started=$SECONDS status
    shift
    left=$((deadline - SECONDS))
    ((left < cap)) && cap=$left
    if ((cap < 5)); then
        echo "skipped (no time left): $*" >> "$res/steps.log"
        return 124
    fi
    timeout "$cap" "$@"
    status=$?
    echo "exit $status after $((SECONDS - started)) s (cap $cap s, at $SECONDS s): $*" >> "$res/steps.log"
    return $status
}
save() {
    python3 bench/table.py "$res/rak-bench.jsonl" "$res/peers.jsonl" "$res/rak-chunked.jsonl" \
        > "$res/table.md" 2>&1
    tar -czf "$out/results.tar.gz.part" -C "$res" . && mv -f "$out/results.tar.gz.part" "$out/results.tar.gz"
    for file in device.txt table.md; do
        [ -e "$res/$file" ] && cp -f "$res/$file" "$out/$file"
    done
    return 0
}

{ nvidia-smi; date -u; echo "bundle built from:"; cat gpu-bundle/commit.txt; } > "$res/device.txt" 2>&1

# The rak binaries load the CUDA driver (libcuda.so.1) and NVRTC (libnvrtc.so.13) when they
# first touch the device. If the loader does not find NVRTC, take the first folder of the
# toolkit or of NVIDIA's Python wheels that holds it; device.txt says what was found.
loads() { python3 -c "import ctypes, sys; [ctypes.CDLL(name) for name in sys.argv[1:]]" "$@" 2>/dev/null; }
if ! loads libnvrtc.so.13 && ! loads libnvrtc.so; then
    for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
        $(find /usr/local /opt -name 'libnvrtc.so.13*' -printf '%h\n' 2>/dev/null | sort -u); do
        if [ -e "$dir/libnvrtc.so.13" ] || [ -e "$dir/libnvrtc.so" ]; then
            export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
            break
        fi
    done
fi
{
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
    for lib in libcuda.so.1 libnvrtc.so.13; do
        loads "$lib" && echo "$lib: loads" || echo "$lib: NOT FOUND (the rak binaries cannot use CUDA)"
    done
} >> "$res/device.txt" 2>&1
save
gunzip -kf gpu-bundle/rak.gz gpu-bundle/kernels-cuda.gz gpu-bundle/model-cuda.gz
chmod +x gpu-bundle/rak gpu-bundle/kernels-cuda gpu-bundle/model-cuda
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site gpu-bundle/whl/*.whl &&
    export PYTHONPATH=/tmp/site

# (RAK_GPU_SHAPES="4,2048,16,128 1,16384,8,128" measures some of them only.)
shapes=()
for shape in ${RAK_GPU_SHAPES:-8,2048,8,128 4,2048,16,128 16,512,4,64 1,16384,8,128}; do
    shapes+=(--shape "$shape")
done
rak=$PWD/gpu-bundle/rak
# cubecl keeps the PTX of every kernel it compiles here, so that a process finds the kernels an
# earlier one compiled (the `warm` step's untimed pass; the profile step has a cubecl.toml of
# its own). Its matmul autotuning results go to its default cache (target/ here) as ever.
# (Removed on exit: on a machine that keeps the checkout, it would apply to everything run in it.)
printf '[compilation]\ncache = { file = "/tmp/rak-cubecl-cache" }\n' > cubecl.toml
trap 'rm -f cubecl.toml' EXIT

# The steps, each a function; the arguments name those to run, in their order.

# Side by side, on the 16 cores: the kernel tests, Triton's compilation of fla's kernels, and
# an untimed pass of every rak measurement (see the header).
step_warm() {
    local pids=()
    step_tests &
    pids+=($!)
    step_model_tests &
    pids+=($!)
    # Triton's compilation of fla's kernels: at K = 128 (260 s in one process on the H200 of
    # 2026-12-04) in two processes, each compiling half of every kernel's configurations.
    local dtype dim shard shards
    for dtype in bf16 f32; do
        for dim in 128 64; do
            shards=$((dim == 128 ? 2 : 1))
            for ((shard = 0; shard < shards; shard++)); do
                within 300 python3 bench/peers.py --compile-only --dtypes "$dtype" --dims "$dim" \
                    --shard "$shard/$shards" --out "$res/fla-compile-$dtype-$dim-$shard.jsonl" \
                    > "$res/fla-compile-$dtype-$dim-$shard.log" 2>&1 &
                pids+=($!)
            done
        done
    done
    # rak's untimed pass in three processes side by side (NVRTC compiles one kernel at a time in
    # a process; cubecl's cache file takes writers from several processes): the benches, the
    # seed's LM table, the D = 512 LM.
    {
        for dtype in f32 bf16; do
            within 120 "$rak" bench --device cuda --dtype "$dtype" --repetitions 1 --warmup 0 \
                "${shapes[@]}"
            within 200 "$rak" bench --device cuda --strategy chunked --parts --dtype "$dtype" \
                --repetitions 1 --warmup 0 "${shapes[@]}"
        done
    } > "$res/warm-bench.log" 2>&1 &
    pids+=($!)
    within 240 "$rak" train -m experiment=unfused,fused_projection,fused,chunked \
        model=seed data=dummy steps=2 eval_every=2 checkpoint_every=2 test_batches=1 \
        "job.run_dir=/tmp/rak-warm-runs/{name}" > "$res/warm-lm.log" 2>&1 &
    pids+=($!)
    within 150 "$rak" train experiment=fused data=dummy model.layers=4 model.d_model=512 \
        model.heads=4 "model.dims=[128, 128]" steps=2 eval_every=2 checkpoint_every=2 \
        test_batches=1 "job.name=d512" "job.run_dir=/tmp/rak-warm-d512/{name}" \
        > "$res/warm-d512.log" 2>&1 &
    pids+=($!)
    wait "${pids[@]}"
    cat "$res"/kernel-tests*.log | grep -E "^test result|exit|FAILED|panicked" | head -40
}

# rak's fused kernels at the issue's shapes, f32 and bf16 (state always f32).
step_rak() {
    for dtype in f32 bf16; do
        within 65 "$rak" bench --device cuda --dtype "$dtype" --repetitions 5 --warmup 1 \
            "${shapes[@]}" --json "$res/rak-bench.jsonl" 2>&1 | tee -a "$res/rak-bench.md"
    done
}

# The compiler's chunked form of SimpleRNN at the same shapes (burn operations, matrix
# products; timed to synchronisation), f32, then its own kernels timed alone (`--parts`: their
# share of the scan says whether they or the matrix products come next).
step_chunked() {
    within 120 "$rak" bench --device cuda --strategy chunked --parts --repetitions 5 \
        --warmup 1 "${shapes[@]}" --json "$res/rak-chunked.jsonl" > "$res/chunked.md" 2>&1
    echo "chunked bench: exit $?" >> "$res/chunked.md"
    cat "$res/chunked.md"
}

# The chunked form with bf16 inputs, parameters and outputs (the scan in f32, casts in the
# timed region), beside chunk_gla's bf16 rows.
step_chunked_bf16() {
    within 90 "$rak" bench --device cuda --strategy chunked --dtype bf16 --repetitions 5 \
        --warmup 1 "${shapes[@]}" --json "$res/rak-chunked.jsonl" > "$res/chunked-bf16.md" 2>&1
    echo "chunked bench, bf16: exit $?" >> "$res/chunked-bf16.md"
    cat "$res/chunked-bf16.md"
}

# Peers and floors on the same GPU (bf16, then f32); table.md is remade by `save`. fla
# autotunes here, alone on the GPU, from the kernels `warm` compiled (25 ms of repetitions per
# configuration: bench/peers.py --autotune-ms).
step_peers() {
    within 240 python3 bench/peers.py --out "$res/peers.jsonl" > "$res/peers.log" 2>&1
    echo "peers: exit $?" >> "$res/peers.log"
}

# Where the chunked form's time goes, kernel by kernel, at B=4 T=2048 H=16 K=V=128 (f32):
# cubecl's profiler times every launch alone (a cubecl.toml in the working directory turns it
# on) and bench/kernel_profile.py sums the launches by kind, for one forward and one forward +
# backward after a warm-up: launches and time per kernel kind (matrix products, fused
# element-wise, copies, the chunked path's own kernels).
step_profile() {
    local profile=/tmp/rak-profile
    mkdir -p "$profile"
    printf '[profiling.logger]\nlevel = "basic"\nfile = "%s"\nappend = false\n' \
        "$res/kernel-profile.log" > "$profile/cubecl.toml"
    (cd "$profile" && within 60 "$rak" bench --device cuda --strategy chunked --repetitions 1 \
        --warmup 1 --shape 4,2048,16,128) > "$res/kernel-profile.md" 2>&1
    echo "profiled bench: exit $?" >> "$res/kernel-profile.md"
    python3 bench/kernel_profile.py "$res/kernel-profile.log" "forward, warm-up (autotuning)" \
        forward "forward + backward, warm-up" "forward + backward" >> "$res/kernel-profile.md" 2>&1
    cat "$res/kernel-profile.md"
}

# The model tests that run on CUDA: the chunked path's own kernels against loops, and the LM's
# fused and chunked strategies against the unfused one (loss and every gradient); beside them,
# in a process of its own (so that neither cuts the other short), the fused operation and the
# chunked scan on operands laid out as views (pitched rows among them, as CUDA's allocator
# makes them) against dense ones.
step_model_tests() {
    within "${1:-240}" gpu-bundle/model-cuda --test-threads 1 --nocapture operands_given_as_views \
        > "$res/model-tests-views.log" 2>&1 &
    within "${1:-240}" gpu-bundle/model-cuda --test-threads 1 --nocapture linear_scan_matches decayed_scores \
        scores_across_sub_chunks language_model_fused_chunked_and_unfused_agree \
        > "$res/model-tests.log" 2>&1
    echo "model tests: exit $?" | tee -a "$res/model-tests.log"
    wait
    grep -H "^test result" "$res/model-tests-views.log"
}

# The checks of the chunked form on CUDA alone, side by side: the model tests above and the
# chunked form's tests against the interpreter (`chunked_form::`, in the same binary; for a short
# call after a fix of that path: 110 s each).
step_chunked_checks() {
    step_model_tests 110 &
    within 110 gpu-bundle/model-cuda --test-threads 1 --nocapture chunked_form:: \
        > "$res/kernel-tests-chunked.log" 2>&1 &
    wait
    grep -H "^test \|test result\|exit" "$res/model-tests.log" "$res/model-tests-views.log" \
        "$res/kernel-tests-chunked.log"
}

# Kernel tests of every cell on CUDA against the f64 interpreter (same tolerances as on wgpu),
# in five processes side by side (NVRTC compiles every kernel a test launches, one at a time
# in a process): every cell; every tile and workspace placement; the chunked form (in the model
# tests' binary, `chunked_form::`), at T = 2048 with saturated gates too (burn operations on
# CUDA: cubecl's autotuned matmuls, tf32 products on the tensor cores, hence its own tolerance;
# every case's worst error is logged); and the rest.
step_tests() {
    local tests=gpu-bundle/kernels-cuda
    within 240 "$tests" --test-threads 1 kernels_match_the_interpreter_for_every_cell \
        > "$res/kernel-tests-cells.log" 2>&1 &
    within 240 "$tests" --test-threads 1 split_tiles_and_workspace_placements \
        > "$res/kernel-tests-schedules.log" 2>&1 &
    within 240 gpu-bundle/model-cuda --test-threads 1 --nocapture --exact \
        chunked_form::chunked_form_matches_the_interpreter > "$res/kernel-tests-chunked.log" 2>&1 &
    within 240 gpu-bundle/model-cuda --test-threads 1 --nocapture --exact \
        chunked_form::chunked_form_with_saturated_gates_and_long_sequences \
        > "$res/kernel-tests-chunked-long.log" 2>&1 &
    within 240 "$tests" --test-threads 1 --skip kernels_match_the_interpreter_for_every_cell \
        --skip split_tiles_and_workspace_placements > "$res/kernel-tests.log" 2>&1 &
    wait
    grep -H "^test result" "$res"/kernel-tests*.log
}

# The seed's table on the GPU: total train / val / test time per strategy (the per-step loop
# with separate projections, with the fused projection, the generated kernels and the chunked
# form), the seed's model on dummy data; then tokens/s of a training step of a 4-layer D = 512
# LM.
runs=/tmp/rak-runs
step_lm() {
    within 150 "$rak" train -m experiment=unfused,fused_projection,fused,chunked \
        model=seed data=dummy steps=100 eval_every=100 checkpoint_every=100 \
        "job.run_dir=$runs/{name}" --table "$res/lm-table.md" > "$res/lm.log" 2>&1
    echo "lm table: exit $?" >> "$res/lm.log"
    within 60 "$rak" train experiment=fused data=dummy model.layers=4 model.d_model=512 \
        model.heads=4 "model.dims=[128, 128]" steps=20 eval_every=20 checkpoint_every=20 \
        test_batches=1 "job.name=d512" "job.run_dir=$runs/{name}" --table "$res/lm-d512.md" \
        >> "$res/lm.log" 2>&1
    echo "d512: exit $?" >> "$res/lm.log"
    cat "$res/lm-table.md" "$res/lm-d512.md" 2>/dev/null
}

# Streaming generation: time and device memory against prompt length (from the LM step's
# fused checkpoint).
step_generate() {
    within 40 "$rak" bench generate --checkpoint "$runs/fused" \
        --prompt-lengths 1000,10000,100000 > "$res/generate.md" 2>&1
    cat "$res/generate.md"
}

# The schedule's knobs, side by side at one shape (f32): units per cube and sums split among
# units or not, for each pass (docs/compiler.md, "Split sums", "The backward scan's own units
# and sums"); these set the defaults. (States in registers or not: on the H200 of 2026-12-04
# registers made the forward faster with split sums, the default, and slower without.) The
# backward's split sums ran at tile 8 on that day (their buffer did not fit beside tile 16's
# workspace), unsplit ones at 16; since the backward keeps no inputs before activation that it
# does not read, both run at tile 16 at this shape, a like-for-like comparison.
step_sweep() {
    within 90 "$rak" bench --device cuda --repetitions 5 --warmup 1 --shape 8,2048,8,128 \
        --cube-dim 64,128 --sum-parts 1,8 --backward-cube-dim 64,128 --backward-sum-parts 1,8 \
        --json "$res/sweep.jsonl" > "$res/sweep.md" 2>&1
    echo "sweep: exit $?" >> "$res/sweep.md"
    cat "$res/sweep.md"
}

# The forward scan's tile and split sums in f32 and bf16, at one shape: B=8 H=8 K=V=128 gets
# tile 16 by default, 512 cubes on a 132-SM GPU, which fit at once only where a cube's kernel
# uses at most 128 registers per unit (4 cubes of 128 units per multiprocessor); ptxas gives
# the f32 kernel 80 and the bf16 one 168 (scripts/cuda-compile.sh), which would make two waves
# of cubes and explain bf16's forward at twice f32's time. Tile 32 (256 cubes) and
# `sum_parts 4` bring bf16 to 128 registers (BENCHMARKS.md, "bf16 forward").
step_tiles() {
    for dtype in bf16 f32; do
        within 80 "$rak" bench --device cuda --dtype "$dtype" --tile 16,32 --sum-parts 4,8 \
            --repetitions 5 --warmup 1 --shape 8,2048,8,128 --json "$res/tiles.jsonl"
    done > "$res/tiles.md" 2>&1
    cat "$res/tiles.md"
}

# The backward scan against the interval between checkpoints (f32, B=8 H=8 K=V=128): per
# chunk of C steps it recomputes C + 1 states of its tile into global memory (532 KB per cube
# at C = 64 and tile 16: 272 MB for the 512 cubes, past the 50 MB L2; 37 MB at C = 8) and reads
# them back one step ahead; the forward writes T / C checkpoints (1 GB at C = 8).
step_checkpoints() {
    within 90 "$rak" bench --device cuda --repetitions 5 --warmup 1 --shape 8,2048,8,128 \
        --chunk 8,16,32,64 --json "$res/checkpoints.jsonl" > "$res/checkpoints.md" 2>&1
    echo "checkpoints: exit $?" >> "$res/checkpoints.md"
    cat "$res/checkpoints.md"
}

# The backward scan's sums unsplit or split (f32, B=8 H=8 K=V=128, everything else at its
# default: 64 units, tile 16). Unsplit (the default since the sweep of 2026-12-04), 16 of the
# 64 units each add up one value's 128 terms of `dv` while the rest wait at the next barrier;
# with `sum_parts` 8, 4 units share each (64 units / 16 values), at the cost of two barriers. That sweep ran split sums
# at tile 8 (their buffer did not fit beside tile 16's workspace then), so it did not answer
# this; the default follows from here. Each both with the recomputation's states in the
# workspace and in registers (`Schedule::recompute_registers`, the default since 2026-12-05:
# half the shared-memory reads and a barrier fewer per recomputed step, 8% fewer instructions
# in SimpleRNN's time loop by ptxas's output; BENCHMARKS.md), and with the walk's state
# gradients in the workspace and in registers (`Schedule::walk_registers`, the default since
# 2026-12-05 (2nd session): `dv`'s sum split by the register layout whatever `sum_parts` says,
# SimpleRNN's kernel at 128 registers instead of 232; BENCHMARKS.md).
step_backward_sums() {
    within 100 "$rak" bench --device cuda --repetitions 5 --warmup 1 --shape 8,2048,8,128 \
        --backward-sum-parts 1,8 --recompute-registers false,true --walk-registers false,true \
        --json "$res/backward-sums.jsonl" > "$res/backward-sums.md" 2>&1
    echo "backward sums: exit $?" >> "$res/backward-sums.md"
    cat "$res/backward-sums.md"
}

# The chunked form without burn's fusion wrapper (the cubecl backend alone), to see what fusing
# its element-wise operations gains (`chunked` runs it inside the wrapper, as training does).
step_no_fusion() {
    within 60 "$rak" bench --device cuda --strategy chunked --fusion false \
        --repetitions 5 --warmup 1 "${shapes[@]}" --json "$res/rak-chunked-no-fusion.jsonl" \
        > "$res/chunked-no-fusion.md" 2>&1
    echo "chunked without fusion: exit $?" >> "$res/chunked-no-fusion.md"
    cat "$res/chunked-no-fusion.md"
}

# `tanh` and `log1p` as series near 0 (`Schedule::series_near_zero`: on for wgpu, off for CUDA
# by default) or CUDA's own `tanhf` and `log1pf`: with the series, Elman's backward at dims 128
# spilled 24 bytes with 5 local accesses in its time loop (BENCHMARKS.md, "tanh as a series near
# 0"); GLA's gate goes through log-sigmoid, and with CUDA's `log1pf` ptxas gives its forward
# 51 more time-loop instructions, and its bf16 forward 149 registers (3 cubes per SM) instead of
# 128 and a 20-byte spill (BENCHMARKS.md, "The series as a flag").
step_series() {
    for cell in elman gla; do
        within 40 "$rak" bench --device cuda --cell "$cell" --repetitions 5 --warmup 1 \
            --shape 8,2048,8,128 --series-near-zero false,true --json "$res/series.jsonl"
    done > "$res/series.md" 2>&1
    echo "series: exit $?" >> "$res/series.md"
    cat "$res/series.md"
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(warm rak chunked chunked-bf16 peers lm generate done \
    backward-sums tiles checkpoints profile sweep no-fusion series)
echo "steps: ${steps[*]}" >> "$res/device.txt"
for name in "${steps[@]}"; do
    if [ "$name" = done ]; then
        # The end of issue 6's run (its time is what the issue's 8 minutes are about); the steps
        # after it get what is left before the deadline.
        echo "issue 6's steps done at $SECONDS s" >> "$res/steps.log"
        continue
    fi
    if ! declare -F "step_${name//-/_}" > /dev/null; then
        echo "unknown step: $name" | tee -a "$res/steps.log"
        continue
    fi
    "step_${name//-/_}"
    save
done
cat "$res/table.md" "$res/steps.log"
