"""Toy-pair benchmark (not a test): build time, peak memory and held-out accuracy of toy-qwq and toy-r1-distill.

    python bench/toy_pair.py [--n_problems 200]

Builds both models from scratch into a temporary REASONING_DIRECTIONS_CACHE, each in its own subprocess (the
teacher first: the student's build loads it), timing each build and reading each subprocess's peak RSS. Then
grades greedy answers to the first `n_problems` held-out toy_arithmetic problems exactly as
tests/test_toy_pair.py does (dataset source -> build_prompt_rows -> interp.generation.generate -> grade_answer),
per number of steps. Prints one JSON object. Target (issue 8): both built in <= 5 min together on 2 cores;
accuracy >= 0.9 (toy-qwq) and >= 0.8 (toy-r1-distill).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUILD = """
import resource
from interp.backbone import resolve_backbone_path
resolve_backbone_path({name!r})
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)  # peak RSS of this build, KiB -> GiB
"""
EVALUATE = """
import json, sys
from collections import defaultdict
from datamodules.problems import DatasetSource, load_problems
from datamodules.prompt_rows import build_prompt_rows
from interp.backbone import load_backbone
from interp.generation import generate
from interp.grading import grade_answer
model, tokenizer = load_backbone({name!r})
source = DatasetSource("toy_arithmetic", split="test", limit={n})
problems = load_problems(source)
steps = {{p.problem_id: row["steps"] for p, row in zip(load_problems(DatasetSource("toy_arithmetic", split="test")),
         __import__("interp.toy_arithmetic", fromlist=["toy_rows"]).toy_rows("test"))}}
rows = [r for r in build_prompt_rows(problems, tokenizer, val_fraction=0.0, test_fraction=0.0) if r.kind == "reasoning"]
texts = generate(model, tokenizer, [r.prompt for r in rows], max_new_tokens=96, do_sample=False, batch_size=50)
by_steps = defaultdict(list)
for text, row in zip(texts, rows):
    by_steps[steps[row.problem_id]].append(grade_answer(text, row.gold_answer, row.dataset))
graded = [g for v in by_steps.values() for g in v]
print(json.dumps({{"accuracy": sum(graded) / len(graded), "n": len(graded),
                  "by_steps": {{k: round(sum(v) / len(v), 3) for k, v in sorted(by_steps.items())}}}}))
"""


def _run(code: str, env: dict) -> tuple[float, str]:
    """(wall seconds, last stdout line) of `python -c code` in the repo."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return wall, done.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n_problems", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "REASONING_DIRECTIONS_CACHE": cache, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "PYTHONPATH": str(REPO)}  # fmt: skip
        results = {}
        for name in ("toy-qwq", "toy-r1-distill"):
            wall, peak = _run(BUILD.format(name=name), env)
            _, accuracy = _run(EVALUATE.format(name=name, n=args.n_problems), env)
            results[name] = {"build_s": round(wall, 1), "peak_rss_gb": round(float(peak), 2), **json.loads(accuracy)}
        results["total_build_s"] = round(sum(r["build_s"] for r in results.values() if isinstance(r, dict)), 1)
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
