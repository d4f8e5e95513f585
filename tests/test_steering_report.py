"""The steering report (lightning_modules/steering_report.py): train.py then evaluate.py on the tiny backbone,
every number recomputed here without the report code: gold NLL with the plain backbone and with the vectors added
by InterventionHandler, the generations under steering, the placebo null vectors from HF output_hidden_states,
the cosine to a directions file; the LoRA baseline's sweep; bad input."""

import json

import pytest
import torch

from datamodules.completions import CompletionDataModule
from datamodules.problems import DatasetSource
from datamodules.prompts import ReasoningPromptsDataModule
from interp.backbone import BackboneSpec
from interp.errors import UserError
from interp.generation import generate
from interp.grading import grade_answer
from interp.interventions import InterventionHandler
from interp.metrics import gold_solution_nll
from interp.null_directions import balanced_signs
from interp.prompts import tokenize_prompts
from lightning_modules.steering import SteeringVectorModule
from lightning_modules.steering_report import placebo_vectors

LAYERS = [8, 16]  # configs/steering_tiny.yaml's


def _rows(limit: int = 5):
    data = CompletionDataModule(ReasoningPromptsDataModule(sources=[DatasetSource("gsm8k", limit=limit),
                                DatasetSource("math", limit=limit)]), BackboneSpec("tiny"))  # fmt: skip
    data.setup()
    return data.prompts.rows


def _train(tmp_path, monkeypatch, config: str = "steering_tiny.yaml", run: str = "steer"):
    from pipeline_utils import tiny_config

    import train

    monkeypatch.chdir(tmp_path)
    train.main(["--config", str(tiny_config(config, tmp_path, limit=5)), "--run_name", run,
                "--trainer.max_epochs", "2"])  # fmt: skip
    return tmp_path / "checkpoints" / run / "best.ckpt"


def _directions_file(path, weights: str, directions: torch.Tensor):
    from interp.directions import save_directions

    save_directions(path, directions, {"backbone": {"name_or_path": "tiny", "weights": weights}, "d_model": 64,
                                       "layers": LAYERS, "selected": {"position": 1, "layer": 8}})  # fmt: skip
    return path


def test_placebo_vectors_are_sign_flipped_hidden_state_differences(tiny):
    """Each null vector set k at layer l = sum_i s_ki (x_l(reasoning_i) - x_l(control_i)) / n_pairs over the train
    problems (x from HF output_hidden_states at the last token, one prompt at a time), rescaled to |like_l|."""
    model, tokenizer = tiny
    rows = [row for row in _rows() if row.split == "train"]
    like = torch.randn(2, 64, generator=torch.Generator().manual_seed(1)) * torch.tensor([[0.5], [3.0]])
    nulls = placebo_vectors(model, tokenizer, rows, LAYERS, like, n=3, seed=7, batch_size=3)
    assert nulls.shape == (3, 2, 64)
    pairs = sorted({row.pair_index for row in rows})
    by_key = {(row.pair_index, row.kind): row.prompt for row in rows}

    def hidden(prompt):  # [n_layers + 1, d_model] at the last token
        with torch.no_grad():
            out = model(**tokenize_prompts(tokenizer, [prompt]), output_hidden_states=True)
        return torch.stack([h[0, -1] for h in out.hidden_states]).to(torch.float64)

    diffs = torch.stack([hidden(by_key[p, "reasoning"]) - hidden(by_key[p, "control"]) for p in pairs])
    signs = balanced_signs(len(pairs), 3, 7)  # [3, n_pairs]
    scale = max(hidden(row.prompt).abs().max() for row in rows[:4])
    for i, layer in enumerate(LAYERS):
        raw = signs @ diffs[:, layer + 1] / len(pairs)  # [3, d_model]; hidden_states[l + 1] = resid_post of l
        expected = raw / raw.norm(dim=-1, keepdim=True) * like[i].norm()
        # x errs by 1e-5 * scale per coordinate (test_activations), so raw by 2e-5 * scale (a signed mean of
        # differences) and the rescaled vector by 2 * |raw error| / |raw| * |like|
        tol = 4e-5 * float(scale) * 64**0.5 / float(raw.norm(dim=-1).min()) * float(like[i].norm())
        torch.testing.assert_close(nulls[:, i].to(torch.float64), expected, rtol=0, atol=tol)
        torch.testing.assert_close(nulls[:, i].norm(dim=-1), like[i].norm().expand(3), rtol=1e-6, atol=0)


