"""Transplanting one model's reasoning direction into another: does model A's direction do in model B what B's own
direction does?

MAPS (`map_directions`) carry a direction r_A[l] [d_A] of layer l into model B's residual space [d_B]:
    identity  r_A[l] itself (needs d_A == d_B): both models are fine-tunes of one base, so their residual bases
              may agree
    ridge     r_A[l] W_l with W_l the ridge regression of B's activations on A's at layer l, fitted on paired rows
              (the same prompts in both models) that took NO part in computing the directions: with fewer rows
              than dimensions and a small ridge the fit interpolates (Xc W = Yc), and on the directions' own rows
              it then maps A's mean difference onto B's exactly, for any two models (a simulation with two
              unrelated random models gave cosine 1.000). W_l = (Xc^T Xc + lam I)^-1 Xc^T Yc,
              Xc, Yc = the rows centered, lam = ridge * tr(Xc^T Xc) / d_A. A difference of means maps to the
              difference of the fitted means, so this is "A's direction as B would represent it". Computed
              without forming W: r (Xc^T Xc + lam I)^-1 Xc^T Yc = r Xc^T (Xc Xc^T + lam I)^-1 Yc, a d_A x d_A or
              n x n solve per layer, whichever is smaller; float64.
Either way the mapped direction is rescaled to |r_B[l]|, B's own direction norm at that layer (and
`transplant_report` rescales every direction it is given to that norm again), so effects compare directions, not
norms.

EFFECTS (`transplant_report`), on model B and B's problems (reasoning and control prompt with gold solutions),
per layer l, through `interp.direction_scoring.PromptScorer` (the directions run's own scoring):
    ablation_score   reasoning prompts: metric(direction ablated everywhere) - metric(baseline)
    induction_score  control prompts: metric(baseline) - metric(strength * direction added at blocks.{l}.resid_post)
    kl               control prompts: KL(baseline || ablated) of the next-token distribution
for B's own direction r_B[l], each transplanted direction, and each null direction (e.g. B's placebo directions,
`interp.null_directions.signflip_directions`, rescaled to |r_B[l]|). Per layer and score:
    ratio        mean_i effect_i(transplanted) / mean_i effect_i(own): a ratio of means (1: A's direction does what
                 B's does; 0: nothing); "ci": percentile bootstrap over problems, numerator and denominator
                 resampled together; undefined (null) where the own effect's mean is 0
    null_ratios  the same ratio for each null direction; "p_rank" = (1 + #{null ratio >= ratio}) / (m + 1), null
                 where the ratio is undefined
Read a ratio only where B's own effect is clearly non-zero ("own": its mean and CI are reported beside it): a noisy
own mean of the wrong sign flips every ratio and the direction of p_rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from interp.direction_scoring import PromptScorer
from interp.errors import UserError
from interp.selection import PER_PROMPT_KEYS, bootstrap_ci

MAPS = ("identity", "ridge")
SCORES = ("ablation_score", "induction_score", "kl")


def _as_layers(x: object, name: str, ndim: int) -> torch.Tensor:
    t = torch.as_tensor(x).detach().cpu().to(torch.float64)
    if t.ndim != ndim:
        raise UserError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    return t


def _ridge_map(r: torch.Tensor, x: torch.Tensor, y: torch.Tensor, ridge: float) -> torch.Tensor:
    """r [d_A] through the ridge map fitted on x [n, d_A] -> y [n, d_B] (module docstring): [d_B] float64."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    n, d = xc.shape
    lam = ridge * float((xc * xc).sum()) / d
    if n < d:  # r Xc^T (Xc Xc^T + lam I)^-1 Yc
        coef = torch.linalg.solve(xc @ xc.T + lam * torch.eye(n, dtype=xc.dtype), xc @ r)  # [n]
    else:  # ((Xc^T Xc + lam I)^-1 r)^T Xc^T Yc, the system being symmetric
        coef = xc @ torch.linalg.solve(xc.T @ xc + lam * torch.eye(d, dtype=xc.dtype), r)  # [n]
    return coef @ yc


