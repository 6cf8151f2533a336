#!/usr/bin/env python3
"""Compiles rak's generated CUDA kernels with NVRTC and ptxas, without a GPU.

For every built-in cell, its forward, backward and step kernels (`rak emit --target cuda`) at several
sizes, element types and schedules go through NVRTC with the options cubecl-cuda uses on an
H100/H200 (`--gpu-architecture=sm_90a -lineinfo`), then through ptxas, whose report gives each
kernel's registers per thread, spills and stack. Prints a Markdown table; exits 1 if any kernel
fails to compile (the log names it), or if a kernel that holds its states in registers (the
forward scan; the backward scan's recomputation and the state gradients its walk carries,
"recomputed states and carried gradients in registers") may spill them under the default schedule (the point of holding them there is to keep them out of
memory; spills under other schedules are reported, not failed: ptxas trades registers for
occupancy), or if SimpleRNN's forward or backward scan, at the tile one of issue 6's benchmark shapes gets, needs more
registers than let its whole grid fit a 132-SM GPU at once (`Kernel.grid_cubes`).

Needs NVRTC, ptxas and the CUDA runtime headers: scripts/cuda-compile.sh fetches them (CUDA 13.0
wheels from PyPI) and calls this script with `--cuda DIR`.

With `--sass-tools DIR` (a directory holding cuobjdump and nvdisasm; `cuda-compile.sh --sass`
fetches them), each kernel's machine code is disassembled too, and the table gets the size of
its time loop (the instructions of its outermost loop, counted once: a static count, each inner
loop's body once) and the reads and writes of local memory (spills) inside that loop. Then a
kernel holding its states in registers fails only if its time loop writes local memory: a
state changes every step, so a spilled state is written there every step, where a value
spilled before the loop (ptxas keeps a few loop-invariant ones there to give the kernel more
cubes per multiprocessor) is only read back in it, from the L1 cache. Without the disassembly
where the spills lie is unknown, and any spill of such a kernel fails.
"""

import argparse
import concurrent.futures
import ctypes
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CELLS = sorted(p.stem for p in (ROOT / "cells").glob("*.rak"))
# Streaming multiprocessors of the H200 (and the H100 SXM) the GPU runs measure on.
MULTIPROCESSORS = 132
# The chunked path's own kernels (`rak emit NAME`: hand-written in rak-runtime/src/fused/cube.rs),
# listed in the table as the kernels of a "cell" of this name.
CHUNKED = "chunked path"
CHUNKED_KERNELS = [
    "linear_scan",
    "linear_scan_reverse",
    "running_sum",
    "decayed_scores",
    "decayed_scores_backward",
    "scores_across_sub_chunks",
    "scores_across_sub_chunks_backward",
]


@dataclass(frozen=True)
class Kernel:
    cell: str
    pass_: str
    dim: int
    dtype: str = "f32"
    cube_dim: int | None = None
    registers: bool | None = None
    tile: int | None = None
    sum_parts: int | None = None
    # The cubes of the grid of a benchmark shape that runs this kernel (B·H·tiles), if any: the
    # kernel's registers must let a GPU of `MULTIPROCESSORS` hold them all at once.
    grid_cubes: int | None = None

    def at_default_schedule(self):
        return self.cube_dim is None and self.registers is None and self.tile is None and self.sum_parts is None

    def slug(self):
        """A file name for this kernel's source."""
        schedule = f"c{self.cube_dim}_r{self.registers}_t{self.tile}_p{self.sum_parts}".replace("None", "-")
        return f"{self.cell.replace(' ', '_')}_{self.pass_}_{self.dtype}_{self.dim}_{schedule}"

    def emit_args(self):
        if self.cell == CHUNKED:
            return [self.pass_, "--target", "cuda", "--dim", str(self.dim), "--dtype", self.dtype]
        args = [self.cell, "--target", "cuda", "--pass", self.pass_, "--dim", str(self.dim)]
        args += ["--dtype", self.dtype]
        if self.cube_dim is not None:
            args += ["--cube-dim", str(self.cube_dim)]
        if self.registers is not None:
            args += ["--registers", str(self.registers).lower()]
        if self.tile is not None:
            args += ["--tile", str(self.tile)]
        if self.sum_parts is not None:
            args += ["--sum-parts", str(self.sum_parts)]
        return args


