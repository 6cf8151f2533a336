"""Merges `rak bench --json` lines and bench/peers.py lines into the BENCHMARKS.md tables.

Usage: table.py RAK_JSONL PEERS_JSONL [RAK_CHUNKED_JSONL] (the last from
`rak bench --strategy chunked --json`, in columns of its own).

Prints three parts: the times of every form at every shape and dtype (with the compute and
memory floors), the speed-ups of rak over each peer (a peer's time over rak's, above 1 when
rak is faster; rak's time is the faster of its two forms, fused recurrent and chunked, and
the speed-ups of each form alone are printed too), and whether the issues' goals hold:
the fused forward within 1.5x of the compute floor and rak faster than both
flash-linear-attention kernels at every shape (issue 6); the chunked form faster than
chunk_gla, forward and forward+backward, at B=4 T=2048 H=16 and B=1 T=16384 H=8, K=V=128
(issue 7). A missing measurement is shown as "—" and fails no goal silently: the goal says
what it lacks.
"""

import json
import sys

PEERS = ("fused_recurrent_gla", "chunk_gla", "torch_loop")
MODES = ("forward_ms", "forward_backward_ms")
FLOOR_GOAL = 1.5
CHUNKED_GOAL_SHAPES = ((4, 2048, 16, 128), (1, 16384, 8, 128))


def load(path):
    try:
        with open(path) as file:
            return [json.loads(line) for line in file if line.strip()]
    except FileNotFoundError:
        return []


def key(record):
    return (record.get("dtype"), record.get("batch"), record.get("time"), record.get("heads"), record.get("dim"))


class Measurements:
    """Every measurement of one (dtype, B, T, H, K=V) key, by form."""

    def __init__(self, rak, peers, chunked):
        self.keys = []
        self.fused, self.chunked, self.peers, self.floors = {}, {}, {}, {}
        self.device = next((r["device"] for r in peers if r.get("kind") == "floors"), "unknown device")
        for r in rak:
            self._add(key(r))
            self.fused[key(r)] = r
        for r in chunked:
            self._add(key(r))
            self.chunked[key(r)] = r
        for r in peers:
            if r.get("kind") == "peer":
                self._add(key(r))
                self.peers.setdefault(key(r), {})[r["peer"]] = r
            elif r.get("kind") == "floor":
                self._add(key(r))
                self.floors[key(r)] = r
        order = {"f32": 0, "bf16": 1, "f16": 2}
        self.keys.sort(key=lambda k: order.get(k[0], 3))

    def _add(self, k):
        if k not in self.keys:
            self.keys.append(k)

    def time(self, form, k, mode):
        """The time in ms of `form` (fused, chunked or a peer) at `k`, or None."""
        record = {"fused": self.fused, "chunked": self.chunked}.get(form, {}).get(k)
        if form in PEERS:
            record = self.peers.get(k, {}).get(form)
        return record.get(mode) if record else None

    def best(self, k, mode):
        """rak's faster form at `k`: (time, form name), or (None, None)."""
        times = [(self.time(form, k, mode), form) for form in ("fused", "chunked")]
        times = [t for t in times if t[0] is not None]
        return min(times) if times else (None, None)


def show(x, digits=3):
    return "—" if x is None else f"{x:.{digits}f}"


def pair(first, second, digits=3):
    return f"{show(first, digits)} / {show(second, digits)}"


def speed_up(peer, rak):
    return None if peer is None or not rak else peer / rak


def shape_cells(k):
    dtype, b, t, h, d = k
    return f"| {dtype} | {b} | {t} | {h} | {d} "


def times_table(m):
    forms = ("fused", "chunked") + PEERS
    names = ("rak fused", "rak chunked", "fused_recurrent_gla", "chunk_gla", "torch loop")
    lines = [
        "| dtype | B | T | H | K=V | " + " | ".join(f"{n} fwd / fwd+bwd" for n in names) + " | compute floor | memory floor |",
        "|---|---|---|---|---|" + "---|" * (len(names) + 2),
    ]
    for k in m.keys:
        floor = m.floors.get(k, {})
        cells = [pair(m.time(form, k, MODES[0]), m.time(form, k, MODES[1])) for form in forms]
        floors = [show(floor.get("compute_floor_ms")), show(floor.get("memory_floor_ms"))]
        lines.append(shape_cells(k) + "| " + " | ".join(cells + floors) + " |")
    return lines


