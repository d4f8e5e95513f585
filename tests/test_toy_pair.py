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


def test_selected_direction_ablation_costs_answers_far_beyond_its_null(tmp_path, monkeypatch):
    """configs/directions_toy.yaml as shipped (tmp cache) through train.py, then evaluate.py: greedy answers to 32
    test problems, the selected direction and 4 of the run's placebo null directions each ablated and added.

    Known answer: ablating the selected direction costs answers (measured: 1.0 -> 0.03 on these 32 problems, placebo
    nulls 0.66-0.94), far beyond ablating a null direction, with a per-prompt CI that excludes the null.
    Adding it does NOT make control prompts solve on this toy (README "The toy pair"): recorded, not asserted."""
    import evaluate
    import train

    monkeypatch.chdir(tmp_path)
    config = str(REPO / "configs" / "directions_toy.yaml")
    train.main(["--config", config, "--run_name", "dir", "--data.init_args.cache_dir", str(tmp_path / "cache")])
    selection = json.loads((tmp_path / "logs" / "dir" / "reasoning_directions.json").read_text())["selection"]
    report_set = selection["report"]  # the selected direction and its nulls re-scored on problems it was not chosen on
    assert report_set["ci"]["ablation_score"][0] > max(null["ablation_score"] for null in report_set["null"])
    evaluate.main(["--ckpt", str(tmp_path / "checkpoints" / "dir" / "best.ckpt"), "--greedy", "--max_new_tokens", "96",
                   "--n_prompts", "32", "--n_random", "4", "--strengths", "1"])  # fmt: skip
    results = json.loads((tmp_path / "logs" / "dir" / "intervention_results.json").read_text())
    baseline = results["conditions"][0]
    ablated, added = results["vs_null"]["ablated"], results["vs_null"]["added"]
    print(f"accuracy {baseline['accuracy']:.3f} -> ablated {ablated['value']:.3f}, nulls {ablated['null_values']}, "
          f"difference {ablated['difference']:+.3f} {ablated['ci']}; control solved {baseline['control_accuracy']:.3f}"
          f" -> added {added['value']:.3f}, nulls {added['null_values']}")  # fmt: skip
    assert baseline["accuracy"] >= 0.9
    assert ablated["ci"][1] < 0 and ablated["value"] <= baseline["accuracy"] - 0.2
    assert ablated["value"] < min(ablated["null_values"])


def test_the_pair_represents_prompts_alike_far_above_the_permutation_band():
    """Linear CKA of the two models' last-prompt-token residuals, layer by layer, on the same 200 held-out problems'
    reasoning and control prompts (rows matched by problem and kind; each model with its own chat template).
    Measured: diagonal 0.83-0.92, permutation p95 <= 0.016 (reasoning prompts only: see the print)."""
    from interp.activations import collect_activations
    from interp.similarity import cka_permutation_null

    acts, keys = [], []
    for name in ("toy-qwq", "toy-r1-distill"):
        model, tokenizer = load_backbone(name)
        rows = build_prompt_rows(load_problems(DatasetSource("toy_arithmetic", split="test", limit=N_HELD_OUT)),
                                 tokenizer, control="restate", val_fraction=0.0, test_fraction=0.0)  # fmt: skip
        acts.append(collect_activations(model, tokenizer, [r.prompt for r in rows], positions="last", batch_size=50))
        keys.append([(r.problem_id, r.kind) for r in rows])
    assert keys[0] == keys[1]
    band = cka_permutation_null(acts[0], acts[1], n_permutations=99)
    reasoning = torch.tensor([kind == "reasoning" for _, kind in keys[0]])
    within = cka_permutation_null(acts[0][reasoning], acts[1][reasoning], n_permutations=99)
    print({k: [round(v, 3) for v in band[k].tolist()] for k in ("diagonal", "null_p95")},
          {k: [round(v, 3) for v in within[k].tolist()] for k in ("diagonal", "null_p95")})
    assert bool((band["diagonal"] > band["null_p95"] + 0.3).all()) and bool((band["p_value"] == 0.01).all())
    assert bool((within["diagonal"] > within["null_p95"]).all())


def test_adding_the_reasoning_direction_makes_control_prompts_open_a_reasoning_trace():
    """Addition's known answer, on toy-qwq. Direction per layer: mean(reasoning) - mean(control) at the last prompt
    token (the "\\n" after `<think>`) over 100 problems' train rows; added at that layer (blocks.{l}.resid_post,
    every position, strength 1) on the control (restate) prompts of 100 OTHER problems. Null: 8 placebo directions
    per layer (balanced sign flips of the same paired differences), rescaled to the direction's norm.

    Known answer: the model's first token switches from `</think>` (skip reasoning, do the control task) to an
    opened reasoning trace, on every control prompt (measured: 1.00 at each layer; placebos 0-0.39). It does not
    make the model solve: what follows restates the problem (README). The selection's induction_score (first-8-token
    NLL of the gold solution, baseline - added) does not separate it from these placebos (measured 1.6-2.3 nats vs
    -0.5-2.7): at this norm any added vector moves that NLL."""
    from interp.activations import collect_activations
    from interp.interventions import AddDirection
    from interp.metrics import next_token_logits
    from interp.null_directions import balanced_signs, paired_differences, signflip_directions
    from interp.selection import bootstrap_ci

    model, tokenizer = load_backbone("toy-qwq")
    problems = load_problems(DatasetSource("toy_arithmetic", split="test", limit=N_HELD_OUT))
    rows = build_prompt_rows(problems, tokenizer, control="restate", val_fraction=0.0, test_fraction=0.5)
    train = [r for r in rows if r.split == "train"]
    control_prompts = [r.prompt for r in rows if r.split == "test" and r.kind == "control"]
    acts = collect_activations(model, tokenizer, [r.prompt for r in train], positions="last", batch_size=50)
    labels = torch.tensor([r.kind == "reasoning" for r in train]).long()
    pair = torch.tensor([r.pair_index for r in train])
    close = tokenizer.convert_tokens_to_ids("</think>")
    assert bool((next_token_logits(model, tokenizer, control_prompts, 50).argmax(-1) == close).all())

    def opened(direction: torch.Tensor, layer: int) -> torch.Tensor:  # [n_control] 1.0 where not `</think>`
        with AddDirection(model, direction, layers=[layer]):
            return (next_token_logits(model, tokenizer, control_prompts, 50).argmax(-1) != close).double()

    for layer in range(acts.shape[1]):
        diffs = paired_differences(acts[:, layer], labels, pair)  # [100, d]
        direction = diffs.mean(0).float()
        nulls = signflip_directions(diffs, balanced_signs(len(diffs), 8, generator=layer)).float()
        nulls = nulls / nulls.norm(dim=-1, keepdim=True) * direction.norm()
        rate = opened(direction, layer)
        null_rates = [float(opened(null, layer).mean()) for null in nulls]
        low, _ = bootstrap_ci(rate, 1000, seed=0)
        print(f"layer {layer}: opened {float(rate.mean()):.2f} (CI low {low:.2f}), placebos {null_rates}")
        assert float(rate.mean()) >= 0.9 and low > max(null_rates) + 0.3