def kernels():
    """Every cell's three kernels (forward scan, backward scan, single step) at the default
    schedule (the backward scan at its own: 64 units, unsplit sums) and the chunked path's kernels at its default chunks (dims or keys 64 and 128,
    f32; 128 in bf16 and f16), then SimpleRNN's forward scan under the schedules `rak bench`'s
    sweep times on the GPU: 64, 128 and 256 units per cube, states in registers or not, the tile
    a 48 KiB launch of one sequence gets (64) and the one the benchmark shape B=8 H=8 gets on a
    GPU (16); last, its forward scan in f32 and bf16 at the tiles the issue's benchmark shapes get
    on a 132-SM GPU (K = 128: 16 for B·H = 64, 2 for B·H = 8; K = 64: 8), at tile 32, and at tile
    16 with sums split in 4 parts (whether a grid of 512 cubes fits the GPU at once depends on
    the registers, see `cubes_per_multiprocessor`). (The backward scan's default rows at
    dims 128 have tile 16, what B=8 H=8 K=V=128 runs; SimpleRNN's, in f32 and bf16, must fit that
    grid of 512 cubes at once too.)"""
    every_cell = [(cell, pass_) for cell in CELLS for pass_ in ("forward", "backward", "step")]
    for cell, pass_ in every_cell + [(CHUNKED, name) for name in CHUNKED_KERNELS]:
        # SimpleRNN's backward scan at dims 128 runs B=8 H=8 and B=4 H=16 at its default
        # schedule: 64 sequences of 8 tiles of 16.
        grid = 512 if (cell, pass_) == ("simple_rnn", "backward") else None
        yield Kernel(cell, pass_, 64)
        yield Kernel(cell, pass_, 128, grid_cubes=grid)
        yield Kernel(cell, pass_, 128, "bf16", grid_cubes=grid)
        yield Kernel(cell, pass_, 128, "f16")
    for cube_dim in (64, 128, 256):
        for registers in (True, False):
            for tile in (16, 64):
                # At 128 units, states in registers, tile 16: what B=8 H=8 runs (512 cubes).
                default = (cube_dim, registers, tile) == (128, True, 16)
                yield Kernel("simple_rnn", "forward", 128, "f32", cube_dim, registers, tile, grid_cubes=512 if default else None)
    for dtype in ("f32", "bf16"):
        # B=1 H=8 K=V=128: 8 sequences of 64 tiles of 2.
        yield Kernel("simple_rnn", "forward", 128, dtype, tile=2, grid_cubes=512)
        yield Kernel("simple_rnn", "forward", 128, dtype, tile=32)
        # B=16 H=4 K=V=64: 64 sequences of 8 tiles of 8.
        yield Kernel("simple_rnn", "forward", 64, dtype, tile=8, grid_cubes=512)
        yield Kernel("simple_rnn", "forward", 128, dtype, tile=16, sum_parts=4)
    # B=8 H=8 and B=4 H=16 at K=V=128: 64 sequences of 8 tiles of 16.
    yield Kernel("simple_rnn", "forward", 128, "bf16", tile=16, grid_cubes=512)


def cubes_per_multiprocessor(registers: int, cube_dim: int) -> int:
    """How many cubes of `cube_dim` units an H100/H200 multiprocessor holds at once as far as
    registers go: 64 Ki 32-bit registers, given out per warp in blocks of 256 (8 per unit).
    A grid of more cubes than the GPU holds at once runs in waves, and a scan whose cubes each
    walk the whole sequence then takes a multiple of the time of one wave."""
    per_unit = -(-registers // 8) * 8
    return 65536 // (per_unit * cube_dim)


def fits_in_one_wave(grid_cubes: int, cubes_per_sm: int) -> bool:
    """Whether a grid of `grid_cubes` runs at once on a GPU of `MULTIPROCESSORS` holding
    `cubes_per_sm` each (else the scan takes about twice the time)."""
    return grid_cubes <= cubes_per_sm * MULTIPROCESSORS


class Nvrtc:
    def __init__(self, cuda: Path, arch: str):
        self.lib = ctypes.CDLL(str(cuda / "lib" / "libnvrtc.so.13"))
        self.options = [
            f"--gpu-architecture={arch}".encode(),
            f"--include-path={cuda / 'include'}".encode(),
            b"-lineinfo",
        ]
        version = (ctypes.c_int(), ctypes.c_int())
        self.lib.nvrtcVersion(ctypes.byref(version[0]), ctypes.byref(version[1]))
        self.version = f"{version[0].value}.{version[1].value}"

    def ptx(self, source: str):
        """The PTX of `source`, or None and NVRTC's log."""
        lib = self.lib
        program = ctypes.c_void_p()
        status = lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), b"kernel.cu", 0, None, None)
        if status != 0:
            return None, f"nvrtcCreateProgram: status {status}"
        try:
            options = (ctypes.c_char_p * len(self.options))(*self.options)
            status = lib.nvrtcCompileProgram(program, len(self.options), options)
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(program, log)
            if status != 0:
                return None, log.value.decode(errors="replace")
            lib.nvrtcGetPTXSize(program, ctypes.byref(size))
            ptx = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetPTX(program, ptx)
            return ptx.value.decode(), log.value.decode(errors="replace")
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(program))