def speed_up_table(m):
    names = ("fused_recurrent_gla", "chunk_gla", "torch loop")
    lines = [
        "| dtype | B | T | H | K=V | rak's faster form fwd / fwd+bwd | "
        + " | ".join(f"vs {n} fwd / fwd+bwd" for n in names)
        + " | rak fused vs chunk_gla | rak chunked vs chunk_gla | rak fused fwd / compute floor |",
        "|---|---|---|---|---|" + "---|" * (len(names) + 4),
    ]
    for k in m.keys:
        best = [m.best(k, mode) for mode in MODES]
        forms = " / ".join(form or "—" for _, form in best)
        cells = [forms]
        for peer in PEERS:
            ups = [speed_up(m.time(peer, k, mode), rak) for mode, (rak, _) in zip(MODES, best)]
            cells.append(pair(*ups, digits=2))
        for form in ("fused", "chunked"):
            ups = [speed_up(m.time("chunk_gla", k, mode), m.time(form, k, mode)) for mode in MODES]
            cells.append(pair(*ups, digits=2))
        compute = m.floors.get(k, {}).get("compute_floor_ms")
        fused = m.time("fused", k, MODES[0])
        cells.append("—" if not compute or fused is None else f"{fused / compute:.2f}×")
        lines.append(shape_cells(k) + "| " + " | ".join(cells) + " |")
    return lines


def goals(m):
    """One line per goal of issues 6 and 7: met, not met (with the figure) or not measured."""
    lines = []

    def verdict(text, ok, detail):
        state = "not measured" if ok is None else ("met" if ok else "NOT met")
        lines.append(f"- {text}: **{state}**{detail}")

    for k in m.keys:
        dtype, b, t, h, d = k
        where = f" at {dtype} B={b} T={t} H={h} K=V={d}"
        compute = m.floors.get(k, {}).get("compute_floor_ms")
        fused = m.time("fused", k, MODES[0])
        ratio = fused / compute if compute and fused is not None else None
        verdict(
            f"issue 6, fused forward within {FLOOR_GOAL}× of the compute floor{where}",
            None if ratio is None else ratio <= FLOOR_GOAL,
            "" if ratio is None else f" ({ratio:.2f}×)",
        )
        for peer in ("fused_recurrent_gla", "chunk_gla"):
            for mode in MODES:
                rak, form = m.best(k, mode)
                up = speed_up(m.time(peer, k, mode), rak)
                label = "forward" if mode == MODES[0] else "forward+backward"
                verdict(
                    f"issue 6, rak faster than {peer} {label}{where}",
                    None if up is None else up > 1,
                    "" if up is None else f" ({up:.2f}×, rak {form})",
                )
        if (b, t, h, d) in CHUNKED_GOAL_SHAPES:
            for mode in MODES:
                up = speed_up(m.time("chunk_gla", k, mode), m.time("chunked", k, mode))
                label = "forward" if mode == MODES[0] else "forward+backward"
                verdict(
                    f"issue 7, rak chunked faster than chunk_gla {label}{where}",
                    None if up is None else up > 1,
                    "" if up is None else f" ({up:.2f}×)",
                )
    return lines


def main():
    m = Measurements(load(sys.argv[1]), load(sys.argv[2]), load(sys.argv[3]) if len(sys.argv) > 3 else [])
    print(f"Device: {m.device}\n")
    print("Times in ms, forward / forward+backward: medians, CUDA events (rak fused: cubecl's device")
    print("profiler; rak chunked: burn operations, wall clock from launch to synchronisation).\n")
    print("\n".join(times_table(m)))
    print("\nSpeed-ups: a peer's time over rak's (above 1: rak is faster); rak's time is the faster")
    print("of its two forms, named in the first column.\n")
    print("\n".join(speed_up_table(m)))
    print("\nGoals:\n")
    print("\n".join(goals(m)))


if __name__ == "__main__":
    main()
