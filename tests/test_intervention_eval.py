"""Intervention evaluation: the answer-graded report, the ablation / patching callbacks, evaluate.py on directions.

Independent references: every number of the report is recomputed with the interp functions called directly
under plain torch forward hooks written in this file (not interp.hooks / InterventionHandler) (generate, grade_answer, gold_solution_nll, last_token_kl on
next_token_logits, bootstrap_ci, ngram_repetition, compression_ratio); planted generations give known
accuracies; the callbacks' numbers are recomputed with LayerAblator / InterventionHandler / patching_sweep /
attribution_patching on the rows they name, and their TensorBoard events are read back.
"""

import dataclasses
import json
import os

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from pipeline_utils import tiny_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

import evaluate
import interp.intervention_eval as eval_module
import train
from callbacks.ablation import AblationCallback
from callbacks.patching import PatchingCallback
from datamodules.problems import DatasetSource
from datamodules.prompts import ReasoningPromptsDataModule, problem_pairs
from interp.ablation import LayerAblator
from interp.directions import random_directions
from interp.errors import UserError
from interp.generation import generate
from interp.grading import extract_answer, grade_answer
from interp.intervention_eval import Condition, build_conditions, intervention_report, vs_null
from interp.interventions import InterventionHandler
from interp.metrics import first_tokens_logprob, gold_solution_nll, last_token_kl, next_token_logits
from interp.patching_stats import target_log_prob
from interp.patching_sweep import attribution_patching, patching_sweep
from interp.selection import bootstrap_ci, zscore
from interp.text_metrics import compression_ratio, ngram_repetition
from lightning_modules.direction_report import write_intervention_report

LAYER = 5
SOLUTION_TOKENS = 12


@pytest.fixture(scope="module")
def prompts_dm():
    """10 embedded problems (5 GSM8K + 5 MATH) on the tiny tokenizer: 2 val and 2 test problems."""
    dm = ReasoningPromptsDataModule(backbone="tiny", sources=[DatasetSource("gsm8k", limit=5),
                                                              DatasetSource("math", limit=5)])  # fmt: skip
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def direction_by_layer():
    return torch.randn(32, 64, generator=torch.Generator().manual_seed(7)) * 3.0  # [n_layers, d_model]


@pytest.fixture(scope="module")
def test_rows(prompts_dm):
    return [row for pair in problem_pairs(prompts_dm, "test") for row in pair]


@pytest.fixture(scope="module")
def greedy_report(tiny, test_rows, direction_by_layer):
    model, tokenizer = tiny
    return intervention_report(model, tokenizer, test_rows, direction_by_layer, LAYER, strengths=(0.0, 2.0),
                               n_random=1, max_new_tokens=6, do_sample=False, n_samples=None, n_bootstrap=200,
                               max_solution_tokens=SOLUTION_TOKENS, batch_size=2)  # fmt: skip


def test_problem_pairs(prompts_dm):
    pairs = problem_pairs(prompts_dm, "test")
    rows = prompts_dm.rows
    expected = sorted({r.pair_index for r in rows if r.split == "test"})
    assert [r.pair_index for r, _ in pairs] == expected and len(expected) == 2
    assert all(r.kind == "reasoning" and c.kind == "control" and r.pair_index == c.pair_index for r, c in pairs)
    assert all(r.split == c.split == "test" for r, c in pairs)
    (one,) = problem_pairs(prompts_dm, "val", n=1, seed=3)
    assert one[0].split == "val"
    with pytest.raises(UserError, match="no nope problems"):
        problem_pairs(prompts_dm, "nope")
    # leaving out the problems that chose a direction
    first, second = expected
    assert [r.pair_index for r, _ in problem_pairs(prompts_dm, "test", n=2, exclude=[first])] == [second]
    with pytest.raises(UserError, match="no test problems left once the 2 used to select"):
        problem_pairs(prompts_dm, "test", exclude=expected)


def test_conditions_for_given_strengths_and_null_count():
    conditions = build_conditions((1, -3.0, 2.5), n_random=2)
    assert [c.name for c in conditions] == ["baseline", "ablated", "added@1", "added@-3", "added@2.5",
                                            "random0_added@-3", "random0_ablated", "random1_added@-3",
                                            "random1_ablated"]  # fmt: skip
    assert conditions[:2] == [Condition("baseline", "none", "none", None, None),
                              Condition("ablated", "ablate", "selected", None, None)]  # fmt: skip
    assert [(c.strength, c.random_index) for c in conditions[2:5]] == [(1.0, None), (-3.0, None), (2.5, None)]
    assert all(isinstance(c.strength, float) for c in conditions[2:5])
    # random directions: added at the strength of largest magnitude (-3, not 2.5), ablated; index = k
    assert [(c.intervention, c.direction, c.strength, c.random_index) for c in conditions[5:]] == [
        ("add", "random", -3.0, 0), ("ablate", "random", None, 0), ("add", "random", -3.0, 1),
        ("ablate", "random", None, 1)]  # fmt: skip
    assert [c.name for c in build_conditions((2.0,), n_random=0)] == ["baseline", "ablated", "added@2"]


