"""Peers of rak's SimpleRNN kernels, timed on the same GPU in the same call (issue 6).

- the seed's PyTorch per-step loop (a faithful SimpleRNN, projections excluded, as in rak's
  kernel benchmark: q, k, v, g are the per-step inputs before activation);
- flash-linear-attention's fused_recurrent_gla and chunk_gla on the same math
  (k = sigmoid(k_pre), gk = logsigmoid(g_pre) so that exp(gk) = sigmoid(g_pre), scale = 1);
- the compute floor (4*K*V flops per token and head at the measured fp32 rate) and the memory
  floor (bytes in + out at the measured copy bandwidth).

Timings: CUDA events, median of repetitions after warm-up. Writes one JSON object per
measurement to --out, as it is taken. Correctness: fla and the loop are compared at the first
f32 shape measured.

Triton compiles every configuration fla autotunes (chunk_gla's forward and backward: some 250
per element type and K), which takes minutes, one after the other, in one process. So that the
GPU run fits its call, `--compile-only` processes (one per element type and K, or several with
`--shard`, beside the CUDA kernel tests) launch each configuration once, compiling it into
Triton's on-disk cache, time nothing and keep no autotuning result; the timing run then
autotunes alone on the GPU, from the cache, with `--autotune-ms` of repetitions per
configuration (Triton's default is 100 ms).
"""

import argparse
import json
import math
import os
import statistics

import torch
import torch.nn.functional as F

import triton_shards

SHAPES = [(8, 2048, 8, 128), (4, 2048, 16, 128), (16, 512, 4, 64), (1, 16384, 8, 128)]


def simple_rnn_loop(q, k_pre, v, g_pre, state=None):
    """The seed's SimpleRNN, one step at a time. Inputs [B, T, H, D]; returns o [B, T, H, V], S."""
    b, t, h, kd = q.shape
    vd = v.shape[-1]
    k, g = torch.sigmoid(k_pre.float()), torch.sigmoid(g_pre.float())
    s = torch.zeros(b, h, kd, vd, device=q.device, dtype=torch.float32) if state is None else state
    outputs = []
    for step in range(t):
        s = g[:, step, :, :, None] * s + k[:, step, :, :, None] * v[:, step, :, None, :].float()
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, step].float(), s))
    return torch.stack(outputs, dim=1).to(q.dtype), s


def fla_inputs(q, k_pre, v, g_pre):
    return q, torch.sigmoid(k_pre), v, F.logsigmoid(g_pre.float()).to(q.dtype)


def time_ms(fn, warmup=3, repetitions=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repetitions):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def forward_backward(fn, inputs):
    def run():
        for x in inputs:
            x.grad = None
        out = fn(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()

    return run


def floors(device):
    n = 8192
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.backends.cuda.matmul.allow_tf32 = False
    ms = time_ms(lambda: a @ b, 2, 5)
    fp32_flops = 2 * n**3 / (ms * 1e-3)
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), 2, 10)
    copy_bytes_per_s = 2 * x.numel() / (ms * 1e-3)
    return fp32_flops, copy_bytes_per_s


def compile_only_benchmarker():
    """Makes Triton's autotuner launch each configuration once (compiling it) and time nothing.

    Every configuration then ties, so the pick is meaningless: FLA_CACHE_RESULTS=0 (set before
    fla is imported) keeps it off the disk cache, where the timing run would find it."""
    import torch
    import triton.testing

    def launch_once(kernel_call, quantiles=None, **_):
        kernel_call()
        torch.cuda.synchronize()
        return [1.0, 1.0, 1.0] if quantiles else 1.0

    triton.testing.do_bench = launch_once


