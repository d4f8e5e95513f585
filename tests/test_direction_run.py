"""The directions run: class means, candidate scores, selection / report split, null directions, files,
checkpoints, configs.

Independent references: `compute_contrastive_directions` (float64) on the same rows and a planted shift;
the metrics of `interp.metrics` run by hand inside hand-built `InterventionHandler`s; `interp.selection`
applied by hand to the saved table; the paired placebo null recomputed from the cached train rows read through
the DataLoader (problem ids from the prompt rows); the files read back with `load_directions`.
"""

import json
import os
import subprocess
import sys

import lightning as L
import pytest
import safetensors.torch
import torch
from pipeline_utils import REPO, build_datamodule, cache_contents, tiny_config

import train
from interp.direction_scoring import PromptScorer, score_candidates
from interp.directions import compute_contrastive_directions, load_directions, load_extra_tensors
from interp.errors import UserError
from interp.interventions import InterventionHandler
from interp.metrics import first_tokens_logprob, gold_solution_nll, last_token_kl, next_token_logits
from interp.null_directions import null_directions
from interp.prompts import format_chat_prompt
from interp.selection import bootstrap_ci, select_reasoning_direction
from lightning_modules.cache_writer import extract_activations
from lightning_modules.directions import ReasoningDirectionModule

CACHED_LAYERS = [1, 4, 9, 28]
QWQ_POST_TOKENS = ["<|im_end|>", "\n", "<|im_start|>", "assistant", "\n", "<think>", "\n"]


