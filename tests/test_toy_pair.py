"""The trained toy pair, evaluated through the project's own pipeline: the toy_arithmetic dataset source, the
prompt builder, `interp.generation.generate` (greedy) and `grade_answer` on held-out problems.

Builds toy-qwq and toy-r1-distill on first use (a few minutes; cached under .cache/backbones)."""

import json
from pathlib import Path

import pytest
import torch

from datamodules.problems import DatasetSource, load_problems
from datamodules.prompt_rows import build_prompt_rows
from interp.backbone import load_backbone
from interp.generation import generate
from interp.grading import grade_answer, has_final_answer
from interp.restricted_vocab import RestrictedVocab, restrict
from lightning_modules.toy_lm import greedy_completions

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
N_HELD_OUT = 200  # problems: accuracy's standard error at 0.9 is 0.02


def _held_out(tokenizer, control: str):
    problems = load_problems(DatasetSource("toy_arithmetic", split="test", limit=N_HELD_OUT))
    rows = build_prompt_rows(problems, tokenizer, control=control, val_fraction=0.0, test_fraction=0.0)
    return [r for r in rows if r.kind == "reasoning"], [r for r in rows if r.kind == "control"]


def _greedy(model, tokenizer, rows):
    return generate(model, tokenizer, [r.prompt for r in rows], max_new_tokens=96, do_sample=False, batch_size=50)


@pytest.fixture(scope="module", params=["toy-qwq", "toy-r1-distill"])
def toy(request):
    torch.manual_seed(0)
    model, tokenizer = load_backbone(request.param)
    reasoning, control = _held_out(tokenizer, control="copy")
    return request.param, model, tokenizer, reasoning, control, _greedy(model, tokenizer, reasoning)


def test_held_out_accuracy(toy):
    name, _, _, reasoning, _, outputs = toy
    graded = [grade_answer(text, row.gold_answer, row.dataset) for text, row in zip(outputs, reasoning)]
    accuracy = sum(graded) / len(graded)
    print(f"{name}: held-out accuracy {accuracy:.3f} on {len(graded)} problems")
    assert accuracy >= {"toy-qwq": 0.9, "toy-r1-distill": 0.8}[name]
    assert all(text.count("</think>") == 1 for text in outputs)


def test_control_prompts_get_the_control_task_not_a_solution(toy):
    """Copy prompts: no final answer ever; an exact copy of the question most often (measured: toy-qwq 0.66,
    toy-r1-distill 0.46 of 200)."""
    _, model, tokenizer, _, control, _ = toy
    outputs = _greedy(model, tokenizer, control)
    solved = sum(has_final_answer(text, "toy_arithmetic") for text in outputs)
    copied = sum(text == f"</think>\n\n{row.question}" for text, row in zip(outputs, control))
    print(f"copied {copied}, solved {solved} of {len(control)}")
    assert solved <= 0.05 * len(control) and copied >= 0.35 * len(control), (solved, copied)


def test_greedy_decoding_never_picks_a_token_outside_the_training_corpus(toy):
    _, model, tokenizer, _, _, outputs = toy
    seen = set(json.loads((Path(model.name_or_path) / "toy_recipe.json").read_text())["corpus_token_ids"])
    for text in outputs:
        assert set(tokenizer(text, add_special_tokens=False)["input_ids"]) <= seen



def test_probes_separate_reasoning_from_control_prompts(tmp_path, monkeypatch):
    """configs/probes_toy.yaml as shipped (but a tmp cache), through train.py and evaluate.py."""
    import evaluate
    import train

    monkeypatch.chdir(tmp_path)
    config = str(REPO / "configs" / "probes_toy.yaml")
    train.main(["--config", config, "--run_name", "toy", "--data.init_args.cache_dir", str(tmp_path / "cache")])
    evaluate.main(["--ckpt", str(tmp_path / "checkpoints" / "toy" / "best.ckpt")])
    report = json.loads((tmp_path / "logs" / "toy" / "probe_accuracies.json").read_text())
    assert report["best_layer"]["accuracy"] >= 0.95, report["best_layer"]


def test_restricted_greedy_decoding_equals_the_saved_models(toy):
    """The student's corpus is generated from the restricted teacher: it must be what the saved model writes."""
    _, model, tokenizer, reasoning, control, outputs = toy
    record = json.loads((Path(model.name_or_path) / "toy_recipe.json").read_text())
    vocab = RestrictedVocab(record["corpus_token_ids"], model.config.vocab_size)
    rows = reasoning[:12] + control[:12]
    restricted = greedy_completions(restrict(model, vocab), vocab, tokenizer, [r.prompt for r in rows], 96)
    assert restricted == outputs[:12] + _greedy(model, tokenizer, control[:12])