def test_each_report_entry_opens_with_its_condition(greedy_report):
    expected = [dataclasses.asdict(c) for c in build_conditions((0.0, 2.0), n_random=1)]
    assert [dict(list(entry.items())[:5]) for entry in greedy_report["conditions"]] == expected
    assert list(expected[0]) == ["name", "intervention", "direction", "strength", "random_index"]


class _ByHand:
    """Plain `register_forward_hook`s on (module, edit) pairs, edit: [batch, pos, d_model] -> same; for the
    report's conditions computed without interp.hooks / InterventionHandler."""

    def __init__(self, pairs):
        self.pairs, self.handles = pairs, []

    @staticmethod
    def _hook(edit):
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (edit(output[0]), *output[1:])
            return edit(output)

        return hook

    def __enter__(self):
        self.handles = [module.register_forward_hook(self._hook(edit)) for module, edit in self.pairs]

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def _added_by_hand(model, r, strength, layer):
    """x + strength * r at the output of decoder layer `layer` (blocks.{layer}.resid_post)."""
    v = strength * r.float()
    return _ByHand([(model.model.layers[layer], lambda x: (x.float() + v).to(x.dtype))])


def _ablated_by_hand(model, r):
    """x - (x . r_hat) r_hat at the embedding and every attention and MLP output (every residual-stream write)."""
    unit = (r.double() / r.double().norm()).float()

    def edit(x):
        x32 = x.float()
        return (x32 - (x32 @ unit)[..., None] * unit).to(x.dtype)

    parts = [model.model.embed_tokens]
    parts += [part for layer in model.model.layers for part in (layer.self_attn, layer.mlp)]
    return _ByHand([(part, edit) for part in parts])


def test_report_numbers_equal_direct_calls(tiny, test_rows, direction_by_layer, greedy_report):
    model, tokenizer = tiny
    report = greedy_report
    names = [c["name"] for c in report["conditions"]]
    assert names == ["baseline", "ablated", "added@0", "added@2", "random0_added@2", "random0_ablated"]
    assert report["null"] == "isotropic" and report["n_null"] == 1 and "drawn here" in report["null_source"]
    reasoning = [r for r in test_rows if r.kind == "reasoning"]
    control = [r for r in test_rows if r.kind == "control"]
    assert report["reasoning_rows"] == [r.row_index for r in reasoning]
    assert report["control_rows"] == [r.row_index for r in control]
    prompts, solutions = [r.prompt for r in reasoning], [r.gold_solution for r in reasoning]
    r = direction_by_layer[LAYER]
    (random_r,) = random_directions(r, 1, generator=0)
    assert report["direction_norm"] == pytest.approx(float(r.double().norm()), rel=1e-9)
    handlers = {  # plain torch forward hooks written here, not the project's hook machinery
        "baseline": None,
        "ablated": lambda: _ablated_by_hand(model, r),
        "added@2": lambda: _added_by_hand(model, r, 2.0, LAYER),
        "random0_added@2": lambda: _added_by_hand(model, random_r, 2.0, LAYER),
        "random0_ablated": lambda: _ablated_by_hand(model, random_r),
    }
    base_logits = next_token_logits(model, tokenizer, [c.prompt for c in control], batch_size=2)
    by_name = {c["name"]: c for c in report["conditions"]}
    for name, make in handlers.items():
        condition = by_name[name]
        handler = make() if make else None
        if handler:
            handler.__enter__()
        try:
            texts = generate(model, tokenizer, prompts, max_new_tokens=6, do_sample=False, batch_size=2)
            nll = gold_solution_nll(model, tokenizer, prompts, solutions, 2, SOLUTION_TOKENS)
            logits = next_token_logits(model, tokenizer, [c.prompt for c in control], batch_size=2)
        finally:
            if handler:
                handler.__exit__(None, None, None)
        assert [s["generation"] for s in condition["samples"]] == texts, name
        graded = [grade_answer(t, row.gold_answer, row.dataset) for t, row in zip(texts, reasoning)]
        assert condition["correct"] == graded and condition["accuracy"] == sum(graded) / len(graded)
        assert [s["correct"] for s in condition["samples"]] == graded
        assert condition["extracted_answers"] == [extract_answer(t, row.dataset) for t, row in zip(texts, reasoning)]
        torch.testing.assert_close(torch.tensor(condition["gold_nll"]["per_prompt"], dtype=torch.float64), nll,
                                   rtol=0, atol=1e-12)  # fmt: skip
        assert condition["gold_nll"]["mean"] == pytest.approx(float(nll.mean()), abs=1e-12)
        assert condition["gold_nll"]["ci"] == list(bootstrap_ci(nll, 200, seed=0))
        kl = last_token_kl(base_logits, logits)
        torch.testing.assert_close(torch.tensor(condition["control_kl"]["per_prompt"], dtype=torch.float64), kl,
                                   rtol=0, atol=1e-12)  # fmt: skip
        assert condition["ngram_repetition"] == pytest.approx(sum(map(ngram_repetition, texts)) / len(texts))
        assert condition["compression_ratio"] == pytest.approx(sum(map(compression_ratio, texts)) / len(texts))
    base = by_name["baseline"]
    change = torch.tensor(by_name["added@2"]["gold_nll"]["per_prompt"], dtype=torch.float64) - torch.tensor(
        base["gold_nll"]["per_prompt"], dtype=torch.float64)  # fmt: skip
    assert by_name["added@2"]["gold_nll_change"]["mean"] == pytest.approx(float(change.mean()), abs=1e-12)
    # the interventions do something: they move the gold NLL and the control prompts' next-token distribution
    for name in ("ablated", "added@2", "random0_added@2"):
        assert abs(by_name[name]["gold_nll_change"]["mean"]) > 1e-4 and by_name[name]["control_kl"]["mean"] > 1e-6


