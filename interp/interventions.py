"""Causal interventions on the residual stream: adding a direction, or ablating it everywhere.

Two plain interventions, context managers active for the `with` block:
- `AddDirection(model, directions, strength, layers)`: x <- x + strength * directions[l] at
  `blocks.{l}.resid_post` of the chosen layers (unnormalised directions: |r| sets the scale);
  `AddTrainableVectors(model, vectors, layers)` is the same addition with live vectors (an nn.Parameter that
  gradients reach: the steering vectors of `lightning_modules.steering`);
- `AblateDirection(model, direction, fraction)`: removes one direction r_hat everywhere the residual stream is
  written (the `embed` output and every layer's `attn_out` and `mlp_out`): x <- x - fraction * (x . r_hat) r_hat,
  in float32 (fraction 1 = directional ablation, 0 = identity, 2 = reflection).
Both take `apply_to`: the prompt's tokens ("prompt"), the tokens after the prompt ("generated") or both
("all"). Inside `generate` the prompt is what the first forward saw; a teacher-forced forward (prompt + solution
in one sequence, e.g. `interp.metrics.gold_solution_nll`) must declare where each row's prompt ends, with
`prompt_boundary(model, prompt_lengths)` or `prompt_lengths=...`; a forward that is neither raises UserError
instead of silently changing nothing.
`InterventionHandler(model, directions, intervention_strength, mode="add" | "ablate", ...)` is the one entry
point of both (the seed's API): it builds the `AddDirection` or `AblateDirection` its mode names.
Weight-space twin of ablation: `interp.orthogonalize.orthogonalize_weights`; whole layers:
`interp.ablation.LayerAblator`.

Every hook goes through `interp.hooks.hooked`, so hooks are removed on exit, also after exceptions, and
handlers nest: the hooks of the outer `with` block run first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from interp.activations import check_layers
from interp.backbone import decoder_layers
from interp.errors import UserError
from interp.hooks import HookContext, HookFn, site_name
from interp.token_roles import _check_prompt_lengths, _PromptTracker

MODES = ("add", "ablate")
APPLY_TO = ("all", "prompt", "generated")


def _d_model(model: PreTrainedModel) -> int:
    return model.config.get_text_config().hidden_size


def intervention_directions(model: PreTrainedModel, directions) -> torch.Tensor:
    """What an intervention on `model` applies: a float32 CPU copy of `directions`, one [d_model] vector or one per
    layer [n_layers, d_model], finite; UserError otherwise. (`interp.directions.check_directions` checks stored
    [n_pos,] n_layers, d_model directions against a model's size instead.)"""
    directions = torch.as_tensor(directions).detach().to("cpu", torch.float32)
    d_model, n_layers = _d_model(model), len(decoder_layers(model))
    if directions.ndim not in (1, 2):
        raise UserError(
            f"directions must be [d_model] or [n_layers, d_model]; got shape {tuple(directions.shape)}"
        )
    if directions.shape[-1] != d_model:
        raise UserError(
            f"directions have d_model {directions.shape[-1]} but the model's hidden size is {d_model}"
        )
    if directions.ndim == 2 and directions.shape[0] != n_layers:
        raise UserError(
            f"directions have {directions.shape[0]} rows but the model has {n_layers} layers "
            "(pass one direction per layer, or a single [d_model] vector)"
        )
    if not bool(torch.isfinite(directions).all()):
        raise UserError("directions contain NaN or inf")
    return directions


def unit_direction(direction: torch.Tensor) -> torch.Tensor:
    """r / |r| in float32 (norm taken in float64) for a [d_model] vector; UserError for a zero vector."""
    norm = float(direction.to(torch.float64).norm())
    if norm == 0.0:
        raise UserError("cannot ablate a zero-norm direction")
    return (direction.to(torch.float64) / norm).to(torch.float32)


class _OnDevice:
    """A CPU tensor, copied once per (device, dtype) it is used on (layers may sit on several GPUs)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self._copies: dict[tuple, torch.Tensor] = {}

    def on(self, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
        key = (device, dtype or self.tensor.dtype)
        if key not in self._copies:
            self._copies[key] = self.tensor.to(device=device, dtype=key[1])
        return self._copies[key]


class _DirectionIntervention(HookContext):
    """What both interventions share: one vector per hooked site, edited on the tokens `apply_to` selects."""

    def __init__(self, model: PreTrainedModel, apply_to: str, prompt_lengths):
        if apply_to not in APPLY_TO:
            raise UserError(f"unknown apply_to {apply_to!r}; expected one of {', '.join(APPLY_TO)}")
        if prompt_lengths is not None and apply_to == "all":
            raise UserError("prompt_lengths are only used with apply_to 'prompt' or 'generated'")
        self.model, self.apply_to = model, apply_to
        self.prompt_lengths = None if prompt_lengths is None else _check_prompt_lengths(prompt_lengths)
        self._tracker = _PromptTracker(model, apply_to, self.prompt_lengths)
        self._sites: dict[str, _OnDevice] = {}  # site -> its vector, set by the subclass

    def _edit(self, vector: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The edited float32 hidden states [batch, pos, d_model] of x (float32, same shape)."""
        raise NotImplementedError

    def _hook(self, vector: _OnDevice):
        def fn(hidden: torch.Tensor) -> torch.Tensor | None:
            keep = None
            if self.apply_to != "all":
                keep = self._tracker.selected(hidden.shape[1], hidden.device)  # [batch or 1, pos]
                if not bool(keep.any()):
                    return None
            new = self._edit(vector.on(hidden.device), hidden.to(torch.float32)).to(hidden.dtype)
            return new if keep is None or bool(keep.all()) else torch.where(keep[..., None], new, hidden)

        return fn

    def hooks(self) -> list[tuple[str, HookFn]]:
        """The (site, fn) pairs this intervention registers."""
        return [(site, self._hook(vector)) for site, vector in self._sites.items()]

    def _on_enter(self) -> None:
        self._tracker = _PromptTracker(self.model, self.apply_to, self.prompt_lengths)

    def observe_inputs(self):
        return None if self.apply_to == "all" else self._tracker.observe


class AddDirection(_DirectionIntervention):
    """x <- x + strength * directions[l] at `blocks.{l}.resid_post` for every l in `layers` (None = all).

    directions: [n_layers, d_model] (one per layer) or [d_model] (the same vector at every chosen layer).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        directions,
        strength: float = 1.0,
        layers: Sequence[int] | None = None,
        apply_to: str = "all",
        prompt_lengths: Sequence[int] | torch.Tensor | None = None,
    ):
        super().__init__(model, apply_to, prompt_lengths)
        directions = intervention_directions(model, directions)
        n_layers = len(decoder_layers(model))
        self.strength, self.layers = float(strength), check_layers(layers, n_layers)
        rows = directions if directions.ndim == 2 else directions.expand(n_layers, -1)
        self._sites = {site_name(layer): _OnDevice(self.strength * rows[layer]) for layer in self.layers}

    def _edit(self, vector: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x + vector


class _Live:
    """strength * tensor[index], read on every use: no cached copy, so gradients reach `tensor` and optimizer
    steps take effect at once."""

    def __init__(self, tensor: torch.Tensor, index: int, strength: float):
        self.tensor, self.index, self.strength = tensor, index, strength

    def on(self, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
        row = self.tensor[self.index]
        return self.strength * row.to(device=device, dtype=dtype or row.dtype)


class AddTrainableVectors(_DirectionIntervention):
    """x <- x + strength * vectors[i] at `blocks.{layers[i]}.resid_post`: `AddDirection` with live vectors
    [len(layers), d_model] (e.g. an nn.Parameter) that gradients flow into; every forward reads their current
    values. `layers`: sorted, unique model layer indices."""

    def __init__(
        self,
        model: PreTrainedModel,
        vectors: torch.Tensor,
        layers: Sequence[int],
        strength: float = 1.0,
        apply_to: str = "all",
        prompt_lengths: Sequence[int] | torch.Tensor | None = None,
    ):
        super().__init__(model, apply_to, prompt_lengths)
        layers = [int(layer) for layer in layers]
        if check_layers(layers, len(decoder_layers(model))) != layers:
            raise UserError(f"steering layers must be sorted and unique, got {layers}")
        if tuple(vectors.shape) != (len(layers), _d_model(model)):
            raise UserError(f"vectors must be [{len(layers)}, {_d_model(model)}] (one per layer), got "
                            f"{tuple(vectors.shape)}")  # fmt: skip
        self.layers = layers
        self._sites = {site_name(layer): _Live(vectors, i, float(strength)) for i, layer in enumerate(layers)}

    def _edit(self, vector: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x + vector


class AblateDirection(_DirectionIntervention):
    """x <- x - fraction * (x . r_hat) r_hat at `embed` and every `blocks.{l}.attn_out` / `mlp_out`.

    direction: one [d_model] vector r (normalised here: r_hat = r / |r|, norm in float64).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        direction,
        fraction: float = 1.0,
        apply_to: str = "all",
        prompt_lengths: Sequence[int] | torch.Tensor | None = None,
    ):
        super().__init__(model, apply_to, prompt_lengths)
        direction = intervention_directions(model, direction)
        if direction.ndim != 1:
            raise UserError(f"AblateDirection takes one [d_model] direction; got shape {tuple(direction.shape)}")
        self.fraction = float(fraction)
        self.layers = list(range(len(decoder_layers(model))))
        self.direction = unit_direction(direction)  # r_hat, float32 [d_model]
        unit = _OnDevice(self.direction)
        sites = ["embed"] + [site_name(layer, kind) for layer in self.layers for kind in ("attn_out", "mlp_out")]
        self._sites = {site: unit for site in sites}

    def _edit(self, vector: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        projection = x @ vector  # [batch, pos]
        return x - self.fraction * projection[..., None] * vector


class InterventionHandler(HookContext):
    """Add a direction at chosen layers, or ablate one direction everywhere, while the `with` block runs.

    The seed's entry point to `AddDirection` (mode "add") and `AblateDirection` (mode "ablate"); it holds the one
    its mode names as `.intervention`.

    Args:
        directions: [n_layers, d_model] (one per layer) or [d_model] (the same vector at every chosen layer).
        intervention_strength: "add": AddDirection's `strength`, the multiplier c in x + c r_l (unnormalised
            r_l). "ablate": AblateDirection's `fraction` of the projection removed: 1 = directional ablation.
        layers: "add" only: layer indices (None = all layers). "ablate" always acts at every layer.
        mode: "add" (at `blocks.{l}.resid_post`) or "ablate" (at `embed` and every `attn_out` / `mlp_out`).
        apply_to: "all"; "prompt" (only the prompt's tokens); "generated" (only the tokens after the prompt).
            In HF `generate` the prompt is the first forward's (padded) input: "prompt" is the prefill,
            "generated" the decoding steps (without a KV cache: the tail of every re-run sequence). Any other
            forward needs a declared boundary (`prompt_lengths`, or `prompt_boundary` around the forward)
            and otherwise raises UserError. See `interp.token_roles`.
        ablation_layer: "ablate" with [n_layers, d_model] directions: which layer's direction to ablate.
        prompt_lengths: [batch] numbers of real (unpadded) prompt tokens per row, for teacher-forced forwards
            (prompt + continuation in one sequence, left or right padded) with apply_to "prompt" /
            "generated": in row i the first prompt_lengths[i] real tokens are prompt, the later real tokens
            generated, padding neither. Applies to every forward in the block without a KV cache (they must
            have len(prompt_lengths) rows); an active `prompt_boundary` takes precedence.

    Examples:
        with InterventionHandler(model, directions, 4.0, layers=[20], apply_to="generated"):
            out = model.generate(**batch, max_new_tokens=64)
        with InterventionHandler(model, directions, 4.0, layers=[20], apply_to="generated", prompt_lengths=[12, 9]):
            logits = model(**prompt_plus_solution_batch).logits
    """

    def __init__(
        self,
        model: PreTrainedModel,
        directions,
        intervention_strength: float = 1.0,
        layers: Sequence[int] | None = None,
        mode: str = "add",
        apply_to: str = "all",
        ablation_layer: int | None = None,
        prompt_lengths: Sequence[int] | torch.Tensor | None = None,
    ):
        if mode not in MODES:
            raise UserError(f"unknown intervention mode {mode!r}; expected one of {', '.join(MODES)}")
        self.model, self.mode = model, mode
        if mode == "add":
            if ablation_layer is not None:
                raise UserError("ablation_layer is only used with mode='ablate'")
            self.intervention = AddDirection(model, directions, intervention_strength, layers, apply_to, prompt_lengths)
            return
        if layers is not None:
            raise UserError("mode='ablate' acts at every layer; choose its direction with ablation_layer, not layers")
        directions = intervention_directions(model, directions)
        n_layers = len(decoder_layers(model))
        if directions.ndim == 2:
            if ablation_layer is None:
                raise UserError("mode='ablate' needs one direction: pass a [d_model] vector or ablation_layer")
            if not 0 <= int(ablation_layer) < n_layers:
                raise UserError(f"ablation_layer {ablation_layer} out of range: the model has {n_layers} layers")
            directions = directions[int(ablation_layer)]
        elif ablation_layer is not None:
            raise UserError("ablation_layer picks a row of [n_layers, d_model] directions; got a single vector")
        self.intervention = AblateDirection(model, directions, intervention_strength, apply_to, prompt_lengths)

    def hooks(self) -> list[tuple[str, HookFn]]:
        return self.intervention.hooks()

    def _on_enter(self) -> None:
        self.intervention._on_enter()

    def observe_inputs(self):
        return self.intervention.observe_inputs()