def map_directions(
    directions: torch.Tensor,
    to_norms: torch.Tensor,
    method: str = "identity",
    source_activations: torch.Tensor | None = None,
    target_activations: torch.Tensor | None = None,
    ridge: float = 1e-2,
) -> torch.Tensor:
    """Model A's directions [L, d_A] in model B's space, one per layer, each rescaled to to_norms[l] (MAPS).

    Args:
        to_norms: [L] the norms to rescale to (B's own direction norms).
        source_activations, target_activations: ridge only: [n, L, d_A] and [n, L, d_B], the same n prompts in
            both models (rows matched), disjoint from the rows the directions came from; at least 2 rows.
        ridge: lam as a share of the mean squared activation norm per dimension, tr(Xc^T Xc) / d_A (> 0).
    Returns:
        [L, d_B] float32; a zero row of `directions` (a layer without a direction) gives a zero row.
    """
    r = _as_layers(directions, "directions", 2)
    norms = _as_layers(to_norms, "to_norms", 1)
    if len(norms) != len(r):
        raise UserError(f"to_norms covers {len(norms)} layers but directions {len(r)}")
    if method not in MAPS:
        raise UserError(f"unknown map {method!r}; expected one of {', '.join(MAPS)}")
    if method == "identity":
        if target_activations is not None and torch.as_tensor(target_activations).shape[-1] != r.shape[-1]:
            raise UserError(f"d_model differs ({r.shape[-1]} vs {torch.as_tensor(target_activations).shape[-1]}): "
                            "the identity map needs one basis; use method='ridge'")  # fmt: skip
        mapped = r
    else:
        if source_activations is None or target_activations is None:
            raise UserError("the ridge map needs source_activations and target_activations (paired rows)")
        x, y = _as_layers(source_activations, "source_activations", 3), _as_layers(target_activations, "target_activations", 3)
        if len(x) != len(y) or len(x) < 2 or x.shape[1] != len(r) or y.shape[1] != len(r) or x.shape[2] != r.shape[1]:
            raise UserError(f"the ridge map needs [n >= 2, {len(r)}, d] activations of the same n prompts in both "
                            f"models, A's with d = {r.shape[1]}; got {tuple(x.shape)} and {tuple(y.shape)}")  # fmt: skip
        if not ridge > 0:
            raise UserError(f"ridge must be > 0, got {ridge}")
        mapped = torch.stack([_ridge_map(r[layer], x[:, layer], y[:, layer], ridge) for layer in range(len(r))])  # [L, d_B]
    present = r.norm(dim=-1) > 0  # [L]: zero rows (layers without a direction) stay zero
    length = mapped.norm(dim=-1, keepdim=True)
    if bool((length[present] == 0).any()) or not bool(torch.isfinite(mapped).all()):
        raise UserError("a mapped direction has zero norm or is not finite: nothing to rescale")
    return torch.where(present[:, None], mapped / length.clamp_min(1e-300) * norms[:, None], 0.0).to(torch.float32)


