"""Causal interventions on the residual stream: adding a direction, ablating it, ablating whole layers.

- `InterventionHandler`: a context manager that, while active, either
    "add":    adds `strength * directions[l]` at `blocks.{l}.resid_post` of the chosen layers, or
    "ablate": removes one direction r_hat everywhere the residual stream is written (the `embed` output and
              every layer's `attn_out` and `mlp_out`): x <- x - strength * (x . r_hat) r_hat, in float32.
  `positions` limits this to the prompt's tokens ("prompt"), to the tokens produced by generation
  ("generated": positions >= the prompt length) or applies it to both ("all").
- `orthogonalize_weights`: the weight-space twin of "ablate" (strength 1): projects r_hat out of the embedding
  matrix and out of the output space of every attention and MLP output projection, in place.
- `LayerAblator`: a context manager that replaces a layer's contribution `resid_post - resid_pre`
  [batch, pos, d_model] by zero, by its mean over reference prompts, or by what the layer wrote on reference
  prompts ("resample").

Every hook goes through `interp.hooks.hooked`, so hooks are removed on exit, also after exceptions, and
handlers nest: the hooks of the outer `with` block run first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from interp.activations import check_layers, run_hooked_decoder
from interp.backbone import decoder_layers, input_device
from interp.errors import UserError
from interp.hooks import HookFn, block_part, hooked, site_name
from interp.prompts import tokenize_prompts

MODES = ("add", "ablate")
POSITIONS = ("all", "prompt", "generated")
ABLATION_METHODS = ("zero", "mean", "resample")
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


class _PromptTracker:
    """Where the tokens of the current forward sit relative to the prompt, for positions "prompt"/"generated".

    A forward starts a new prompt when its KV cache is empty (or it has none) unless, without a cache, its
    tokens extend the current prompt's tokens: generation without a cache re-runs prompt + generated tokens
    at every step. So a later call on the same prompt + extra tokens without a cache counts as generated
    tokens; every other forward starts a new prompt. With a cache, each decoding step (seq len 1) sits at
    absolute position `past length`.
    """

    def __init__(self):
        self.prompt_len: int | None = None
        self.prompt_tokens: torch.Tensor | None = None  # [batch, prompt_len] ids (or [.., d] embeddings)
        self.start = 0  # absolute position of the current forward's first token

    def observe(self, kwargs: dict) -> None:
        tokens = kwargs.get("input_ids")
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past, seq = _past_length(cache), tokens.shape[1]
        self.start = past
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
        if not continues:
            self.prompt_len, self.prompt_tokens = seq, tokens.detach().clone()

    def selected(self, seq: int, positions: str, device: torch.device) -> torch.Tensor:
        """[pos] bool: which of the current forward's `seq` tokens the intervention applies to."""
        absolute = torch.arange(self.start, self.start + seq, device=device)
        is_prompt = absolute < (self.prompt_len if self.prompt_len is not None else seq)
        return is_prompt if positions == "prompt" else ~is_prompt


