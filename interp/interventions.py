"""Causal interventions on the residual stream: adding a direction, or ablating it everywhere.

- `InterventionHandler`: a context manager that, while active, either
    "add":    adds `strength * directions[l]` at `blocks.{l}.resid_post` of the chosen layers, or
    "ablate": removes one direction r_hat everywhere the residual stream is written (the `embed` output and
              every layer's `attn_out` and `mlp_out`): x <- x - strength * (x . r_hat) r_hat, in float32.
  `positions` limits this to the prompt's tokens ("prompt"), to the tokens after the prompt ("generated")
  or applies it to both ("all"). Inside `generate` the prompt is what the first forward saw; a teacher-forced
  forward (prompt + solution in one sequence, e.g. `interp.metrics.gold_solution_nll`) must declare where each
  row's prompt ends, with `prompt_boundary(model, prompt_lengths)` or `InterventionHandler(...,
  prompt_lengths=...)`; a forward that is neither raises UserError instead of silently changing nothing.
- `orthogonalize_weights`: the weight-space twin of "ablate" (strength 1): projects r_hat out of the embedding
  matrix and out of the output space of every attention and MLP output projection, in place.
- Ablating whole layers: `interp.ablation.LayerAblator`.

Every hook goes through `interp.hooks.hooked`, so hooks are removed on exit, also after exceptions, and
handlers nest: the hooks of the outer `with` block run first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from interp.activations import check_layers
from interp.backbone import decoder_layers
from interp.errors import UserError
from interp.hooks import HookContext, HookFn, block_part, site_name
from interp.token_roles import _check_prompt_lengths, _PromptTracker

MODES = ("add", "ablate")
POSITIONS = ("all", "prompt", "generated")
# Names of the output projection (the Linear writing into the residual stream) of attention and MLP modules.
_OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "down_proj", "c_proj", "dense_4h_to_h", "fc2", "dense", "wo")


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


class InterventionHandler(HookContext):
    """Add a direction at chosen layers, or ablate one direction everywhere, while the `with` block runs.

    Args:
        directions: [n_layers, d_model] (one per layer) or [d_model] (the same vector at every chosen layer).
        intervention_strength: "add": the multiplier c in x + c r_l (unnormalised r_l). "ablate": the fraction
            of the projection removed, x - c (x . r_hat) r_hat: 1 = directional ablation, 0 = identity,
            2 = reflection.
        layers: "add" only: layer indices (None = all layers). "ablate" always acts at every layer.
        mode: "add" (at `blocks.{l}.resid_post`) or "ablate" (at `embed` and every `attn_out` / `mlp_out`).
        positions: "all"; "prompt" (only the prompt's tokens); "generated" (only the tokens after the prompt).
            In HF `generate` the prompt is the first forward's (padded) input: "prompt" is the prefill,
            "generated" the decoding steps (without a KV cache: the tail of every re-run sequence). Any other
            forward needs a declared boundary (`prompt_lengths`, or `prompt_boundary` around the forward)
            and otherwise raises UserError. See `_PromptTracker`.
        ablation_layer: "ablate" with [n_layers, d_model] directions: which layer's direction to ablate.
        prompt_lengths: [batch] numbers of real (unpadded) prompt tokens per row, for teacher-forced forwards
            (prompt + continuation in one sequence, left or right padded) with positions "prompt" /
            "generated": in row i the first prompt_lengths[i] real tokens are prompt, the later real tokens
            generated, padding neither. Applies to every forward in the block without a KV cache (they must
            have len(prompt_lengths) rows); an active `prompt_boundary` takes precedence.

    Examples:
        with InterventionHandler(model, directions, 4.0, layers=[20], positions="generated"):
            out = model.generate(**batch, max_new_tokens=64)
        with InterventionHandler(model, directions, 4.0, layers=[20], positions="generated",
                                 prompt_lengths=[12, 9]):
            logits = model(**prompt_plus_solution_batch).logits
    """

    def __init__(
        self,
        model: PreTrainedModel,
        directions,
        intervention_strength: float = 1.0,
        layers: Sequence[int] | None = None,
        mode: str = "add",
        positions: str = "all",
        ablation_layer: int | None = None,
        prompt_lengths: Sequence[int] | torch.Tensor | None = None,
    ):
        if mode not in MODES:
            raise UserError(f"unknown intervention mode {mode!r}; expected one of {', '.join(MODES)}")
        if positions not in POSITIONS:
            raise UserError(
                f"unknown intervention positions {positions!r}; expected one of {', '.join(POSITIONS)}"
            )
        if prompt_lengths is not None and positions == "all":
            raise UserError("prompt_lengths are only used with positions 'prompt' or 'generated'")
        directions = intervention_directions(model, directions)
        n_layers = len(decoder_layers(model))
        self.model, self.mode, self.positions = model, mode, positions
        self.prompt_lengths = None if prompt_lengths is None else _check_prompt_lengths(prompt_lengths)
        self.strength = float(intervention_strength)
        self._tracker = _PromptTracker(model, positions, self.prompt_lengths)
        if mode == "add":
            if ablation_layer is not None:
                raise UserError("ablation_layer is only used with mode='ablate'")
            self.layers = check_layers(layers, n_layers)
            rows = directions if directions.ndim == 2 else directions.expand(n_layers, -1)
            self._sites = {site_name(layer): _OnDevice(self.strength * rows[layer]) for layer in self.layers}
            return
        if layers is not None:
            raise UserError(
                "mode='ablate' acts at every layer; choose its direction with ablation_layer, not layers"
            )
        if directions.ndim == 2:
            if ablation_layer is None:
                raise UserError(
                    "mode='ablate' needs one direction: pass a [d_model] vector or ablation_layer"
                )
            if not 0 <= int(ablation_layer) < n_layers:
                raise UserError(
                    f"ablation_layer {ablation_layer} out of range: the model has {n_layers} layers"
                )
            directions = directions[int(ablation_layer)]
        elif ablation_layer is not None:
            raise UserError(
                "ablation_layer picks a row of [n_layers, d_model] directions; got a single vector"
            )
        self.layers = list(range(n_layers))
        self.direction = unit_direction(directions)  # r_hat, float32 [d_model]
        unit = _OnDevice(self.direction)
        sites = ["embed"] + [
            site_name(layer, kind) for layer in self.layers for kind in ("attn_out", "mlp_out")
        ]
        self._sites = {site: unit for site in sites}

    def _edit(self, vector: _OnDevice, hidden: torch.Tensor) -> torch.Tensor:
        """The intervention on all positions of `hidden` [batch, pos, d_model], computed in float32."""
        x = hidden.to(torch.float32)
        v = vector.on(hidden.device)
        if self.mode == "add":
            return (x + v).to(hidden.dtype)
        projection = x @ v  # [batch, pos]
        return (x - self.strength * projection[..., None] * v).to(hidden.dtype)

    def _hook(self, vector: _OnDevice):
        def fn(hidden: torch.Tensor) -> torch.Tensor | None:
            if self.positions == "all":
                return self._edit(vector, hidden)
            keep = self._tracker.selected(hidden.shape[1], hidden.device)  # [batch or 1, pos]
            if not bool(keep.any()):
                return None
            new = self._edit(vector, hidden)
            return new if bool(keep.all()) else torch.where(keep[..., None], new, hidden)

        return fn

    def hooks(self) -> list[tuple[str, HookFn]]:
        """The (site, fn) pairs this handler registers."""
        return [(site, self._hook(vector)) for site, vector in self._sites.items()]

    def _on_enter(self) -> None:
        self._tracker = _PromptTracker(self.model, self.positions, self.prompt_lengths)

    def observe_inputs(self):
        return None if self.positions == "all" else self._tracker.observe


def _output_projection(part: nn.Module) -> nn.Module:
    for name in _OUTPUT_PROJECTIONS:
        module = getattr(part, name, None)
        if isinstance(module, nn.Module) and isinstance(getattr(module, "weight", None), torch.Tensor):
            return module
    raise UserError(
        f"cannot find the output projection of {type(part).__name__} (looked for {_OUTPUT_PROJECTIONS})"
    )


@torch.no_grad()
def orthogonalize_weights(model: PreTrainedModel, direction) -> None:
    """Project r_hat = direction / |direction| out of every weight that writes the residual stream, IN PLACE.

    - input embedding rows [vocab, d_model]: E <- E - (E r_hat) r_hat^T;
    - every attention and MLP output projection (o_proj / down_proj for Qwen2 and Llama), an nn.Linear with
      weight [d_model, in]: W <- W - r_hat (r_hat^T W), bias b <- b - (b . r_hat) r_hat if present
      (GPT-2's Conv1D, weight [in, d_model]: W <- W - (W r_hat) r_hat^T).
    Computed in float32, written back in the weights' dtype. The result equals running the original model
    inside `InterventionHandler(model, direction, mode="ablate")`. Tied input/output embeddings are untied
    first (the LM head keeps the original matrix; `config.tie_word_embeddings` is set to False).
    Takes a [d_model] vector. Use a `copy.deepcopy` of the model to keep the original.
    """
    direction = intervention_directions(model, direction)
    if direction.ndim != 1:
        raise UserError(
            f"orthogonalize_weights takes one [d_model] direction; got shape {tuple(direction.shape)}"
        )
    r = unit_direction(direction)
    embedding = model.get_input_embeddings()
    output = model.get_output_embeddings()
    if output is not None and output.weight is embedding.weight:
        output.weight = nn.Parameter(embedding.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
        model.config.get_text_config().tie_word_embeddings = False
    _project_rows(embedding.weight, r)
    d_model = _d_model(model)
    for block in decoder_layers(model):
        for part in ("attn", "mlp"):
            projection = _output_projection(block_part(block, part))
            weight = projection.weight
            if not weight.is_floating_point():
                raise UserError(
                    f"cannot orthogonalize {type(projection).__name__} weights of dtype {weight.dtype}"
                )
            if isinstance(projection, nn.Linear) and weight.shape[0] == d_model:
                vector = r.to(weight.device)
                new = weight.to(torch.float32) - torch.outer(vector, vector @ weight.to(torch.float32))
                weight.copy_(new.to(weight.dtype))
            elif type(projection).__name__ == "Conv1D" and weight.shape[1] == d_model:
                _project_rows(weight, r)
            else:
                raise UserError(
                    f"{type(projection).__name__} weight {tuple(weight.shape)} does not write d_model"
                )
            if getattr(projection, "bias", None) is not None:
                _project_rows(projection.bias[None], r)


def _project_rows(weight: torch.Tensor, r: torch.Tensor) -> None:
    """In place: every row w of `weight` [n, d_model] <- w - (w . r) r (float32 math)."""
    vector = r.to(weight.device)
    rows = weight.to(torch.float32)
    weight.copy_((rows - torch.outer(rows @ vector, vector)).to(weight.dtype))