def shorter_autotuning(rep_ms):
    """Triton's do_bench, as the autotuner calls it, with `rep_ms` of repetitions (and a fifth of
    it of warm-up) instead of 100 (and 25)."""
    import triton.testing

    do_bench = triton.testing.do_bench

    def bench(kernel_call, quantiles=None, **_):
        return do_bench(kernel_call, warmup=max(1, rep_ms // 5), rep=rep_ms, quantiles=quantiles)

    triton.testing.do_bench = bench


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--dims", default="128,64", help="the K = V of SHAPES to run")
    parser.add_argument(
        "--compile-only",
        action="store_true",
        help="launch every configuration fla autotunes once, to fill Triton's cache; time nothing",
    )
    parser.add_argument(
        "--shard",
        type=triton_shards.parse_shard,
        default=(0, 1),
        metavar="I/N",
        help="with --compile-only: compile only every N-th configuration of each autotuned kernel, from the I-th (bench/triton_shards.py)",
    )
    parser.add_argument(
        "--autotune-ms",
        type=int,
        default=25,
        help="repetitions per configuration when fla autotunes, in ms (Triton's default: 100)",
    )
    parser.add_argument("--loop-max-time", type=int, default=2048, help="skip the Python loop above this T")
    parser.add_argument(
        "--dtypes",
        default="bf16,f32",
        help="element types in the order measured (bf16 first: Triton autotuning chunk_gla in f32 took over 150 s on an H200)",
    )
    args = parser.parse_args()
    if args.shard != (0, 1) and not args.compile_only:
        parser.error("--shard splits the compilation only: it needs --compile-only")
    if args.compile_only:
        os.environ["FLA_CACHE_RESULTS"] = "0"
        compile_only_benchmarker()
        if args.shard != (0, 1) and not triton_shards.shard_autotuning(*args.shard):
            print("this Triton has no Autotuner.prune_configs: compiling every configuration", flush=True)
    else:
        shorter_autotuning(args.autotune_ms)
    dims = {int(d) for d in args.dims.split(",")}
    device = torch.device("cuda")
    torch.manual_seed(0)
    # Each measurement is written as soon as it is taken: a run cut short keeps what it measured.
    results = open(args.out, "w")

    def emit(**record):
        line = json.dumps(record)
        print(line, flush=True)
        results.write(line + "\n")
        results.flush()

    if args.compile_only:
        fp32_flops = copy_bw = math.nan
    else:
        fp32_flops, copy_bw = floors(device)
        emit(kind="floors", device=torch.cuda.get_device_name(), fp32_tflops=fp32_flops / 1e12, copy_tb_per_s=copy_bw / 1e12)

    try:
        from fla.ops.gla import chunk_gla, fused_recurrent_gla
    except Exception as error:  # noqa: BLE001 - report and go on without fla
        emit(kind="error", what="import fla", error=repr(error))
        chunk_gla = fused_recurrent_gla = None

    dtypes = {"f32": torch.float32, "bf16": torch.bfloat16}
    checked = args.compile_only
    for dtype_name in args.dtypes.split(","):
        dtype = dtypes[dtype_name]
        for b, t, h, d in SHAPES:
            if d not in dims:
                continue
            shape = dict(batch=b, time=t, heads=h, dim=d, dtype=dtype_name)
            compute_floor_ms = 4 * d * d * b * t * h / fp32_flops * 1e3
            element = torch.finfo(dtype).bits // 8
            bytes_moved = (4 * b * t * h * d + b * t * h * d) * element
            if not args.compile_only:
                emit(kind="floor", **shape, compute_floor_ms=compute_floor_ms, memory_floor_ms=bytes_moved / copy_bw * 1e3)
            inputs = [torch.randn(b, t, h, d, device=device, dtype=dtype, requires_grad=True) for _ in range(4)]
            with torch.no_grad():
                fla_args = [x.detach() for x in fla_inputs(*inputs)]
            fla_grad_args = [x.detach().requires_grad_(True) for x in fla_args]
            if not checked and dtype_name == "f32":
                # Correctness against the loop, at the first f32 shape measured: fla autotunes
                # here, at a measured shape (its autotuning keys leave out B, T and H).
                checked = True
                with torch.no_grad():
                    reference, _ = simple_rnn_loop(*[x.detach() for x in inputs])
                    for name, fn in (("fused_recurrent_gla", fused_recurrent_gla), ("chunk_gla", chunk_gla)):
                        if fn is not None:
                            out = fn(*fla_args, scale=1.0)[0]
                            error = ((out.float() - reference).abs().max() / reference.abs().max()).item()
                            emit(kind="check", peer=name, **shape, relative_error=error)
            for name, fn in (("fused_recurrent_gla", fused_recurrent_gla), ("chunk_gla", chunk_gla)):
                if fn is None:
                    continue
                try:
                    if args.compile_only:
                        with torch.no_grad():
                            fn(*fla_args, scale=1.0)
                        forward_backward(lambda *x: fn(*x, scale=1.0), fla_grad_args)()
                        torch.cuda.synchronize()
                        emit(kind="compiled", peer=name, **shape)
                        continue
                    with torch.no_grad():
                        forward_ms = time_ms(lambda: fn(*fla_args, scale=1.0))
                    both_ms = time_ms(forward_backward(lambda *x: fn(*x, scale=1.0), fla_grad_args))
                    emit(kind="peer", peer=name, **shape, forward_ms=forward_ms, forward_backward_ms=both_ms)
                except Exception as error:  # noqa: BLE001
                    emit(kind="error", peer=name, **shape, error=repr(error))
            if t <= args.loop_max_time and not args.compile_only:
                with torch.no_grad():
                    forward_ms = time_ms(lambda: simple_rnn_loop(*[x.detach() for x in inputs]), 1, 3)
                both_ms = time_ms(forward_backward(simple_rnn_loop, inputs), 1, 3)
                emit(kind="peer", peer="torch_loop", **shape, forward_ms=forward_ms, forward_backward_ms=both_ms)

    results.close()


if __name__ == "__main__":
    main()