def test_report_uses_the_null_directions_it_is_given(tiny, test_rows, direction_by_layer):
    """Given null directions (e.g. a run's placebo nulls), random{k} is null row k rescaled to |r|."""
    model, tokenizer = tiny
    nulls = torch.randn(3, 64, generator=torch.Generator().manual_seed(8))  # any norm: rescaled to |r|
    kwargs = dict(strengths=(2.0,), n_random=2, max_new_tokens=2, do_sample=False, n_bootstrap=10,
                  max_solution_tokens=SOLUTION_TOKENS, batch_size=2)  # fmt: skip
    report = intervention_report(model, tokenizer, test_rows, direction_by_layer, LAYER, null_directions=nulls,
                                 null="placebo", **kwargs)  # fmt: skip
    assert report["null"] == "placebo" and report["n_null"] == 2
    assert report["null_source"] == "the run's saved null directions"
    r = direction_by_layer[LAYER]
    reasoning = [row for row in test_rows if row.kind == "reasoning"]
    prompts, solutions = [row.prompt for row in reasoning], [row.gold_solution for row in reasoning]
    by_name = {c["name"]: c for c in report["conditions"]}
    for k in range(2):
        null64 = nulls[k].double()
        null = (null64 / null64.norm() * r.double().norm()).float()  # the report's rescaling, in float64
        with InterventionHandler(model, null, 2.0, layers=[LAYER], mode="add"):
            added = gold_solution_nll(model, tokenizer, prompts, solutions, 2, SOLUTION_TOKENS)
        with InterventionHandler(model, null, mode="ablate"):
            ablated = gold_solution_nll(model, tokenizer, prompts, solutions, 2, SOLUTION_TOKENS)
        # the same float32 direction through the same batched forwards: the same numbers
        assert by_name[f"random{k}_added@2"]["gold_nll"]["per_prompt"] == pytest.approx(added.tolist(), rel=1e-12)
        assert by_name[f"random{k}_ablated"]["gold_nll"]["per_prompt"] == pytest.approx(ablated.tolist(), rel=1e-12)
    with pytest.raises(UserError, match="ask for at most 3"):
        intervention_report(model, tokenizer, test_rows, direction_by_layer, LAYER, null_directions=nulls,
                            **{**kwargs, "n_random": 4})  # fmt: skip


def test_strength_zero_equals_baseline_exactly(greedy_report):
    base, zero = greedy_report["conditions"][0], greedy_report["conditions"][2]
    assert zero["name"] == "added@0" and zero["strength"] == 0.0
    for key in ("samples", "correct", "extracted_answers", "gold_nll", "ngram_repetition", "compression_ratio"):
        assert zero[key] == base[key], key
    assert zero["control_kl"]["per_prompt"] == [0.0] * len(zero["control_kl"]["per_prompt"])
    assert base["control_kl"]["max"] == 0.0 and base["gold_nll_change"]["mean"] == 0.0


def test_sampling_uses_the_same_seed_in_every_condition(tiny, test_rows, direction_by_layer):
    model, tokenizer = tiny
    kwargs = dict(strengths=(0.0,), n_random=0, max_new_tokens=4, n_bootstrap=10, max_solution_tokens=4, seed=5)
    report = intervention_report(model, tokenizer, test_rows, direction_by_layer, LAYER, **kwargs)
    base, zero = report["conditions"][0], report["conditions"][2]
    assert report["generation"]["do_sample"] and [c["name"] for c in report["conditions"]] == [
        "baseline", "ablated", "added@0"]  # fmt: skip
    assert zero["samples"] == base["samples"]
    prompts = [r.prompt for r in test_rows if r.kind == "reasoning"]
    assert [s["generation"] for s in base["samples"]] == generate(model, tokenizer, prompts, max_new_tokens=4, seed=5)


