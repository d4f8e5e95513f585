"""CKA benchmark (not a test): every layer pair in one batched `cka_matrix` vs a Python loop of `linear_cka`.

    python bench/cka.py [--n 1000 --layers 32 --d 512 --repeats 3 --pairs 64 --debiased] [--quick]

Inputs: two random float32 activation sets [n, layers, d], the second correlated with the first. All timings run
in this one process, interleaved (batched, loop, batched, loop, ...), after one warm-up of each, and are
reported as medians. The loop is timed on a fixed random subset of `--pairs` layer pairs (all of them if there
are fewer) and extrapolated linearly to all layers^2 pairs, as its cost per pair does not depend on the pair;
the output says so. Target: speedup >= 10x.

Memory: peak RSS growth of the first batched call (ru_maxrss after it minus the RSS before it, so the inputs are
excluded), next to the estimate from cka_matrix's docstring. `--quick` (n 256, 16 layers, d 256) takes ~7 s, the
defaults ~30 s (one thread). The study's size, `--n 2000 --layers 64 --d 1024 --pairs 32` (~5 min, ~7 GB): batched
43 s against ~1430 s for the loop (33x), peak growth 6.9 GB as predicted (2 cores, OMP_NUM_THREADS=1, 2026-12-01).
Prints one JSON object. On a 2-core machine busy with other jobs, run it with
OMP_NUM_THREADS=1: two OpenMP threads waiting on each other made the small per-pair ops ~50x slower there.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from interp.similarity import cka_matrix, linear_cka  # noqa: E402

MIB = 2**20


def current_rss() -> int:
    """Resident set size now, in bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def predicted_bytes(n: int, layers: int, d: int) -> tuple[str, int]:
    """The form cka_matrix's "auto" takes and its memory estimate (docstring): centered float64 inputs, a
    transient copy of one side, and the cross products or the Gram matrices."""
    pairs, inputs = layers * layers, 3 * n * layers * d
    if pairs * d * d > n * (2 * layers * d + pairs):
        return "gram", 8 * (inputs + 2 * layers * n * n)
    return "feature", 8 * (inputs + pairs * d * d)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=64, help="loop: time these many pairs, extrapolate")
    parser.add_argument("--debiased", action="store_true")
    parser.add_argument("--quick", action="store_true", help="n 256, 16 layers, d 256: a few seconds")
    args = parser.parse_args()
    if args.quick:
        args.n, args.layers, args.d = 256, 16, 256

    generator = torch.Generator().manual_seed(0)
    acts1 = torch.randn(args.n, args.layers, args.d, generator=generator)
    acts2 = 0.5 * acts1 + torch.randn(args.n, args.layers, args.d, generator=generator)
    all_pairs = [(i, j) for i in range(args.layers) for j in range(args.layers)]
    chosen = torch.randperm(len(all_pairs), generator=generator)[: args.pairs].tolist()
    pairs = [all_pairs[k] for k in sorted(chosen)]

    rss_before, peak_before = current_rss(), peak_rss()
    matrix = cka_matrix(acts1, acts2, args.debiased)  # also the batched warm-up
    peak_after = peak_rss()

    def loop() -> list[float]:
        return [linear_cka(acts1[:, i], acts2[:, j], args.debiased) for i, j in pairs]

    looped = loop()  # warm-up, and the check that both give the same numbers
    max_diff = max(abs(float(matrix[i, j]) - value) for (i, j), value in zip(pairs, looped))
    batched_s, loop_s = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        cka_matrix(acts1, acts2, args.debiased)
        batched_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        loop()
        loop_s.append(time.perf_counter() - start)

    batched = statistics.median(batched_s)
    per_pair = statistics.median(loop_s) / len(pairs)
    form, predicted = predicted_bytes(args.n, args.layers, args.d)
    print(json.dumps({
        "n": args.n, "layers": args.layers, "d": args.d, "debiased": args.debiased, "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(), "form": form,
        "batched_s_median": round(batched, 4),
        "loop_pairs_timed": len(pairs),
        "loop_s_per_pair_median": round(per_pair, 6),
        "loop_s_all_pairs_extrapolated": round(per_pair * len(all_pairs), 3),
        "loop_note": f"loop timed on {len(pairs)} of {len(all_pairs)} layer pairs, extrapolated linearly to all",
        "speedup": round(per_pair * len(all_pairs) / batched, 1),
        "target_speedup": 10,
        "max_abs_diff_batched_vs_loop": max_diff,
        "peak_rss_growth_mib": round((peak_after - rss_before) / MIB, 1) if peak_after > peak_before else None,
        "predicted_mib": round(predicted / MIB, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
