"""Weight-space directional ablation: `orthogonalize_weights` edits a model so that it never writes r_hat into
the residual stream, the weight twin of `interp.interventions.AblateDirection` (fraction 1)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from interp.backbone import decoder_layers
from interp.errors import UserError
from interp.hooks import block_part
from interp.interventions import intervention_directions, unit_direction

# Names of the output projection (the Linear writing into the residual stream) of attention and MLP modules.
_OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "down_proj", "c_proj", "dense_4h_to_h", "fc2", "dense", "wo")


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
    d_model = model.config.get_text_config().hidden_size
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
