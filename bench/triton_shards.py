"""Splits the configurations Triton's autotuner tries among processes (`bench/peers.py
--compile-only --shard I/N`): in process I of N, every autotuned kernel tries only the
configurations I, I + N, I + 2N, … of those it would try (at least one), so N processes compile a
kernel's configurations into Triton's on-disk cache side by side instead of one process compiling
them all. Meant for compiling only: the pick of each process is not the best configuration (the
timing run autotunes over all of them, from the cache)."""


def parse_shard(text):
    """`I/N` (0 ≤ I < N) as (I, N)."""
    index, _, count = text.partition("/")
    index, count = int(index), int(count)
    if not 0 <= index < count:
        raise ValueError(f"shard {text!r}: want I/N with 0 <= I < N")
    return index, count


def shard_autotuning(index, count, autotuner=None):
    """Makes `autotuner` (Triton's Autotuner class, and so fla's subclass of it) try only shard
    `index` of `count` of the configurations left after pruning. Returns False, changing
    nothing, where this Triton has no `Autotuner.prune_configs` to wrap."""
    if autotuner is None:
        try:
            from triton.runtime.autotuner import Autotuner as autotuner
        except ImportError:
            return False
    prune = getattr(autotuner, "prune_configs", None)
    if prune is None:
        return False

    def prune_to_shard(self, *args, **kwargs):
        configs = prune(self, *args, **kwargs)
        return configs[index::count] or configs[:1]

    autotuner.prune_configs = prune_to_shard
    return True
