"""Lining two models up on the same prompts: CKA and reasoning-direction cosine, each read against chance.

`analyze_cross_model_alignment(model1_activations, model2_activations, ..., keys1=, keys2=)` takes the residual
streams of both models at one position per prompt, [n, L, d1] and [n, L, d2] (e.g. `collect_activations` at
"last", or a "post_instruction" axis indexed by `interp.prompts.role_positions`: the two chat templates put
different tokens after the user's text, so positions are matched by role, never by offset). Rows are matched
by key: keys1 / keys2 give each row's (problem_id, kind) with kind "reasoning" | "control"; they must be equal,
in the same order, each problem with one row of each kind, or UserError.

RESULT (JSON-able; L = layers, m = n_null, B = n_bootstrap; lists are per layer):
    "cka"  linear CKA of acts1[:, l] and acts2[:, l] over all n rows (`interp.similarity`):
        "diagonal" [L], "ci" [L][2] (percentile bootstrap over rows, `bootstrap_cka_diagonal`),
        "null_mean" / "null_p95" / "p_value" [L] (`cka_permutation_null`: rows of model 2 shuffled, m draws),
        "matrix" [L][L] (`cka_matrix`: row i = model 1 layer i, column j = model 2 layer j)
    "direction_cosine"  cos(r1[l], r2[l]) of the two reasoning directions; r = mean over problems of the paired
        difference d_i = x(reasoning_i) - x(control_i) (`interp.null_directions.paired_differences`), unless
        directions are given; needs d1 == d2 (the identity basis: both models are fine-tunes of one base):
        "value" [L];
        "ci" [L][2]: percentile bootstrap over problems (the same problems drawn for both models, both r
            recomputed); null when the directions were given (nothing to resample);
        "matched_placebo" {"mean", "p95", "p_value"} [L]: m balanced sign-flip placebos (sum_i s_i d_i / n,
            half the s_i +1, half -1: the class difference cancels) with the SAME signs in both models. How alike
            the models make an arbitrary contrast of these prompts: a value above it says the reasoning
            direction agrees more than the shared basis alone explains;
        "independent_placebo" {...}: the same with independent signs per model: chance agreement of two
            unrelated contrast directions;
        p_value = (1 + #{null >= value - 1e-9}) / (m + 1), one-sided (ties within rounding count), never below
            1 / (m + 1).
    plus "n_rows", "n_problems", "n_layers", "debiased", "n_null", "n_bootstrap", "seed", "directions" ("computed
    from the activations" | "given").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from interp.errors import UserError
from interp.null_directions import balanced_signs, paired_differences
from interp.similarity import bootstrap_cka_diagonal, cka_matrix, cka_permutation_null

KINDS = ("reasoning", "control")
_TIE = 1e-9  # cosines are float64 sums of d-term products: rounding error ~1e-15, far below this


def check_matched_rows(keys1: Sequence[tuple], keys2: Sequence[tuple]) -> None:
    """UserError unless both models' rows are the same (problem_id, kind) keys in the same order, kinds in KINDS."""
    keys1, keys2 = [tuple(k) for k in keys1], [tuple(k) for k in keys2]
    if len(keys1) != len(keys2):
        raise UserError(f"the two models' activations cover {len(keys1)} and {len(keys2)} prompts; build both from "
                        "the same problems")  # fmt: skip
    for i, (a, b) in enumerate(zip(keys1, keys2)):
        if a != b:
            raise UserError(f"row {i} is {a} for model 1 but {b} for model 2: rows must be matched by problem id and "
                            "kind, in the same order")  # fmt: skip
    bad = sorted({kind for _, kind in keys1} - set(KINDS))
    if bad:
        raise UserError(f"unknown prompt kinds {bad}; expected {' / '.join(KINDS)}")


def _pairs(acts: torch.Tensor, keys: Sequence[tuple]) -> torch.Tensor:
    """Paired differences of acts [n, L, d]: float64 [n_problems, L, d], problems in ascending id order."""
    ids = {pid: k for k, pid in enumerate(sorted({pid for pid, _ in keys}))}
    problems = torch.tensor([ids[pid] for pid, _ in keys])
    labels = torch.tensor([kind == "reasoning" for _, kind in keys]).long()
    flat = paired_differences(acts.reshape(len(acts), -1), labels, problems)  # [n_problems, L * d]
    if len(flat) != len(ids):
        raise UserError(f"{len(ids) - len(flat)} problems lack a reasoning or a control row")
    return flat.reshape(len(flat), *acts.shape[1:])


