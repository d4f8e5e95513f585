"""The one hook mechanism: named residual-stream sites, registered only inside context managers.

Sites (the only naming used anywhere in the project):
    blocks.{l}.resid_pre   input of decoder layer l                      [batch, pos, d_model]
    blocks.{l}.resid_post  output of decoder layer l (for the last layer: before the final norm)

A hook function receives the activation tensor and returns None (observe) or a replacement tensor of the
same shape. Decoder layers return a Tensor in transformers 5 and a tuple in older versions and other
architectures; both are handled here, so a hook never sees `output[0]` of a Tensor (= batch item 0).
Hooks are global state on the modules: `hooked` removes every handle in `finally`, also on exceptions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from interp.backbone import decoder_layers
from interp.errors import UserError

HookFn = Callable[[torch.Tensor], "torch.Tensor | None"]
_SITE = re.compile(r"^blocks\.(\d+)\.(resid_pre|resid_post)$")


def site_name(layer: int, kind: str = "resid_post") -> str:
    return f"blocks.{layer}.{kind}"


def parse_site(name: str, n_layers: int | None = None) -> tuple[int, str]:
    """'blocks.3.resid_post' -> (3, 'resid_post'); raises UserError for malformed names or bad layers."""
    match = _SITE.match(name)
    if match is None:
        raise UserError(f"unknown hook site {name!r}; expected 'blocks.<layer>.resid_pre|resid_post'")
    layer, kind = int(match.group(1)), match.group(2)
    if n_layers is not None and not 0 <= layer < n_layers:
        raise UserError(f"hook site {name!r}: layer {layer} out of range for a model with {n_layers} layers")
    return layer, kind


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


def _raise_stop(module, args, output):
    raise StopForward


@contextmanager
def hooked(
    model: nn.Module, hooks: Iterable[tuple[str, HookFn]] = (), stop_after_layer: int | None = None
) -> Iterator[None]:
    """Attach `(site, fn)` hooks to the model's decoder layers for the duration of the block.

    Several hooks may share a site; they run in the given order, each seeing the previous one's result.
    `stop_after_layer=l` raises StopForward right after layer l's hooks (catch it with `run_until`).
    Nested `hooked` blocks compose: hooks of the outer block run first.
    """
    layers = decoder_layers(model)
    handles = []
    try:
        for name, fn in hooks:
            layer, kind = parse_site(name, len(layers))
            if kind == "resid_post":
                handles.append(layers[layer].register_forward_hook(_output_hook(fn)))
            else:
                handles.append(layers[layer].register_forward_pre_hook(_input_hook(fn), with_kwargs=True))
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