class InterventionHandler:
    """Add a direction at chosen layers, or ablate one direction everywhere, while the `with` block runs.

    Args:
        directions: [n_layers, d_model] (one per layer) or [d_model] (the same vector at every chosen layer).
        intervention_strength: "add": the multiplier c in x + c r_l (unnormalised r_l). "ablate": the fraction
            of the projection removed, x - c (x . r_hat) r_hat: 1 = directional ablation, 0 = identity,
            2 = reflection.
        layers: "add" only: layer indices (None = all layers). "ablate" always acts at every layer.
        mode: "add" (at `blocks.{l}.resid_post`) or "ablate" (at `embed` and every `attn_out` / `mlp_out`).
        positions: "all"; "prompt" (only the prompt's tokens, i.e. the prefill forward); "generated" (only
            tokens at positions >= the prompt length: with a KV cache the decoding steps, without one the
            tail of every re-run sequence). See `_PromptTracker` for how a new prompt is recognised.
        ablation_layer: "ablate" with [n_layers, d_model] directions: which layer's direction to ablate.

    Example:
        with InterventionHandler(model, directions, 4.0, layers=[20], positions="generated"):
            out = model.generate(**batch, max_new_tokens=64)
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
    ):
        if mode not in MODES:
            raise UserError(f"unknown intervention mode {mode!r}; expected one of {', '.join(MODES)}")
        if positions not in POSITIONS:
            raise UserError(
                f"unknown intervention positions {positions!r}; expected one of {', '.join(POSITIONS)}"
            )
        directions = check_directions(model, directions)
        n_layers = len(decoder_layers(model))
        self.model, self.mode, self.positions = model, mode, positions
        self.strength = float(intervention_strength)
        self._tracker = _PromptTracker()
        self._stack: ExitStack | None = None
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
            keep = self._tracker.selected(hidden.shape[1], self.positions, hidden.device)  # [pos]
            if not bool(keep.any()):
                return None
            new = self._edit(vector, hidden)
            return new if bool(keep.all()) else torch.where(keep[None, :, None], new, hidden)

        return fn

    def hooks(self) -> list[tuple[str, HookFn]]:
        """The (site, fn) pairs this handler registers."""
        return [(site, self._hook(vector)) for site, vector in self._sites.items()]

    def __enter__(self) -> InterventionHandler:
        if self._stack is not None:
            raise RuntimeError("this InterventionHandler is already active")
        self._tracker = _PromptTracker()
        observe = None if self.positions == "all" else self._tracker.observe
        stack = ExitStack()
        stack.enter_context(hooked(self.model, self.hooks(), observe_inputs=observe))
        self._stack = stack
        return self

    def __exit__(self, *exc) -> bool:
        stack, self._stack = self._stack, None
        stack.close()
        return False


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


def _reference_batches(
    reference_inputs, tokenizer, batch_size: int | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) batches [batch, seq] from a tokenized batch dict or a list of prompts."""
    if isinstance(reference_inputs, Mapping):
        ids = torch.as_tensor(reference_inputs["input_ids"])
        ids = ids[None] if ids.ndim == 1 else ids
        mask = reference_inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(ids.shape)
        return [(ids, mask)]
    prompts = [reference_inputs] if isinstance(reference_inputs, str) else list(reference_inputs)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise UserError(
            "reference_inputs must be a tokenized batch {'input_ids', 'attention_mask'} or a list of prompts"
        )
    if tokenizer is None:
        raise UserError(
            "reference prompts given as text need the tokenizer (LayerAblator(..., tokenizer=...))"
        )
    size = batch_size or len(prompts)
    batches = [tokenize_prompts(tokenizer, prompts[i : i + size]) for i in range(0, len(prompts), size)]
    return [(batch["input_ids"], batch["attention_mask"]) for batch in batches]