def test_accuracy_and_degeneration_of_planted_generations(tiny, test_rows, direction_by_layer, monkeypatch):
    """generate replaced by known texts: prompt 0 answered right (boxed gold answer), prompt 1 wrong and looping."""
    model, tokenizer = tiny
    reasoning = [r for r in test_rows if r.kind == "reasoning"]
    loop = "Wait, hold on. " * 20
    planted = [f"<think>so</think> The answer is $\\boxed{{{reasoning[0].gold_answer}}}$.", loop + "\\boxed{-12345}"]
    control = [r for r in test_rows if r.kind == "control"]
    planted_control = [f"It asks for \\boxed{{{control[0].gold_answer}}}.", "A restatement without any number."]
    calls = []

    def fake_generate(model, tokenizer, prompts, **kwargs):
        calls.append(kwargs)
        if prompts == [r.prompt for r in control]:
            return list(planted_control)
        assert prompts == [r.prompt for r in reasoning]
        return list(planted)

    monkeypatch.setattr(eval_module, "generate", fake_generate)
    report = intervention_report(model, tokenizer, test_rows, direction_by_layer, LAYER, strengths=(1.0,), n_random=0,
                                 max_new_tokens=3, temperature=0.7, top_p=0.9, n_bootstrap=10,
                                 max_solution_tokens=4, n_samples=1)  # fmt: skip
    # reasoning prompts in every condition, control prompts in the baseline and the added condition
    assert len(calls) == 5 and calls[0] == {"batch_size": 8, "max_new_tokens": 3, "do_sample": True,
                                            "temperature": 0.7, "top_p": 0.9, "seed": 0}  # fmt: skip
    assert [c["control_correct"] for c in report["conditions"]] == [[True, False], None, [True, False]]
    assert [c["control_accuracy"] for c in report["conditions"]] == [0.5, None, 0.5]
    assert [c["control_answer_rate"] for c in report["conditions"]] == [0.5, None, 0.5]
    for condition in report["conditions"]:
        assert condition["accuracy_change"]["mean"] == 0.0
        assert condition["correct"] == [True, False] and condition["accuracy"] == 0.5 and condition["n_correct"] == 1
        assert condition["extracted_answers"][1] == "-12345"
        assert condition["ngram_repetition"] == pytest.approx(sum(map(ngram_repetition, planted)) / 2)
        assert condition["compression_ratio"] == pytest.approx(sum(map(compression_ratio, planted)) / 2)
        assert len(condition["samples"]) == 1 and condition["samples"][0]["generation"] == planted[0]


def test_vs_null_compares_prompt_by_prompt_with_the_null_conditions():
    """Planted 0/1 outcomes of 4 prompts; the differences, p-values and CIs worked out by hand."""

    def entry(name, intervention, direction, strength=None, correct=None, control_correct=None):
        return {"name": name, "intervention": intervention, "direction": direction, "strength": strength,
                "correct": correct, "control_correct": control_correct}  # fmt: skip

    conditions = [
        entry("baseline", "none", "none", correct=[1, 1, 1, 1], control_correct=[0, 0, 0, 0]),
        entry("ablated", "ablate", "selected", correct=[0, 0, 1, 0]),
        entry("added@1", "add", "selected", 1.0, [1, 1, 1, 1], [0, 0, 0, 0]),
        entry("added@4", "add", "selected", 4.0, [1, 1, 1, 1], [1, 1, 0, 1]),
        entry("random0_added@4", "add", "random", 4.0, [1, 1, 1, 1], [0, 0, 0, 1]),
        entry("random0_ablated", "ablate", "random", correct=[1, 1, 1, 0]),
        entry("random1_added@4", "add", "random", 4.0, [1, 1, 1, 1], [0, 0, 0, 0]),
        entry("random1_ablated", "ablate", "random", correct=[1, 1, 1, 1]),
    ]
    out = vs_null(conditions, n_bootstrap=200, seed=0)
    ablated, added = out["ablated"], out["added"]
    assert ablated["condition"] == "ablated" and ablated["value"] == 0.25 and ablated["null_values"] == [0.75, 1.0]
    assert ablated["difference"] == pytest.approx(0.25 - 0.875)  # per prompt: -1, -1, 0, -0.5
    assert ablated["p_rank"] == 1 / 3  # no null accuracy as low as 0.25
    assert added["condition"] == "added@4" and added["value"] == 0.75 and added["null_values"] == [0.25, 0.0]
    assert added["difference"] == pytest.approx(0.75 - 0.125) and added["p_rank"] == 1 / 3
    for result, per_prompt in ((ablated, [-1, -1, 0, -0.5]), (added, [1, 1, 0, 0.5])):
        low, high = result["ci"]
        assert min(per_prompt) <= low <= result["difference"] <= high <= max(per_prompt)
    assert vs_null(conditions[:4]) == {}  # no null conditions
    with pytest.raises(UserError, match="no add condition at strength 4"):
        vs_null([c for c in conditions if c["name"] != "added@4"])
    with pytest.raises(UserError, match="the same 4 prompts"):
        vs_null(conditions[:-1] + [{**conditions[-1], "correct": [1, 1]}])
    with pytest.raises(UserError, match="different strengths"):
        vs_null(conditions[:4] + [conditions[4], {**conditions[6], "strength": 1.0}])


def test_truncated_reasoning_is_incorrect_and_counted(tiny, test_rows, direction_by_layer, monkeypatch):
    """Prompt 1 is cut off while thinking, its last number the gold answer: incorrect and truncated."""
    model, tokenizer = tiny
    reasoning = [r for r in test_rows if r.kind == "reasoning"]
    planted = [f"so</think> The answer is $\\boxed{{{reasoning[0].gold_answer}}}$.",
               f"Let me add these up step by step: {reasoning[1].gold_answer}"]  # fmt: skip
    monkeypatch.setattr(eval_module, "generate", lambda *args, **kwargs: list(planted))
    report = intervention_report(model, tokenizer, test_rows, direction_by_layer, LAYER, strengths=(1.0,), n_random=0,
                                 n_bootstrap=10, max_solution_tokens=4)  # fmt: skip
    for condition in report["conditions"]:
        assert condition["correct"] == [True, False] and condition["truncated"] == [False, True]
        assert condition["truncation_rate"] == 0.5 and condition["n_truncated"] == 1
        assert condition["accuracy"] == 0.5 and condition["accuracy_among_finished"] == 1.0
        assert [sample["truncated"] for sample in condition["samples"]] == [False, True]


