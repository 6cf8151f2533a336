"""Merges `rak bench --json` lines and bench/peers.py lines into the BENCHMARKS.md table.

Usage: table.py RAK_JSONL PEERS_JSONL [RAK_CHUNKED_JSONL] (the last from
`rak bench --strategy chunked --json`, shown in a column of its own).
"""

import json
import sys


def load(path):
    try:
        with open(path) as file:
            return [json.loads(line) for line in file if line.strip()]
    except FileNotFoundError:
        return []


def main():
    rak = load(sys.argv[1])
    peers = load(sys.argv[2])
    chunked = load(sys.argv[3]) if len(sys.argv) > 3 else []
    key = lambda r: (r.get("dtype"), r.get("batch"), r.get("time"), r.get("heads"), r.get("dim"))
    floors = {key(r): r for r in peers if r.get("kind") == "floor"}
    by_peer = {}
    for r in peers:
        if r.get("kind") == "peer":
            by_peer.setdefault(key(r), {})[r["peer"]] = r
    by_chunked = {key(r): r for r in chunked}
    device = next((r["device"] for r in peers if r.get("kind") == "floors"), "unknown device")
    print(f"Device: {device}\n")
    print("| dtype | B | T | H | K=V | rak fwd | rak fwd+bwd | rak chunked fwd / fwd+bwd | fused_recurrent_gla fwd / fwd+bwd | chunk_gla fwd / fwd+bwd | torch loop fwd / fwd+bwd | compute floor | memory floor | rak fwd / floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rak:
        k = key(r)
        p = by_peer.get(k, {})
        f = floors.get(k, {})
        pair = lambda name: (f"{p[name]['forward_ms']:.3f} / {p[name]['forward_backward_ms']:.3f}" if name in p else "—")
        floor = max(f.get("compute_floor_ms", 0), f.get("memory_floor_ms", 0))
        ratio = f"{r['forward_ms'] / floor:.1f}×" if floor else "—"
        c = by_chunked.get(k)
        rak_chunked = f"{c['forward_ms']:.3f} / {c['forward_backward_ms']:.3f}" if c else "—"
        print(
            f"| {r['dtype']} | {r['batch']} | {r['time']} | {r['heads']} | {r['dim']} | {r['forward_ms']:.3f} | {r['forward_backward_ms']:.3f} | {rak_chunked} "
            f"| {pair('fused_recurrent_gla')} | {pair('chunk_gla')} | {pair('torch_loop')} "
            f"| {f.get('compute_floor_ms', float('nan')):.3f} | {f.get('memory_floor_ms', float('nan')):.3f} | {ratio} |"
        )
    print("\nTimes in ms: medians, CUDA events (rak: cubecl's device profiler; rak chunked: burn operations, wall clock from launch to synchronisation).")


if __name__ == "__main__":
    main()
