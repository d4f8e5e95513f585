"""Reasoning directions: contrastive means, PCA of paired differences, null directions, and their file format.

Activations come from `interp.activations.collect_activations`: [n, n_layers, d_model] for one-vector
position specs, [n, n_pos, n_layers, d_model] otherwise. Every function here also takes an ITERABLE of such
batches (a generator over an activation cache, a DataLoader, ...), so any number of prompts fits in memory.
Directions come back without the prompt axis: [n_layers, d_model] or [n_pos, n_layers, d_model], float32.

Null directions for testing one direction r built from activations (`null_directions`, NULL_DEFINITIONS).
The rows are matched pairs (a reasoning and a control prompt per problem), so r = mean of the within-pair
differences d_i and problem content cancels out of it; the nulls are built from the same d_i:
balanced sign-flip placebos (sum_i s_i d_i / n_pairs, half the signs +1, half -1: the class difference cancels
exactly, the noise is r's) and covariance-shaped Gaussians (covariance of the d_i). Unlike isotropic noise, which
any direction built from anisotropic activations beats, these are shaped like r's noise. A pooled random split
of the rows ignoring the pairs (pooled_placebo) is kept only for comparison: it carries between-problem
variance and part of the real class difference. Every null is rescaled to |r|.

File format (`save_directions` / `load_directions`):
    reasoning_directions.safetensors   tensor "directions" (float32) + optional extra named tensors; its
                                       header repeats the key metadata so a stray .json is caught on load
    reasoning_directions.json          metadata: model, layers, positions, d_model, shape, norms, selection
                                       table, ... (whatever the caller passes, plus the computed fields)
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from interp.errors import UserError
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


def check_directions(
    directions: torch.Tensor, n_layers: int, d_model: int, layers: Sequence[int] | None = None
) -> None:
    """Raise UserError unless `directions` ([n_layers, d] or [n_pos, n_layers, d]) fit a model.

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


def _finite(value):
    """A copy of a JSON-able value with every non-finite float (NaN, +-inf) replaced by None (JSON null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
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
    save_file(tensors, str(tensor_path), metadata=header)
    json_path.write_text(json.dumps(_finite(meta), indent=2, sort_keys=True, allow_nan=False) + "\n")
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