def test_write_report(greedy_report, tmp_path, capsys):
    report = json.loads(json.dumps(greedy_report))
    report["conditions"][1]["control_kl"]["max"] = float("nan")
    paths = write_intervention_report(report, tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert paths["json"] == tmp_path / "intervention_results.json"
    assert saved["conditions"][1]["control_kl"]["max"] is None
    assert saved["conditions"][3] == greedy_report["conditions"][3]
    assert paths["figure"].is_file() and paths["figure"].stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "random0_added@2" in out and "baseline" in out


def test_report_rejects_bad_input(tiny, test_rows, direction_by_layer):
    model, tokenizer = tiny
    reasoning_only = [r for r in test_rows if r.kind == "reasoning"]
    with pytest.raises(UserError, match="reasoning and control prompts"):
        intervention_report(model, tokenizer, reasoning_only, direction_by_layer, LAYER)
    with pytest.raises(UserError, match="zero norm"):
        intervention_report(model, tokenizer, test_rows, torch.zeros(32, 64), LAYER)
    with pytest.raises(UserError, match="out of range"):
        intervention_report(model, tokenizer, test_rows, direction_by_layer, 32)
    with pytest.raises(UserError, match="d_model"):
        intervention_report(model, tokenizer, test_rows, direction_by_layer[:, :10], LAYER)


# ---- the callbacks on a stand-in module inside a real Trainer ----------------------------------------------------
class StandInDirections(L.LightningModule):
    """What the callbacks use of a ReasoningDirectionModule, with planted directions on the tiny backbone."""

    def __init__(self, backbone, directions: torch.Tensor, layers: list[int], selected: dict | None):
        super().__init__()
        self._backbone = backbone  # a tuple: never a submodule
        self.register_buffer("directions", directions)  # [n_pos, n_layers_cached, d_model]
        self.layers, self.selected, self.n_model_layers = layers, selected, 32
        self.weight = torch.nn.Parameter(torch.zeros(1))

    @property
    def backbone_model(self):
        return self._backbone[0]

    @property
    def tokenizer(self):
        return self._backbone[1]

    def directions_by_layer(self, position: int) -> torch.Tensor:
        out = torch.zeros(self.n_model_layers, self.directions.shape[-1])
        out[self.layers] = self.directions[position]
        return out

    def selected_direction(self) -> torch.Tensor:
        return self.directions[self.selected["position"], self.selected["slot"]].detach().cpu()

    def training_step(self, batch, batch_idx):
        return (self.weight - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class PromptsOnly(L.LightningDataModule):
    def __init__(self, prompts):
        super().__init__()
        self.prompts = prompts

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(2, 1)), batch_size=1)


@pytest.fixture(scope="module")
def stand_in(tiny):
    directions = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(11)) * 4.0
    return StandInDirections(tiny, directions, [2, 5, 9], {"position": 1, "layer": 5, "slot": 1})


def _fit(module, dm, callbacks, log_dir, max_epochs=1):
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, callbacks=callbacks,
                        logger=TensorBoardLogger(str(log_dir), name="run", version=""), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    events = EventAccumulator(str(log_dir / "run"))
    events.Reload()
    return trainer, events


def _val_reasoning(prompts_dm, row_indices):
    rows = [prompts_dm.rows[i] for i in row_indices]
    assert all(r.split == "val" and r.kind == "reasoning" for r in rows)
    return [r.prompt for r in rows], [r.gold_solution for r in rows]


