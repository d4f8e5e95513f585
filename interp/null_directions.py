"""Null directions for testing one direction r built from activations (`null_directions`, NULL_DEFINITIONS), and
the two null inputs of `interp.selection.select_reasoning_direction`: nulls at the selected site
(`site_null_factory`) and placebo candidates at every searched site for the max-statistic null
(`searched_placebo_candidates`, SEARCHED_NULL_DEFINITION).

The rows are matched pairs (a reasoning and a control prompt per problem), so r = mean of the within-pair
differences d_i and problem content cancels out of it; the nulls are built from the same d_i:
balanced sign-flip placebos (sum_i s_i d_i / n_pairs, half the signs +1, half -1: the class difference cancels
exactly, the noise is r's) and covariance-shaped Gaussians (covariance of the d_i). Unlike isotropic noise, which
any direction built from anisotropic activations beats, these are shaped like r's noise. A pooled random split
of the rows ignoring the pairs (pooled_placebo) is kept only for comparison: it carries between-problem
variance and part of the real class difference. Every null is rescaled to |r|. All math is float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from interp.directions import random_directions
from interp.errors import UserError

NULLS = ("placebo", "covariance", "isotropic", "pooled_placebo")
NULL_DEFINITIONS = {
    "placebo": "balanced within-pair sign-flip placebo: sum_i s_i d_i / n_pairs over the train problems i with both a "
    "reasoning and a control row, d_i = x(reasoning_i) - x(control_i) at the tested direction's (position, layer), "
    "s_i in {-1, +1} seeded with exactly half +1 and half -1 (odd n_pairs: one random pair gets s_i = 0), so the "
    "class difference cancels exactly and the noise is that of r; rescaled to |r|",
    "covariance": "g = Dc^T z / sqrt(n_pairs - 1), z ~ N(0, I_n_pairs), Dc = the within-pair differences d_i = "
    "x(reasoning_i) - x(control_i) of the train problems at the tested direction's (position, layer), centred on "
    "their mean (the covariance of the paired differences), rescaled to |r|",
    "isotropic": "uniform on the sphere (normalised N(0, I_d_model)), rescaled to |r|",
    "pooled_placebo": "mean(A) - mean(B) over a seeded random partition of the pooled train rows at the tested "
    "direction's (position, layer) into groups A, B of the two class sizes, ignoring the pairs (carries "
    "between-problem variance and ~1/sqrt(n) of the real class difference; kept for comparison), rescaled to |r|",
}
PAIRED_NULLS = ("placebo", "covariance")  # need the rows' problem ids


def _rows_and_labels(acts: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """acts [n, d] as float64 and labels [n] as bool (True = class 1), after checking both classes occur."""
    acts = torch.as_tensor(acts).detach().cpu().to(torch.float64)
    labels = torch.as_tensor(labels).detach().cpu()
    if acts.ndim != 2 or labels.shape != (acts.shape[0],):
        raise UserError(f"null directions need acts [n, d_model] and labels [n], got {tuple(acts.shape)} and "
                        f"{tuple(labels.shape)}")  # fmt: skip
    if not bool(((labels == 0) | (labels == 1)).all()) or int(labels.sum()) in (0, len(labels)):
        raise UserError("null directions need labels 0 / 1 with at least one row of each class")
    return acts, labels == 1


def paired_differences(acts: torch.Tensor, labels: torch.Tensor, problems: torch.Tensor) -> torch.Tensor:
    """d_i = x(reasoning_i) - x(control_i) for every problem i with one row of each class, float64 [n_pairs, d].

    acts [n, d], labels [n] (1 = reasoning, 0 = control), problems [n] (the problem id of each row, e.g. the
    cache's label.problem). Rows are in ascending problem id; problems with only one of their two rows are left
    out; a problem with two rows of one class is an error. When every row is paired, mean(d_i) equals the
    contrastive direction mean(reasoning) - mean(control) of the same rows.
    """
    acts, is_a = _rows_and_labels(acts, labels)
    problems = torch.as_tensor(problems).detach().cpu().long()
    if problems.shape != is_a.shape:
        raise UserError(f"problem ids must be [{len(is_a)}] like the labels, got {tuple(problems.shape)}")
    ids, inverse = torch.unique(problems, return_inverse=True)
    counts = torch.zeros(len(ids), 2, dtype=torch.long)  # [problem, class]
    counts.index_put_((inverse, is_a.long()), torch.ones_like(inverse), accumulate=True)
    if bool((counts > 1).any()):
        raise UserError("paired nulls need at most one reasoning and one control row per problem")
    by_class = torch.zeros(2, len(ids), acts.shape[1], dtype=torch.float64)  # [class, problem, d]
    by_class[is_a.long(), inverse] = acts
    complete = (counts == 1).all(1)
    if int(complete.sum()) < 2:
        raise UserError(f"paired nulls need at least 2 problems with both a reasoning and a control row, got "
                        f"{int(complete.sum())}")  # fmt: skip
    return by_class[1, complete] - by_class[0, complete]


def balanced_signs(n_pairs: int, n: int, generator: torch.Generator | int | None = None) -> torch.Tensor:
    """n seeded sign vectors [n, n_pairs] float64: floor(n_pairs / 2) entries +1, as many -1, and (n_pairs odd)
    one 0 at a random pair, so every row sums to exactly 0."""
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    half = n_pairs // 2
    signs = torch.zeros(n, n_pairs, dtype=torch.float64)
    for k in range(n):
        order = torch.randperm(n_pairs, generator=generator)
        signs[k, order[:half]], signs[k, order[half : 2 * half]] = 1.0, -1.0
    return signs


def signflip_directions(diffs: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """sum_i s_i d_i / n_pairs per sign vector: diffs [n_pairs, d], signs [n, n_pairs] -> float64 [n, d].

    With all s_i = +1 this is r = mean(d_i); with balanced signs (sum s_i = 0) any common shift of the d_i (the
    class difference) cancels exactly, and what is left has the covariance of the d_i, like r's noise.
    """
    diffs = torch.as_tensor(diffs).detach().cpu().to(torch.float64)
    signs = torch.as_tensor(signs, dtype=torch.float64)
    if signs.ndim != 2 or signs.shape[1] != diffs.shape[0]:
        raise UserError(f"signs must be [n, {diffs.shape[0]}], got {tuple(signs.shape)}")
    return signs @ diffs / diffs.shape[0]


def placebo_partitions(labels: torch.Tensor, n: int, generator: torch.Generator | int | None = None) -> torch.Tensor:
    """n random partitions of the rows into a group A of #(labels == 1) rows and a group B of the rest
    (the pooled_placebo null, which ignores the pairs).

    Returns [n, n_rows] bool (True = group A): row k is the first #A entries of a seeded permutation.
    """
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    labels = torch.as_tensor(labels)
    n_a = int((labels == 1).sum())
    partitions = torch.zeros(n, len(labels), dtype=torch.bool)
    for k in range(n):
        partitions[k, torch.randperm(len(labels), generator=generator)[:n_a]] = True
    return partitions


def placebo_directions(acts: torch.Tensor, partitions: torch.Tensor) -> torch.Tensor:
    """mean(acts[A]) - mean(acts[B]) per partition: acts [n_rows, d], partitions [n, n_rows] bool (True = A).

    Returns float64 [n, d] (the pooled_placebo null). A random split is imbalanced across the true classes by
    ~1/sqrt(n_rows), so these carry a share of the real class difference and, for paired rows, the
    between-problem variance that r does not have: use the paired `signflip_directions` to test r.
    """
    acts = torch.as_tensor(acts).detach().cpu().to(torch.float64)
    partitions = torch.as_tensor(partitions, dtype=torch.bool)
    if partitions.ndim != 2 or partitions.shape[1] != acts.shape[0]:
        raise UserError(f"partitions must be [n, {acts.shape[0]}], got {tuple(partitions.shape)}")
    n_a = partitions.sum(1, keepdim=True).to(torch.float64)  # [n, 1]
    if bool(((n_a == 0) | (n_a == acts.shape[0])).any()):
        raise UserError("every placebo partition needs rows in both groups")
    weights = partitions / n_a - (~partitions) / (acts.shape[0] - n_a)  # [n, n_rows]: 1/|A| on A, -1/|B| on B
    return weights @ acts


def covariance_directions(diffs: torch.Tensor, n: int, generator: torch.Generator | int | None = None) -> torch.Tensor:
    """n Gaussian directions g = Dc^T z / sqrt(n_pairs - 1), z ~ N(0, I_n_pairs), float64 [n, d].

    diffs [n_pairs, d] are the within-pair differences (`paired_differences`); Dc = diffs - mean(diffs), so
    Cov(g) = Dc^T Dc / (n_pairs - 1), the covariance of the paired differences: the shape of r's noise, without
    the class difference itself. The d x d matrix is never formed.
    """
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    diffs = torch.as_tensor(diffs).detach().cpu().to(torch.float64)
    if diffs.ndim != 2 or diffs.shape[0] < 2:
        raise UserError(f"covariance null needs paired differences [n_pairs >= 2, d], got {tuple(diffs.shape)}")
    centred = diffs - diffs.mean(0)
    z = torch.randn((n, diffs.shape[0]), generator=generator, dtype=torch.float64)  # [n, n_pairs]
    return z @ centred / math.sqrt(diffs.shape[0] - 1)


def null_directions(
    kind: str,
    like: torch.Tensor,
    n: int,
    generator: torch.Generator | int | None = None,
    acts: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    problems: torch.Tensor | None = None,
) -> torch.Tensor:
    """n null directions of `kind` (NULL_DEFINITIONS), each rescaled to the norm of `like` (the tested r [d]).

    kind: "placebo" (`signflip_directions` of `balanced_signs` over `paired_differences`), "covariance"
    (`covariance_directions` of the paired differences), "isotropic" (`random_directions`), "pooled_placebo"
    (`placebo_directions` of `placebo_partitions(labels)`). acts [m, d] / labels [m] (1 / 0) / problems [m]
    (problem id per row): the rows r was built from, at r's (position, layer); placebo and covariance need all
    three, pooled_placebo acts and labels. Returns [n, d] in like's dtype; every row has norm |like| (float64 math).
    """
    if kind not in NULLS:
        raise UserError(f"unknown null {kind!r}; expected one of {', '.join(NULLS)}")
    if n < 1 or like.ndim != 1:
        raise UserError(f"null_directions needs n >= 1 and one [d_model] direction, got n={n}, {tuple(like.shape)}")
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    if kind == "isotropic":
        return random_directions(like, n, generator)
    if acts is None or labels is None or (kind in PAIRED_NULLS and problems is None):
        what = "activations, labels and problem ids" if kind in PAIRED_NULLS else "activations and labels"
        raise UserError(f"the {kind} null needs the {what} the direction was built from")
    acts, is_a = _rows_and_labels(acts, labels)
    if acts.shape[1] != like.shape[0]:
        raise UserError(f"null activations have d_model {acts.shape[1]}, the direction {like.shape[0]}")
    if kind == "pooled_placebo":
        raw = placebo_directions(acts, placebo_partitions(is_a.long(), n, generator))
    else:
        diffs = paired_differences(acts, is_a.long(), problems)  # [n_pairs, d]
        if kind == "placebo":
            raw = signflip_directions(diffs, balanced_signs(len(diffs), n, generator))
        else:
            raw = covariance_directions(diffs, n, generator)
    norms = raw.norm(dim=-1, keepdim=True)  # [n, 1]
    if not bool((norms > 0).all()):
        raise UserError(f"a {kind} null direction has zero norm (are the activations constant?)")
    scale = float(like.detach().cpu().to(torch.float64).norm())
    return (raw / norms * scale).to(device=like.device, dtype=like.dtype)


SEARCHED_NULL_DEFINITION = (
    "max-statistic null: per draw, one balanced within-pair sign-flip placebo candidate at every searched "
    "(position, layer) (one sign vector shared by all sites, rescaled to the real candidate's norm there), "
    "chosen by the same selection rule on the same selection problems; its winner's report-problem scores are "
    "one draw of the best-of-search statistic r is compared with"
)


# site_rows(position, layer) -> (acts [rows, d_model], labels [rows] 1 / 0, problem ids [rows]): the rows the
# candidate directions at that site were built from (e.g. the train rows of an activation cache).
SiteRows = Callable[[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def site_null_factory(kind: str, n: int, seed: int, site_rows: SiteRows) -> Callable[[dict, torch.Tensor], torch.Tensor]:
    """The null_factory of `interp.selection.select_reasoning_direction`: (selected row, r [d_model]) -> n null
    directions of `kind` [n, d_model] from site_rows at the selected (position, layer) (not read for isotropic)."""

    def make(best: dict, r: torch.Tensor) -> torch.Tensor:
        if kind == "isotropic":
            return null_directions(kind, r, n, seed)
        acts, labels, problems = site_rows(best["position"], best["layer"])
        return null_directions(kind, r, n, seed, acts=acts, labels=labels, problems=problems)

    return make


def searched_placebo_candidates(
    candidates: torch.Tensor, layers: Sequence[int], site_rows: SiteRows, n: int, seed: int
) -> Callable[[int], torch.Tensor]:
    """The searched_null_candidates of `interp.selection.select_reasoning_direction` (the max-statistic null):
    draw j -> placebo candidates float32 [n_pos, n_model_layers, d_model], zeros at the layers not searched.

    candidates [n_pos, n_model_layers, d_model]: the real ones. At every searched (position p, layer l in
    `layers`), draw j is sum_i s_ji d_i / n_pairs over the paired differences d_i of site_rows(p, l) (the same
    problems at every site), with ONE balanced sign vector s_j per draw shared by all sites (as the real
    candidates share their rows), rescaled to the norm of candidates[p, l]. All n draws are built at once (each
    site's rows are read once).
    """
    out = torch.zeros(n, *candidates.shape)  # [n, n_pos, n_model_layers, d_model]
    signs = None
    for position in range(candidates.shape[0]):
        for layer in layers:
            diffs = paired_differences(*site_rows(position, layer))  # [n_pairs, d_model], ascending problem id
            if signs is None:
                signs = balanced_signs(len(diffs), n, seed)  # [n, n_pairs]
            nulls = signflip_directions(diffs, signs)  # [n, d_model] float64
            norm = candidates[position, layer].double().norm()
            out[:, position, layer] = (nulls / nulls.norm(dim=-1, keepdim=True) * norm).float()
    return lambda j: out[j]
