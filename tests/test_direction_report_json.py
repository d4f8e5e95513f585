"""ReasoningDirectionModule.run_selection + save_directions_file with a synthetic scorer and a fake datamodule (no
backbone): the numbers of problems actually used, the paired null read from one train slice with problem ids,
and standard JSON when a number is undefined.

Independent references: the problem sets the split actually produced; `null_directions` on the fake train slice;
a strict JSON parser that rejects NaN / Infinity.
"""

import json
import types

import pytest
import torch

import lightning_modules.directions as directions_module
from interp.null_directions import null_directions

D, N_LAYERS, N_POS, N_TRAIN_PAIRS = 8, 10, 2, 16


def _strict(text: str) -> dict:
    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=reject)


class _FlatScorer:
    """Scores every direction 0.1 on every prompt except the first direction of a call (r): a zero-spread null."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, directions, layers, problems):
        out = []
        for i in range(len(directions)):
            values = torch.full((len(problems),), 0.1 + (1e-3 if i == 0 else 0.0), dtype=torch.float64)
            out.append({"ablation_score": float(values.mean()), "induction_score": float(values.mean()),
                        "kl": 0.0, "ablation_per_prompt": values, "induction_per_prompt": values,
                        "kl_per_prompt": torch.zeros(len(problems), dtype=torch.float64)})  # fmt: skip
        return out


def _fake_datamodule(n_val: int):
    rows, row_index = [], {"train": [], "val": []}
    for p in range(n_val + N_TRAIN_PAIRS):
        split = "val" if p < n_val else "train"
        for kind in ("reasoning", "control"):
            rows.append(types.SimpleNamespace(pair_index=p, kind=kind, prompt=f"{kind}-{p}", gold_solution=f"s{p}",
                                              row_index=len(rows), split=split))  # fmt: skip
            row_index[split].append(rows[-1].row_index)
    train = [rows[i] for i in row_index["train"]]
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(len(train), N_POS, N_LAYERS, D, generator=g)  # [rows, n_pos, n_layers, d]
    labels = torch.tensor([int(row.kind == "reasoning") for row in train])
    problems = torch.tensor([row.pair_index for row in train])
    reads = []

    class DM:
        prompts = types.SimpleNamespace(rows=rows, setup=lambda stage=None: None)

        def __init__(self):
            self.row_index = {k: torch.tensor(v) for k, v in row_index.items()}

        def split_slice_problems(self, split, position, slot):
            reads.append((split, position, slot))
            return acts[:, position, slot], labels, problems

    return DM(), acts, labels, problems, reads


@pytest.mark.parametrize("n_val", [5, 8])
def test_json_records_the_problems_used_the_paired_null_and_only_standard_numbers(n_val, tmp_path, monkeypatch):
    monkeypatch.setattr(directions_module, "PromptScorer", _FlatScorer)
    dm, acts, labels, problems, reads = _fake_datamodule(n_val)
    module = directions_module.ReasoningDirectionModule(n_selection_prompts=4, n_report_prompts=4, n_random=4,
                                                        kl_threshold=10.0, seed=0)  # fmt: skip
    module.layers, module.n_model_layers, module.position_labels = list(range(N_LAYERS)), N_LAYERS, ["a", "b"]
    module.positions = "last"
    module.attach_backbone(torch.nn.Identity())  # the fake scorers never run it
    module.directions = (acts[labels == 1].mean(0) - acts[labels == 0].mean(0)).float()
    module.n_train = {"reasoning": N_TRAIN_PAIRS, "control": N_TRAIN_PAIRS}
    selected = module.run_selection(dm)
    assert selected is not None and reads == [("train", selected["position"], selected["slot"])]
    expected = null_directions("placebo", module.selected_direction(), 4, 0, acts=acts[:, selected["position"],
                               selected["slot"]], labels=labels, problems=problems)  # fmt: skip
    torch.testing.assert_close(module.null_directions, expected, rtol=0, atol=0)

    module.save_directions_file(tmp_path)
    meta = _strict((tmp_path / "reasoning_directions.json").read_text())
    stats = meta["selection"]
    used = {name: len(stats["problems"][name]["pair_indices"]) for name in ("selection", "report")}
    assert (stats["n_selection_prompts"], stats["n_report_prompts"]) == (4, 4)
    assert (stats["n_selection_used"], stats["n_report_used"]) == (used["selection"], used["report"])
    assert (used["selection"], used["report"]) == ((3, 2) if n_val == 5 else (4, 4))
    # every null scores 0.1, r 0.101: a zero-spread null, so z and p_t are undefined (JSON null) with a reason
    report = stats["report"]
    assert report["zscores"]["ablation_score"] is None and report["pvalues"]["ablation_score"]["t"] is None
    assert "zero-spread null" in report["pvalues"]["ablation_score"]["reason"]
    assert report["pvalues"]["ablation_score"]["rank"] == pytest.approx(1 / 5)
    assert "m = 4" in stats["pvalue_definitions"]["rank"] and "0.2" in stats["pvalue_definitions"]["rank"]
    assert "sign-flip" in stats["null_definition"]


class _RecordingScorer(_FlatScorer):
    """Like _FlatScorer, but keeps every call's (directions, layers, problems)."""

    calls: list = []

    def __call__(self, directions, layers, problems):
        _RecordingScorer.calls.append((directions.clone(), list(layers), list(problems)))
        return super().__call__(directions, layers, problems)