def test_evaluate_measures_the_sweep_against_nulls_and_directions(tmp_path, monkeypatch, tiny):
    """evaluate.py on a 2-epoch steering run: the gold NLL at strength 0 is the plain backbone's and at 1 the
    vectors added by InterventionHandler; the generations under steering are generate()'s under the same handler,
    graded by grade_answer; each null condition adds placebo_vectors' set k; the cosine to a directions file is
    the plain cosine; vs_null compares steered@1 with the nulls prompt by prompt."""
    import evaluate

    ckpt = _train(tmp_path, monkeypatch)
    module = SteeringVectorModule.load_from_checkpoint(ckpt)
    vectors = module.vectors.detach()
    reference = torch.randn(2, 2, 64, generator=torch.Generator().manual_seed(3))  # [n_pos, n_layers, d_model]
    directions = _directions_file(tmp_path / "d.safetensors", BackboneSpec("tiny").fingerprint()["weights"], reference)
    evaluate.main(["--ckpt", str(ckpt), "--strengths", "1", "-1", "--max_new_tokens", "6", "--greedy",
                   "--n_random", "2", "--directions", str(directions)])  # fmt: skip
    out = tmp_path / "logs" / "steer"
    report = json.loads((out / "steering_results.json").read_text())
    assert (out / "visualizations" / "steering_sweep.png").is_file()
    assert report["strengths"] == [-1.0, 0.0, 1.0] and report["trainable_parameters"] == 2 * 64
    by_name = {c["name"]: c for c in report["conditions"]}
    assert list(by_name) == ["baseline", "steered@-1", "steered@1", "null0_steered@1", "null1_steered@1"]

    model, tokenizer = tiny
    rows = _rows()
    test = sorted((r for r in rows if r.split == "test" and r.kind == "reasoning"), key=lambda r: r.pair_index)
    assert report["reasoning_rows"] == [r.row_index for r in test]
    prompts, solutions = [r.prompt for r in test], [r.gold_solution for r in test]
    train = [r for r in rows if r.split == "train"]
    nulls = placebo_vectors(model, tokenizer, train, LAYERS, vectors, 2, 0)

    def per_layer(v):  # [2, d] at LAYERS -> [32, d]
        full = torch.zeros(32, 64)
        full[LAYERS] = v
        return full

    assert report["max_solution_tokens"] == 64  # the config's max_completion_tokens: what was trained on
    nll = lambda: gold_solution_nll(model, tokenizer, prompts, solutions, 8, 64).tolist()  # noqa: E731
    assert by_name["baseline"]["gold_nll"]["per_prompt"] == nll()
    for name, added in (("steered@1", vectors), ("steered@-1", -vectors), ("null0_steered@1", nulls[0]),
                        ("null1_steered@1", nulls[1])):  # fmt: skip
        with InterventionHandler(model, per_layer(added), 1.0, layers=LAYERS):
            assert by_name[name]["gold_nll"]["per_prompt"] == nll()
            texts = generate(model, tokenizer, prompts, max_new_tokens=6, do_sample=False, seed=0)
        assert [s["generation"] for s in by_name[name]["samples"]] == texts[:4]
        assert by_name[name]["correct"] == [grade_answer(t, r.gold_answer, r.dataset) for t, r in zip(texts, test)]
    assert by_name["baseline"]["control_kl"]["mean"] == 0.0 and by_name["steered@1"]["control_kl"]["mean"] > 0

    cosine = report["cosine_to_directions"]
    assert cosine["position"] == 1 and cosine["layers"] == LAYERS
    v, r = vectors.to(torch.float64), reference[1].to(torch.float64)
    expected = (v * r).sum(-1) / (v.norm(dim=-1) * r.norm(dim=-1))
    torch.testing.assert_close(torch.tensor(cosine["cosine"], dtype=torch.float64), expected, rtol=1e-12, atol=1e-12)
    null_expected = [[float((n[i].double() @ r[i]) / (n[i].double().norm() * r[i].norm())) for n in nulls]
                     for i in range(2)]  # fmt: skip
    torch.testing.assert_close(torch.tensor(cosine["null_cosine"]), torch.tensor(null_expected), rtol=1e-6, atol=1e-6)

    nll = report["vs_null"]["steered_gold_nll"]
    steered = torch.tensor(by_name["steered@1"]["gold_nll"]["per_prompt"], dtype=torch.float64)
    null = torch.tensor([by_name[f"null{k}_steered@1"]["gold_nll"]["per_prompt"] for k in range(2)], dtype=torch.float64)
    assert nll["condition"] == "steered@1" and nll["metric"] == "gold_nll"
    assert nll["difference"] == pytest.approx(float((steered - null.mean(0)).mean()), rel=1e-12)
    assert nll["null_values"] == pytest.approx(null.mean(1).tolist(), rel=1e-12)
    assert report["vs_null"]["steered"]["metric"] == "accuracy" and report["not_measured"] == []
    from lightning_modules.steering_report import plot_steering

    figure = plot_steering(report)  # the sweep is drawn in strength order, the baseline at 0
    assert list(figure.axes[0].lines[0].get_xdata()) == [-1.0, 0.0, 1.0] and len(figure.axes) == 3

    # the config's SteeringSweepCallback, after the last epoch: the first 4 val problems, the final vectors
    sweep = json.loads((out / "steering_sweep.json").read_text())
    val = sorted((r for r in rows if r.split == "val" and r.kind == "reasoning"), key=lambda r: r.pair_index)[:4]
    assert sweep["epochs_completed"] == 2 and sweep["pair_indices"] == [r.pair_index for r in val]
    assert sweep["max_solution_tokens"] == 64  # the trained length, as in the report
    final = SteeringVectorModule.load_from_checkpoint(ckpt.parent / "last.ckpt").vectors.detach()
    by_strength = {c["strength"]: c for c in sweep["conditions"]}
    assert sorted(by_strength) == [-1.0, 0.0, 0.5, 1.0, 2.0]
    for s in by_strength:
        with InterventionHandler(model, per_layer(final), s, layers=LAYERS):
            nll = gold_solution_nll(model, tokenizer, [r.prompt for r in val], [r.gold_solution for r in val], 8, 64)
        assert by_strength[s]["gold_nll"]["per_prompt"] == nll.tolist()  # the same float ops: s * v, x + s v
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out)).Reload()
    assert {"sweep/gold_nll@1", "sweep/control_kl@-1"} <= set(events.Tags()["scalars"])
    assert "sweep/gold_nll_vs_strength" in events.Tags()["images"]


