"""Prompt data: GSM8K/MATH loading through `datasets`, reasoning/control pairs, splits, labels, batches, cache key.

Every value is checked against an independent computation: the raw JSON text, the tokenizer itself,
`format_chat_prompt`, closed-form split sizes, or a literal pinned by hand.
"""

import json
import os
import subprocess
import sys
from collections import Counter
from functools import cache
from pathlib import Path

import datasets
import pytest
import torch

import datamodules.prompts as prompts_module
from datamodules.problems import (
    EMBEDDED_FILES,
    DatasetSource,
    Problem,
    load_problems,
    load_sources,
)
from datamodules.prompt_rows import (
    CONTROL_TEMPLATES,
    LABELS,
    REASONING_TEMPLATE,
    build_prompt_rows,
    encode_labels,
    label_names,
    split_counts,
)
from datamodules.prompts import ReasoningPromptsDataModule
from interp.backbone import load_tokenizer
from interp.errors import UserError
from interp.prompts import format_chat_prompt, post_instruction_ids

REPO = Path(__file__).resolve().parents[1]
SHARED = Path("/work/shared/data")
R1_BOS = 151646


def _raw(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@cache
def _tokenizer(name: str, revision: str | None = None, trust_remote_code: bool = False):
    return load_tokenizer(name, revision, trust_remote_code)


@pytest.fixture(autouse=True)
def _shared_tokenizers(monkeypatch):
    """DataModules get the (read-only) tokenizers loaded once per session: loading takes ~2 s each."""
    monkeypatch.setattr(prompts_module, "load_tokenizer", _tokenizer)


@pytest.fixture(scope="module")
def few_problems() -> list[Problem]:
    """8 GSM8K + 12 MATH problems (MATH-500 has every subject and level)."""
    return load_sources([DatasetSource("gsm8k", limit=8), DatasetSource("math", limit=12)], seed=0)


def _small_dm(**kwargs) -> ReasoningPromptsDataModule:
    kwargs.setdefault("sources", [DatasetSource("gsm8k", limit=6), DatasetSource("math", limit=6)])
    dm = ReasoningPromptsDataModule(**kwargs)
    dm.setup()
    return dm


# ------------------------------------------------------------------------------------------- problems


def test_embedded_gsm8k_loads_through_datasets(monkeypatch):
    calls = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    problems = load_problems(DatasetSource("gsm8k"))
    assert calls == [(("json",), {"data_files": str(EMBEDDED_FILES["gsm8k"]), "split": "train"})]
    raw = _raw(EMBEDDED_FILES["gsm8k"])
    assert len(problems) == len(raw) == 1319
    for i, (p, r) in enumerate(zip(problems, raw)):
        assert p.problem_id == f"gsm8k/test/{i}" and p.dataset == "gsm8k" and p.question == r["question"]
        assert p.gold_answer == r["answer"].split("####")[-1].strip().replace(",", "")
        assert "####" not in p.gold_solution and "<<" not in p.gold_solution and ">>" not in p.gold_solution
        assert p.subject is None and p.level is None
    assert problems[146].gold_answer == "2125"  # "#### 2,125" in the file
    assert problems[0].gold_solution == (
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = $18 every day at the farmer\u2019s market."
    )
    assert len({p.problem_id for p in problems}) == len(problems)


def test_embedded_math500_loads_through_datasets():
    problems = load_problems(DatasetSource("math"))
    raw = _raw(EMBEDDED_FILES["math"])
    assert len(problems) == len(raw) == 500
    for p, r in zip(problems, raw):
        assert (p.problem_id, p.question, p.gold_answer, p.gold_solution) == (
            r["unique_id"], r["problem"], r["answer"], r["solution"])  # fmt: skip
        assert (p.dataset, p.subject, p.level) == ("math", r["subject"], r["level"])
    assert Counter(p.level for p in problems) == Counter(r["level"] for r in raw)
    assert len({p.subject for p in problems}) == 7


def test_full_math_format_levels_types_and_boxed_answers(tmp_path):
    """Full MATH rows ("Level 3", `type`); with `answer` removed the gold answer comes from the last \\boxed{}."""
    lines = (SHARED / "math" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    picked = [json.loads(line) for line in lines[1::40]] + [json.loads(line) for line in lines if "Level ?" in line]
    stripped = [{k: v for k, v in r.items() if k != "answer"} for r in picked]
    path = _write_jsonl(tmp_path / "math_train.jsonl", stripped)
    problems = load_problems(DatasetSource("math", path=str(path), split="train"))
    assert len(problems) == len(picked) == 188 + 2
    for p, r in zip(problems, picked):
        assert p.gold_answer == r["answer"].strip()  # the dataset's own derived answers (some have spaces)
        assert p.subject == r["type"] and p.problem_id == r["unique_id"]
        assert p.level == (None if r["level"] == "Level ?" else int(r["level"][-1]))
    assert [p.level for p in problems[-2:]] == [None, None]
    assert {p.subject for p in problems} == {r["type"] for r in picked} and len({p.subject for p in problems}) == 7


def test_limit_samples_seeded_in_file_order():
    full = load_problems(DatasetSource("gsm8k"))
    a = load_problems(DatasetSource("gsm8k", limit=10), seed=3)
    assert a == load_problems(DatasetSource("gsm8k", limit=10), seed=3)
    assert a != load_problems(DatasetSource("gsm8k", limit=10), seed=4)
    index = [int(p.problem_id.split("/")[-1]) for p in a]
    assert index == sorted(index) and len(set(index)) == 10
    assert a == [full[i] for i in index]  # ids name the row in the full file
    assert len(load_problems(DatasetSource("gsm8k", limit=5000))) == 1319


def test_repeated_problem_ids_are_refused():
    with pytest.raises(UserError, match="appears twice"):
        load_sources([DatasetSource("math", limit=5), DatasetSource("math", limit=5)])


def test_hub_path_goes_through_load_dataset_and_checks_fields(monkeypatch):
    calls = []
    rows = [{"question": "What is 1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"}]

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    (p,) = load_problems(DatasetSource("gsm8k", path="openai/gsm8k", subset="main", split="train"))
    assert calls == [(("openai/gsm8k", "main"), {"split": "train"})]
    assert (p.problem_id, p.gold_answer, p.gold_solution) == ("gsm8k/train/0", "2", "1+1=2")
    rows[:] = [{"question": "q", "text": "a"}]
    with pytest.raises(UserError, match="no field 'answer'"):
        load_problems(DatasetSource("gsm8k", path="openai/gsm8k", subset="main"))
    rows[:] = [{"problem": "p", "solution": r"\boxed{1}"}, {"problem": None, "solution": "s"}]
    with pytest.raises(UserError, match=r"row 1: field 'problem' is missing"):
        load_problems(DatasetSource("math", path="someone/math"))


def test_hub_unreachable_is_a_user_error():
    with pytest.raises(UserError, match="cannot load dataset 'openai/gsm8k'"):
        load_problems(DatasetSource("gsm8k", path="openai/gsm8k", subset="main"))  # HF_DATASETS_OFFLINE=1


# ------------------------------------------------------------------------------------- malformed files


def _message(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(UserError) as excinfo:
        load_problems(DatasetSource("gsm8k", path=str(path)))
    assert _message(excinfo).startswith(f"{path}:1: ") and "empty" in _message(excinfo)


def test_bad_json_line_names_file_and_line(tmp_path):
    good = {"question": "q", "answer": "r\n#### 1"}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n{not json\n")
    with pytest.raises(UserError) as excinfo:
        load_problems(DatasetSource("gsm8k", path=str(path)))
    assert _message(excinfo).startswith(f"{path}:4: not valid JSON")


@pytest.mark.parametrize(
    "name, row, expected",
    [
        ("gsm8k", {"question": "q"}, "field 'answer' is missing"),
        ("gsm8k", {"question": "q", "answer": "no final line"}, "no '#### <final answer>' line"),
        ("gsm8k", {"question": "", "answer": "#### 3"}, "field 'question' is empty"),
        ("gsm8k", ["q", "a"], "expected a JSON object, got list"),
        ("math", {"problem": "p", "answer": "1"}, "field 'solution' is missing"),
        ("math", {"problem": "p", "solution": "no box"}, "no field 'answer' and no \\boxed{}"),
        ("math", {"problem": "p", "solution": "s", "answer": "1", "level": "Level 9"}, "level 'Level 9'"),
    ],
)
def test_bad_row_names_file_line_and_field(tmp_path, name, row, expected):
    good = {"question": "q", "answer": "r\n#### 1"} if name == "gsm8k" else {"problem": "p", "solution": r"\boxed{1}"}
    path = _write_jsonl(tmp_path / "rows.jsonl", [good, good, row])
    with pytest.raises(UserError) as excinfo:
        load_problems(DatasetSource(name, path=str(path)))
    message = _message(excinfo)
    assert message.startswith(f"{path}:3: ") and expected in message


def test_json_array_file(tmp_path):
    rows = [{"question": "a", "answer": "#### 1"}, {"question": "b", "answer": "#### 2"}]
    path = tmp_path / "rows.json"
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    assert [p.gold_answer for p in load_problems(DatasetSource("gsm8k", path=str(path)))] == ["1", "2"]
    path.write_text("[\n" + json.dumps(rows[0]) + ",\n" + json.dumps({"question": "b"}) + "\n]")
    with pytest.raises(UserError, match=rf"^{path}:3: field 'answer' is missing"):
        load_problems(DatasetSource("gsm8k", path=str(path)))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"name": "svamp"}, "source.name"),
        ({"name": "gsm8k", "limit": 0}, "source.limit"),
        ({"name": "gsm8k", "split": "train"}, "source.split"),
        ({"name": "gsm8k", "path": "/nonexistent/gsm8k.jsonl"}, "source.path"),
        ({"name": "gsm8k", "path": "data/missing.jsonl"}, "source.path"),
    ],
)
def test_bad_source_fields(kwargs, field):
    with pytest.raises(UserError, match=field):
        DatasetSource(**kwargs)