def test_callbacks_in_a_trainer(tiny, stand_in, prompts_dm, tmp_path):
    model, tokenizer = tiny
    ablation = AblationCallback(n_prompts=2, layers=[0, 5, 31], n_random=2, metric="first_tokens", k_first_tokens=4,
                                n_bootstrap=50)  # fmt: skip
    patching = PatchingCallback(n_pairs=2, layers=[0, 3, 31])
    trainer, events = _fit(stand_in, PromptsOnly(prompts_dm), [ablation, patching], tmp_path)
    log_dir = tmp_path / "run"
    saved = json.loads((log_dir / "ablation_results.json").read_text())
    assert saved == json.loads(json.dumps(ablation.last_results)) and saved["global_step"] == trainer.global_step
    assert saved["epochs_completed"] == 1
    # the stand-in chose no direction on any problem and saved no nulls: any val problems, isotropic nulls
    assert saved["excluded_selection_pairs"] == [] and saved["null"] == "isotropic" and saved["n_null"] == 2

    # ablation: recomputed with LayerAblator / InterventionHandler on the rows it names
    prompts, solutions = _val_reasoning(prompts_dm, saved["row_indices"])
    assert len(prompts) == 2

    def metric():
        return -first_tokens_logprob(model, tokenizer, prompts, solutions, k=4, batch_size=8)

    baseline = metric()
    assert saved["baseline"]["per_prompt"] == pytest.approx(baseline.tolist(), abs=1e-12)
    for row in saved["layers"]:
        with LayerAblator(model, row["layer"], "zero"):
            delta = metric() - baseline
        assert row["delta_per_prompt"] == pytest.approx(delta.tolist(), abs=1e-12)
        assert row["ci"] == list(bootstrap_ci(delta, 50, seed=0))
    assert [row["layer"] for row in saved["layers"]] == [0, 5, 31]
    assert abs(saved["layers"][0]["delta"]) > 1e-3  # skipping layer 0 changes the metric
    r = stand_in.selected_direction()
    with InterventionHandler(model, r, mode="ablate"):
        selected = metric() - baseline
    nulls = []
    for direction in random_directions(r, 2, generator=0):
        with InterventionHandler(model, direction, mode="ablate"):
            nulls.append(float((metric() - baseline).mean()))
    direction = saved["direction"]
    assert direction["delta"] == pytest.approx(float(selected.mean()), abs=1e-12)
    assert direction["random_deltas"] == pytest.approx(nulls, abs=1e-12)
    assert direction["zscore"] == pytest.approx(zscore(float(selected.mean()), torch.tensor(nulls)), rel=1e-9)
    assert (direction["layer"], direction["position"]) == (5, 1)

    # patching: patching_sweep on the same pairs with the first gold-solution token as target
    result = json.loads((log_dir / "patching_results.json").read_text())
    reasoning = [prompts_dm.rows[i] for i in result["reasoning_rows"]]
    control = [prompts_dm.rows[i] for i in result["control_rows"]]
    assert [c.pair_index for c in control] == [r.pair_index for r in reasoning] == result["pair_indices"]
    targets = [tokenizer(r.gold_solution, add_special_tokens=False)["input_ids"][0] for r in reasoning]
    assert result["target_tokens"] == targets
    reference = patching_sweep(model, tokenizer, [r.prompt for r in reasoning], [c.prompt for c in control],
                               target_log_prob(targets), layers=[0, 3, 31])  # fmt: skip
    assert result["method"] == "exact" and result["layers"] == [0, 3, 31]
    assert torch.tensor(result["recovered"], dtype=torch.float64).shape == (3, 7)
    torch.testing.assert_close(torch.tensor(result["recovered"], dtype=torch.float64), reference.recovered,
                               rtol=0, atol=1e-9)  # fmt: skip

    # TensorBoard: figures and scalars
    assert {"ablation/metric_change_vs_layer", "patching/recovered_heatmap"} <= set(events.Tags()["images"])
    scalars = set(events.Tags()["scalars"])
    assert {"ablation/layer_delta/L05", "ablation/selected_direction_delta", "ablation/direction_zscore",
            "patching/recovered/L03", "patching/recovered_max", "patching/n_usable_pairs"} <= scalars  # fmt: skip
    logged = events.Scalars("ablation/layer_delta/L31")[-1].value
    assert logged == pytest.approx(saved["layers"][2]["delta"], rel=1e-5)
    max_l3 = max(v for v in result["recovered"][1] if v is not None)
    assert events.Scalars("patching/recovered/L03")[-1].value == pytest.approx(max_l3, rel=1e-5)


def test_callbacks_every_epoch_attribution_and_mean(tiny, stand_in, prompts_dm, tmp_path):
    model, tokenizer = tiny
    ablation = AblationCallback(n_prompts=1, layers=[4], ablation_method="mean", n_random=0, metric="gold_nll",
                                every_n_epochs=1, n_bootstrap=10)  # fmt: skip
    patching = PatchingCallback(n_pairs=2, layers=[1, 30], method="attribution", every_n_epochs=2)
    _, events = _fit(stand_in, PromptsOnly(prompts_dm), [ablation, patching], tmp_path, max_epochs=2)
    assert len(events.Scalars("ablation/layer_delta/L04")) == 2  # after both epochs
    assert len(events.Scalars("patching/recovered/L30")) == 1  # after the second only
    saved = json.loads((tmp_path / "run" / "ablation_results.json").read_text())
    assert saved["epochs_completed"] == 2 and saved["ablation_method"] == "mean" and saved["direction"]["random_deltas"] == []
    prompts, solutions = _val_reasoning(prompts_dm, saved["row_indices"])
    reference = [row.prompt for row in prompts_dm.rows if row.pair_index in saved["pair_indices"]]
    baseline = gold_solution_nll(model, tokenizer, prompts, solutions)
    with LayerAblator(model, 4, "mean", reference_inputs=reference, tokenizer=tokenizer):
        delta = gold_solution_nll(model, tokenizer, prompts, solutions) - baseline
    assert saved["layers"][0]["delta_per_prompt"] == pytest.approx(delta.tolist(), abs=1e-12)
    result = json.loads((tmp_path / "run" / "patching_results.json").read_text())
    reasoning = [prompts_dm.rows[i].prompt for i in result["reasoning_rows"]]
    control = [prompts_dm.rows[i].prompt for i in result["control_rows"]]
    expected = attribution_patching(model, tokenizer, reasoning, control, target_log_prob(result["target_tokens"]),
                                    layers=[1, 30])  # fmt: skip
    assert result["method"] == "attribution"
    torch.testing.assert_close(torch.tensor(result["recovered"], dtype=torch.float64), expected.recovered,
                               rtol=0, atol=1e-9)  # fmt: skip


