"""Tests of bench/table.py on made-up measurements (run by .ci/run: python3 -m unittest
discover -s bench). The GPU run's table is pasted into BENCHMARKS.md as it comes, so its
arithmetic and its verdicts are checked here, where a mistake can still be caught."""

import io
import json
import os
import tempfile
import unittest
from contextlib import redirect_stdout

import table


def rak(dtype, shape, forward, both):
    b, t, h, d = shape
    return dict(cell="simple_rnn", dtype=dtype, batch=b, time=t, heads=h, dim=d, forward_ms=forward, forward_backward_ms=both)


def peer(name, dtype, shape, forward, both):
    record = rak(dtype, shape, forward, both)
    record.update(kind="peer", peer=name)
    return record


def floor(dtype, shape, compute, memory):
    b, t, h, d = shape
    return dict(kind="floor", dtype=dtype, batch=b, time=t, heads=h, dim=d, compute_floor_ms=compute, memory_floor_ms=memory)


LONG = (1, 16384, 8, 128)
WIDE = (4, 2048, 16, 128)


class TableTest(unittest.TestCase):
    def run_table(self, fused, peers, chunked):
        with tempfile.TemporaryDirectory() as folder:
            paths = []
            for name, records in (("rak", fused), ("peers", peers), ("chunked", chunked)):
                path = os.path.join(folder, name + ".jsonl")
                with open(path, "w") as file:
                    file.writelines(json.dumps(r) + "\n" for r in records)
                paths.append(path)
            out = io.StringIO()
            saved = table.sys.argv
            table.sys.argv = ["table.py", *paths]
            try:
                with redirect_stdout(out):
                    table.main()
            finally:
                table.sys.argv = saved
        return out.getvalue()

    def test_speed_ups_use_rak_s_faster_form_and_goals_give_figures(self):
        text = self.run_table(
            [rak("f32", WIDE, 2.0, 8.0)],
            [
                {"kind": "floors", "device": "Test GPU"},
                floor("f32", WIDE, 1.0, 0.5),
                peer("chunk_gla", "f32", WIDE, 3.0, 6.0),
                peer("fused_recurrent_gla", "f32", WIDE, 4.0, 16.0),
            ],
            [rak("f32", WIDE, 1.5, 5.0)],
        )
        self.assertIn("Device: Test GPU", text)
        speed_row = next(line for line in text.splitlines() if line.startswith("| f32") and "chunked / chunked" in line)
        # vs fused_recurrent_gla: 4 / 1.5 and 16 / 5; vs chunk_gla: 3 / 1.5 and 6 / 5; no loop.
        self.assertIn("| 2.67 / 3.20 | 2.00 / 1.20 | — / — |", speed_row)
        # Each form alone against chunk_gla, and the fused forward over the compute floor.
        self.assertIn("| 1.50 / 0.75 | 2.00 / 1.20 | 2.00× |", speed_row)
        self.assertIn("fused forward within 1.5× of the compute floor at f32 B=4 T=2048 H=16 K=V=128: **NOT met** (2.00×)", text)
        self.assertIn("rak faster than chunk_gla forward+backward at f32 B=4 T=2048 H=16 K=V=128: **met** (1.20×, rak chunked)", text)
        self.assertIn("issue 7, rak chunked faster than chunk_gla forward at f32 B=4 T=2048 H=16 K=V=128: **met** (2.00×)", text)

    def test_a_missing_measurement_is_shown_and_named_not_measured(self):
        text = self.run_table([rak("bf16", LONG, 1.0, 2.0), rak("f32", LONG, 1.0, 2.0)], [], [])
        self.assertIn("Device: unknown device", text)
        lines = text.splitlines()
        # f32 rows come before bf16 ones.
        first = next(i for i, line in enumerate(lines) if line.startswith("| f32"))
        self.assertLess(first, next(i for i, line in enumerate(lines) if line.startswith("| bf16")))
        self.assertIn("| f32 | 1 | 16384 | 8 | 128 | 1.000 / 2.000 | — / — | — / — | — / — | — / — | — | — |", text)
        self.assertIn("issue 7, rak chunked faster than chunk_gla forward at bf16 B=1 T=16384 H=8 K=V=128: **not measured**", text)
        self.assertNotIn("**met**", text)


if __name__ == "__main__":
    unittest.main()
