"""Summarises cubecl's kernel profile: which kernels a run launched, how often, for how long.

cubecl times every kernel launch when its profiling logger is on (a `cubecl.toml` in the
working directory or a parent, `[profiling.logger] level = "basic"`, `file = "…"`; see
scripts/gpu-run.sh), and at every synchronisation of the device it logs a summary table of
the launches since the previous one. `rak bench` synchronises once per repetition, so with
`--warmup 1 --repetitions 1` a chunked bench at one shape leaves four tables: the forward
scan (with the inputs' creation and the matmuls' autotuning), the forward scan again, then
forward + backward twice. Each launch is timed alone, the device synchronised around it: the
sums are the kernels' own times, without the overlap of a normal run, so they say where the
time goes and how many launches there are, not how long the scan takes.

Usage: kernel_profile.py LOG [LABEL ...]: one Markdown table per summary in LOG, labelled in
order by the LABELs (else "window 1", "window 2", …); kernels of the same kind (the first
part of the name, and for cubecl's matmul its argument kind) are merged.
"""

import re
import sys

UNITS = {"s": 1e3, "ms": 1.0, "µs": 1e-3, "us": 1e-3, "ns": 1e-6}


def milliseconds(text):
    """A Rust `Duration` as `{:?}` prints it ("3.466745ms", "153.358µs", "0ns", "1.2s")."""
    match = re.fullmatch(r"([0-9.]+)(s|ms|µs|us|ns)", text.strip())
    if not match:
        raise ValueError(f"not a duration: {text!r}")
    return float(match.group(1)) * UNITS[match.group(2)]


def kind(name):
    """The kernel's kind: its first name part (the runtime dropped), and for cubecl's matmul
    its argument kind (`TensorArgs`, or `FusedMatmulArgs` inside burn's fusion)."""
    parts = [part.strip() for part in name.split("|") if part.strip()]
    parts = [part for part in parts if not part.endswith("Runtime")]
    if not parts:
        return name.strip()
    if parts[0] == "MatmulEntry" and len(parts) > 1:
        return f"MatmulEntry ({parts[1]})"
    if len(parts) > 1 and parts[0].startswith("Kernel"):
        return f"{parts[0]} ({parts[1]})"
    return parts[0]


def summaries(lines):
    """Every summary table in the log: a list of (name, milliseconds, launches) per table."""
    tables, current = [], None
    for line in lines:
        if line.startswith("| Name "):
            current = []
        elif current is not None and line.startswith("| Total "):
            tables.append(current)
            current = None
        elif current is not None and line.startswith("| ") and not line.startswith("|⎼"):
            fields = line.rstrip().rstrip("|").split("|")
            # The name may itself hold "|": the last three fields are duration, count, ratio.
            name, duration, launches = "|".join(fields[1:-3]), fields[-3], fields[-2]
            current.append((name, milliseconds(duration), int(launches)))
    return tables


def merged(table):
    by_kind = {}
    for name, ms, launches in table:
        total = by_kind.setdefault(kind(name), [0.0, 0])
        total[0] += ms
        total[1] += launches
    return sorted(by_kind.items(), key=lambda item: -item[1][0])


def markdown(label, table):
    rows = merged(table)
    total_ms = sum(ms for _, (ms, _) in rows)
    total_launches = sum(launches for _, (_, launches) in rows)
    lines = [
        f"{label}: {total_launches} launches, {total_ms:.3f} ms in all\n",
        "| kernel | launches | time (ms) | share |",
        "|---|---:|---:|---:|",
    ]
    for name, (ms, launches) in rows:
        share = 100 * ms / total_ms if total_ms else 0.0
        lines.append(f"| {name} | {launches} | {ms:.3f} | {share:.0f} % |")
    return "\n".join(lines)


def main():
    with open(sys.argv[1], encoding="utf-8") as file:
        tables = summaries(file.read().splitlines())
    labels = sys.argv[2:]
    for index, table in enumerate(tables):
        label = labels[index] if index < len(labels) else f"window {index + 1}"
        print(markdown(label, table) + "\n")


if __name__ == "__main__":
    main()
