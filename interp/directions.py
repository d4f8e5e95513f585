"""Reasoning directions: contrastive means, PCA of paired differences, shape checks, and their file format.

Activations come from `interp.activations.collect_activations`: [n, n_layers, d_model] for one-vector
position specs, [n, n_pos, n_layers, d_model] otherwise. Every function here also takes an ITERABLE of such
batches (a generator over an activation cache, a DataLoader, ...), so any number of prompts fits in memory.
Directions come back without the prompt axis: [n_layers, d_model] or [n_pos, n_layers, d_model], float32.

Null directions shaped like the data (placebo, covariance) for testing a direction: `interp.null_directions`;
isotropic ones (`random_directions`) are here.

File format (`save_directions` / `load_directions`):
    reasoning_directions.safetensors   tensor "directions" (float32) + optional extra named tensors; its
                                       header repeats the key metadata so a stray .json is caught on load
    reasoning_directions.json          metadata: model, layers, positions, d_model, shape, norms, selection
                                       table, ... (whatever the caller passes, plus the computed fields);
                                       a selection's record: SCORE_DEFINITIONS, `problem_sets`, `selection_stats`
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from interp.atomic import replaced_atomically, write_json
from interp.errors import UserError
from interp.positions import PositionSpec
from interp.prompts import post_instruction_ids
from interp.selection import SCORE_KEYS, SelectionResult, pvalue_definitions
from interp.stats import RunningMoments

DIRECTIONS_FILE = "reasoning_directions.safetensors"
_CHECKED_KEYS = ("model", "layers", "positions", "d_model", "shape")  # JSON fields repeated in the header

Activations = torch.Tensor | Iterable[torch.Tensor]


def _batches(acts: Activations, side: str) -> Iterator[torch.Tensor]:
    """Yield [batch, (n_pos,) n_layers, d] tensors from one tensor or an iterable of them."""
    stream = [acts] if isinstance(acts, torch.Tensor) else acts
    for batch in stream:
        if not isinstance(batch, torch.Tensor) or batch.ndim not in (3, 4):
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise UserError(
                f"{side} activations must be [n, n_layers, d_model] or [n, n_pos, n_layers, d_model], got {shape}"
            )
        yield batch


def _check_same(shape_a: torch.Size, shape_b: torch.Size, what: str) -> None:
    if tuple(shape_a) != tuple(shape_b):
        raise UserError(f"{what}: shapes {tuple(shape_a)} and {tuple(shape_b)} do not match")


def _moments(acts: Activations, side: str) -> RunningMoments:
    moments, item_shape = RunningMoments(), None
    for batch in _batches(acts, side):
        if item_shape is None:
            item_shape = batch.shape[1:]
        _check_same(item_shape, batch.shape[1:], f"{side} activation batches [n, ...]")
        moments.update(batch)
    if moments.count == 0:
        raise UserError(f"no {side} activations")
    return moments


def compute_contrastive_directions(reasoning_acts: Activations, control_acts: Activations) -> torch.Tensor:
    """mean(reasoning) - mean(control) per (position, layer), unnormalised.

    Args:
        reasoning_acts, control_acts: [n, n_layers, d] or [n, n_pos, n_layers, d] tensors, or iterables of
            such batches. The two sides may hold different numbers of prompts.
    Returns:
        float32 [n_layers, d] or [n_pos, n_layers, d]; both means are accumulated in float64.
    """
    reasoning = _moments(reasoning_acts, "reasoning")
    control = _moments(control_acts, "control")
    _check_same(reasoning.mean.shape, control.mean.shape, "reasoning vs control activations (without n)")
    return (reasoning.mean - control.mean).to(torch.float32)


def pca_directions(reasoning_acts: Activations, control_acts: Activations) -> torch.Tensor:
    """First principal direction of the paired differences delta_i = reasoning_i - control_i.

    Row i of each side is one matched pair (e.g. the same question with and without a reasoning cue);
    for iterables, the k-th batches of the two sides must hold the same pairs.

    UNCENTRED PCA: the top eigenvector v of the second moment E[delta delta^T] = mu mu^T + Cov(delta).
    Centring would subtract mu mu^T, i.e. remove the consistent reasoning-vs-control shift that the
    direction is meant to capture, and leave only the direction along which the differences VARY most
    (which may well be nuisance). Uncentred, a consistent shift dominates and a constant shift is
    recovered exactly.

    Sign and norm: returned as (v . mu) v, the unit direction scaled to the mean difference's projection on
    it. This fixes the sign (it has positive dot product (v . mu)^2 with mu whichever sign eigh gave v) and
    the scale: when mu lies along v the result equals the contrastive direction mu; a principal direction
    orthogonal to mu comes back with (near) zero norm, which `check_nonzero_norm` then reports.

    Memory: one float64 d x d matrix per (position, layer): 8 * n_pos * n_layers * d^2 bytes, e.g. 210 MB
    per layer for d = 5120. For the 32B models pass one layer at a time (acts[..., [layer], :]).

    Returns:
        float32 [n_layers, d] or [n_pos, n_layers, d].
    """
    control_stream = iter(_batches(control_acts, "control"))
    second: torch.Tensor | None = None  # [*item, d] x d float64 running sum of delta delta^T
    mean = RunningMoments()
    item_shape = None
    for reasoning in _batches(reasoning_acts, "reasoning"):
        control = next(control_stream, None)
        if control is None:
            raise UserError("pca_directions needs matched pairs: the control side ran out of batches first")
        _check_same(reasoning.shape, control.shape, "pca_directions matched reasoning vs control batch")
        if item_shape is None:
            item_shape = reasoning.shape[1:]
        _check_same(item_shape, reasoning.shape[1:], "reasoning activation batches [n, ...]")
        delta = reasoning.to(torch.float64) - control.to(torch.float64)  # [b, *item]
        outer = torch.einsum("b...i,b...j->...ij", delta, delta)  # [*item, d] x d
        second = outer if second is None else second + outer
        mean.update(delta)
    if next(control_stream, None) is not None:
        raise UserError("pca_directions needs matched pairs: the reasoning side ran out of batches first")
    if second is None or mean.count == 0:
        raise UserError("no paired activations")
    _, eigvecs = torch.linalg.eigh(second / mean.count)  # ascending eigenvalues
    top = eigvecs[..., :, -1]  # [*item_without_d, d], unit norm
    projection = (top * mean.mean).sum(-1, keepdim=True)  # v . mu, [*item_without_d, 1]
    return (projection * top).to(torch.float32)


def random_directions(like: torch.Tensor, n: int, generator: torch.Generator | int | None = None) -> torch.Tensor:
    """n isotropic random directions with the norm of `like` at every (position, layer), for null tests.

    Args:
        like: [..., d] e.g. [n_layers, d] or [n_pos, n_layers, d].
        generator: a torch.Generator or an int seed (None: the global RNG).
    Returns:
        [n, *like.shape] in like's dtype and on its device; ||out[k, ..., :]|| == ||like[..., :]||.
    """
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    if n < 1:
        raise UserError(f"random_directions: n must be >= 1, got {n}")
    gauss = torch.randn((n, *like.shape), generator=generator, dtype=torch.float64)
    unit = gauss / gauss.norm(dim=-1, keepdim=True)
    norms = like.detach().cpu().to(torch.float64).norm(dim=-1, keepdim=True)  # [..., 1]
    return (unit * norms).to(device=like.device, dtype=like.dtype)


def check_directions(
    directions: torch.Tensor, n_layers: int, d_model: int, layers: Sequence[int] | None = None
) -> None:
    """Raise UserError unless `directions` ([n_layers, d] or [n_pos, n_layers, d]) fit a model of n_layers layers
    of width d_model (`interp.interventions.intervention_directions` prepares directions for an intervention).

    `layers`: the model layers the rows stand for (default: all n_layers, in order).
    """
    if directions.ndim not in (2, 3):
        raise UserError(
            f"directions must be [n_layers, d_model] or [n_pos, n_layers, d_model], got {tuple(directions.shape)}"
        )
    if directions.shape[-1] != d_model:
        raise UserError(f"directions have d_model {directions.shape[-1]} but the model has d_model {d_model}")
    expected = n_layers if layers is None else len(layers)
    if directions.shape[-2] != expected:
        what = f"the model's {n_layers} layers" if layers is None else f"the {expected} layers {list(layers)}"
        raise UserError(f"directions cover {directions.shape[-2]} layers but {what} were expected")
    bad = [layer for layer in (layers or ()) if not 0 <= layer < n_layers]
    if bad:
        raise UserError(f"direction layers {bad} out of range: the model has {n_layers} layers")


def position_labels(spec: str, tokenizer, n_pos: int) -> list[str]:
    """A name per position of a directions tensor's position axis (n_pos positions of PositionSpec `spec`): the
    template token strings for post_instruction, else last[-k] / mean."""
    spec = PositionSpec.parse(spec)
    if spec.kind == "post_instruction":
        return [tokenizer.decode([token]) for token in post_instruction_ids(tokenizer)]
    if spec.kind == "mean":
        return ["mean"]
    return [f"last[{j - n_pos}]" for j in range(n_pos)]


def check_nonzero_norm(directions: torch.Tensor, layers: Sequence[int] | None = None, eps: float = 0.0) -> None:
    """Raise UserError "zero-norm direction at layer L" if any [..., d] vector has norm <= eps (or is not
    finite). `layers` maps the layer axis (dim -2) to model layer indices (default 0..n-1)."""
    if directions.ndim < 2:
        directions = directions[None]
    norms = directions.detach().to(torch.float64).norm(dim=-1)  # [..., n_layers]
    layers = list(range(norms.shape[-1])) if layers is None else list(layers)
    bad = (~torch.isfinite(norms)) | (norms <= eps)
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        where = f" (position {index[-2]})" if len(index) > 1 else ""
        kind = "non-finite" if not math.isfinite(float(norms[index])) else "zero-norm"
        raise UserError(f"{kind} direction at layer {layers[index[-1]]}{where}")


def unit_directions(directions: torch.Tensor, layers: Sequence[int] | None = None) -> torch.Tensor:
    """directions / ||directions|| along d (out of place), after `check_nonzero_norm`."""
    check_nonzero_norm(directions, layers)
    return directions / directions.norm(dim=-1, keepdim=True)


def _paths(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    tensors = path if path.suffix == ".safetensors" else path / DIRECTIONS_FILE
    return tensors, tensors.with_suffix(".json")


def finite_json(value):
    """A copy of a JSON-able value with every non-finite float (NaN, +-inf) replaced by None (JSON null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(item) for item in value]
    return value


