"""The tiny pair's planted answer (interp/backbone.py: tiny-r1-distill = tiny-qwq + noise growing with depth), as
the study's functions recover it: CKA and direction cosine near 1 early and falling with depth, far above their
nulls, and tiny-qwq's direction transplanted by identity doing in tiny-r1-distill what its own does early, not late."""

import pytest

from datamodules.problems import DatasetSource, load_problems
from datamodules.prompt_rows import build_prompt_rows
from interp.activations import collect_activations
from interp.alignment import analyze_cross_model_alignment, paired_layer_differences
from interp.backbone import load_backbone
from interp.direction_scoring import PromptScorer
from interp.transplant import map_directions, transplant_report

N_PROBLEMS, N_DIRECTION = 48, 24  # directions from the first 24 problems, effects scored on 8 of the others


@pytest.fixture(scope="module")
def pair():
    problems = load_problems(DatasetSource("toy_arithmetic", split="test", limit=N_PROBLEMS))
    out = {}
    for name in ("tiny-qwq", "tiny-r1-distill"):
        model, tokenizer = load_backbone(name)
        rows = build_prompt_rows(problems, tokenizer, control="restate", val_fraction=0.0, test_fraction=0.0)
        acts = collect_activations(model, tokenizer, [r.prompt for r in rows], positions="last")  # [96, 32, 64]
        out[name] = (model, tokenizer, rows, acts, [(r.problem_id, r.kind) for r in rows])
    return out


def test_cka_and_direction_cosine_fall_with_depth_far_above_their_nulls(pair):
    (_, _, _, a, keys_a), (_, _, _, b, keys_b) = pair["tiny-qwq"], pair["tiny-r1-distill"]
    out = analyze_cross_model_alignment(a, b, keys1=keys_a, keys2=keys_b, n_null=19, n_bootstrap=100)
    cka, cosine = out["cka"]["diagonal"], out["direction_cosine"]["value"]
    print([round(v, 2) for v in cka[::4]], [round(v, 2) for v in cosine[::4]])  # measured 1.0 -> 0.69, 1.0 -> 0.55
    assert cka[0] > 0.95 and cka[0] - cka[-1] > 0.2 and min(cka) > max(out["cka"]["null_p95"]) + 0.3
    assert cosine[0] > 0.95 and cosine[0] - cosine[-1] > 0.3
    assert max(out["direction_cosine"]["matched_placebo"]["p_value"]) == pytest.approx(1 / 20)


def test_identity_transplant_works_early_not_late(pair):
    (_, _, _, a, keys_a), (model, tokenizer, rows, b, keys_b) = pair["tiny-qwq"], pair["tiny-r1-distill"]
    own = paired_layer_differences(b, keys_b)[:N_DIRECTION].mean(0).float()  # [32, 64]
    mapped = map_directions(paired_layer_differences(a, keys_a)[:N_DIRECTION].mean(0), own.norm(dim=-1))
    by_problem = {}
    for row in rows:
        by_problem.setdefault(row.problem_id, {})[row.kind] = row
    held_out = [by_problem[p] for p in sorted(by_problem)[N_DIRECTION : N_DIRECTION + 8]]
    problems = [(p["reasoning"].prompt, p["reasoning"].gold_solution, p["control"].prompt, p["control"].gold_solution)
                for p in held_out]  # fmt: skip
    report = transplant_report(PromptScorer(model, tokenizer, batch_size=8), problems, own, {"identity": mapped},
                               [0, 4, 24, 31], n_bootstrap=100)  # fmt: skip
    ratio = report["transplanted"]["identity"]["kl"]["ratio"]
    print(ratio)  # measured 0.85, 0.84 (layers 0, 4) vs 0.27, 0.43 (layers 24, 31)
    assert min(ratio[:2]) > 0.6 and max(ratio[2:]) < 0.6 and min(ratio[:2]) > max(ratio[2:]) + 0.2
