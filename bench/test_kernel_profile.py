"""Tests of bench/kernel_profile.py on a log in cubecl's format (run by .ci/run: python3 -m
unittest discover -s bench)."""

import unittest

import kernel_profile

SEPARATOR = "|" + "⎼" * 40 + "| "
LOG = f"""| 1.5ms      | MatmulEntry | TensorArgs | DynamicScalar | WgpuRuntime
| Name                                         | Duration    | Num Computed | Ratio |
{SEPARATOR}
| MatmulEntry | TensorArgs | DynamicScalar | WgpuRuntime | 1.5ms       | 2            | 60 %  |
| KernelScalarBinop | MulOp | WgpuRuntime      | 500µs       | 3            | 20 %  |
| MatmulEntry | FusedMatmulArgs | e | WgpuRuntime | 250.5µs | 1 | 10 % |
| RunningSumKernel | f32 | WgpuRuntime        | 249.5µs     | 4            | 10 %  |
{SEPARATOR}
| Total                                        | 2.5ms       | 10           | 100 % |
| Name                                         | Duration    | Num Computed | Ratio |
{SEPARATOR}
| ElemwiseFuse | WgpuRuntime                   | 1.2s        | 7            | 100 % |
| MatmulEntry | TensorArgs | x | WgpuRuntime | 0ns | 1 | 0 % |
{SEPARATOR}
| Total                                        | 1.2s        | 8            | 100 % |
"""


class KernelProfileTest(unittest.TestCase):
    def test_durations_in_every_unit(self):
        self.assertAlmostEqual(kernel_profile.milliseconds("3.466745ms"), 3.466745)
        self.assertAlmostEqual(kernel_profile.milliseconds("153.358µs"), 0.153358)
        self.assertAlmostEqual(kernel_profile.milliseconds("12ns"), 12e-6)
        self.assertAlmostEqual(kernel_profile.milliseconds("1.2s"), 1200.0)
        with self.assertRaises(ValueError):
            kernel_profile.milliseconds("soon")

    def test_summaries_are_read_table_by_table_and_merged_by_kind(self):
        tables = kernel_profile.summaries(LOG.splitlines())
        self.assertEqual(len(tables), 2)
        first = dict((kind, totals) for kind, totals in kernel_profile.merged(tables[0]))
        self.assertEqual(first["MatmulEntry (TensorArgs)"][1], 2)
        self.assertAlmostEqual(first["MatmulEntry (TensorArgs)"][0], 1.5)
        self.assertEqual(first["MatmulEntry (FusedMatmulArgs)"][1], 1)
        self.assertEqual(first["KernelScalarBinop (MulOp)"], [0.5, 3])
        self.assertEqual(first["RunningSumKernel"][1], 4)
        text = kernel_profile.markdown("forward", tables[0])
        self.assertIn("forward: 10 launches, 2.500 ms in all", text)
        self.assertIn("| MatmulEntry (TensorArgs) | 2 | 1.500 | 60 % |", text)
        second = kernel_profile.markdown("both", tables[1])
        self.assertIn("both: 8 launches, 1200.000 ms in all", second)


if __name__ == "__main__":
    unittest.main()
