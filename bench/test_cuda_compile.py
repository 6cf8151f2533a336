"""Tests of the occupancy arithmetic of scripts/cuda_compile.py (run by .ci/run: python3 -m
unittest discover -s bench), with the register counts ptxas gave rak's kernels."""

import sys
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import cuda_compile  # noqa: E402


class CubesPerMultiprocessor(unittest.TestCase):
    def test_registers_bound_the_cubes_a_multiprocessor_holds(self):
        fit = cuda_compile.cubes_per_multiprocessor
        # SimpleRNN's forward scan, 128 units per cube: f32 at tile 16, bf16 at tile 16 and 32.
        self.assertEqual(fit(80, 128), 6)
        self.assertEqual(fit(168, 128), 3)
        self.assertEqual(fit(128, 128), 4)
        # Registers are given out in blocks of 8 per unit: 163 counts as 168.
        self.assertEqual(fit(163, 256), 1)
        self.assertEqual(fit(146, 64), 6)
        self.assertEqual(fit(255, 128), 2)

    def test_grids_of_the_benchmark_shapes_fit_one_wave_or_not(self):
        one_wave = cuda_compile.fits_in_one_wave
        # 512 cubes (B=8 H=8 K=V=128 at tile 16) on 132 multiprocessors: 4 each hold 528, 3 hold
        # 396 (SimpleRNN's bf16 forward scan at 168 registers ran in two waves).
        self.assertTrue(one_wave(512, cuda_compile.cubes_per_multiprocessor(128, 128)))
        self.assertFalse(one_wave(512, cuda_compile.cubes_per_multiprocessor(168, 128)))
        self.assertTrue(one_wave(528, 4))
        self.assertFalse(one_wave(529, 4))


if __name__ == "__main__":
    unittest.main()
