"""evaluate.py goes through the study-module protocol (lightning_modules/protocol.py) and names no module class."""

import ast
import inspect

import pytest
import torch
import yaml
from pipeline_utils import REPO, tiny_config

import evaluate
from cli import run_main
from interp.errors import UserError
from lightning_modules.protocol import EvaluateOptions, StudyModule, study_module_class


def _lightning_module_classes() -> set[str]:
    """Names of the classes defined in lightning_modules/ (every module class there, present or future)."""
    names = set()
    for path in (REPO / "lightning_modules").glob("*.py"):
        tree = ast.parse(path.read_text())
        names |= {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    return names


def test_evaluate_names_no_module_class():
    source = (REPO / "evaluate.py").read_text()
    names = _lightning_module_classes()
    assert {"LayerProbeModule", "ReasoningDirectionModule", "TunedLensModule"} <= names
    named = {name for name in names | {"ProbeModule"} if name in source} - {"EvaluateOptions"}
    assert not named, f"evaluate.py names {named}"
    assert not any(f"lightning_modules.{m}" in source for m in ("probes", "directions", "tuned_lens"))


@pytest.mark.parametrize("config_name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_names_a_study_module(config_name):
    class_path = yaml.safe_load((REPO / "configs" / config_name).read_text())["model"]["class_path"]
    cls = study_module_class(class_path)
    # write_report is a staticmethod, on the class or inherited (the steering modules share their base's)
    assert issubclass(cls, StudyModule) and isinstance(inspect.getattr_static(cls, "write_report"), staticmethod)


def _fake_checkpoint(tmp_path, class_path: str):
    """A checkpoint whose run config (a real tiny probe config) names `class_path` as its model class."""
    config = yaml.safe_load(tiny_config("quickstart.yaml", tmp_path, limit=1).read_text())
    config["model"] = {"class_path": class_path, "init_args": {}}
    config["run_name"] = "fake"
    path = tmp_path / "fake.ckpt"
    torch.save({"run_config": yaml.safe_dump(config), "state_dict": {}}, path)
    return path


@pytest.mark.parametrize(
    "class_path, message",
    [("lightning_modules.extractor.ActivationExtractor",
      "lightning_modules.extractor.ActivationExtractor has no evaluation report: a study module needs build_report()"),
     ("lightning_modules.probes.NoSuchModule", "cannot import the run's model class 'lightning_modules.probes.NoSuch")],
)  # fmt: skip
def test_a_class_without_the_protocol_is_one_user_error_line(tmp_path, monkeypatch, capsys, class_path, message):
    monkeypatch.chdir(tmp_path)
    ckpt = _fake_checkpoint(tmp_path, class_path)
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: evaluate.main(["--ckpt", str(ckpt), "--output_dir", str(tmp_path / "out")]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()  # failed before any work


@pytest.mark.parametrize("class_path", ["lightning_modules.probes.LayerProbeModule",
                                        "lightning_modules.tuned_lens.TunedLensModule"])  # fmt: skip
def test_test_split_only_reports_refuse_other_splits(class_path):
    module = study_module_class(class_path)()
    with pytest.raises(UserError, match="test split"):
        module.build_report(None, None, "val", EvaluateOptions(), "x.ckpt")