def test_local_file_with_other_suffix_is_refused(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("question,answer\n")
    with pytest.raises(UserError, match=r"\.jsonl or \.json"):
        DatasetSource("gsm8k", path=str(path))


# ------------------------------------------------------------------------------------------ prompt rows


@pytest.mark.parametrize("backbone", ["tiny", "tiny-r1-distill"])
@pytest.mark.parametrize("control", sorted(CONTROL_TEMPLATES))
def test_pairs_share_post_instruction_tokens(few_problems, backbone, control):
    tokenizer = _tokenizer(backbone)
    rows = build_prompt_rows(few_problems, tokenizer, control=control)
    assert len(rows) == 2 * len(few_problems)
    assert [r.row_index for r in rows] == list(range(len(rows)))
    post = post_instruction_ids(tokenizer)
    expected_post = {"tiny": "<|im_end|>\n<|im_start|>assistant\n<think>\n",
                     "tiny-r1-distill": "<｜Assistant｜><think>\n"}[backbone]  # fmt: skip
    assert tokenizer.decode(post) == expected_post
    for i, problem in enumerate(few_problems):
        reasoning, control_row = rows[2 * i], rows[2 * i + 1]
        assert (reasoning.kind, control_row.kind) == ("reasoning", "control")
        assert reasoning.problem_index == reasoning.pair_index == control_row.pair_index == i
        assert reasoning.split == control_row.split and reasoning.problem_id == problem.problem_id
        assert reasoning.prompt == format_chat_prompt(tokenizer, REASONING_TEMPLATE.replace("{question}", problem.question))
        assert control_row.prompt == format_chat_prompt(
            tokenizer, CONTROL_TEMPLATES[control].replace("{question}", problem.question))  # fmt: skip
        assert (control_row.gold_answer, control_row.level) == (problem.gold_answer, problem.level)
        ids = [tokenizer(r.prompt, add_special_tokens=False)["input_ids"] for r in (reasoning, control_row)]
        assert ids[0][-len(post) :] == ids[1][-len(post) :] == post
        for token_ids in ids:
            if backbone == "tiny-r1-distill":  # exactly one BOS, first
                assert token_ids[0] == R1_BOS and token_ids.count(R1_BOS) == 1
            else:
                assert token_ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>") and R1_BOS not in token_ids


def test_reasoning_template_keeps_braces_literally(few_problems):
    assert REASONING_TEMPLATE.endswith(r"put your final answer within \boxed{}.")
    rows = build_prompt_rows(few_problems[:1], _tokenizer("tiny"), control_template="Q: {question} {x}")
    assert f"Q: {few_problems[0].question} {{x}}<|im_end|>" in rows[1].prompt


def test_double_bos_is_refused(few_problems):
    with pytest.raises(UserError, match="BOS"):
        build_prompt_rows(few_problems[:2], _tokenizer("tiny-r1-distill"),
                          reasoning_template="<｜begin▁of▁sentence｜>{question}")  # fmt: skip


@pytest.mark.parametrize(
    "n, val, test, expected",
    [(3, 0.2, 0.2, (1, 1, 1)), (10, 0.2, 0.2, (6, 2, 2)), (40, 0.2, 0.25, (22, 8, 10)), (4, 0.45, 0.45, (1, 1, 2)),
     (20, 0.0, 0.3, (14, 0, 6)), (2, 0.2, 0.2, (2, 0, 0)), (1, 0.4, 0.4, (1, 0, 0))],
)  # fmt: skip
def test_split_counts(n, val, test, expected):
    counts = split_counts(n, val, test)
    assert (counts["train"], counts["val"], counts["test"]) == expected


def test_splits_are_by_problem_seeded_and_stratified():
    problems = load_sources([DatasetSource("gsm8k", limit=20), DatasetSource("math", limit=20)], seed=0)
    rows = build_prompt_rows(problems, _tokenizer("tiny"), val_fraction=0.2, test_fraction=0.25, seed=5)
    by_split = {s: {r.problem_id for r in rows if r.split == s} for s in ("train", "val", "test")}
    assert {s: len(v) for s, v in by_split.items()} == {"train": 22, "val": 8, "test": 10}
    assert not (by_split["train"] & by_split["val"] or by_split["train"] & by_split["test"]
                or by_split["val"] & by_split["test"])  # fmt: skip
    for s in by_split:  # every split holds both datasets in proportion
        counts = Counter(r.dataset for r in rows if r.split == s and r.kind == "reasoning")
        assert abs(counts["gsm8k"] - counts["math"]) <= 1, (s, counts)
    again = build_prompt_rows(problems, _tokenizer("tiny"), val_fraction=0.2, test_fraction=0.25, seed=5)
    assert again == rows
    other = build_prompt_rows(problems, _tokenizer("tiny"), val_fraction=0.2, test_fraction=0.25, seed=6)
    assert [r.split for r in other] != [r.split for r in rows]
    assert [r.prompt for r in other] == [r.prompt for r in rows]


def test_three_problems_fill_every_split(few_problems):
    rows = build_prompt_rows(few_problems[:3], _tokenizer("tiny"))
    assert sorted(r.split for r in rows) == ["test", "test", "train", "train", "val", "val"]


def test_max_prompt_tokens_drops_whole_problems(few_problems):
    tokenizer = _tokenizer("tiny-r1-distill")
    full = build_prompt_rows(few_problems, tokenizer)
    length = {}
    for r in full:
        n = len(tokenizer(r.prompt, add_special_tokens=False)["input_ids"])
        length[r.problem_index] = max(length.get(r.problem_index, 0), n)
    limit = sorted(length.values())[len(length) // 2]
    dropped = sum(n > limit for n in length.values())
    with pytest.warns(UserWarning, match=f"dropped {dropped} of {len(few_problems)} problems .* longest has "
                      f"{max(length.values())}"):  # fmt: skip
        rows = build_prompt_rows(few_problems, tokenizer, max_prompt_tokens=limit)
    kept = sorted({r.problem_index for r in rows})
    assert kept == [i for i in range(len(few_problems)) if length[i] <= limit] and 0 < len(kept) < len(few_problems)
    assert [r.row_index for r in rows] == list(range(len(rows))) and len(rows) == 2 * len(kept)
    full_prompts = {(r.problem_index, r.kind): r.prompt for r in full}
    assert all(r.prompt == full_prompts[(r.problem_index, r.kind)] for r in rows)  # never truncated
    with pytest.raises(UserError, match="no problem fits max_prompt_tokens=5"):
        build_prompt_rows(few_problems, tokenizer, max_prompt_tokens=5)


def test_label_encodings(few_problems):
    rows = build_prompt_rows(few_problems, _tokenizer("tiny"))
    names = label_names(rows)
    labels = encode_labels(rows, names)
    assert tuple(labels) == LABELS == ("reasoning", "dataset", "subject", "level", "problem")
    assert names["reasoning"] == ["control", "reasoning"] and names["dataset"] == ["gsm8k", "math", "toy_arithmetic"]
    assert names["subject"] == sorted({p.subject for p in few_problems if p.dataset == "math"})
    assert names["level"] == ["Level 1", "Level 2", "Level 3", "Level 4", "Level 5"]
    for i, r in enumerate(rows):
        assert labels["reasoning"][i] == (1 if r.kind == "reasoning" else 0)
        assert labels["dataset"][i] == (0 if r.dataset == "gsm8k" else 1)
        assert labels["problem"][i] == r.problem_index
        if r.dataset == "gsm8k":
            assert labels["subject"][i] == -1 and labels["level"][i] == -1
        else:
            assert names["subject"][labels["subject"][i]] == r.subject
            assert names["level"][labels["level"][i]] == f"Level {r.level}"
    assert all(v.dtype == torch.long and v.shape == (len(rows),) for v in labels.values())


# ------------------------------------------------------------------------------------------- datamodule


@pytest.mark.parametrize("backbone", ["tiny", "tiny-r1-distill"])
def test_predict_batches_are_left_padded_and_labelled(backbone):
    dm = _small_dm(backbone=backbone, batch_size=5)
    tokenizer = dm.tokenizer
    labels = encode_labels(dm.rows, label_names(dm.rows))
    seen = []
    for batch in dm.predict_dataloader():
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape and ids.shape[0] <= 5
        assert bool(mask[:, -1].all())  # left padded: the last column is real tokens
        for b, row_index in enumerate(batch["row_index"].tolist()):
            row = dm.rows[row_index]
            expected = tokenizer(row.prompt, add_special_tokens=False)["input_ids"]
            n = int(mask[b].sum())
            assert ids[b, -n:].tolist() == expected and n == len(expected)
            assert ids[b, :-n].eq(tokenizer.pad_token_id).all() and mask[b, :-n].eq(0).all()
            assert batch["split"][b] == ("train", "val", "test").index(row.split)
            for name in LABELS:
                assert batch["labels"][name][b] == labels[name][row_index]
            if backbone == "tiny-r1-distill":
                assert expected[0] == R1_BOS and expected.count(R1_BOS) == 1
        seen += batch["row_index"].tolist()
    assert sorted(seen) == list(range(len(dm.rows))) == list(range(24))


def test_exclude_rows_and_idempotent_setup():
    dm = _small_dm(batch_size=4)
    rows = dm.rows
    dm.setup("predict")
    assert dm.rows is rows
    dm.exclude_rows = {0, 5, 6, 23}
    seen = [i for batch in dm.predict_dataloader() for i in batch["row_index"].tolist()]
    assert sorted(seen) == [i for i in range(24) if i not in {0, 5, 6, 23}]
    lengths = [dm.prompt_lengths[i] for i in seen]  # longest first, so batches hold similar lengths
    assert lengths == sorted(lengths, reverse=True)
    assert dm.prompt_lengths == [len(dm.tokenizer(r.prompt, add_special_tokens=False)["input_ids"]) for r in rows]


def test_default_sources_and_label_names():
    dm = ReasoningPromptsDataModule()
    assert [(s.name, s.path, s.split, s.limit) for s in dm.sources] == [
        ("gsm8k", "embedded", "test", 64), ("math", "embedded", "test", 64)]  # fmt: skip
    dm.setup()
    assert len(dm.problems) == 128 and len(dm.rows) == 256  # every default prompt fits in 1024 tokens
    assert dm.label_names == label_names(dm.rows)
    assert Counter(r.split for r in dm.rows) == {"train": 152, "val": 52, "test": 52}


def test_data_spec_is_stable_and_tracks_its_inputs(tmp_path, monkeypatch):
    base = dict(sources=[DatasetSource("gsm8k", limit=4), DatasetSource("math", limit=4)])
    spec = _small_dm(**base).data_spec()
    assert json.loads(json.dumps(spec)) == spec
    dm = _small_dm(**base)
    list(dm.predict_dataloader())  # a padded tokenizer call must not change the tokenizer's identity
    dm._spec = None
    assert dm.data_spec() == spec
    # the tokenizer's identity is pinned above; memoise it below (0.5 s a call) to keep this test fast
    monkeypatch.setattr(prompts_module, "tokenizer_identity", cache(prompts_module.tokenizer_identity))
    changes = [
        dict(seed=1), dict(control="copy"), dict(control_template="Say: {question}"),
        dict(reasoning_template="Solve: {question}"), dict(val_fraction=0.3), dict(test_fraction=0.1),
        dict(max_prompt_tokens=512), dict(backbone="tiny-r1-distill"),
        dict(sources=[DatasetSource("gsm8k", limit=5), DatasetSource("math", limit=4)]),
    ]
    for change in changes:
        assert _small_dm(**{**base, **change}).data_spec() != spec, change
    # a local file: its content is part of the key, even at the same path
    rows = [{"question": "What is 1+1?", "answer": "#### 2"}, {"question": "What is 2+2?", "answer": "#### 4"},
            {"question": "What is 3+3?", "answer": "#### 6"}]  # fmt: skip
    path = _write_jsonl(tmp_path / "g.jsonl", rows)
    first = _small_dm(sources=[DatasetSource("gsm8k", path=str(path))]).data_spec()
    _write_jsonl(path, rows[:2] + [{"question": "What is 3+3?", "answer": "#### 7"}])
    assert _small_dm(sources=[DatasetSource("gsm8k", path=str(path))]).data_spec() != first


def test_data_spec_is_identical_in_another_process():
    config = "[DatasetSource('gsm8k', limit=4), DatasetSource('math', limit=4)]"
    code = (
        "import json\n"
        "from datamodules.problems import DatasetSource\n"
        "from datamodules.prompts import ReasoningPromptsDataModule\n"
        f"dm = ReasoningPromptsDataModule(backbone='tiny-r1-distill', sources={config})\n"
        "print(json.dumps(dm.data_spec()))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    here = _small_dm(backbone="tiny-r1-distill", sources=eval(config)).data_spec()
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(control="summarise"), "unknown control 'summarise'"),
        (dict(val_fraction=1.0), "val_fraction must be in"),
        (dict(test_fraction=-0.1), "test_fraction must be in"),
        (dict(val_fraction=0.5, test_fraction=0.5), r"val_fraction \+ test_fraction must be < 1"),
        (dict(reasoning_template="Solve it step by step."), "reasoning_template must contain"),
        (dict(control_template="Restate: {problem}"), "control_template must contain"),
        (dict(max_prompt_tokens=0), "max_prompt_tokens"),
        (dict(batch_size=0), "batch_size"),
        (dict(sources=[]), "sources is empty"),
        (dict(sources=[{"name": "gsm8k", "limit": -1}]), "source.limit"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(UserError, match=match) as excinfo:
        ReasoningPromptsDataModule(**kwargs)
    assert "\n" not in str(excinfo.value)


def test_custom_control_name_with_template():
    dm = _small_dm(control="paraphrase", control_template="Paraphrase: {question}")
    control_rows = [r for r in dm.rows if r.kind == "control"]
    assert all(f"Paraphrase: {r.question}" in r.prompt for r in control_rows)


def test_jsonargparse_builds_it_from_a_config():
    from jsonargparse import ArgumentParser, set_parsing_settings

    parser = ArgumentParser()
    parser.add_class_arguments(ReasoningPromptsDataModule, "data")
    config = parser.parse_object({"data": {
        "backbone": "tiny-r1-distill", "control": "topic", "max_prompt_tokens": None,
        "sources": [{"name": "math", "limit": 3}, {"name": "gsm8k", "path": "embedded", "limit": 2}],
    }})  # fmt: skip
    dm = parser.instantiate_classes(config)["data"]
    assert isinstance(dm, ReasoningPromptsDataModule) and dm.control == "topic" and dm.max_prompt_tokens is None
    assert dm.sources == [DatasetSource("math", limit=3), DatasetSource("gsm8k", limit=2)]
    assert "DataLoader worker processes." in parser.format_help()  # docstrings become --help
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # what the entry points turn on
    try:
        source_parser = ArgumentParser()
        source_parser.add_class_arguments(DatasetSource, "source")
        assert "Benchmark format: gsm8k | math | toy_arithmetic" in source_parser.format_help()
    finally:
        set_parsing_settings(docstring_parse_attribute_docstrings=False)


def test_trainer_predict_visits_every_row_once():
    import lightning

    class RowIndex(lightning.LightningModule):
        def predict_step(self, batch, batch_idx):
            assert batch["input_ids"].shape[0] == batch["labels"]["reasoning"].shape[0]
            return batch["row_index"]

    dm = _small_dm(batch_size=7)
    dm.exclude_rows = {3}
    trainer = lightning.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                                enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    out = trainer.predict(RowIndex(), datamodule=dm)
    assert sorted(torch.cat(out).tolist()) == [i for i in range(24) if i != 3]