def test_searched_null_candidates_are_shared_sign_flips_at_every_searched_site(tmp_path, monkeypatch):
    """n_searched_null = 3: three more selection sweeps over placebo candidates; each draw's candidate at a site is
    the sign-flip of that site's paired train differences with ONE sign vector per draw, scaled to |r| there."""
    from interp.null_directions import balanced_signs, paired_differences

    _RecordingScorer.calls = []
    monkeypatch.setattr(directions_module, "PromptScorer", _RecordingScorer)
    dm, acts, labels, problems, reads = _fake_datamodule(8)
    module = directions_module.ReasoningDirectionModule(n_selection_prompts=4, n_report_prompts=4, n_random=0,
                                                        kl_threshold=10.0, seed=0, n_searched_null=3)  # fmt: skip
    module.layers, module.n_model_layers, module.position_labels = list(range(N_LAYERS)), N_LAYERS, ["a", "b"]
    module.positions = "last"
    module.attach_backbone(torch.nn.Identity())  # the fake scorers never run it
    module.directions = (acts[labels == 1].mean(0) - acts[labels == 0].mean(0)).float()
    module.n_train = {"reasoning": N_TRAIN_PAIRS, "control": N_TRAIN_PAIRS}
    module.run_selection(dm)
    layers = module.default_candidate_layers()
    # calls: selection (real), report (real), 3 selection sweeps (nulls), report (null winners)
    assert len(_RecordingScorer.calls) == 6
    selection_problems = _RecordingScorer.calls[0][2]
    signs = balanced_signs(N_TRAIN_PAIRS, 3, 1)  # the module's seed + 1
    for j in range(3):
        directions, called_layers, called_problems = _RecordingScorer.calls[2 + j]
        assert called_problems == selection_problems and called_layers == [layer for _ in range(N_POS) for layer in
                                                                            layers]  # fmt: skip
        k = 0
        for position in range(N_POS):
            for layer in layers:
                diffs = paired_differences(acts[:, position, layer], labels, problems)
                null = signs[j] @ diffs / N_TRAIN_PAIRS
                r_norm = module.directions[position, layer].double().norm()
                expected = (null / null.norm() * r_norm).float()
                torch.testing.assert_close(directions[k], expected, rtol=4 * 2.0**-24 * 8, atol=0)
                k += 1
    module.save_directions_file(tmp_path)
    stats = _strict((tmp_path / "reasoning_directions.json").read_text())["selection"]
    assert stats["n_searched_null"] == 3 and "max-statistic" in stats["searched_null_definition"]
    assert len(stats["report"]["searched_null"]) == 3
    with pytest.raises(Exception, match="n_searched_null"):
        directions_module.ReasoningDirectionModule(n_searched_null=1)