def ratio_of_means_ci(num: torch.Tensor, den: torch.Tensor, n_bootstrap: int, generator: torch.Generator) -> list | None:
    """Percentile 95% interval of mean(num) / mean(den) over problems resampled together ([n] each); None when a
    resample's denominator mean is 0."""
    rows = torch.randint(len(num), (n_bootstrap, len(num)), generator=generator)
    ratios = num[rows].mean(-1) / den[rows].mean(-1)
    ratios = ratios[torch.isfinite(ratios)]
    if len(ratios) < n_bootstrap:
        return None
    return ratios.quantile(torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()


def _effects(rows: list[dict], score: str) -> torch.Tensor:
    return torch.stack([torch.as_tensor(row[PER_PROMPT_KEYS[score]], dtype=torch.float64) for row in rows])


def transplant_report(
    scorer: PromptScorer,
    problems: Sequence[tuple],
    own_directions: torch.Tensor,
    transplanted: dict[str, torch.Tensor],
    layers: Sequence[int],
    null_directions: torch.Tensor | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """EFFECTS and ratios (module docstring) of transplanted directions in the scorer's model, layer by layer.

    Args:
        scorer: PromptScorer on model B (its metric, strength and batch size are used as they are).
        problems: B's problems, (reasoning_prompt, reasoning_solution, control_prompt, control_solution) each, in
            B's chat template; held out from everything that chose or fitted the directions.
        own_directions: [L_B, d_B] B's own directions (row l = blocks.{l}.resid_post).
        transplanted: name -> [L_B, d_B] directions mapped into B (`map_directions`), e.g. {"identity": ...}.
        layers: the model layers to report.
        null_directions: [m, L_B, d_B] or None. Transplanted and null directions are rescaled here to
            |own_directions[l]| at every reported layer.
    Returns:
        {"layers": [...], "n_problems", "n_null", "n_bootstrap", "own": {score: {"mean": [per layer], "ci":
         [per layer [2]]}}, "transplanted": {name: {score: {"mean", "ratio", "ci", "null_ratios" [per layer [m]],
         "p_rank"}}}, "nulls": {score: {"mean": [per layer [m]]}} }
    """
    own = _as_layers(own_directions, "own_directions", 2)
    layers = [int(layer) for layer in layers]
    if not layers or not transplanted:
        raise UserError("name at least one layer to transplant at and at least one transplanted direction set")
    sets = {name: _as_layers(t, f"transplanted[{name!r}]", 2) for name, t in transplanted.items()}
    for name, t in sets.items():
        if t.shape != own.shape:
            raise UserError(f"{name} directions are {tuple(t.shape)} but B's own are {tuple(own.shape)}")
    nulls = None
    if null_directions is not None:
        nulls = _as_layers(null_directions, "null_directions", 3)
        if nulls.shape[1:] != own.shape:
            raise UserError(f"null_directions must be [m, {own.shape[0]}, {own.shape[1]}], got {tuple(nulls.shape)}")
        sets.update({f"null{k}": nulls[k] for k in range(len(nulls))})
    # one scorer call: every set at every layer (the baselines are computed once), each rescaled to |own[l]|
    own_rows = own[layers]  # [n_layers, d_B]
    others = torch.stack([t[layers] for t in sets.values()])  # [n_sets, n_layers, d_B]
    others = others / others.norm(dim=-1, keepdim=True) * own_rows.norm(dim=-1, keepdim=True)
    sets = {"own": own_rows, **dict(zip(sets, others))}
    stacked = torch.stack(list(sets.values())).reshape(-1, own.shape[1])  # [n_sets * n_layers, d_B]
    rows = scorer(stacked, layers * len(sets), problems)
    by_set = {name: rows[k * len(layers) : (k + 1) * len(layers)] for k, name in enumerate(sets)}
    generator = torch.Generator().manual_seed(seed)
    own_eff = {score: _effects(by_set["own"], score) for score in SCORES}  # [n_layers, n_prompts]
    report = {"layers": layers, "n_problems": len(problems), "n_null": 0 if nulls is None else len(nulls),
              "n_bootstrap": n_bootstrap, "own": {}, "transplanted": {}, "nulls": {}}  # fmt: skip
    for score in SCORES:
        den = own_eff[score]
        report["own"][score] = {"mean": den.mean(-1).tolist(),
                                "ci": [list(bootstrap_ci(d, n_bootstrap, seed=seed)) for d in den]}  # fmt: skip
        null_means = [_effects(by_set[f"null{k}"], score).mean(-1) for k in range(report["n_null"])]  # [m][n_layers]
        report["nulls"][score] = {"mean": torch.stack(null_means, 1).tolist() if null_means else []}
        for name in transplanted:
            num = _effects(by_set[name], score)
            ratio = num.mean(-1) / den.mean(-1)  # [n_layers]; inf / nan where the own mean is 0
            null_ratios = torch.stack(null_means, 1) / den.mean(-1)[:, None] if null_means else None  # [n_layers, m]
            entry = report["transplanted"].setdefault(name, {})
            entry[score] = {
                "mean": num.mean(-1).tolist(),
                "ratio": [float(v) if torch.isfinite(v) else None for v in ratio],
                "ci": [ratio_of_means_ci(num[i], den[i], n_bootstrap, generator) for i in range(len(layers))],
                "null_ratios": null_ratios.tolist() if null_ratios is not None else [],
                "p_rank": ([float((1 + (null_ratios[i] >= ratio[i]).sum().double()) / (len(nulls) + 1))
                            if torch.isfinite(ratio[i]) else None for i in range(len(layers))]
                           if null_ratios is not None else None),
            }  # fmt: skip
    return report