@dataclass
class Result:
    kernel: Kernel
    schedule: str = ""
    in_registers: bool = False
    registers: int | None = None
    spill_bytes: int = 0
    stack_bytes: int = 0
    # With --sass-tools: see `time_loop`.
    loop_instructions: int | None = None
    loop_local_reads: int | None = None
    loop_local_writes: int | None = None
    error: str | None = None


def sass_instructions(sass: str):
    """(address, instruction) for each instruction of `cuobjdump -sass` output."""
    found = []
    for line in sass.splitlines():
        match = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if match:
            found.append((int(match.group(1), 16), match.group(2)))
    return found


def time_loop(sass: str):
    """The outermost loop of a kernel's machine code (the backward branch that spans the most
    instructions: a scan's loop over time steps or chunks): its number of instructions, of
    local-memory reads (`LDL`: spills read back) and of local-memory writes (`STL`: spills)
    inside it; (0, 0, 0) without a loop."""
    instructions = sass_instructions(sass)
    loops = []
    for address, text in instructions:
        branch = re.search(r"\bBRA\b(?:\s+!?U?P\w+,)?\s+(?:`\()?0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < address:
            loops.append((int(branch.group(1), 16), address))
    if not loops:
        return 0, 0, 0
    start, end = max(loops, key=lambda loop: loop[1] - loop[0])
    body = [text for address, text in instructions if start <= address <= end]
    reads = sum(1 for text in body if re.search(r"\bLDL\b", text))
    writes = sum(1 for text in body if re.search(r"\bSTL\b", text))
    return len(body), reads, writes


def state_spill(result: Result, disassembled: bool) -> str | None:
    """Why `result`'s kernel may spill the states it holds in registers (None if it cannot, or
    if it does not hold them there under the default schedule): any spill without the
    disassembly; with it, a write of local memory inside the time loop (see the module doc)."""
    if not (result.in_registers and result.spill_bytes and result.kernel.at_default_schedule()):
        return None
    if not disassembled:
        return f"holds its states in registers but spills {result.spill_bytes} bytes (where: --sass tells)"
    if result.loop_local_writes:
        return (
            f"holds its states in registers but its time loop writes local memory "
            f"{result.loop_local_writes} times (spills {result.spill_bytes} bytes)"
        )
    return None


def compile_one(kernel: Kernel, rak: Path, nvrtc: Nvrtc, cuda: Path, arch: str, work: Path, sass_tools: Path | None) -> Result:
    result = Result(kernel)
    emitted = subprocess.run([str(rak), "emit", *kernel.emit_args()], capture_output=True, text=True)
    if emitted.returncode != 0:
        result.error = f"rak emit failed: {emitted.stderr.strip()}"
        return result
    header, _, source = emitted.stdout.partition("\n")
    # "// rak emit: CELL PASS kernel, DTYPE, SIZES; SCHEDULE"
    result.schedule = header.split("; ", 1)[-1]
    # ", states in registers" (forward) or, for the backward, ", recomputed states in
    # registers", ", carried gradients in registers" or both.
    result.in_registers = " in registers" in header
    ptx, log = nvrtc.ptx(source)
    name = kernel.slug()
    if ptx is None:
        (work / f"{name}.cu").write_text(source)
        result.error = f"NVRTC: {log.strip()} (source: {work / (name + '.cu')})"
        return result
    ptx_path = work / f"{name}.ptx"
    ptx_path.write_text(ptx)
    cubin = work / f"{name}.cubin" if sass_tools else Path(os.devnull)
    report = subprocess.run(
        [str(cuda / "bin" / "ptxas"), "-v", f"-arch={arch}", str(ptx_path), "-o", str(cubin)],
        capture_output=True,
        text=True,
    )
    if report.returncode != 0:
        result.error = f"ptxas: {report.stderr.strip()}"
        return result
    text = report.stderr
    used = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    result.registers = int(used.group(1)) if used else None
    result.spill_bytes = int(spills.group(1)) + int(spills.group(2)) if spills else 0
    result.stack_bytes = int(stack.group(1)) if stack else 0
    if sass_tools:
        # cuobjdump runs nvdisasm, which it looks for on the PATH.
        path = f"{sass_tools}{os.pathsep}{os.environ.get('PATH', '')}"
        sass = subprocess.run(
            [str(sass_tools / "cuobjdump"), "-sass", str(cubin)],
            capture_output=True,
            text=True,
            env={**os.environ, "PATH": path},
        )
        if sass.returncode != 0:
            result.error = f"cuobjdump: {sass.stderr.strip()}"
            return result
        result.loop_instructions, result.loop_local_reads, result.loop_local_writes = time_loop(sass.stdout)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda", type=Path, required=True, help="CUDA root: lib/libnvrtc.so.13, bin/ptxas, include/")
    parser.add_argument("--rak", type=Path, default=ROOT / "target" / "release" / "rak")
    parser.add_argument("--arch", default="sm_90a", help="what cubecl-cuda passes NVRTC on an H100/H200")
    parser.add_argument("--work", type=Path, default=Path("/tmp/rak-cuda-compile"))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--sass-tools", type=Path, help="directory with cuobjdump and nvdisasm: add the time loop's size and spills")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    nvrtc = Nvrtc(args.cuda, args.arch)
    todo = list(kernels())
    print(f"Compiling {len(todo)} kernels with NVRTC {nvrtc.version} for {args.arch}", file=sys.stderr)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda k: compile_one(k, args.rak, nvrtc, args.cuda, args.arch, args.work, args.sass_tools), todo))

    sass = args.sass_tools is not None
    print(f"NVRTC {nvrtc.version}, `--gpu-architecture={args.arch}`; registers per thread and spills from ptxas.\n")
    extra = " time loop (instructions) | local accesses in the time loop |" if sass else ""
    print(f"| cell | kernel | dtype | dims | schedule | registers | cubes/SM by registers | spills (bytes) | stack (bytes) |{extra}")
    print("|---|---|---|---:|---|---:|---:|---:|---:|" + ("---:|---:|" if sass else ""))
    failures = []
    for r in results:
        k = r.kernel
        if r.error:
            failures.append(f"{k.cell} {k.pass_} {k.dtype} dim {k.dim} ({r.schedule}): {r.error}")
            cells = "FAILED | | | " + (" | | " if sass else "")
        else:
            cube_dim = re.search(r"cube_dim (\d+)", r.schedule)
            fit = cubes_per_multiprocessor(r.registers, int(cube_dim.group(1))) if cube_dim and r.registers else ""
            cells = f"{r.registers} | {fit} | {r.spill_bytes} | {r.stack_bytes}"
            if sass:
                cells += f" | {r.loop_instructions} | {r.loop_local_reads + r.loop_local_writes}"
            spill = state_spill(r, sass)
            if spill:
                failures.append(f"{k.cell} {k.pass_} {k.dtype} dim {k.dim} ({r.schedule}): {spill}")
            if k.grid_cubes and fit and not fits_in_one_wave(k.grid_cubes, fit):
                failures.append(
                    f"{k.cell} {k.pass_} {k.dtype} dim {k.dim} ({r.schedule}): {r.registers} registers "
                    f"let a multiprocessor hold {fit} cubes, so the {k.grid_cubes} cubes of its "
                    f"benchmark shape need more than one wave on {MULTIPROCESSORS} multiprocessors"
                )
        print(f"| {k.cell} | {k.pass_} | {k.dtype} | {k.dim} | {r.schedule} | {cells} |")
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    print(f"{len(results) - len(failures)} of {len(results)} kernels compiled cleanly", file=sys.stderr)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
