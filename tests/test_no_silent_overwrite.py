"""Nothing finished is replaced by accident: a second train.py run under the same --run_name, an evaluation of
another checkpoint into the same folder, and a killed writer all leave the earlier files as they were."""

import json
import os
import signal
import subprocess
import sys

import pytest
from pipeline_utils import REPO, tiny_config

import evaluate
import train
from cli import run_main
from interp.atomic import replaced_atomically, write_text


def _exit_and_error(main, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(main)
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture
def finished_run(tmp_path, monkeypatch):
    """A finished 1-epoch probe run `run` on the tiny backbone, evaluated on best.ckpt into logs/run."""
    monkeypatch.chdir(tmp_path)
    config = tiny_config("quickstart.yaml", tmp_path, limit=6)
    args = ["--config", str(config), "--run_name", "run", "--trainer.max_epochs", "1"]
    train.main(args)
    evaluate.main(["--ckpt", "checkpoints/run/best.ckpt"])
    return args


def test_the_same_run_name_twice_is_refused_and_overwrite_replaces(finished_run, tmp_path, capsys):
    checkpoints, logs = tmp_path / "checkpoints" / "run", tmp_path / "logs" / "run"
    before = {path: path.read_bytes() for path in [*checkpoints.glob("*.ckpt"), logs / "probe_accuracies.json"]}
    code, err = _exit_and_error(lambda: train.main(finished_run), capsys)
    assert code == 2 and len(err) == 1 and "already exists" in err[0] and "--ckpt_path last" in err[0] and "--overwrite true" in err[0], err
    assert {path: path.read_bytes() for path in before} == before  # not one byte changed

    train.main([*finished_run, "--overwrite", "true"])
    assert not (logs / "probe_accuracies.json").exists()  # the old run's results went with it
    assert (checkpoints / "best.ckpt").read_bytes() != before[checkpoints / "best.ckpt"]  # a new run (new time)


def test_evaluating_another_checkpoint_does_not_replace_results(finished_run, tmp_path, capsys):
    results = tmp_path / "logs" / "run" / "probe_accuracies.json"
    before = results.read_bytes()
    assert json.loads(before)["checkpoint"] == "checkpoints/run/best.ckpt"
    code, err = _exit_and_error(lambda: evaluate.main(["--ckpt", "checkpoints/run/last.ckpt"]), capsys)
    assert code == 2 and len(err) == 1 and "holds the results of checkpoints/run/best.ckpt" in err[0], err
    assert results.read_bytes() == before

    evaluate.main(["--ckpt", "checkpoints/run/last.ckpt", "--output_dir", "logs/run/last"])  # both kept
    assert json.loads((tmp_path / "logs/run/last/probe_accuracies.json").read_text())["checkpoint"].endswith("last.ckpt")
    evaluate.main(["--ckpt", "checkpoints/run/best.ckpt"])  # the same checkpoint again: redone in place
    evaluate.main(["--ckpt", "checkpoints/run/last.ckpt", "--overwrite"])
    assert json.loads(results.read_text())["checkpoint"] == "checkpoints/run/last.ckpt"


def test_a_failed_writer_leaves_the_previous_file(tmp_path):
    path = write_text(tmp_path / "result.json", "old")
    with pytest.raises(RuntimeError), replaced_atomically(path) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("disk full")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


_KILLED_WRITER = """
import os, signal, sys
from interp.atomic import replaced_atomically
with replaced_atomically(sys.argv[1]) as tmp:
    with open(tmp, "w") as f:
        f.write("half of the new")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_writer_never_leaves_a_partial_file_under_the_final_name(tmp_path):
    path = write_text(tmp_path / "result.json", "old")
    result = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(path)], cwd=os.getcwd(), timeout=120,
                            env={**os.environ, "PYTHONPATH": str(train.__file__).rsplit("/", 1)[0]})  # fmt: skip
    assert result.returncode == -signal.SIGKILL
    assert path.read_text() == "old"  # the kill left only the hidden temporary beside it
    left = [p.name for p in tmp_path.iterdir() if p.name != "result.json"]
    assert len(left) == 1 and left[0].startswith(".result.json.tmp"), left


_KILLED_EVALUATE = """
import os, signal, sys
sys.path[:0] = [sys.argv[1]]
import lightning_modules.protocol as protocol
from interp.atomic import replaced_atomically

def dies_while_saving(figure, path, **kwargs):
    with replaced_atomically(path) as tmp:
        tmp.write_bytes(b"half a png")
        os.kill(os.getpid(), signal.SIGKILL)

protocol.save_figure = dies_while_saving
import evaluate
evaluate.main(sys.argv[2:])
"""


def test_a_killed_evaluation_leaves_no_partial_file_and_the_rerun_redoes_it(finished_run, tmp_path):
    out = tmp_path / "logs" / "run" / "last"
    args = ["--ckpt", "checkpoints/run/last.ckpt", "--output_dir", str(out)]
    killed = subprocess.run([sys.executable, "-c", _KILLED_EVALUATE, str(REPO), *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "visualizations" / "probe_accuracy.png").exists()  # only its hidden temporary
    assert [p.name for p in (out / "visualizations").iterdir()][0].startswith(".probe_accuracy.png.tmp")
    evaluate.main(args)  # the same checkpoint: redone in place
    assert (out / "visualizations" / "probe_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "probe_accuracies.json").read_text())["checkpoint"] == "checkpoints/run/last.ckpt"
