"""Bad input: one clear line on stderr, exit status 2, nothing loaded or written."""

import importlib.util
import json
import subprocess
import sys

import huggingface_hub
import pytest
import yaml
from pipeline_utils import REPO, tiny_config

import train
from cli import ProjectCLI, _nested_nulls_as_json, run_main


def _run_in_process(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: train.main(args))
    err = capsys.readouterr().err.strip().splitlines()
    return exit_info.value.code, err


def _nothing_written(tmp_path):
    return not any((tmp_path / d).exists() for d in ("checkpoints", "logs", "cache"))


def test_missing_config_from_the_real_command_line(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", "nope.yaml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "nope.yaml" in lines[0], result.stderr
    assert "Traceback" not in result.stderr and _nothing_written(tmp_path)


def test_a_malformed_config_from_the_real_command_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(bad)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: --config {bad} is not valid YAML: while parsing a flow sequence"], result.stderr
    assert _nothing_written(tmp_path)


def _edit(tmp_path, edit):
    path = tiny_config("quickstart.yaml", tmp_path)
    config = yaml.safe_load(path.read_text())
    edit(config)
    path.write_text(yaml.safe_dump(config))
    return path


def _data(config):
    return config["data"]["init_args"]


def _prompt_sources(config):
    return _data(config)["prompts"]["init_args"]["sources"]


CASES = {
    "malformed yaml": (lambda p, c: p.write_text("data: [unclosed\n"), "config"),
    "unknown key": (lambda p, c: c["model"]["init_args"].update(bogus_key=1), "bogus_key"),
    "layer out of range": (lambda p, c: _data(c).update(layers=[0, 99]), "out of range"),
    "nonexistent model": (lambda p, c: _data(c)["backbone"].update(name_or_path="./no/such/model"), "does not exist"),
    "unknown label": (lambda p, c: _data(c).update(label="colour"), "colour"),
    "missing data file": (lambda p, c: _prompt_sources(c)[0].update(path=str(p.parent / "nope.jsonl")), "nope.jsonl"),
    "built-in name typo": (lambda p, c: _data(c)["backbone"].update(name_or_path="tiny-qwen"), "did you mean 'tiny-qwq'"),
    "hub id not cached offline": (lambda p, c: _data(c)["backbone"].update(name_or_path="nobody/no-such-model"),
                                  "not in the local Hugging Face cache"),
    "probe batch size 0": (lambda p, c: _data(c).update(batch_size=0), "data.batch_size"),
    "negative max_epochs": (lambda p, c: c["trainer"].update(max_epochs=-5), "trainer.max_epochs -5"),
    "more GPUs than visible": (lambda p, c: c["trainer"].update(accelerator="gpu", devices=999), "GPU(s) visible"),
    "max_memory without device_map": (lambda p, c: _data(c)["backbone"].update(max_memory={"cpu": "1GiB"}),
                                      "needs backbone.device_map"),
    "max_memory below the weights": (lambda p, c: _data(c)["backbone"].update(device_map="auto",
                                                                               max_memory={"cpu": "1MiB"}),
                                     "less than the weights of tiny"),
    "max_memory unparsable": (lambda p, c: _data(c)["backbone"].update(device_map="auto", max_memory={"cpu": "1XB"}),
                              "backbone.max_memory"),
    "batch_position out of range": (lambda p, c: _data(c).update(batch_position=3), "data.batch_position 3"),
    "label level without MATH": (lambda p, c: (_prompt_sources(c).pop(), _data(c).update(label="level")),
                                 "needs MATH problems"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_values(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read by the hub at import time
    edit, expected = CASES[case]
    path = tiny_config("quickstart.yaml", tmp_path)
    config = yaml.safe_load(path.read_text())
    edit(path, config)
    if case != "malformed yaml":
        path.write_text(yaml.safe_dump(config))
    code, err = _run_in_process(["--config", str(path)], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error:"), err
    assert expected in err[0], err
    assert _nothing_written(tmp_path)


@pytest.mark.parametrize("content, expected", [("", "empty"), ('{"question": "q", "answer": "#### 1"}\nnot json\n', ":2:")])
def test_bad_data_files(content, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    path = tiny_config("quickstart.yaml", tmp_path)
    config = yaml.safe_load(path.read_text())
    _prompt_sources(config)[0].update(path=str(bad))
    path.write_text(yaml.safe_dump(config))
    code, err = _run_in_process(["--config", str(path)], capsys)
    assert code == 2 and len(err) == 1 and "bad.jsonl" in err[0] and expected in err[0], err
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "logs").exists()


@pytest.mark.parametrize("run_name", ["../escape", "/tmp/abs", "a/../../b", ".hidden", "a//b"])
def test_run_names_cannot_escape_the_output_roots(run_name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = tiny_config("quickstart.yaml", tmp_path)
    code, err = _run_in_process(["--config", str(path), "--run_name", run_name], capsys)
    assert code == 2 and len(err) == 1 and "--run_name" in err[0], err
    assert _nothing_written(tmp_path) and not (tmp_path.parent / "escape").exists()


def test_quantization_without_bitsandbytes(tmp_path, monkeypatch, capsys):
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here: the missing-extra message cannot be shown")
    monkeypatch.chdir(tmp_path)
    path = _edit(tmp_path, lambda c: _data(c)["backbone"].update(quantization="4bit"))
    code, err = _run_in_process(["--config", str(path)], capsys)
    assert code == 2 and len(err) == 1 and "needs bitsandbytes" in err[0] and "[quantization]" in err[0], err
    assert _nothing_written(tmp_path)


def test_prompt_longer_than_the_context(tmp_path, monkeypatch, capsys):
    """max_prompt_tokens null lets every prompt through: one over the model's 4,096 positions stops the run before
    anything is extracted or written."""
    monkeypatch.chdir(tmp_path)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"question": "How many? " + "one two three four " * 1100, "answer": "#### 1"}) + "\n")

    def edit(config):
        _prompt_sources(config)[:] = [{"name": "gsm8k", "path": str(long), "split": "test"}]
        _data(config)["prompts"]["init_args"]["max_prompt_tokens"] = None

    code, err = _run_in_process(["--config", str(_edit(tmp_path, edit))], capsys)
    assert code == 2 and len(err) == 1 and "more than the context of tiny (4096 tokens)" in err[0], err
    assert not (tmp_path / "checkpoints").exists() and not list((tmp_path / "cache").rglob("*.safetensors"))


def test_null_of_a_nested_option_on_the_command_line():
    """`--data.init_args.prompts.init_args.max_prompt_tokens null` (valid in YAML) is passed as its parent's JSON,
    which jsonargparse accepts; other options are left alone."""
    args = ["--config", "c.yaml", "--data.init_args.prompts.init_args.max_prompt_tokens", "null",
            "--data.init_args.layers", "null", "--data.init_args.prompts.init_args.seed=None"]  # fmt: skip
    assert _nested_nulls_as_json(args) == [
        "--config", "c.yaml", "--data.init_args.prompts", '{"init_args": {"max_prompt_tokens": null}}',
        "--data.init_args.layers", "null", "--data.init_args.prompts", '{"init_args": {"seed": null}}',
    ]  # fmt: skip


def test_nested_null_reaches_the_datamodule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tiny_config("quickstart.yaml", tmp_path)
    cli = ProjectCLI(args=["--config", str(path), "--data.init_args.prompts.init_args.max_prompt_tokens", "null"])
    assert cli.datamodule.prompts.max_prompt_tokens is None
    assert len(cli.datamodule.prompts.sources) == 2  # the rest of the prompts config is kept
