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

import inspect
import sys
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.generation.utils import GenerationMixin

from interp.activations import check_layers
from interp.backbone import base_decoder, decoder_layers
from interp.errors import UserError
from interp.hooks import HookContext, HookFn, block_part, site_name

MODES = ("add", "ablate")
POSITIONS = ("all", "prompt", "generated")
# Names of the output projection (the Linear writing into the residual stream) of attention and MLP modules.
_OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "down_proj", "c_proj", "dense_4h_to_h", "fc2", "dense", "wo")


def _d_model(model: PreTrainedModel) -> int:
    return model.config.get_text_config().hidden_size


def check_directions(model: PreTrainedModel, directions) -> torch.Tensor:
    """float32 CPU copy of `directions`, either [d_model] or [n_layers, d_model]; UserError otherwise."""
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


def _past_length(cache) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2]) if len(cache) else 0  # legacy tuple of (key, value) per layer


def _tokens_and_cache(kwargs: dict) -> tuple[torch.Tensor, object]:
    """The forward's input_ids (or inputs_embeds) [batch, seq(, d)] and its KV cache (None without one)."""
    tokens = kwargs.get("input_ids")
    tokens = kwargs.get("inputs_embeds") if tokens is None else tokens
    return tokens, kwargs.get("cache", kwargs.get("past_key_values"))


def real_token_index(kwargs: dict) -> torch.Tensor:
    """[batch, seq] long: the index of each token of a forward among its row's real (non-padding) tokens,
    counting tokens already in the KV cache; -1 at padding.

    `kwargs` are the base decoder's forward arguments (as `hooked(observe_inputs=...)` passes them); padding
    is read from the 2D `attention_mask` (left or right padded; None: no padding), which spans the cached
    tokens too (as in HF generate).
    """
    tokens, cache = _tokens_and_cache(kwargs)
    (batch, seq), past = tokens.shape[:2], _past_length(cache)
    mask = kwargs.get("attention_mask")
    if mask is None:
        return torch.arange(past, past + seq, device=tokens.device).expand(batch, seq)
    if mask.ndim != 2 or tuple(mask.shape) != (batch, past + seq):
        raise UserError(
            f"cannot tell padding from real tokens: expected a 2D attention_mask of shape {(batch, past + seq)}, "
            f"got {tuple(mask.shape)}"
        )
    real = mask.bool()
    index = (real.long().cumsum(-1) - 1).masked_fill(~real, -1)
    return index[:, past:]


# base decoder -> [batch] prompt lengths declared by the innermost active `prompt_boundary`
_BOUNDARIES: weakref.WeakKeyDictionary[nn.Module, torch.Tensor] = weakref.WeakKeyDictionary()


def _check_prompt_lengths(prompt_lengths) -> torch.Tensor:
    lengths = torch.as_tensor(prompt_lengths).detach().cpu()
    if lengths.ndim != 1 or lengths.numel() == 0 or lengths.is_floating_point() or bool((lengths < 0).any()):
        raise UserError(f"prompt_lengths must be a [batch] list of token counts >= 0, got {prompt_lengths!r}")
    return lengths.long()


@contextmanager
def prompt_boundary(model: nn.Module, prompt_lengths) -> Iterator[None]:
    """Declare, for the teacher-forced forwards of `model` inside the block, that row i's first
    `prompt_lengths[i]` real (non-padding) tokens are its prompt and its later real tokens are "generated".

    Read by every active `InterventionHandler` with positions "prompt" / "generated" (it overrides the
    handler's own `prompt_lengths`) in every forward without a KV cache, which must have len(prompt_lengths)
    rows. Forwards with a KV cache (HF generate) keep the generation rule.
    """
    lengths, key = _check_prompt_lengths(prompt_lengths), base_decoder(model)
    previous = _BOUNDARIES.get(key)
    _BOUNDARIES[key] = lengths
    try:
        yield
    finally:
        if previous is None:
            _BOUNDARIES.pop(key, None)
        else:
            _BOUNDARIES[key] = previous


_GENERATE = inspect.unwrap(GenerationMixin.generate).__code__