def test_lora_sweep_has_no_nulls_and_refuses_directions(tmp_path, monkeypatch):
    """The LoRA baseline goes through the same sweep (strength 0 = the plain backbone); it has no vectors, so no
    null vectors and no cosine, said in not_measured; --directions is one clear error."""
    import evaluate

    ckpt = _train(tmp_path, monkeypatch, "steering_lora_tiny.yaml", "lora")
    args = ["--ckpt", str(ckpt), "--strengths", "1", "--max_new_tokens", "4", "--greedy", "--n_prompts", "2"]
    with pytest.raises(UserError, match="LoraSteeringModule has none"):
        evaluate.main([*args, "--directions", str(tmp_path / "d.safetensors")])
    evaluate.main(args)
    report = json.loads((tmp_path / "logs" / "lora" / "steering_results.json").read_text())
    assert [c["name"] for c in report["conditions"]] == ["baseline", "steered@1"]
    assert report["n_null"] == 0 and report["vs_null"] == {} and report["cosine_to_directions"] is None
    assert len(report["not_measured"]) == 2 and report["n_problems"] == 2


def test_directions_from_another_backbone_are_refused_before_generating(tmp_path, monkeypatch):
    import evaluate

    ckpt = _train(tmp_path, monkeypatch)
    other = _directions_file(tmp_path / "d.safetensors", "other-weights", torch.ones(2, 2, 64))
    with pytest.raises(UserError, match="--directions .* come from backbone"):
        evaluate.main(["--ckpt", str(ckpt), "--directions", str(other)])
    assert not (tmp_path / "logs" / "steer" / "steering_results.json").exists()
