"""`make bench` (bench/suite.py) in its smoke mode: every section but DDP runs on tiny sizes and writes its rows
(a wiring check: smoke sizes judge no target). The DDP rows' cache comparison is the one tests/test_direction_run.py
checks for real (test_ddp_run_equals_the_single_process_run); the full DDP bench spawns two processes per run."""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_suite_smoke_writes_one_row_per_measurement(tmp_path):
    import suite

    output = tmp_path / "results.json"
    rows = suite.main(["--smoke", "--sections", "extraction,probes,generation,steering,cka", "--output", str(output)])
    written = json.loads(output.read_text())
    assert written["rows"] == rows and written["settings"]["smoke"] is True
    sections = {r["section"] for r in rows}
    assert sections == {"extraction", "probes", "generation", "steering", "cka"}
    measured = [r for r in rows if r["value"] is not None]
    assert all(math.isfinite(r["value"]) and r["value"] >= 0 for r in measured)
    assert all(r["ok"] is None for r in rows)  # smoke sizes judge no target
    references = {r["reference"] for r in rows if r["section"] == "extraction"}
    assert {"bare decoder forward", "HF output_hidden_states"} <= references
    peers = {"TransformerLens", "nnsight"}
    assert all(any(p in ref for ref in references) for p in peers)  # timed, or a "not installed" note


def test_unknown_sections_are_refused():
    import suite

    with pytest.raises(SystemExit):
        suite.main(["--smoke", "--sections", "extraction,gpu"])


def test_gpu_bench_smoke_runs_on_the_cpu(tmp_path):
    """bench/gpu.py's code path (shape backbone, extraction vs bare decoder, the JSON) on the CPU; the MFU needs a
    card's peak, looked up by name (most specific first)."""
    import gpu

    output = tmp_path / "results_gpu.json"
    result = gpu.main(["--smoke", "--output", str(output)])
    assert json.loads(output.read_text())["smoke"] is True
    assert result["device"] == "cpu" and result["mfu"] is None and result["parameters"] > 0
    assert result["extraction_vs_bare"] > 0 and set(result["tokens_per_s"]) == {"ours", "bare decoder"}
    assert gpu.peak_flops("NVIDIA H100 PCIe") == 756e12 and gpu.peak_flops("NVIDIA H200") == 989e12
    assert gpu.peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and gpu.peak_flops("some CPU") is None