def _trainer(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, max_epochs=1,
                    num_sanity_val_steps=0)  # fmt: skip
    return L.Trainer(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def dm(shared_cache_dir):
    """Tiny-backbone cache: post-instruction positions (7), layers 1, 4, 9, 28; 10 + 10 problems."""
    datamodule = build_datamodule(shared_cache_dir, limit=10, layers=CACHED_LAYERS,
                                  positions="post_instruction", batch_size=8)  # fmt: skip
    datamodule.batch_position = None
    extract_activations(_trainer(), datamodule)
    datamodule.batch_size = 5
    datamodule.setup()
    return datamodule


def _split(dm, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(dm._loader(split, shuffle=False))
    return torch.cat([b["x"] for b in batches]), torch.cat([b["y"] for b in batches])


@pytest.fixture(scope="module")
def fitted(dm, tmp_path_factory):
    """One directions run on the tiny cache: 2 val problems choose, the other 2 report; candidates at layers 4, 9
    (and 28: too late); 2 paired sign-flip placebo null directions."""
    L.seed_everything(0, verbose=False)
    module = ReasoningDirectionModule(n_selection_prompts=2, n_report_prompts=2, kl_threshold=10.0, n_random=2,
                                      n_bootstrap=200, batch_size=4, candidate_layers=[4, 9, 28])  # fmt: skip
    root = tmp_path_factory.mktemp("dir_run")
    trainer = _trainer(default_root_dir=str(root))  # logger=False: trainer.log_dir is the root dir
    trainer.fit(module, datamodule=dm)
    assert (root / "reasoning_directions.safetensors").is_file()
    return module, trainer


# ---- fit: the class means ---------------------------------------------------------------------------------------
def test_directions_equal_the_contrastive_reference(fitted, dm):
    module, _ = fitted
    x, y = _split(dm, "train")  # [n, 7, 4, 64]
    reference = compute_contrastive_directions(x[y == 1].double(), x[y == 0].double())
    assert module.directions.shape == (7, len(CACHED_LAYERS), 64)
    torch.testing.assert_close(module.directions, reference, rtol=1e-6, atol=1e-7)
    assert module.n_train == {"reasoning": int((y == 1).sum()), "control": int((y == 0).sum())}
    assert module.post_instruction_tokens == QWQ_POST_TOKENS and module.layers == CACHED_LAYERS


def test_planted_shift_is_recovered(dm, tmp_path):
    """Rows x = noise + y * planted: the module's directions equal the float64 reference on those rows (and
    lie near the planted shift)."""
    generator = torch.Generator().manual_seed(1)
    shape = (7, len(CACHED_LAYERS), 64)
    planted = torch.randn(shape, generator=generator) * 3
    y = torch.arange(40) % 2
    x = torch.randn((40, *shape), generator=generator) + y[:, None, None, None] * planted
    rows = [{"x": x[i], "y": y[i], "y_control": y[i]} for i in range(40)]
    original = dm.datasets["train"]
    dm.datasets["train"] = rows
    try:
        module = ReasoningDirectionModule()
        _trainer(limit_val_batches=0, default_root_dir=str(tmp_path)).fit(module, datamodule=dm)
    finally:
        dm.datasets["train"] = original
    reference = compute_contrastive_directions(x[y == 1].double(), x[y == 0].double())
    torch.testing.assert_close(module.directions, reference, rtol=1e-6, atol=1e-6)
    assert float((module.directions - planted).abs().max()) < 2.0  # 20 + 20 rows of unit noise
    assert module.n_train == {"reasoning": 20, "control": 20}


# ---- scoring ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def selection_prompts(tiny):
    _, tokenizer = tiny
    questions = ["What is 2+2?", "Compute 17 * 3.", "If x + 1 = 4, what is x?"]
    reasoning = [format_chat_prompt(tokenizer, q + " Please reason step by step.") for q in questions]
    control = [format_chat_prompt(tokenizer, q + " Restate the problem. Do not solve it.") for q in questions]
    solutions = ["2 + 2 = 4, so the answer is 4.", "17 * 3 = 51.", "x = 4 - 1 = 3, so x is 3."]
    return reasoning, solutions, control, solutions


def _candidates(scale: float = 5.0) -> torch.Tensor:
    directions = torch.zeros(2, 32, 64)
    directions[:, [3, 7]] = torch.randn(2, 2, 64, generator=torch.Generator().manual_seed(2)) * scale
    return directions


def _manual_scores(model, tokenizer, r, layer, prompts, metric, strength=1.0):
    """The three scores of direction r at `layer` from hand-built interventions (per prompt, float64).
    `metric` and next_token_logits run with the batch size of the code under test (2), so the padded batches
    and hence the float32 rounding are the same."""
    reasoning, r_sol, control, c_sol = prompts
    base_r, base_c = metric(model, tokenizer, reasoning, r_sol), metric(model, tokenizer, control, c_sol)
    base_logits = next_token_logits(model, tokenizer, control, batch_size=2)
    with InterventionHandler(model, r, mode="ablate"):  # the handler ablates r / |r|
        abl_r = metric(model, tokenizer, reasoning, r_sol)
        abl_logits = next_token_logits(model, tokenizer, control, batch_size=2)
    with InterventionHandler(model, strength * r, 1.0, layers=[layer], mode="add"):
        add_c = metric(model, tokenizer, control, c_sol)
    return abl_r - base_r, base_c - add_c, last_token_kl(base_logits, abl_logits)


def test_scores_equal_hand_computed_interventions(tiny, selection_prompts):
    model, tokenizer = tiny
    directions = _candidates()
    rows = score_candidates(model, tokenizer, directions, *selection_prompts, metric="first_tokens", layers=[3, 7],
                            k_first_tokens=4, batch_size=2, intervention_strength=2.0)  # fmt: skip
    assert [(r["position"], r["layer"]) for r in rows] == [(0, 3), (0, 7), (1, 3), (1, 7)]
    nll = lambda m, t, p, s: -first_tokens_logprob(m, t, p, s, k=4, batch_size=2)  # noqa: E731
    for row in rows[1:3]:
        r = directions[row["position"], row["layer"]]
        ablation, induction, kl = _manual_scores(model, tokenizer, r, row["layer"], selection_prompts, nll, 2.0)
        torch.testing.assert_close(row["ablation_per_prompt"], ablation, rtol=0, atol=1e-9)
        torch.testing.assert_close(row["induction_per_prompt"], induction, rtol=0, atol=1e-9)
        torch.testing.assert_close(row["kl_per_prompt"], kl, rtol=0, atol=1e-9)
        assert row["ablation_score"] == pytest.approx(float(ablation.mean()), abs=1e-9)
        assert row["induction_score"] == pytest.approx(float(induction.mean()), abs=1e-9)
        assert row["kl"] == pytest.approx(float(kl.mean()), abs=1e-9)
        assert row["norm"] == pytest.approx(float(r.double().norm()), rel=1e-6)
        assert abs(row["induction_score"]) > 1e-6 and row["kl"] > 0  # the interventions did something


def test_gold_nll_metric(tiny, selection_prompts):
    model, tokenizer = tiny
    directions = _candidates()[:1]
    (row,) = score_candidates(model, tokenizer, directions, *selection_prompts, metric="gold_nll", layers=[7],
                              batch_size=2)  # fmt: skip
    nll = lambda m, t, p, s: gold_solution_nll(m, t, p, s, batch_size=2)  # noqa: E731
    ablation, induction, _ = _manual_scores(model, tokenizer, directions[0, 7], 7, selection_prompts, nll)
    torch.testing.assert_close(row["ablation_per_prompt"], ablation, rtol=0, atol=1e-9)
    torch.testing.assert_close(row["induction_per_prompt"], induction, rtol=0, atol=1e-9)


def test_report_phase_is_scored_on_the_report_problems(tiny, selection_prompts):
    """select_reasoning_direction with the model's PromptScorer: the selection table holds the hand-computed scores
    on the selection problem, the report the selected r's on the two report problems. Null = [r, r]: every z is
    0; null = [r, -r]: ablation (sign-blind) z 0, induction z from hand-scored +r and -r."""
    model, tokenizer = tiny
    reasoning, r_sol, control, c_sol = selection_prompts
    problems = list(zip(reasoning, r_sol, control, c_sol))
    scorer = PromptScorer(model, tokenizer, "first_tokens", k_first_tokens=4, batch_size=2)
    directions = _candidates()
    nll = lambda m, t, p, s: -first_tokens_logprob(m, t, p, s, k=4, batch_size=2)  # noqa: E731

    def run(null_factory):
        return select_reasoning_direction(directions, [3, 7], problems, scorer, n_selection=1, n_report=2, seed=3,
                                          kl_threshold=100.0, max_layer_fraction=1.0, null_factory=null_factory,
                                          n_bootstrap=300)  # fmt: skip

    same = run(lambda best, r: torch.stack([r, r]))
    (chosen,), report_idx = same.selection_problems, same.report_problems
    assert sorted([chosen, *report_idx]) == [0, 1, 2]
    assert same.report["zscores"] == {"ablation_score": 0.0, "induction_score": 0.0, "kl": 0.0}
    row = same.table[1]  # candidate (position 0, layer 7), scored on the selection problem only
    one = [[x[chosen]] for x in selection_prompts]
    ablation, induction, kl = _manual_scores(model, tokenizer, directions[0, 7], 7, one, nll)
    torch.testing.assert_close(row["ablation_per_prompt"], ablation, rtol=0, atol=1e-9)
    torch.testing.assert_close(row["kl_per_prompt"], kl, rtol=0, atol=1e-9)
    best = same.selected
    r = directions[best["position"], best["layer"]]
    held_out = [[x[i] for i in report_idx] for x in selection_prompts]
    ablation, induction, kl = _manual_scores(model, tokenizer, r, best["layer"], held_out, nll)
    for key, values in (("ablation_score", ablation), ("induction_score", induction), ("kl", kl)):
        torch.testing.assert_close(same.report["per_prompt"][key], values, rtol=0, atol=1e-9)
        assert same.report["scores"][key] == pytest.approx(float(values.mean()), abs=1e-9)
        assert same.report["ci"][key] == list(bootstrap_ci(values, n_boot=300, seed=3))
    flipped = run(lambda best, r: torch.stack([r, -r]))
    _, induction_neg, _ = _manual_scores(model, tokenizer, -r, best["layer"], held_out, nll)
    null = torch.tensor([float(induction.mean()), float(induction_neg.mean())], dtype=torch.float64)
    expected = float((induction.mean() - null.mean()) / null.std())
    assert flipped.report["zscores"]["induction_score"] == pytest.approx(expected, rel=1e-6)
    assert abs(expected) > 0.1 and flipped.report["zscores"]["ablation_score"] == 0.0


def test_scoring_rejects_bad_input(tiny, selection_prompts):
    model, tokenizer = tiny
    with pytest.raises(UserError, match="zero-norm direction at layer 5"):
        score_candidates(model, tokenizer, _candidates(), *selection_prompts, layers=[3, 5])
    with pytest.raises(UserError, match="unknown selection metric"):
        score_candidates(model, tokenizer, _candidates(), *selection_prompts, metric="nll", layers=[3])
    with pytest.raises(UserError, match="cover 31 layers"):
        score_candidates(model, tokenizer, _candidates()[:, :31], *selection_prompts)


# ---- selection, files, checkpoints ------------------------------------------------------------------------------
def test_selection_follows_the_table(fitted):
    module, _ = fitted
    table = module.selection_table
    assert len(table) == 7 * 3 and {row["layer"] for row in table} == {4, 9, 28}
    late = [row for row in table if row["layer"] == 28]
    assert all("layer 28 >= 25.6" in row["filtered"] for row in late)
    kept = [row for row in table if row["filtered"] is None]
    assert kept and all(row["induction_score"] >= 0 and row["kl"] <= 10.0 for row in kept)
    best = max(kept, key=lambda row: row["ablation_score"])
    assert module.selected == {"position": best["position"], "layer": best["layer"],
                               "slot": CACHED_LAYERS.index(best["layer"])}  # fmt: skip
    torch.testing.assert_close(module.selected_direction(), module.directions[best["position"], module.selected["slot"]])
    by_layer = module.directions_by_layer(best["position"])  # [32, 64]
    assert by_layer.shape == (32, 64) and torch.equal(by_layer[CACHED_LAYERS], module.directions[best["position"]])
    assert not by_layer[[layer for layer in range(32) if layer not in CACHED_LAYERS]].any()
    logged = module.last_metrics["val"]
    assert logged["val/selected_ablation_score"] == best["ablation_score"]
    assert logged["val/selected_layer"] == best["layer"] and logged["val/n_kept"] == len(kept)
    top9 = max((row for row in table if row["layer"] == 9), key=lambda row: row["ablation_score"])
    assert logged["val/ablation_score/L09"] == top9["ablation_score"]
    assert logged["val/best_position/L09"] == top9["position"]
    sets = module.selection_stats["problems"]
    rows = module.trainer.datamodule.prompts.rows
    val = sorted({row.pair_index for row in rows if row.split == "val"})
    assert len(val) == 4 and sorted(sets["selection"]["pair_indices"] + sets["report"]["pair_indices"]) == val
    assert len(sets["selection"]["pair_indices"]) == len(sets["report"]["pair_indices"]) == 2
    for name in ("selection", "report"):
        assert [rows[i].pair_index for i in sets[name]["reasoning_rows"]] == sets[name]["pair_indices"]
        assert all(rows[i].kind == "reasoning" for i in sets[name]["reasoning_rows"])
        assert [rows[i].pair_index for i in sets[name]["control_rows"]] == sets[name]["pair_indices"]


def test_files_round_trip(fitted, tmp_path):
    module, _ = fitted
    path = module.save_directions_file(tmp_path)
    directions, meta = load_directions(path)
    assert torch.equal(directions, module.directions)
    assert meta["layers"] == CACHED_LAYERS and meta["positions"] == "post_instruction"
    assert meta["position_tokens"] == QWQ_POST_TOKENS and meta["model"] == "tiny"
    assert meta["backbone"]["name_or_path"] == "tiny" and meta["n_model_layers"] == 32
    assert meta["selected"] == module.selected
    assert meta["selection_table"] == json.loads(json.dumps(module.selection_table))
    report = meta["selection"]["report"]
    assert report["problems"] == "report" and set(report["zscores"]) == {"ablation_score", "induction_score", "kl"}
    assert meta["null"] == meta["selection"]["null"] == "placebo" and meta["n_null"] == meta["selection"]["n_null"] == 2
    assert "sign-flip" in meta["selection"]["null_definition"]
    assert meta["selection"]["n_selection_used"] == meta["selection"]["n_report_used"] == 2
    assert "first 8 gold-solution tokens" in meta["selection"]["metric_definition"]
    torch.testing.assert_close(torch.tensor(meta["norms"]), module.directions.double().norm(dim=-1).float(),
                               rtol=1e-6, atol=1e-6, check_dtype=False)  # fmt: skip
    extra = load_extra_tensors(path)
    assert extra["ablation_per_prompt"].shape == (21, 2) and extra["null_directions"].shape == (2, 64)
    row = meta["selection_table"][5]
    assert float(extra["kl_per_prompt"][row["candidate"]].mean()) == pytest.approx(row["kl"], abs=1e-12)
    # an independent re-selection from the saved table agrees
    kept = [r for r in meta["selection_table"] if r["filtered"] is None]
    best = max(kept, key=lambda r: r["ablation_score"])
    assert (best["position"], best["layer"]) == (meta["selected"]["position"], meta["selected"]["layer"])
    # the reported numbers are the report problems': their means, CIs and z-scores against the saved nulls
    for key in ("ablation_score", "induction_score", "kl"):
        values = torch.tensor(report["per_prompt"][key], dtype=torch.float64)
        assert len(values) == 2 and report["scores"][key] == pytest.approx(float(values.mean()), abs=1e-12)
        assert report["ci"][key] == list(bootstrap_ci(values, n_boot=200, seed=0))
    assert meta["selection"]["n_selection_prompts"] == meta["selection"]["n_report_prompts"] == 2


def test_null_directions_are_paired_placebos_of_the_cached_train_rows(fitted, dm):
    module, _ = fitted
    x, y = _split(dm, "train")  # [n, 7, 4, 64] through the DataLoader
    position, slot = module.selected["position"], module.selected["slot"]
    acts, labels, problems = dm.split_slice_problems("train", position, slot)  # one cached slice per shard
    assert torch.equal(acts, x[:, position, slot]) and torch.equal(labels, y)
    every_layer = dm.split_position("train", position)  # all cached layers at one position
    assert torch.equal(every_layer["x"], x[:, position]) and torch.equal(every_layer["row_index"], dm.row_index["train"])
    rows = [dm.prompts.rows[i] for i in dm.row_index["train"].tolist()]
    assert problems.tolist() == [row.problem_index for row in rows]
    r = module.selected_direction()
    expected = null_directions("placebo", r, 2, generator=0, acts=x[:, position, slot], labels=y,
                               problems=torch.tensor([row.pair_index for row in rows]))  # fmt: skip
    torch.testing.assert_close(module.null_directions, expected, rtol=0, atol=0)
    torch.testing.assert_close(module.null_directions.double().norm(dim=-1), r.double().norm().expand(2),
                               rtol=1e-6, atol=0)  # fmt: skip


def test_checkpoint_holds_no_backbone_and_reloads(fitted, tmp_path):
    module, trainer = fitted
    path = tmp_path / "directions.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    assert set(checkpoint["state_dict"]) == {"directions"}
    reloaded = ReasoningDirectionModule.load_from_checkpoint(path, map_location="cpu")
    assert torch.equal(reloaded.directions, module.directions)
    assert reloaded.layers == CACHED_LAYERS and reloaded.selected == module.selected
    assert reloaded.selection_table == module.selection_table
    assert reloaded.post_instruction_tokens == QWQ_POST_TOKENS
    torch.testing.assert_close(reloaded.selected_direction(), module.selected_direction())
    assert not reloaded.backbone.loaded and reloaded.backbone_spec.name_or_path == "tiny"


def test_bad_settings():
    with pytest.raises(UserError, match="n_random"):
        ReasoningDirectionModule(n_random=1)
    with pytest.raises(UserError, match="unknown selection metric"):
        ReasoningDirectionModule(selection_metric="accuracy")
    with pytest.raises(UserError, match="unknown null 'gaussian'"):
        ReasoningDirectionModule(null_kind="gaussian")
    with pytest.raises(UserError, match="n_report_prompts"):
        ReasoningDirectionModule(n_report_prompts=0)


def test_needs_all_positions(dm, tmp_path):
    dm.batch_position = -1
    try:
        with pytest.raises(UserError, match="batch_position: null"):
            _trainer(limit_val_batches=0, default_root_dir=str(tmp_path)).fit(ReasoningDirectionModule(), datamodule=dm)
    finally:
        dm.batch_position = None


# ---- configs through train.py -----------------------------------------------------------------------------------
# (every config parsed as written, and one fast_dev_run of this module: tests/test_configs.py)
def test_one_epoch_writes_the_directions_file(tmp_path, monkeypatch, shared_cache_dir):
    monkeypatch.chdir(tmp_path)
    config = tiny_config("directions_tiny.yaml", tmp_path, limit=5, cache_dir=str(shared_cache_dir))
    train.main(["--config", str(config), "--run_name", "run", "--model.init_args.candidate_layers", "[2, 10, 27]",
                "--model.init_args.n_selection_prompts", "2", "--model.init_args.kl_threshold", "100"])
    log_dir = tmp_path / "logs" / "run"
    directions, meta = load_directions(log_dir / "reasoning_directions.safetensors")
    assert directions.shape == (7, 32, 64) and meta["layers"] == list(range(32))
    assert {row["layer"] for row in meta["selection_table"]} == {2, 10, 27}
    checkpoint = torch.load(tmp_path / "checkpoints" / "run" / "best.ckpt", map_location="cpu", weights_only=False)
    assert (tmp_path / "checkpoints" / "run" / "last.ckpt").is_file() and checkpoint["global_step"] >= 1
    assert set(checkpoint["state_dict"]) == {"directions"}
    assert torch.equal(checkpoint["state_dict"]["directions"], directions)
    assert checkpoint["direction_selection"]["selected"] == meta["selected"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"val/ablation_score/L02", "val/kl/L27", "val/selected_ablation_score", "val/selected_layer"} <= tags
    assert meta["selected"] is not None  # kl_threshold 100: only the induction filter (and layer 27) discard
    expected = next(r for r in meta["selection_table"] if r["selected"])["ablation_score"]
    assert events.Scalars("val/selected_ablation_score")[-1].value == pytest.approx(expected, rel=1e-6)
    assert all("layer 27 >= 25.6" in r["filtered"] for r in meta["selection_table"] if r["layer"] == 27)

    # The same config and seed again: the same directions, scores, nulls and selection, bit for bit.
    train.main(["--config", str(config), "--run_name", "again", "--model.init_args.candidate_layers", "[2, 10, 27]",
                "--model.init_args.n_selection_prompts", "2", "--model.init_args.kl_threshold", "100"])
    again, first = tmp_path / "logs" / "again" / "reasoning_directions", log_dir / "reasoning_directions"
    assert again.with_suffix(".json").read_bytes() == first.with_suffix(".json").read_bytes()
    tensors = [safetensors.torch.load_file(path.with_suffix(".safetensors")) for path in (first, again)]
    assert tensors[0].keys() == tensors[1].keys() and all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])


