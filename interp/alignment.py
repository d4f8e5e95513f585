"""Lining two models up on the same prompts: CKA and reasoning-direction cosine, each read against chance.

`analyze_cross_model_alignment(model1_activations, model2_activations, ..., keys1=, keys2=)` takes the residual
streams of both models at one position per prompt, [n, L, d1] and [n, L, d2] (e.g. `collect_activations` at
"last", or a "post_instruction" axis indexed by `interp.prompts.role_positions`: the two chat templates put
different tokens after the user's text, so positions are matched by role, never by offset). Rows are matched
by key: keys1 / keys2 give each row's (problem_id, kind) with kind "reasoning" | "control"; they must be equal,
in the same order, each problem with one row of each kind, or UserError.

RESULT (JSON-able; L = layers, m = n_null, B = n_bootstrap; lists are per layer):
    "cka"  linear CKA of acts1[:, l] and acts2[:, l] over all n rows (`interp.similarity`):
        "diagonal" [L], "ci" [L][2] (percentile bootstrap over PROBLEMS, both rows of a drawn problem together,
        `bootstrap_cka_diagonal(groups=)`: a spread more than an exact interval, see there),
        "null_mean" / "null_p95" / "p_value" [L] (`cka_permutation_null`: rows of model 2 shuffled, m draws),
        "matrix" [L][L] (`cka_matrix`: row i = model 1 layer i, column j = model 2 layer j)
    "direction_cosine"  the two reasoning directions r1[l], r2[l]; r = mean over problems of the paired difference
        d_i = x(reasoning_i) - x(control_i) (`paired_layer_differences`), unless directions are given. null when
        d1 != d2 (no shared basis: map one model's directions with `interp.transplant.map_directions`):
        "value" [L]: the plug-in cos(r1, r2) (what the saved directions give). It is biased by the noise in the
            means: toward 0 when the models' noise is independent, toward the noise's own correlation when they
            share it (one model's rows in another's basis), the more so in high d;
        "debiased" [L] | null: the cross-problem cosine U_12 / sqrt(U_11 U_22), U_ab = sum over problem pairs
            i != j of d_a,i . d_b,j (each term's noise is independent across problems, so U_ab is unbiased for
            mu_a . mu_b); null where U_11 or U_22 <= 0 (the direction is not above its noise);
        "ci" [L][2] | null: percentile bootstrap of "debiased" over problems (same problems in both models, the
            same-problem terms of a draw removed); null per layer where a draw is undefined, and when directions
            were given. Simulated coverage of the population cosine (0.5; d 32 / 512, 20-200 problems): 0.94-1.00
            where the direction stands clear of its noise (|mu|^2 n / (2 d) >= 5), 5-30% wider than needed. With a
            weak direction and few noise dimensions (that ratio 2, d 32) most layers get null (70-90% of runs, more
            with more bootstrap draws) and "debiased" itself runs up to 0.075 low under shared noise;
        "matched_placebo" {"mean", "p95", "p_value"} [L]: m balanced sign-flip placebos (sum_i s_i d_i / n, half
            the s_i +1, half -1: the class difference cancels) with the SAME signs in both models, plug-in cosine.
            How alike the two models make other contrasts of the same prompts; the placebos' spread follows the
            noise variance, so "value" above it is agreement beyond a typical contrast, not proof that no fixed
            basis map explains it;
        "independent_placebo" {...}: the same with independent signs per model: the level of two UNRELATED
            contrast directions. Any shared basis beats it (a simulation of one model twice, no reasoning shift:
            P(p <= 0.05) = 0.92-1.00), so it says the directions are not unrelated, not that reasoning is shared;
        p_value = (1 + #{null >= value - 1e-9}) / (m + 1), one-sided (ties within rounding count), never below
            1 / (m + 1); with fewer than MIN_PLACEBO_PROBLEMS problems the balanced placebos take few distinct
            values and the matched p-value runs anti-conservative ("warnings" says so);
        "warnings" [str].
    plus "n_rows", "n_problems", "n_layers", "debiased" (the CKA estimator), "n_null", "n_bootstrap", "seed",
    "directions" ("computed from the activations" | "given").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from interp.errors import UserError
from interp.null_directions import balanced_signs, paired_differences
from interp.similarity import bootstrap_cka_diagonal, cka_matrix, cka_permutation_null

KINDS = ("reasoning", "control")
MIN_PLACEBO_PROBLEMS = 20  # below this the placebo p-values run anti-conservative (see _direction_cosine)
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


def paired_layer_differences(acts: torch.Tensor, keys: Sequence[tuple]) -> torch.Tensor:
    """d_i = x(reasoning_i) - x(control_i) of acts [n, L, d] with row keys (problem_id, kind): float64
    [n_problems, L, d], problems in ascending id order; a problem without both rows: UserError."""
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


def _debiased_cosines(w: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
    """The cross-problem cosine for problem weights w [K, n] (counts): U_ab = sum_{i != j} w_i w_j d_a,i . d_b,j
    = (w . D_a) . (w . D_b) - sum_i w_i^2 d_a,i . d_b,i, cos_u = U_12 / sqrt(U_11 U_22): [K, L], NaN where U_11 or
    U_22 <= 0 (the direction is not distinguishable from its noise)."""
    r1, r2 = torch.einsum("kn,nld->kld", w, d1), torch.einsum("kn,nld->kld", w, d2)
    same = lambda a, b: torch.einsum("kn,nl->kl", w * w, (a * b).sum(-1))  # noqa: E731  # same-problem products
    u12, u11, u22 = ((r1 * r2).sum(-1) - same(d1, d2), (r1 * r1).sum(-1) - same(d1, d1), (r2 * r2).sum(-1) - same(d2, d2))
    ok = (u11 > 0) & (u22 > 0)
    return torch.where(ok, u12 / (u11 * u22).clamp_min(1e-300).sqrt(), float("nan"))


def _direction_cosine(d1, d2, model1_directions, model2_directions, n_null: int, n_bootstrap: int, seed: int) -> dict:
    n = d1.shape[0]
    generator = torch.Generator().manual_seed(seed)
    signs = balanced_signs(n, 2 * n_null, generator) / n  # [2m, n]: matched = first m in both, independent = m..2m
    placebo = _cosines(  # [2m, L]
        torch.cat([signs[:n_null], signs[:n_null]]), torch.cat([signs[:n_null], signs[n_null:]]), d1, d2)
    debiased = ci = None
    if model1_directions is not None:
        r1, r2 = (torch.as_tensor(r).to(torch.float64) for r in (model1_directions, model2_directions))
        if r1.shape != d1.shape[1:] or r2.shape != d2.shape[1:]:
            raise UserError(f"directions must be [n_layers, d_model] like the activations' {tuple(d1.shape[1:])}, got "
                            f"{tuple(r1.shape)} and {tuple(r2.shape)}")  # fmt: skip
        value = (r1 * r2).sum(-1) / (r1.norm(dim=-1) * r2.norm(dim=-1))  # [L]
    else:
        ones = torch.ones(1, n, dtype=torch.float64)
        value = _cosines(ones, ones, d1, d2)[0]
        debiased = _debiased_cosines(ones, d1, d2)[0]
        rows = torch.randint(n, (n_bootstrap, n), generator=generator)
        counts = torch.zeros(n_bootstrap, n, dtype=torch.float64).scatter_add_(1, rows, torch.ones_like(rows).double())
        draws = torch.cat([_debiased_cosines(c, d1, d2) for c in counts.split(100)])  # [B, L]
        tails = torch.tensor([0.025, 0.975], dtype=torch.float64)
        ci = [None if bool(column.isnan().any()) else column.quantile(tails).tolist() for column in draws.T]
        debiased = [float(v) if math.isfinite(v) else None for v in debiased.tolist()]
    if not bool(torch.isfinite(value).all()):
        raise UserError("a reasoning direction has zero norm at some layer: its cosine is undefined")
    warnings = []
    if n < MIN_PLACEBO_PROBLEMS:
        warnings.append(f"{n} problems: the balanced sign-flip placebos take few distinct values (a no-effect "
                        f"simulation gave P(p <= 0.05) = 0.12 at 6 problems, 0.07 at 10); use >= "
                        f"{MIN_PLACEBO_PROBLEMS}")  # fmt: skip
    return {"value": value.tolist(), "debiased": debiased, "ci": ci,
            "matched_placebo": _null(placebo[:n_null], value), "independent_placebo": _null(placebo[n_null:], value),
            "warnings": warnings}  # fmt: skip


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
    if (model1_directions is None) != (model2_directions is None):
        raise UserError("give both models' directions or neither")
    if n_null < 1 or n_bootstrap < 1:
        raise UserError(f"n_null and n_bootstrap must be >= 1, got {n_null}, {n_bootstrap}")
    d1, d2 = paired_layer_differences(x, keys1), paired_layer_differences(y, keys2)
    band = cka_permutation_null(x, y, n_permutations=n_null, seed=seed, debiased=debiased)
    problem_ids: dict = {}
    problem_of_row = torch.tensor([problem_ids.setdefault(pid, len(problem_ids)) for pid, _ in keys1])  # [n]
    return {
        "n_rows": len(x), "n_problems": len(d1), "n_layers": x.shape[1], "debiased": debiased, "n_null": n_null,
        "n_bootstrap": n_bootstrap, "seed": seed,
        "directions": "given" if model1_directions is not None else "computed from the activations",
        "cka": {
            "diagonal": band["diagonal"].tolist(),
            "ci": bootstrap_cka_diagonal(x, y, n_bootstrap=n_bootstrap, seed=seed, groups=problem_of_row).tolist(),
            "null_mean": band["null_mean"].tolist(), "null_p95": band["null_p95"].tolist(),
            "p_value": band["p_value"].tolist(), "matrix": cka_matrix(x, y, debiased=debiased).tolist(),
        },
        "direction_cosine": None if x.shape[2] != y.shape[2] else
        _direction_cosine(d1, d2, model1_directions, model2_directions, n_null, n_bootstrap, seed),
    }  # fmt: skip
