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


# The shape of `cuobjdump -sass` output: an outer loop (0x0020-0x00a0) holding an inner one
# (0x0040-0x0060) and a spill reload, a forward branch, and code after the loop.
SASS = """
        code for sm_90a
                Function : forward_f_f32
        /*0000*/                   LDC R1, c[0x0][0x28] ;                         /* 0x00000a00ff017b82 */
                                                                                  /* 0x000fe20000000800 */
        /*0010*/                   STL [R1], R3 ;                                 /* 0x0000000301007387 */
        /*0020*/                   LDS R4, [R2] ;                                 /* 0x0000000002047984 */
        /*0030*/               @P0 BRA 0x80 ;                                     /* 0x0000000000100947 */
        /*0040*/                   FFMA R5, R4, R4, R5 ;                          /* 0x0000000404057223 */
        /*0050*/                   LDL R3, [R1] ;                                 /* 0x0000000001037983 */
        /*0060*/              @!P1 BRA 0x40 ;                                     /* 0xfffffffc00f49947 */
        /*0070*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;                  /* 0x0000000000007b1d */
        /*0080*/                   IADD3 R2, R2, 0x4, RZ ;                        /* 0x0000000402027810 */
        /*0090*/                   ISETP.NE.AND P2, PT, R2, R6, PT ;              /* 0x000000060200720c */
        /*00a0*/              @P2 BRA P3, 0x20 ;                                  /* 0xffffffff00dc2947 */
        /*00b0*/                   EXIT ;                                         /* 0x000000000000794d */
"""


class TimeLoop(unittest.TestCase):
    def test_the_outermost_loop_and_its_spills(self):
        self.assertEqual(len(cuda_compile.sass_instructions(SASS)), 12)
        # 0x0020 to 0x00a0: 9 instructions, one of them a local-memory read (the STL before the
        # loop does not count).
        self.assertEqual(cuda_compile.time_loop(SASS), (9, 1, 0))

    def test_spills_written_inside_the_loop(self):
        # A value spilled every step (as a state held in registers would be): the STL moves into
        # the loop, before the reload.
        inside = SASS.replace("/*0010*/                   STL [R1], R3 ;", "/*0010*/                   NOP ;")
        inside = inside.replace("/*0040*/                   FFMA R5, R4, R4, R5 ;", "/*0040*/                   STL [R1], R5 ;")
        self.assertEqual(cuda_compile.time_loop(inside), (9, 1, 1))

    def test_no_loop(self):
        straight = "\n".join(line for line in SASS.splitlines() if "BRA" not in line)
        self.assertEqual(cuda_compile.time_loop(straight), (0, 0, 0))


class StateSpill(unittest.TestCase):
    def result(self, spill_bytes, loop_local_writes, in_registers=True, **schedule):
        kernel = cuda_compile.Kernel("gla", "forward", 128, "bf16", **schedule)
        result = cuda_compile.Result(kernel)
        result.in_registers = in_registers
        result.spill_bytes = spill_bytes
        result.loop_local_reads, result.loop_local_writes = 3, loop_local_writes
        return result

    def test_spills_written_in_the_time_loop_fail(self):
        self.assertIn("writes local memory 2 times", cuda_compile.state_spill(self.result(20, 2), True))

    def test_loop_invariant_spills_pass_with_the_disassembly_only(self):
        # GLA's bf16 forward scan at K=V=128: 20 bytes, written before the time loop, read 3 times in it.
        self.assertIsNone(cuda_compile.state_spill(self.result(20, 0), True))
        self.assertIn("spills 20 bytes", cuda_compile.state_spill(self.result(20, 0), False))

    def test_only_register_held_states_at_the_default_schedule(self):
        self.assertIsNone(cuda_compile.state_spill(self.result(20, 2, in_registers=False), True))
        self.assertIsNone(cuda_compile.state_spill(self.result(20, 2, tile=16), True))
        self.assertIsNone(cuda_compile.state_spill(self.result(0, 0), False))


if __name__ == "__main__":
    unittest.main()
