"""A training run SIGKILLed mid-epoch and resumed with --ckpt_path last ends with exactly the weights, optimizer
state and best score of a run that never stopped (deterministic CPU runs on the tiny backbone: probes, tuned lens,
steering vectors), and the kill leaves no checkpoint half-written under its final name. Ctrl-C stops cleanly."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from pipeline_utils import REPO, tiny_config

import train

# The child runs train.py's main with one extra callback that SIGKILLs the process at (epoch, batch).
_KILLED_TRAINING = """
import os, signal, sys
sys.path[:0] = [sys.argv[1]]
KILL_AT = (int(sys.argv[2]), int(sys.argv[3]))
import lightning as L
import cli, train

SIGNAL = signal.SIGINT if os.environ.get("SEND_CTRL_C") else signal.SIGKILL

class KillAt(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == KILL_AT:
            os.kill(os.getpid(), SIGNAL)

instantiate = cli.ProjectCLI.instantiate_trainer
def with_kill(self, **kwargs):
    trainer = instantiate(self, **kwargs)
    trainer.callbacks.append(KillAt())
    return trainer
cli.ProjectCLI.instantiate_trainer = with_kill
args, sys.argv[1:] = sys.argv[4:], []
cli.run_main(lambda: train.main(args))
"""

RUNS = {  # config, extra arguments, epochs, the epoch and batch of the kill
    "probes": ("quickstart.yaml", {"limit": 6, "batch_size": 4}, 3, (2, 1)),
    "tuned_lens": ("tuned_lens_tiny.yaml", {"limit": 4, "batch_size": 4}, 3, (1, 1)),
    "steering": ("steering_tiny.yaml", {"limit": 5, "batch_size": 2, "max_completion_tokens": 16}, 3, (1, 1)),
}


def _checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(RUNS))
def test_a_killed_run_resumes_to_the_uninterrupted_result(kind, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config_name, overrides, epochs, (epoch, batch) = RUNS[kind]
    config = str(tiny_config(config_name, tmp_path, **overrides))
    common = ["--config", config, "--trainer.max_epochs", str(epochs)]
    train.main([*common, "--run_name", "whole"])

    killed = subprocess.run([sys.executable, "-c", _KILLED_TRAINING, str(REPO), str(epoch), str(batch), *common,
                             "--run_name", "killed"], cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    interrupted = _checkpoint(tmp_path / "checkpoints/killed/last.ckpt")  # a whole file under its final name
    assert interrupted["epoch"] == epoch - 1
    assert not [p for p in (tmp_path / "checkpoints/killed").iterdir() if not p.name.endswith(".ckpt")]

    train.main([*common, "--run_name", "killed", "--ckpt_path", "last"])
    whole, resumed = (_checkpoint(tmp_path / f"checkpoints/{run}/last.ckpt") for run in ("whole", "killed"))
    assert resumed["epoch"] == whole["epoch"] == epochs - 1 and resumed["global_step"] == whole["global_step"]
    assert resumed["state_dict"].keys() == whole["state_dict"].keys()
    for key, value in whole["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    for ours, theirs in zip(resumed["optimizer_states"][0]["state"].values(),
                            whole["optimizer_states"][0]["state"].values()):  # fmt: skip
        assert all(torch.equal(ours[name], theirs[name]) for name in theirs)
    best = [c for c in whole["callbacks"] if c.startswith("ModelCheckpoint") and "'monitor': None" not in c]
    assert best and all(resumed["callbacks"][c]["best_model_score"] == whole["callbacks"][c]["best_model_score"]
                        for c in best)  # fmt: skip


def test_ctrl_c_stops_cleanly_and_the_rerun_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = str(tiny_config("quickstart.yaml", tmp_path, limit=6, batch_size=4))
    common = ["--config", config, "--trainer.max_epochs", "3", "--run_name", "run"]
    stopped = subprocess.run([sys.executable, "-c", _KILLED_TRAINING, str(REPO), "1", "1", *common], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600, env={**os.environ, "SEND_CTRL_C": "1"})  # fmt: skip
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert stopped.stderr.strip().splitlines()[-1] == ("interrupted; rerun the same command to resume (train.py: add "
                                                       "--ckpt_path last)")  # fmt: skip
    assert _checkpoint(tmp_path / "checkpoints/run/last.ckpt")["epoch"] == 0
    train.main([*common, "--ckpt_path", "last"])
    assert _checkpoint(tmp_path / "checkpoints/run/last.ckpt")["epoch"] == 2