def test_callbacks_under_fast_dev_run(stand_in, prompts_dm, tmp_path):
    """fast_dev_run checks the wiring only (2 problems, first and last layer) and writes nothing."""
    ablation = AblationCallback(layers=[0, 3, 7], n_random=3, n_bootstrap=5)
    patching = PatchingCallback(layers=[1, 2, 30])
    trainer = L.Trainer(accelerator="cpu", fast_dev_run=True, callbacks=[ablation, patching], enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))  # fmt: skip
    trainer.fit(stand_in, datamodule=PromptsOnly(prompts_dm))
    assert [row["layer"] for row in ablation.last_results["layers"]] == [0, 7]
    assert len(ablation.last_results["direction"]["random_deltas"]) == 2
    assert patching.last_results["layers"] == [1, 30] and patching.last_results["n_pairs"] == 2
    assert not list(tmp_path.rglob("*.json"))


def test_callback_settings_are_checked():
    with pytest.raises(UserError, match="unknown ablation_method"):
        AblationCallback(ablation_method="resample")
    with pytest.raises(UserError, match="unknown selection metric"):
        AblationCallback(metric="accuracy")
    with pytest.raises(UserError, match="unknown patching method"):
        PatchingCallback(method="approx")
    with pytest.raises(UserError, match="every_n_epochs"):
        PatchingCallback(every_n_epochs=0)


# ---- a real directions run: callbacks during fit, then evaluate.py on its checkpoint ----------------------------
@pytest.fixture(scope="module")
def directions_run(tmp_path_factory, shared_cache_dir):
    tmp_path = tmp_path_factory.mktemp("directions_run")
    config_path = tiny_config("directions_tiny.yaml", tmp_path, limit=10, cache_dir=str(shared_cache_dir))  # 4 val problems
    config = yaml.safe_load(config_path.read_text())
    config["trainer"]["callbacks"] = [
        {"class_path": "callbacks.ablation.AblationCallback",
         "init_args": {"n_prompts": 4, "layers": [0, 2], "n_random": 2, "n_bootstrap": 20}},
        {"class_path": "callbacks.patching.PatchingCallback", "init_args": {"n_pairs": 2, "layers": [2, 10]}},
    ]  # fmt: skip
    config_path.write_text(yaml.safe_dump(config))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        train.main(["--config", str(config_path), "--run_name", "run", "--model.init_args.candidate_layers", "[2, 10]",
                    "--model.init_args.n_selection_prompts", "1", "--model.init_args.n_report_prompts", "1",
                    "--model.init_args.kl_threshold", "100", "--model.init_args.n_random", "2"])  # fmt: skip
    finally:
        os.chdir(cwd)
    return tmp_path


def test_callbacks_run_with_the_directions_module(directions_run):
    log_dir = directions_run / "logs" / "run"
    meta = json.loads((log_dir / "reasoning_directions.json").read_text())
    ablation = json.loads((log_dir / "ablation_results.json").read_text())
    patching = json.loads((log_dir / "patching_results.json").read_text())
    assert meta["selected"] is not None and ablation["metric"] == "first_tokens"  # the module's selection metric
    assert ablation["direction"]["layer"] == meta["selected"]["layer"]
    assert len(ablation["direction"]["random_deltas"]) == 2 and [r["layer"] for r in ablation["layers"]] == [0, 2]
    # the ablation never scores the problem that chose the direction, and uses the run's placebo null
    chosen = meta["selection"]["problems"]["selection"]["pair_indices"]
    assert len(chosen) == 1 and ablation["excluded_selection_pairs"] == chosen
    assert len(ablation["pair_indices"]) == 3 and not set(ablation["pair_indices"]) & set(chosen)
    assert ablation["null"] == meta["null"] == "placebo" and ablation["n_null"] == 2
    assert patching["layers"] == [2, 10] and len(patching["recovered"][0]) == 7
    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert {"ablation/metric_change_vs_layer", "patching/recovered_heatmap"} <= set(events.Tags()["images"])


@pytest.mark.slow
def test_evaluate_a_directions_checkpoint(directions_run, tiny):
    model, tokenizer = tiny
    out = directions_run / "eval"
    ckpt = directions_run / "checkpoints" / "run" / "best.ckpt"
    evaluate.main(["--ckpt", str(ckpt), "--output_dir", str(out), "--max_new_tokens", "4", "--greedy",
                   "--n_prompts", "2", "--strengths", "0", "1.5", "--n_random", "1"])  # fmt: skip
    report = json.loads((out / "intervention_results.json").read_text())
    assert (out / "visualizations" / "interventions.png").is_file()
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    selected = checkpoint["direction_selection"]["selected"]
    assert (report["layer"], report["position"]) == (selected["layer"], selected["position"])
    assert report["selected_layer"] == selected["layer"] and report["split"] == "test"
    assert report["checkpoint"] == str(ckpt) and report["backbone"] == "tiny"
    assert [c["name"] for c in report["conditions"]] == ["baseline", "ablated", "added@0", "added@1.5",
                                                         "random0_added@1.5", "random0_ablated"]  # fmt: skip
    assert report["null"] == "placebo" and report["n_null"] == 1
    assert report["null_source"] == "the run's saved null directions"
    # the report's rows are the run's test problems, rebuilt from its config
    from cli import datamodule_from_run_config

    dm = datamodule_from_run_config(checkpoint["run_config"])
    dm.prompts.setup()
    rows = [dm.prompts.rows[i] for i in report["reasoning_rows"]]
    assert len(rows) == 2 and all(r.split == "test" and r.kind == "reasoning" for r in rows)
    direction = checkpoint["state_dict"]["directions"][selected["position"], selected["slot"]]
    assert report["direction_norm"] == pytest.approx(float(direction.double().norm()), rel=1e-9)
    prompts, solutions = [r.prompt for r in rows], [r.gold_solution for r in rows]
    with InterventionHandler(model, direction, mode="ablate"):
        ablated = gold_solution_nll(model, tokenizer, prompts, solutions)
    assert report["conditions"][1]["gold_nll"]["per_prompt"] == pytest.approx(ablated.tolist(), abs=1e-9)
    null = checkpoint["direction_selection"]["null_directions"][0]  # the run's first placebo null direction
    with InterventionHandler(model, null, mode="ablate"):
        ablated = gold_solution_nll(model, tokenizer, prompts, solutions)
    assert report["conditions"][5]["gold_nll"]["per_prompt"] == pytest.approx(ablated.tolist(), abs=1e-9)
    base = report["conditions"][0]
    assert report["conditions"][2]["samples"] == base["samples"] and report["generation"]["do_sample"] is False
    texts = generate(model, tokenizer, prompts, max_new_tokens=4, do_sample=False)
    assert [s["generation"] for s in base["samples"]] == texts


