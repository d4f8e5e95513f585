"""The steering vectors' objectives as plain functions of per-token log-probabilities (`lightning_modules.steering`).

    sft_loss(logprobs, mask)        mean NLL per completion token over the batch: -sum(logprobs * mask) / sum(mask)
    bipo_loss(...)                  BiPO (Cao et al. 2024, "Personalized Steering of LLMs via Bi-directional
                                    Preference Optimization"): with multiplier d in {-1, +1} (drawn per step),
                                        -log sigmoid(d * beta * [(log pi_dv(y_w|x) - log pi(y_w|x))
                                                                 - (log pi_dv(y_l|x) - log pi(y_l|x))])
                                    averaged over the batch: log pi(y|x) = the sum of y's token log-probs, pi_dv
                                    the model with d * v added, pi the frozen model (the reference), y_w the
                                    preferred and y_l the dispreferred completion. d = -1 asks the negated vector
                                    to prefer y_l: the vector learns a direction, not just a bias towards y_w.
logprobs / mask: [batch, n] from `interp.metrics.completion_logprobs`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sequence_logprob(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) per row: the sum of the completion's token log-probs, [batch] (float32)."""
    return (logprobs * mask).sum(-1)


def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return -(logprobs * mask).sum() / mask.sum()


def bipo_loss(steered_preferred: torch.Tensor, reference_preferred: torch.Tensor, steered_dispreferred: torch.Tensor,
              reference_dispreferred: torch.Tensor, multiplier: float, beta: float = 0.1) -> torch.Tensor:  # fmt: skip
    """BiPO's loss (module docstring) from sequence log-probs [batch] (`sequence_logprob`): the steered ones
    computed with `multiplier` * v added, the reference ones without it (no gradient needed)."""
    margin = (steered_preferred - reference_preferred) - (steered_dispreferred - reference_dispreferred)
    return -F.logsigmoid(multiplier * beta * margin).mean()
