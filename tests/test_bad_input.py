"""Bad input: one clear line on stderr, exit status 2, nothing loaded or written."""

import subprocess
import sys

import pytest
import yaml
from pipeline_utils import REPO, tiny_config

import train
from cli import run_main


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
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_values(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
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
