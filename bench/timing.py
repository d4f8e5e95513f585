"""The benchmarks' one timing loop: callables run round-robin in one process, so machine noise hits all alike."""

from __future__ import annotations

import time


def round_robin(modes: dict, repeats: int) -> dict[str, list[float]]:
    """Wall times of each callable, run round-robin (`repeats` rounds) after one warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in modes}
    for fn in modes.values():
        fn()
    for _ in range(repeats):
        for name, fn in modes.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times
