"""The peers of `make bench`'s extraction rows (bench/suite.py), each called as its users call it by default and in
its fastest form, reading the residual stream after every requested layer (and keeping the last token, as ours
does). Installed with `pip install -e .[peers]`; a missing peer becomes a note in the table, not an error.
    TransformerLens 4.x  TransformerBridge.boot_transformers(dir, hf_model=model) (the same weights, no copy);
                         default: run_with_cache(names_filter=the blocks.{l}.hook_resid_post names);
                         fastest: the same with stop_at_layer = last requested layer + 1
    nnsight 0.8          LanguageModel(model, dispatch=True); default: trace + .save() of each layer's output;
                         fastest: the same, then tracer.stop() (skips the layers after the last saved one and the head)
Each form is checked once against `capture_residuals` before it is timed.
"""

from __future__ import annotations

import tempfile

import torch


def _check(name: str, got: torch.Tensor, model, ids, mask, layer: int) -> None:
    """Against `capture_residuals` (tested against HF output_hidden_states, whose last entry is after the final
    norm and so is not the residual stream after the last layer)."""
    from interp.activations import capture_residuals
    from interp.positions import PositionSpec

    expected = capture_residuals(model, ids, mask, [layer], PositionSpec.parse("last"))[:, 0, 0]
    if not torch.allclose(got.float(), expected, atol=1e-4, rtol=1e-4):
        raise AssertionError(f"{name} does not read the residual stream after layer {layer}")


def transformer_lens_modes(model, ids, mask, cases: dict[str, list[int]]) -> dict:
    from transformer_lens.model_bridge import TransformerBridge

    from interp.backbone import load_tokenizer

    directory = tempfile.mkdtemp(prefix="bench-tl-")
    model.config.save_pretrained(directory)
    bridge = TransformerBridge.boot_transformers(directory, hf_model=model, tokenizer=load_tokenizer("tiny"))
    modes = {}
    for case, layers in cases.items():
        names = {f"blocks.{layer}.hook_resid_post" for layer in layers}
        last = f"blocks.{layers[-1]}.hook_resid_post"

        def default(names=names, last=last):
            _, cache = bridge.run_with_cache(ids, names_filter=lambda n: n in names, attention_mask=mask)
            return cache[last][:, -1]

        def fastest(names=names, last=last, stop=layers[-1] + 1):
            _, cache = bridge.run_with_cache(ids, names_filter=lambda n: n in names, attention_mask=mask,
                                             stop_at_layer=stop)  # fmt: skip
            return cache[last][:, -1]

        for label, fn in (("TransformerLens run_with_cache", default), ("TransformerLens stop_at_layer (fastest)", fastest)):
            _check(label, fn(), model, ids, mask, layers[-1])
            modes[f"{label} | {case}"] = fn
    return modes


def nnsight_modes(model, ids, mask, cases: dict[str, list[int]]) -> dict:
    from nnsight import LanguageModel

    from interp.backbone import load_tokenizer

    lm = LanguageModel(model, tokenizer=load_tokenizer("tiny"), dispatch=True)
    inputs = {"input_ids": ids, "attention_mask": mask}
    modes = {}
    for case, layers in cases.items():

        def default(layers=layers):
            saved = []  # nnsight runs the block's body on its own: results come back through a mutated list
            with lm.trace(inputs):
                saved.extend(lm.model.layers[layer].output.save() for layer in layers)
            return _hidden(saved[-1])[:, -1]

        def fastest(layers=layers):
            saved = []
            with lm.trace(inputs) as tracer:
                saved.extend(lm.model.layers[layer].output.save() for layer in layers)
                tracer.stop()
            return _hidden(saved[-1])[:, -1]

        for label, fn in (("nnsight trace + save", default), ("nnsight with tracer.stop() (fastest)", fastest)):
            _check(label, fn(), model, ids, mask, layers[-1])
            modes[f"{label} | {case}"] = fn
    return modes


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def peer_modes(model, ids, mask, cases: dict[str, list[int]]) -> tuple[dict, dict[str, str]]:
    """({"<peer form> | <case>": callable}, {peer: note} for the peers that are not installed)."""
    modes, notes = {}, {}
    for peer, build in (("TransformerLens", transformer_lens_modes), ("nnsight", nnsight_modes)):
        try:
            modes.update(build(model, ids, mask, cases))
        except ImportError as error:
            notes[peer] = f"not installed ({error.name}): pip install -e .[peers]"
    return modes, notes
