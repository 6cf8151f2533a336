"""Tests of bench/triton_shards.py on a stand-in for Triton's Autotuner (run by .ci/run:
python3 -m unittest discover -s bench)."""

import unittest

import triton_shards


class Autotuner:
    """Prunes like Triton's: the configurations that fit the arguments."""

    def __init__(self, configs):
        self.configs = configs

    def prune_configs(self, kwargs):
        return [c for c in self.configs if c <= kwargs["largest"]]


class CachedAutotuner(Autotuner):
    """fla's subclass, which inherits prune_configs."""


class ShardTest(unittest.TestCase):
    def test_each_shard_tries_its_share_and_together_all(self):
        configs = list(range(7))
        tried = []
        for index in range(3):

            class Tuner(CachedAutotuner):
                pass

            self.assertTrue(triton_shards.shard_autotuning(index, 3, Tuner))
            tried.append(Tuner(configs).prune_configs({"largest": 5}))
        self.assertEqual(tried, [[0, 3], [1, 4], [2, 5]])

    def test_a_shard_past_the_configurations_tries_the_first(self):
        class Tuner(Autotuner):
            pass

        triton_shards.shard_autotuning(2, 3, Tuner)
        self.assertEqual(Tuner([0, 1]).prune_configs({"largest": 9}), [0])

    def test_no_prune_configs_changes_nothing(self):
        class Old:
            pass

        self.assertFalse(triton_shards.shard_autotuning(0, 2, Old))
        self.assertFalse(hasattr(Old, "prune_configs"))

    def test_shard_parsing(self):
        self.assertEqual(triton_shards.parse_shard("1/2"), (1, 2))
        for bad in ("2/2", "-1/2", "1", "a/b"):
            with self.assertRaises(ValueError):
                triton_shards.parse_shard(bad)


if __name__ == "__main__":
    unittest.main()