def _cosines(w1: torch.Tensor, w2: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
    """cos(w1[k] @ d1[:, l], w2[k] @ d2[:, l]) for weights w [K, n] and differences d [n, L, d]: [K, L]."""
    r1, r2 = torch.einsum("kn,nld->kld", w1, d1), torch.einsum("kn,nld->kld", w2, d2)
    return (r1 * r2).sum(-1) / (r1.norm(dim=-1) * r2.norm(dim=-1))


def _null(draws: torch.Tensor, value: torch.Tensor) -> dict[str, list[float]]:
    """draws [m, L] against value [L]: mean, 95th percentile, one-sided rank p-value. A draw within rounding of
    the value counts as a tie (at least as extreme): conservative, and exact ties are real (one model twice)."""
    at_least = draws >= value - _TIE
    return {"mean": draws.mean(0).tolist(), "p95": draws.quantile(0.95, dim=0).tolist(),
            "p_value": ((1 + at_least.sum(0)).double() / (len(draws) + 1)).tolist()}  # fmt: skip


def _direction_cosine(d1, d2, model1_directions, model2_directions, n_null: int, n_bootstrap: int, seed: int) -> dict:
    n = d1.shape[0]
    generator = torch.Generator().manual_seed(seed)
    mean = torch.full((1, n), 1.0 / n, dtype=torch.float64)  # weights giving r = mean_i d_i
    signs = balanced_signs(n, 2 * n_null, generator) / n  # [2m, n]: matched = first m in both, independent = m..2m
    placebo = _cosines(  # [2m, L]
        torch.cat([signs[:n_null], signs[:n_null]]), torch.cat([signs[:n_null], signs[n_null:]]), d1, d2)
    given = model1_directions is not None
    if given:
        r1, r2 = (torch.as_tensor(r).to(torch.float64) for r in (model1_directions, model2_directions))
        if r1.shape != d1.shape[1:] or r2.shape != d2.shape[1:]:
            raise UserError(f"directions must be [n_layers, d_model] like the activations' {tuple(d1.shape[1:])}, got "
                            f"{tuple(r1.shape)} and {tuple(r2.shape)}")  # fmt: skip
        value = (r1 * r2).sum(-1) / (r1.norm(dim=-1) * r2.norm(dim=-1))  # [L]
        ci = None
    else:
        value = _cosines(mean, mean, d1, d2)[0]
        rows = torch.randint(n, (n_bootstrap, n), generator=generator)
        counts = torch.zeros(n_bootstrap, n, dtype=torch.float64).scatter_add_(1, rows, torch.ones_like(rows).double())
        draws = torch.cat([_cosines(c / n, c / n, d1, d2) for c in counts.split(100)])  # [B, L]
        tails = torch.tensor([0.025, 0.975], dtype=torch.float64)
        ci = draws.quantile(tails, dim=0).T.tolist()
    if not bool(torch.isfinite(value).all()):
        raise UserError("a reasoning direction has zero norm at some layer: its cosine is undefined")
    return {"value": value.tolist(), "ci": ci,
            "matched_placebo": _null(placebo[:n_null], value), "independent_placebo": _null(placebo[n_null:], value)}


def analyze_cross_model_alignment(
    model1_activations: torch.Tensor,
    model2_activations: torch.Tensor,
    model1_directions: torch.Tensor | None = None,
    model2_directions: torch.Tensor | None = None,
    *,
    keys1: Sequence[tuple],
    keys2: Sequence[tuple],
    n_null: int = 99,
    n_bootstrap: int = 1000,
    seed: int = 0,
    debiased: bool = False,
) -> dict:
    """CKA and direction cosine of two models, layer by layer, each with a CI and a null (module docstring).

    Args:
        model1_activations, model2_activations: [n, L, d1] and [n, L, d2] at `blocks.{l}.resid_post`, one position
            per prompt (matched by role across the two templates).
        model1_directions, model2_directions: [L, d] reasoning directions to compare (both or neither); default:
            the mean paired difference of the activations' own rows.
        keys1, keys2: (problem_id, kind) per row of each model; must be equal (`check_matched_rows`).
        n_null: permutation draws of the CKA null and sign-flip draws of each placebo null (>= 1).
        debiased: the unbiased HSIC estimator for the CKA diagonal, matrix and null (the bootstrap CI stays biased:
            `bootstrap_cka_diagonal` says why).
    """
    check_matched_rows(keys1, keys2)
    x = torch.as_tensor(model1_activations).detach().cpu().to(torch.float64)
    y = torch.as_tensor(model2_activations).detach().cpu().to(torch.float64)
    if x.ndim != 3 or y.ndim != 3 or len(x) != len(keys1) or len(y) != len(keys1):
        raise UserError(f"activations must be [n_prompts, n_layers, d_model] with one row per key ({len(keys1)}), "
                        f"got {tuple(x.shape)} and {tuple(y.shape)}")  # fmt: skip
    if x.shape[1] != y.shape[1]:
        raise UserError(f"the two models' activations cover {x.shape[1]} and {y.shape[1]} layers; a per-layer "
                        "alignment needs the same layers (interp.cka_matrix compares all pairs)")  # fmt: skip
    if x.shape[2] != y.shape[2]:
        raise UserError(f"d_model differs ({x.shape[2]} vs {y.shape[2]}): directions cannot be compared in one basis; "
                        "map one model's directions with interp.transplant.map_directions(method='ridge')")  # fmt: skip
    if (model1_directions is None) != (model2_directions is None):
        raise UserError("give both models' directions or neither")
    if n_null < 1 or n_bootstrap < 1:
        raise UserError(f"n_null and n_bootstrap must be >= 1, got {n_null}, {n_bootstrap}")
    d1, d2 = _pairs(x, keys1), _pairs(y, keys2)
    band = cka_permutation_null(x, y, n_permutations=n_null, seed=seed, debiased=debiased)
    return {
        "n_rows": len(x), "n_problems": len(d1), "n_layers": x.shape[1], "debiased": debiased, "n_null": n_null,
        "n_bootstrap": n_bootstrap, "seed": seed,
        "directions": "given" if model1_directions is not None else "computed from the activations",
        "cka": {
            "diagonal": band["diagonal"].tolist(),
            "ci": bootstrap_cka_diagonal(x, y, n_bootstrap=n_bootstrap, seed=seed).tolist(),
            "null_mean": band["null_mean"].tolist(), "null_p95": band["null_p95"].tolist(),
            "p_value": band["p_value"].tolist(), "matrix": cka_matrix(x, y, debiased=debiased).tolist(),
        },
        "direction_cosine": _direction_cosine(d1, d2, model1_directions, model2_directions, n_null, n_bootstrap, seed),
    }  # fmt: skip
