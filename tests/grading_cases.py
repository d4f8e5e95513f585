"""Shared by the grading tests: the embedded GSM8K / MATH-500 rows and the prefix of a finished generation."""

import json
from pathlib import Path

EMBEDDED = Path(__file__).resolve().parents[1] / "datamodules" / "embedded"
R = "ok\n</think>\n\n"  # a finished generation: its final part follows


def embedded_rows(name: str) -> list[dict]:
    with open(EMBEDDED / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]
