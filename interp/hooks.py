"""The one hook mechanism: named sites in the residual stream, registered only inside context managers.

Sites (the only naming used anywhere in the project):
    embed                  output of the input (token) embedding                        [batch, pos, d_model]
    blocks.{l}.resid_pre   input of decoder layer l                                     [batch, pos, d_model]
    blocks.{l}.attn_out    output of layer l's attention module, before it is added to the residual stream
    blocks.{l}.mlp_out     output of layer l's MLP, before it is added to the residual stream
    blocks.{l}.resid_post  output of decoder layer l (for the last layer: before the final norm)

For Qwen2 / Llama / Mistral / Gemma the residual stream is written by exactly these modules:
resid_pre(0) = embed and resid_post(l) = resid_pre(l) + attn_out(l) + mlp_out(l). The attention and MLP
submodules are found structurally by attribute name (`self_attn` / `attn` / `self_attention` / `attention`,
`mlp` / `feed_forward` / `ffn`; GPT-2 uses `attn` and `mlp`). Caveats: models with learned absolute position
embeddings (GPT-2) add them after the `embed` site, and sandwich-norm models (Gemma 2/3, OLMo 2) normalize
attn_out / mlp_out again before adding them to the residual stream. `embed` does not fire when a caller
passes `inputs_embeds` instead of token ids.

A hook function receives the activation tensor and returns None (observe) or a replacement tensor of the
same shape. Decoder layers return a Tensor in transformers 5 and a tuple in older versions and other
architectures; attention modules return a tuple (attn_output, weights); both are handled here, so a hook
never sees `output[0]` of a Tensor (= batch item 0).
Hooks are global state on the modules: `hooked` removes every handle in `finally`, also on exceptions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from interp.backbone import base_decoder, decoder_layers
from interp.errors import UserError

HookFn = Callable[[torch.Tensor], "torch.Tensor | None"]
InputObserver = Callable[[dict], None]
_SITE = re.compile(r"^blocks\.(\d+)\.(resid_pre|resid_post|attn_out|mlp_out)$")
_ATTN_NAMES = ("self_attn", "attn", "self_attention", "attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")


def site_name(layer: int, kind: str = "resid_post") -> str:
    return f"blocks.{layer}.{kind}"


def parse_site(name: str, n_layers: int | None = None) -> tuple[int | None, str]:
    """'blocks.3.resid_post' -> (3, 'resid_post'); 'embed' -> (None, 'embed').

    Raises UserError for malformed names or layers out of range.
    """
    if name == "embed":
        return None, "embed"
    match = _SITE.match(name)
    if match is None:
        raise UserError(
            f"unknown hook site {name!r}; expected 'embed' or "
            "'blocks.<layer>.resid_pre|attn_out|mlp_out|resid_post'"
        )
    layer, kind = int(match.group(1)), match.group(2)
    if n_layers is not None and not 0 <= layer < n_layers:
        raise UserError(f"hook site {name!r}: layer {layer} out of range for a model with {n_layers} layers")
    return layer, kind


def block_part(block: nn.Module, part: str) -> nn.Module:
    """The attention ("attn") or MLP ("mlp") submodule of one decoder layer, found by attribute name."""
    names = _ATTN_NAMES if part == "attn" else _MLP_NAMES
    for name in names:
        module = getattr(block, name, None)
        if isinstance(module, nn.Module):
            return module
    raise UserError(
        f"cannot find the {part} submodule of {type(block).__name__} (looked for {', '.join(names)})"
    )


class StopForward(Exception):
    """Raised by the early-exit hook once every requested layer has run."""


def _output_hook(fn: HookFn):
    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        new = fn(hidden)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return hook


def _input_hook(fn: HookFn):
    def hook(module, args, kwargs):
        if args:
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        new = fn(kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    return hook


def _observer_hook(observe: InputObserver):
    def hook(module, args, kwargs):
        observe({"input_ids": args[0], **kwargs} if args else dict(kwargs))

    return hook


def _raise_stop(module, args, output):
    raise StopForward


@contextmanager
def hooked(
    model: nn.Module,
    hooks: Iterable[tuple[str, HookFn]] = (),
    stop_after_layer: int | None = None,
    observe_inputs: InputObserver | None = None,
) -> Iterator[None]:
    """Attach `(site, fn)` hooks to the model for the duration of the block.

    Several hooks may share a site; they run in the given order, each seeing the previous one's result.
    `stop_after_layer=l` raises StopForward right after layer l's hooks (catch it with `run_until`).
    `observe_inputs(kwargs)` is called before every forward of the base decoder (`base_decoder(model)`),
    before any site hook of that forward, with its keyword arguments (`input_ids`, `attention_mask`,
    `cache` or `past_key_values`, ...): it lets a hook know where the tokens of the current forward sit.
    Nested `hooked` blocks compose: hooks of the outer block run first.
    """
    layers = decoder_layers(model)
    handles = []
    try:
        if observe_inputs is not None:
            handles.append(
                base_decoder(model).register_forward_pre_hook(
                    _observer_hook(observe_inputs), with_kwargs=True
                )
            )
        for name, fn in hooks:
            layer, kind = parse_site(name, len(layers))
            if kind == "embed":
                handles.append(model.get_input_embeddings().register_forward_hook(_output_hook(fn)))
            elif kind == "resid_post":
                handles.append(layers[layer].register_forward_hook(_output_hook(fn)))
            elif kind == "resid_pre":
                handles.append(layers[layer].register_forward_pre_hook(_input_hook(fn), with_kwargs=True))
            else:
                part = block_part(layers[layer], "attn" if kind == "attn_out" else "mlp")
                handles.append(part.register_forward_hook(_output_hook(fn)))
        if stop_after_layer is not None:
            handles.append(layers[stop_after_layer].register_forward_hook(_raise_stop))
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_until(forward: Callable[[], object]) -> object | None:
    """Call `forward()`; return None instead of propagating an early-exit StopForward."""
    try:
        return forward()
    except StopForward:
        return None


class HookContext:
    """Base of the project's intervention context managers (`with Intervention(model, ...): forward`).

    A subclass sets `self.model`, defines `hooks()` -> [(site, fn)] and may define `observe_inputs(kwargs)`
    (see `hooked`), `_on_enter()` (reset per-use state) and `_on_exit()`. The hooks live exactly as long as the
    `with` block, also on exceptions; entering an active instance again raises (its per-use state would mix).
    """

    model: nn.Module
    _context = None  # the active `hooked(...)` context manager, None when inactive

    def hooks(self) -> list[tuple[str, HookFn]]:
        raise NotImplementedError

    def observe_inputs(self) -> InputObserver | None:
        return None

    def _on_enter(self) -> None:
        pass

    def _on_exit(self) -> None:
        pass

    def __enter__(self):
        if self._context is not None:
            raise RuntimeError(f"this {type(self).__name__} is already active")
        self._on_enter()
        context = hooked(self.model, self.hooks(), observe_inputs=self.observe_inputs())
        context.__enter__()
        self._context = context
        return self

    def __exit__(self, *exc) -> bool:
        context, self._context = self._context, None
        try:
            self._on_exit()
        finally:
            context.__exit__(*exc)
        return False
