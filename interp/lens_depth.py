"""At which depth does a model know where it is going? The logit lens (or a tuned lens) at the last prompt token,
layer by layer.

`logit_lens_depth(lens, acts, final_logits, answer_ids, solution_ids)` reads the residual stream at each prompt's
last token (acts [n, L, d_model] at `blocks.{l}.resid_post`, e.g. `collect_activations(..., positions="last")` or
the "last" role of a post-instruction cache) through the model's own final norm and unembedding (`LogitLens`), or
through a trained `TunedLens` (each layer's translator first; `lens_slots` says which translator reads which
slot of acts). Each layer is read out once; the KL and both targets come from that one [n, vocab] block.
final_logits [n, vocab] are the model's own next-token logits after each prompt (`next_token_logits`; the lens
of the model's last layer gives the same), so per layer l and prompt i:
    kl              KL(p_final || p_lens,l) of the next-token distributions, float64 (~0 at the last layer)
    answer          rank (0 = top; ties count in the target's favour) and probability under the lens of the
                    gold answer's first token (`first_token_ids(tokenizer, answers)`): does layer l already point
                    at the answer the model will box at the end?
    solution        the same for the gold solution's first token: does it point at how the solution starts?
Reported per layer: the mean over prompts with a percentile bootstrap 95% CI over prompts (kl, probabilities),
the median rank (for an even number of prompts the mean of the middle two: ranks are often bimodal, near 0 or near
the bottom of the vocabulary) and the top-1 rate (rank 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from interp.errors import UserError
from interp.lens import LogitLens, TunedLens, rank_and_prob
from interp.metrics import last_token_kl
from interp.selection import bootstrap_ci


def first_token_ids(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """The first token id of each text tokenized alone (no special tokens): long [n]. Qwen2.5 splits numbers into
    digits, so for "18" this is the id of "1". Empty texts raise UserError."""
    ids = tokenizer([str(text) for text in texts], add_special_tokens=False)["input_ids"]
    empty = [i for i, row in enumerate(ids) if not row]
    if empty:
        raise UserError(f"text {empty[0]} has no tokens")
    return torch.tensor([row[0] for row in ids], dtype=torch.long)


def _summary(values: torch.Tensor, n_bootstrap: int, seed: int) -> dict:
    """values [n, L] -> per-layer mean and bootstrap CI over the n prompts."""
    return {"mean": values.mean(0).tolist(),
            "ci": [list(bootstrap_ci(values[:, i], n_bootstrap, seed=seed)) for i in range(values.shape[1])]}  # fmt: skip


def logit_lens_depth(
    lens: LogitLens | TunedLens,
    acts: torch.Tensor,
    final_logits: torch.Tensor,
    answer_ids: torch.Tensor,
    solution_ids: torch.Tensor,
    layers: Sequence[int] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    lens_slots: Sequence[int] | None = None,
) -> dict:
    """The logit lens per layer at the last prompt token (module docstring).

    Args:
        acts: [n, L, d_model] residual stream at each prompt's last token.
        final_logits: [n, vocab] the model's own next-token logits after each prompt.
        answer_ids, solution_ids: [n] target token ids (`first_token_ids`).
        layers: model layer index of each slot of acts' layer axis, for the report (default 0..L-1).
        lens_slots: for a TunedLens, the translator slot that reads each slot of acts (default 0..L-1).
    Returns:
        {"layers", "n_prompts", "kl": {"mean", "ci"}, "answer": {"prob": {"mean", "ci"}, "median_rank",
         "top1_rate"}, "solution": {...}}, lists per layer.
    """
    acts = torch.as_tensor(acts)
    if acts.ndim != 3:
        raise UserError(f"acts must be [n_prompts, n_layers, d_model], got {tuple(acts.shape)}")
    n, n_layers = acts.shape[0], acts.shape[1]
    layers = list(range(n_layers)) if layers is None else [int(layer) for layer in layers]
    if len(layers) != n_layers:
        raise UserError(f"{n_layers} layer slots need {n_layers} layer indices, got {len(layers)}")
    final = torch.as_tensor(final_logits)
    if final.ndim != 2 or len(final) != n:
        raise UserError(f"final_logits must be [{n}, vocab], got {tuple(final.shape)}")
    targets = {"answer": torch.as_tensor(answer_ids).long(), "solution": torch.as_tensor(solution_ids).long()}
    if any(t.shape != (n,) for t in targets.values()):
        raise UserError(f"answer_ids and solution_ids must hold one id per prompt ({n})")
    lens_slots = list(range(n_layers)) if lens_slots is None else [int(slot) for slot in lens_slots]
    if len(lens_slots) != n_layers:
        raise UserError(f"{n_layers} layer slots need {n_layers} lens slots, got {len(lens_slots)}")
    kl, ranks, probs = [], {name: [] for name in targets}, {name: [] for name in targets}
    with torch.no_grad():
        for i, slot in enumerate(lens_slots):
            logits = lens.layer_logits(acts[:, i], slot)  # [n, vocab]
            kl.append(last_token_kl(final, logits))
            for name, target in targets.items():
                rank, prob = rank_and_prob(logits, target)  # [n] each
                ranks[name].append(rank)
                probs[name].append(prob)
    report = {"layers": layers, "n_prompts": n, "kl": _summary(torch.stack(kl, 1), n_bootstrap, seed)}
    for name in targets:
        rank, prob = torch.stack(ranks[name], 1), torch.stack(probs[name], 1)  # [n, L] each
        report[name] = {"prob": _summary(prob.double(), n_bootstrap, seed),
                        "median_rank": rank.double().quantile(0.5, dim=0).tolist(),  # even n: mean of the middle two
                        "top1_rate": (rank == 0).double().mean(0).tolist()}  # fmt: skip
    return report