@torch.no_grad()
def layer_contributions(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: Sequence[int]
) -> dict[int, torch.Tensor]:
    """What each layer adds to the residual stream, resid_post - resid_pre: float64 [batch, seq, d_model].

    One forward of the base decoder (left-padding-safe position ids, no cache, no LM head, stops after the
    deepest layer), with whatever other hooks are active at the time. Returned on the CPU.
    """
    device = input_device(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    inputs: dict[int, torch.Tensor] = {}
    out: dict[int, torch.Tensor] = {}

    def store(layer: int):
        return lambda hidden: inputs.__setitem__(layer, hidden)

    def difference(layer: int):
        def fn(hidden: torch.Tensor) -> None:
            out[layer] = (hidden.to(torch.float64) - inputs.pop(layer).to(torch.float64)).cpu()

        return fn

    hooks = [(site_name(layer, "resid_pre"), store(layer)) for layer in layers]
    hooks += [(site_name(layer), difference(layer)) for layer in layers]
    run_hooked_decoder(model, input_ids, attention_mask, hooks, max(layers))
    return out


class LayerAblator:
    """Replace the contribution c_l = resid_post - resid_pre of chosen layers while the `with` block runs.

    ablation_method:
        "zero":     c_l <- 0, i.e. resid_post = resid_pre exactly (the layer is skipped; same as deleting it
                    from the layer stack).
        "mean":     c_l <- m_l, the mean of c_l over every real (non-padding) token of the reference prompts,
                    accumulated in float64 ([d_model] per layer, `self.means`), at every position.
        "resample": c_l[i, j] <- the contribution the layer wrote at row i, column j of the reference batch
                    (`self.contributions[l]`, [n_ref, seq, d_model]). Rows are paired by index and columns by
                    position in the left-padded batches, i.e. aligned at the last token: column j of both is
                    the same number of tokens before the end. The ablated forward must therefore have the
                    reference batch's shape [n_ref, seq] (single forwards, not KV-cached decoding steps), and
                    every real token of row i must face a real token of reference row i (the reference prompt
                    is at least as long). To resample from other prompts of the same batch, pass the batch
                    with its rows permuted, e.g. `tokenize_prompts(tokenizer, prompts[1:] + prompts[:1])`.
    reference_inputs: a tokenized batch {"input_ids", "attention_mask"} ([batch, seq]) or a list of prompt
        strings (then pass `tokenizer`; "mean" tokenizes them in batches of `batch_size`, "resample" as one
        left-padded batch). Reference contributions are computed once, here, from a run with the hooks that
        are active at construction time (normally none: the clean model).
    Hooks of the outer `with` block run first: put an ablator outside a handler whose edits must survive it.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        layer_indices: int | Sequence[int],
        ablation_method: str = "zero",
        reference_inputs=None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        batch_size: int = 8,
    ):
        if ablation_method not in ABLATION_METHODS:
            raise UserError(
                f"unknown ablation_method {ablation_method!r}; expected one of {', '.join(ABLATION_METHODS)}"
            )
        layer_indices = [layer_indices] if isinstance(layer_indices, int) else layer_indices
        self.model, self.method = model, ablation_method
        self.layers = check_layers(layer_indices, len(decoder_layers(model)))
        self._replacements: dict[int, _OnDevice] = {}
        self._inputs: dict[int, torch.Tensor] = {}
        self._stack: ExitStack | None = None
        self.reference_mask: torch.Tensor | None = None
        if ablation_method == "zero":
            if reference_inputs is not None:
                raise UserError("reference_inputs are only used by ablation_method 'mean' and 'resample'")
            return
        if reference_inputs is None:
            raise UserError(
                f"ablation_method {ablation_method!r} needs reference_inputs (prompts or a tokenized batch)"
            )
        if ablation_method == "mean":
            sums = {layer: torch.zeros(_d_model(model), dtype=torch.float64) for layer in self.layers}
            count = 0
            for ids, mask in _reference_batches(reference_inputs, tokenizer, batch_size):
                contributions = layer_contributions(model, ids, mask, self.layers)
                weights = mask.to(torch.float64)[:, :, None]  # [batch, seq, 1]
                sums = {
                    layer: sums[layer] + (contributions[layer] * weights).sum((0, 1)) for layer in self.layers
                }
                count += int(mask.sum())
            if count == 0:
                raise UserError("reference_inputs hold no real tokens (the attention mask is all zeros)")
            self.means = {layer: sums[layer] / count for layer in self.layers}  # float64 [d_model]
            self._replacements = {
                layer: _OnDevice(self.means[layer].to(torch.float32)) for layer in self.layers
            }
        else:
            [(ids, mask)] = _reference_batches(reference_inputs, tokenizer, None)
            contributions = layer_contributions(model, ids, mask, self.layers)
            self.contributions = {layer: contributions[layer].to(torch.float32) for layer in self.layers}
            self.reference_mask = mask.bool().cpu()  # [n_ref, seq]
            self._replacements = {layer: _OnDevice(self.contributions[layer]) for layer in self.layers}

    def _check_resample_batch(self, kwargs: dict) -> None:
        tokens = kwargs.get("input_ids")
        tokens = kwargs.get("inputs_embeds") if tokens is None else tokens
        shape, expected = tuple(tokens.shape[:2]), tuple(self.reference_mask.shape)
        if shape != expected:
            raise UserError(
                f"resample ablation: the forward has {shape[0]} x {shape[1]} tokens but the reference batch "
                f"{expected[0]} x {expected[1]}; rows and (left-padded) columns are paired: shapes must match"
            )
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.ndim == 2:
            uncovered = mask.bool().cpu() & ~self.reference_mask
            if bool(uncovered.any()):
                row = int(uncovered.any(-1).nonzero()[0, 0])
                raise UserError(
                    f"resample ablation: reference prompt {row} is shorter than the prompt in row {row}"
                )

    def _store(self, layer: int):
        return lambda hidden: self._inputs.__setitem__(layer, hidden)

    def _replace(self, layer: int):
        def fn(hidden: torch.Tensor) -> torch.Tensor:
            resid_pre = self._inputs.pop(layer)
            if self.method == "zero":
                return resid_pre
            replacement = self._replacements[layer].on(hidden.device)  # [d_model] or [batch, seq, d_model]
            return (resid_pre.to(torch.float32) + replacement).to(hidden.dtype)

        return fn

    def hooks(self) -> list[tuple[str, HookFn]]:
        """The (site, fn) pairs this ablator registers: store resid_pre, then replace resid_post."""
        hooks = [(site_name(layer, "resid_pre"), self._store(layer)) for layer in self.layers]
        return hooks + [(site_name(layer), self._replace(layer)) for layer in self.layers]

    def __enter__(self) -> LayerAblator:
        if self._stack is not None:
            raise RuntimeError("this LayerAblator is already active")
        observe = self._check_resample_batch if self.method == "resample" else None
        stack = ExitStack()
        stack.enter_context(hooked(self.model, self.hooks(), observe_inputs=observe))
        self._stack = stack
        return self

    def __exit__(self, *exc) -> bool:
        stack, self._stack = self._stack, None
        self._inputs.clear()
        stack.close()
        return False