@pytest.mark.slow
def test_ddp_run_equals_the_single_process_run(tmp_path, shared_cache_dir):
    """One train.py run on 2 CPU ranks (strategy ddp, a subprocess) checks both DDP paths.
    Extraction: each rank writes the shards of its own rows (predict's sampler gives rank r every other row of the
    longest-first order) and the cache equals a single-process extraction with the same key.
    Fit: the all-reduced class means equal compute_contrastive_directions over every train row, each counted once
    (12 train rows: no DistributedSampler padding)."""
    config = tiny_config("directions_tiny.yaml", tmp_path, limit=5, layers=[2, 10])
    args = ["--config", str(config), "--run_name", "ddp", "--trainer.devices", "2", "--trainer.strategy", "ddp",
            "--data.init_args.prompts.init_args.batch_size", "4", "--model.init_args.n_selection_prompts", "1",
            "--model.init_args.n_random", "0", "--model.init_args.candidate_layers", "[2]"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=env, check=True, timeout=600)
    directions, meta = load_directions(tmp_path / "logs" / "ddp")
    from cli import datamodule_from_run_config

    checkpoint = torch.load(tmp_path / "checkpoints" / "ddp" / "last.ckpt", map_location="cpu", weights_only=False)
    datamodule = datamodule_from_run_config(checkpoint["run_config"])
    assert datamodule.cache.directory.parent == tmp_path / "cache" and datamodule.cache.complete

    # extraction: 20 rows, 10 per rank in batches of 4 -> each rank wrote shards of 4, 4 and 2 of its own rows
    prompts = datamodule.prompts
    order = sorted(range(len(prompts.rows)), key=lambda i: (-prompts.prompt_lengths[i], i))
    rank_rows = [set(order[0::2]), set(order[1::2])]
    shard_rows = [set(shard["row_index"].tolist()) for shard in datamodule.cache.iter_shards()]
    assert sorted(len(rows) for rows in shard_rows) == [2, 2, 4, 4, 4, 4]
    for rank in rank_rows:
        assert set().union(*(rows for rows in shard_rows if rows <= rank)) == rank
    single = datamodule_from_run_config(checkpoint["run_config"])
    single.cache_dir = shared_cache_dir
    extract_activations(_trainer(), single)
    assert single.cache.directory.name == datamodule.cache.directory.name and len(single.cache.shards()) == 5
    meta_single, acts_single = cache_contents(single.cache)
    meta_ddp, acts_ddp = cache_contents(datamodule.cache)
    assert meta_single.keys() == meta_ddp.keys() and all(torch.equal(meta_single[k], meta_ddp[k]) for k in meta_ddp)
    torch.testing.assert_close(acts_ddp, acts_single, atol=1e-5, rtol=1e-5)

    # fit
    datamodule.setup()
    x, y = _split(datamodule, "train")
    assert len(y) == 12 and meta["n_train"] == {"reasoning": 6, "control": 6}
    reference = compute_contrastive_directions(x[y == 1].double(), x[y == 0].double())
    torch.testing.assert_close(directions, reference, rtol=1e-6, atol=1e-7)