def _inside_generate() -> bool:
    """True when HF `generate` is on the call stack. Its first forward without a KV cache looks exactly like
    a teacher-forced forward; only where it is called from tells them apart."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _GENERATE:
            return True
        frame = frame.f_back
    return False


class _PromptTracker:
    """Which tokens of the current forward are prompt, for positions "prompt" / "generated".

    - A forward without a KV cache under a declared boundary (`prompt_lengths`): row i's first
      prompt_lengths[i] real tokens are prompt, its later real tokens generated; padding is neither.
    - Otherwise only forwards of HF `generate` are understood: a forward with an empty KV cache (or, without a
      cache, one that does not extend the previous forward's tokens) starts a new prompt, its whole (padded)
      width; with a cache each decoding step sits at absolute position `past length`; without a cache
      (generate(use_cache=False) re-runs prompt + generated tokens at every step) a forward whose tokens extend
      the current prompt's tokens has its tail generated.
    - Any other forward (teacher forcing without a boundary) raises UserError: there is no prompt to tell.
    """

    def __init__(self, model: nn.Module, positions: str, prompt_lengths: torch.Tensor | None = None):
        self.decoder, self.positions, self.own_lengths = base_decoder(model), positions, prompt_lengths
        self.prompt_len: int | None = None
        self.prompt_tokens: torch.Tensor | None = None  # [batch, prompt_len] ids (or [.., d] embeddings)
        self.start = 0  # absolute position of the current forward's first token
        self.declared: tuple[torch.Tensor, torch.Tensor] | None = None  # (is_prompt, is_real) [batch, seq]

    def observe(self, kwargs: dict) -> None:
        """Called before every forward of the base decoder (`hooked(observe_inputs=...)`)."""
        tokens, cache = _tokens_and_cache(kwargs)
        past, seq = _past_length(cache), tokens.shape[1]
        self.start, self.declared = past, None
        lengths = _BOUNDARIES.get(self.decoder, self.own_lengths)
        if lengths is not None and cache is None:
            self.prompt_len = self.prompt_tokens = None  # a later generate starts afresh
            self._declare(kwargs, lengths)
            return
        if past > 0:  # a decoding step (or a continued cache: then everything seen so far is prompt)
            if self.prompt_len is None:
                self.prompt_len = past + seq
            return
        continues = (
            self.prompt_tokens is not None
            and seq > self.prompt_len
            and tokens.shape[0] == self.prompt_tokens.shape[0]
            and torch.equal(tokens[:, : self.prompt_len].to(self.prompt_tokens.device), self.prompt_tokens)
        )
        if continues:
            return
        if cache is None and not _inside_generate():
            raise UserError(
                f"positions={self.positions!r} on a forward outside generate: say where each prompt ends with "
                "InterventionHandler(..., prompt_lengths=...) or interp.interventions.prompt_boundary"
            )
        self.prompt_len, self.prompt_tokens = seq, tokens.detach().clone()

    def _declare(self, kwargs: dict, lengths: torch.Tensor) -> None:
        index = real_token_index(kwargs)  # [batch, seq]
        if lengths.shape[0] != index.shape[0]:
            raise UserError(f"prompt_lengths has {lengths.shape[0]} rows but the forward has {index.shape[0]}")
        n_real = (index >= 0).sum(-1).cpu()
        if bool((lengths > n_real).any()):
            row = int((lengths > n_real).nonzero()[0, 0])
            raise UserError(f"prompt_lengths[{row}] = {int(lengths[row])} exceeds row {row}'s {int(n_real[row])} tokens")
        is_prompt = (index >= 0) & (index < lengths.to(index.device)[:, None])
        self.declared = (is_prompt, index >= 0)

    def selected(self, seq: int, device: torch.device) -> torch.Tensor:
        """[batch or 1, pos] bool: which of the current forward's `seq` tokens the intervention applies to."""
        if self.declared is not None:
            is_prompt, real = (mask.to(device) for mask in self.declared)
            return is_prompt if self.positions == "prompt" else real & ~is_prompt
        absolute = torch.arange(self.start, self.start + seq, device=device)
        is_prompt = absolute < (self.prompt_len if self.prompt_len is not None else seq)
        return (is_prompt if self.positions == "prompt" else ~is_prompt)[None]


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
        directions = check_directions(model, directions)
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
    direction = check_directions(model, direction)
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
