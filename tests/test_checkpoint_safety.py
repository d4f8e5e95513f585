"""Checkpoints are read as data only: a checkpoint carrying a pickled call is refused by evaluate.py and by
train.py --ckpt_path with one line, before anything is loaded or written, and the call never runs; unreadable
files and checkpoints of another kind are one clear line too."""

import os

import pytest
import torch
import yaml

from interp.errors import UserError

RUN_CONFIG = yaml.safe_dump({"model": {"class_path": "lightning_modules.steering.SteeringVectorModule"},
                             "run_name": "evil"})  # fmt: skip


class _Payload:
    """Unpickling this runs `touch marker` (what an attacker's checkpoint would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_checkpoint(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"run_config": RUN_CONFIG, "state_dict": {}, "extra": _Payload(marker)}, path)
    return path, marker


def test_evaluate_refuses_a_pickled_call_without_running_it(tmp_path, monkeypatch):
    import evaluate

    monkeypatch.chdir(tmp_path)
    path, marker = _evil_checkpoint(tmp_path)
    with pytest.raises(UserError, match=r"holds more than tensors .*GLOBAL posix.system.*refusing to unpickle"):
        evaluate.main(["--ckpt", str(path)])
    assert not marker.exists() and not (tmp_path / "logs").exists()
    torch.load(path, weights_only=False)  # the payload is real: the unsafe load runs it
    assert marker.exists()


def test_resuming_from_a_pickled_call_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from pipeline_utils import tiny_config

    import train

    monkeypatch.chdir(tmp_path)
    path, marker = _evil_checkpoint(tmp_path)
    config = tiny_config("steering_tiny.yaml", tmp_path, limit=5)
    with pytest.raises(UserError, match="refusing to unpickle"):
        train.main(["--config", str(config), "--run_name", "r", "--ckpt_path", str(path)])
    assert not marker.exists() and not (tmp_path / "logs").exists() and not (tmp_path / "checkpoints" / "r").exists()


def test_a_checkpoint_of_another_kind_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from pipeline_utils import tiny_config

    import train

    monkeypatch.chdir(tmp_path)
    probes = yaml.safe_dump({"model": {"class_path": "lightning_modules.probes.LayerProbeModule"}})
    torch.save({"run_config": probes, "state_dict": {}}, tmp_path / "probes.ckpt")
    config = tiny_config("steering_tiny.yaml", tmp_path, limit=5)
    with pytest.raises(UserError, match="holds a LayerProbeModule, not this config's SteeringVectorModule"):
        train.main(["--config", str(config), "--run_name", "r", "--ckpt_path", str(tmp_path / "probes.ckpt")])
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("content, message", [
    (b"hello world\n", r"cannot be read \(truncated or not a checkpoint\)"),
    ("truncated", r"cannot be read \(truncated or not a checkpoint\)"),
    ("no_run_config", "was not written by train.py"),
])  # fmt: skip
def test_unreadable_checkpoints_are_one_line_naming_the_file(tmp_path, content, message):
    from cli import read_checkpoint

    path = tmp_path / "bad.ckpt"
    if content == "truncated":
        torch.save({"run_config": RUN_CONFIG, "state_dict": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif content == "no_run_config":
        torch.save({"state_dict": {}}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message) as error:
        read_checkpoint(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_hub_tokens_never_reach_any_written_file(tmp_path, monkeypatch):
    """The hub token is read from the environment only: with fake tokens set, nothing train.py and evaluate.py
    write (checkpoints, config.yaml, TensorBoard events, results, figures, the activation cache) contains them."""
    from pipeline_utils import tiny_config

    import evaluate
    import train

    fake = "hf_FAKEtokenFORtestsONLY0123456789abcdef"
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.setenv(name, fake)
    monkeypatch.chdir(tmp_path)
    train.main(["--config", str(tiny_config("quickstart.yaml", tmp_path, limit=6)), "--run_name", "run",
                "--trainer.max_epochs", "1"])  # fmt: skip
    evaluate.main(["--ckpt", "checkpoints/run/best.ckpt"])
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.suffix == ".ckpt" for path in written) and any("events" in path.name for path in written)
    assert any(path.name == "config.yaml" for path in written) and any(path.suffix == ".safetensors" for path in written)
    leaking = [str(path) for path in written if fake.encode() in path.read_bytes()]
    assert not leaking