def save_directions(
    path: str | Path,
    directions: torch.Tensor,
    metadata: dict,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write directions (float32) and their JSON metadata; returns the .safetensors path.

    Args:
        path: a directory (-> <dir>/reasoning_directions.safetensors) or a path ending in .safetensors.
        directions: [n_layers, d] or [n_pos, n_layers, d].
        metadata: JSON-serialisable; conventionally model, layers, positions, method, selection table, ...
            "d_model", "shape" and "norms" ([..., n_layers] L2 norms) are filled in (and must agree if given).
            Non-finite floats (NaN, +-inf, e.g. an undefined z-score) are written as null: standard JSON.
        extra: more named tensors to store beside "directions" (e.g. "pca", "null_norms").
    """
    if directions.ndim not in (2, 3):
        raise UserError(f"directions must be [n_layers, d] or [n_pos, n_layers, d], got {tuple(directions.shape)}")
    directions = directions.detach().cpu().to(torch.float32).contiguous()
    computed = {
        "d_model": directions.shape[-1],
        "shape": list(directions.shape),
        "norms": directions.to(torch.float64).norm(dim=-1).tolist(),
    }
    for key in ("d_model", "shape"):
        if key in metadata and metadata[key] != computed[key]:
            raise UserError(f"metadata {key}={metadata[key]!r} does not match the directions ({computed[key]!r})")
    meta = {**metadata, **computed}
    if "layers" in meta and len(meta["layers"]) != directions.shape[-2]:
        raise UserError(f"metadata lists {len(meta['layers'])} layers but directions have {directions.shape[-2]}")
    tensors = {"directions": directions}
    for name, value in (extra or {}).items():
        if name == "directions":
            raise UserError("extra tensor name 'directions' is reserved")
        tensors[name] = value.detach().cpu().contiguous()
    tensor_path, json_path = _paths(path)
    tensor_path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": "pt", "metadata": json.dumps({k: meta.get(k) for k in _CHECKED_KEYS}, sort_keys=True)}
    with replaced_atomically(tensor_path) as tmp:  # the tensors first: the JSON beside them marks them finished
        save_file(tensors, str(tmp), metadata=header)
    write_json(json_path, meta, sort_keys=True, allow_nan=False)
    return tensor_path


def load_directions(path: str | Path) -> tuple[torch.Tensor, dict]:
    """Read what `save_directions` wrote: (directions float32, metadata). Missing files, or metadata that
    does not match the tensor file (another run's .json, edited shape/layers), raise UserError."""
    directions, meta, _ = _load(path)
    return directions, meta


def load_extra_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The `extra` tensors stored by `save_directions` (same checks as `load_directions`)."""
    return _load(path)[2]


def _load(path: str | Path) -> tuple[torch.Tensor, dict, dict[str, torch.Tensor]]:
    tensor_path, json_path = _paths(path)
    for file in (tensor_path, json_path):
        if not file.is_file():
            raise UserError(f"directions file {str(file)!r} does not exist")
    try:
        meta = json.loads(json_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"directions metadata {str(json_path)!r} is not valid JSON: {err}") from None
    with safe_open(str(tensor_path), framework="pt") as f:
        names = list(f.keys())
        if "directions" not in names:
            raise UserError(f"{str(tensor_path)!r} holds no 'directions' tensor")
        tensors = {name: f.get_tensor(name) for name in names}
        header = json.loads((f.metadata() or {}).get("metadata", "{}"))
    directions = tensors.pop("directions")
    for key in _CHECKED_KEYS:
        if header.get(key) != meta.get(key):
            raise UserError(
                f"metadata {json_path.name} does not match {tensor_path.name}: "
                f"{key} is {meta.get(key)!r} in the JSON but {header.get(key)!r} in the tensor file"
            )
    if list(directions.shape) != meta.get("shape"):
        raise UserError(f"{tensor_path.name}: directions shape {list(directions.shape)} != metadata {meta.get('shape')}")
    return directions, meta, tensors


# ---- what reasoning_directions.json records about a selection (`interp.selection.select_reasoning_direction`) -----
SCORE_DEFINITIONS = {
    "ablation_score": "mean over reasoning prompts of metric(direction ablated everywhere) - metric(baseline); > 0: "
    "ablation hurts reasoning",
    "induction_score": "mean over control prompts of metric(baseline) - metric(intervention_strength * r at "
    "blocks.{layer}.resid_post); > 0: adding moves control prompts toward reasoning",
    "kl": "mean over control prompts of KL(baseline || ablated) of the next-token distribution",
}
SELECTION_PROTOCOL = ("candidates scored and one selected on the selection problems; the selected direction and the "
                      "null directions re-scored on the disjoint report problems, which alone give the reported "
                      "scores, z-scores and CIs")  # fmt: skip


def problem_sets(pairs: Sequence[tuple], result: SelectionResult) -> dict[str, dict[str, list[int]]]:
    """The problems of each set of a selection ("selection", "report"): pair_indices, reasoning_rows, control_rows.

    pairs: (reasoning row, control row) of every problem the selection was given (rows with .pair_index, .row_index).
    """
    return {
        name: {"pair_indices": [pairs[i][0].pair_index for i in index],
               "reasoning_rows": [pairs[i][0].row_index for i in index],
               "control_rows": [pairs[i][1].row_index for i in index]}
        for name, index in (("selection", result.selection_problems), ("report", result.report_problems))
    }  # fmt: skip


def selection_stats(result: SelectionResult, problems: dict, settings: dict) -> dict:
    """The "selection" record of reasoning_directions.json: the protocol, the problem sets (`problem_sets`) and how
    many were used, the run's `settings` (as given), the p-value definitions for its number of null directions and
    the report-set numbers (per-prompt values as lists; None when nothing was selected)."""
    n_null = 0 if result.null_directions is None else len(result.null_directions)
    report = None
    if result.report is not None:
        report = {**result.report, "problems": "report",
                  "per_prompt": {key: v.tolist() for key, v in result.report["per_prompt"].items()}}  # fmt: skip
    return {
        "split": "val", "protocol": SELECTION_PROTOCOL, "problems": problems,
        "n_selection_used": len(result.selection_problems), "n_report_used": len(result.report_problems),
        "selection_table_scores": "means over the selection problems; used only to choose",
        **settings, "n_null": n_null, "pvalue_definitions": pvalue_definitions(n_null), "report": report,
    }  # fmt: skip


def selection_summary(table: list[dict], report: dict | None) -> dict[str, float]:
    """A selection in one number per name, for logging. table: the annotated selection table; report: the
    selection_stats "report" (None when nothing was selected).

    Per scored layer, the position with the highest ablation_score there (filters ignored): {key}/L{layer:02d} for
    the SCORE_KEYS and best_position/L{layer:02d}; selected_layer / selected_position (-1 when nothing was
    selected), selected_{key} (selection set; NaN when nothing was selected), report_{key} and z_{key} (report set;
    NaN when undefined), n_kept (candidates that passed the filters).
    """
    summary: dict[str, float] = {}
    for layer in sorted({row["layer"] for row in table}):
        rows = [row for row in table if row["layer"] == layer]
        top = max(rows, key=lambda r: -math.inf if math.isnan(r["ablation_score"]) else r["ablation_score"])
        for key in SCORE_KEYS:
            summary[f"{key}/L{layer:02d}"] = float(top[key])
        summary[f"best_position/L{layer:02d}"] = float(top["position"])
    best = next((row for row in table if row["selected"]), None)
    summary["selected_layer"] = float(best["layer"]) if best else -1.0
    summary["selected_position"] = float(best["position"]) if best else -1.0
    zscores = (report or {}).get("zscores")
    for key in SCORE_KEYS:
        summary[f"selected_{key}"] = float(best[key]) if best else math.nan
        summary[f"report_{key}"] = float(report["scores"][key]) if report else math.nan
        summary[f"z_{key}"] = float(zscores[key]) if zscores else math.nan
    summary["n_kept"] = float(sum(row["filtered"] is None for row in table))
    return summary