@pytest.mark.slow
def test_the_report_shows_the_patching_heatmap_and_the_layer_ablations(directions_run, browser):
    """report.html of the run's log folder embeds the callbacks' files verbatim; in chromium the patching heatmap has a
    cell per (layer, post-instruction token) whose hover gives the JSON's value and CI (or why it is cut), the layer
    control outlines that layer's row and tabulates its values, and the layer ablations draw with their CI band."""
    from pipeline_utils import open_in_browser
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from interp.report_html import provenance, read_embedded_data, write_report_html

    log_dir = directions_run / "logs" / "run"
    report = write_report_html(log_dir, provenance())
    embedded = read_embedded_data(report)["artifacts"]
    for name in ("reasoning_directions.json", "ablation_results.json", "patching_results.json"):
        assert embedded[name] == json.loads((log_dir / name).read_text())
    patching, ablation = embedded["patching_results.json"], embedded["ablation_results.json"]
    tokens = [f"{k}:{json.dumps(t, ensure_ascii=False)}" for k, t in enumerate(patching["post_tokens"])]

    open_in_browser(browser, report)
    box = browser.find_element(By.CSS_SELECTOR, "section[data-artifact='patching_results.json'] .heatmap")
    cells = box.find_elements(By.CSS_SELECTOR, "svg rect[data-row]")
    assert len(cells) == len(patching["layers"]) * len(tokens) == 2 * 7
    tip = box.find_element(By.CSS_SELECTOR, ".tooltip")
    for cell in cells:
        i, j = patching["layers"].index(int(cell.get_attribute("data-row"))), tokens.index(cell.get_attribute("data-col"))
        ActionChains(browser).move_to_element(cell).perform()
        head, _, shown = tip.get_attribute("textContent").partition(f"layer {patching['layers'][i]}, token {tokens[j]}: ")
        assert head == "" and shown
        if patching["cut"][i][j]:
            assert shown == f"cut ({patching['cut_reason']})"
            continue
        assert float(shown.split(" ")[0]) == pytest.approx(patching["recovered"][i][j], rel=5e-4)
        low, high = patching["recovered_ci_low"][i][j], patching["recovered_ci_high"][i][j]
        if low is None:
            assert shown.endswith(f"(no CI: {patching['ci_reason']})")
        else:
            bounds = [float(v) for v in shown.split("[")[1].rstrip("]").split(", ")]
            assert bounds == pytest.approx([low, high], rel=5e-4)

    slider = browser.find_element(By.ID, "layer-slider")
    for layer in (2, 10, 0):
        browser.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))",
                               slider, layer)  # fmt: skip
        shown = {(tr.get_attribute("data-artifact"), tr.get_attribute("data-metric")):
                 json.loads(tr.find_elements(By.TAG_NAME, "td")[2].get_attribute("data-value"))
                 for tr in browser.find_elements(By.CSS_SELECTOR, "#layer-table tbody tr")}  # fmt: skip
        outline = box.find_element(By.CSS_SELECTOR, "rect.selected-row")
        if layer in patching["layers"]:
            i = patching["layers"].index(layer)
            assert {t: shown[("patching_results.json", f"recovered @ {t}")] for t in tokens} == {
                t: patching["recovered"][i][j] for j, t in enumerate(tokens)}
            row_y = next(c for c in cells if c.get_attribute("data-row") == str(layer)).get_attribute("y")
            assert outline.get_attribute("visibility") == "visible" and outline.get_attribute("y") == row_y
        else:
            assert outline.get_attribute("visibility") == "hidden"
        rows = {row["layer"]: row for row in ablation["layers"]}
        if layer in rows:
            assert shown[("ablation_results.json", "delta")] == rows[layer]["delta"]
            assert shown[("ablation_results.json", "ci")] == rows[layer]["ci"]
    chart = browser.find_element(By.CSS_SELECTOR, "section[data-artifact='ablation_results.json'] .chart")
    assert chart.find_elements(By.CSS_SELECTOR, "polygon[data-band='delta']")  # the CI band of the layer ablations
    browser.save_screenshot(str(log_dir / "report.png"))
