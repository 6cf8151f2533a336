#!/usr/bin/env bash
# Runs on the GPU machine (see scripts/gpu-check.sh, which prepares gpu-bundle/ here).
# Everything it writes lands in $OUT: device.txt, kernel-tests.log, rak-bench.jsonl,
# chunked.md, rak-chunked.jsonl, peers.jsonl, peers.log, table.md, lm.log, lm-table.md,
# lm-d512.md, generate.md, sweep.md, sweep.jsonl, chunked-no-fusion.md,
# rak-chunked-no-fusion.jsonl. Every step has a timeout: 575 s in all for steps 1-5; the
# schedule sweep (6) and the chunked form without fusion (7) get what is left of a 600 s call.
set -uo pipefail
out=${OUT:-/tmp/rak-gpu-out}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

{ nvidia-smi; date -u; } > "$out/device.txt" 2>&1
gunzip -kf gpu-bundle/rak.gz gpu-bundle/kernels-cuda.gz
chmod +x gpu-bundle/rak gpu-bundle/kernels-cuda
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site gpu-bundle/whl/*.whl &&
    export PYTHONPATH=/tmp/site

# 1. Kernel tests of every cell on CUDA against the f64 interpreter (same tolerances as on wgpu),
#    then the chunked form against it at T = 2048 with saturated gates, chunks of 64 (burn
#    operations on CUDA: cubecl's autotuned matmuls, tf32 products on the tensor cores, hence
#    its own tolerance; every case's worst error is logged). Its small shapes run in CI.
timeout 120 gpu-bundle/kernels-cuda --test-threads 1 --skip chunked > "$out/kernel-tests.log" 2>&1
echo "kernel tests: exit $?" | tee -a "$out/kernel-tests.log"
timeout 30 gpu-bundle/kernels-cuda --test-threads 1 --nocapture \
    chunked_form_with_saturated_gates_and_long_sequences >> "$out/kernel-tests.log" 2>&1
echo "chunked form tests: exit $?" | tee -a "$out/kernel-tests.log"

# 2. rak's kernels at the issue's shapes, f32 and bf16 (state always f32).
for dtype in f32 bf16; do
    timeout 65 gpu-bundle/rak bench --device cuda --dtype "$dtype" --repetitions 5 --warmup 1 \
        --shape 8,2048,8,128 --shape 4,2048,16,128 --shape 16,512,4,64 --shape 1,16384,8,128 \
        --json "$out/rak-bench.jsonl" 2>&1 | tee -a "$out/kernel-tests.log"
done

# 2b. The compiler's chunked form of SimpleRNN at the same shapes (burn operations, matrix
#     products; timed to synchronisation), f32, then its own kernels timed alone (`--parts`:
#     their share of the scan says whether they or the matrix products come next).
timeout 60 gpu-bundle/rak bench --device cuda --strategy chunked --parts --repetitions 5 --warmup 1 \
    --shape 8,2048,8,128 --shape 4,2048,16,128 --shape 16,512,4,64 --shape 1,16384,8,128 \
    --json "$out/rak-chunked.jsonl" > "$out/chunked.md" 2>&1
echo "chunked bench: exit $?" >> "$out/chunked.md"
cat "$out/chunked.md"

# 3. Peers and floors on the same GPU.
timeout 110 python3 bench/peers.py --out "$out/peers.jsonl" > "$out/peers.log" 2>&1
echo "peers: exit $?" >> "$out/peers.log"

python3 bench/table.py "$out/rak-bench.jsonl" "$out/peers.jsonl" "$out/rak-chunked.jsonl" \
    > "$out/table.md" 2>&1
cat "$out/table.md"

# 4. The seed's table on the GPU: total train / val / test time per strategy (the per-step
#    loop with separate projections, with the fused projection, and the generated kernels),
#    and the chunked form), the seed's model on dummy data; then tokens/s of a training step of
#    a 4-layer D = 512 LM.
runs=/tmp/rak-runs
timeout 75 gpu-bundle/rak train -m experiment=unfused,fused_projection,fused,chunked model=seed \
    data=dummy steps=100 eval_every=100 checkpoint_every=100 "job.run_dir=$runs/{name}" \
    --table "$out/lm-table.md" > "$out/lm.log" 2>&1
echo "lm table: exit $?" >> "$out/lm.log"
timeout 25 gpu-bundle/rak train experiment=fused data=dummy model.layers=4 model.d_model=512 \
    model.heads=4 "model.dims=[128, 128]" steps=20 eval_every=20 checkpoint_every=20 \
    test_batches=1 "job.name=d512" "job.run_dir=$runs/{name}" --table "$out/lm-d512.md" \
    >> "$out/lm.log" 2>&1
echo "d512: exit $?" >> "$out/lm.log"
cat "$out/lm-table.md" "$out/lm-d512.md" 2>/dev/null

# 5. Streaming generation: time and device memory against prompt length.
timeout 25 gpu-bundle/rak bench generate --checkpoint "$runs/fused" \
    --prompt-lengths 1000,10000,100000 > "$out/generate.md" 2>&1
cat "$out/generate.md"

# 6. The schedule's knobs, side by side at one shape (f32): units per cube, sums split among
#    units or not, states held in registers or not (docs/compiler.md, "Split sums", "States
#    in registers"); these set the defaults.
timeout 50 gpu-bundle/rak bench --device cuda --repetitions 5 --warmup 1 --shape 8,2048,8,128 \
    --cube-dim 64,128,256 --sum-parts 1,8 --registers true,false --json "$out/sweep.jsonl" > "$out/sweep.md" 2>&1
echo "sweep: exit $?" >> "$out/sweep.md"
cat "$out/sweep.md"

# 7. If the call has time left: the chunked form without burn's fusion wrapper (the cubecl
#    backend alone), to see what fusing its element-wise operations gains (step 2b runs it
#    inside the wrapper, as training does).
timeout 40 gpu-bundle/rak bench --device cuda --strategy chunked --fusion false --repetitions 5 \
    --warmup 1 --shape 8,2048,8,128 --shape 4,2048,16,128 --shape 16,512,4,64 --shape 1,16384,8,128 \
    --json "$out/rak-chunked-no-fusion.jsonl" > "$out/chunked-no-fusion.md" 2>&1
echo "chunked without fusion: exit $?" >> "$out/chunked-no-fusion.md"
cat "$out/chunked-no-fusion.md"
