"""Scoring candidate reasoning directions on held-out prompts (refusal_direction-style selection, step 2).

Candidates are the contrastive directions r[p, l] of one run, one per (post-instruction position p, layer l).
Each is scored on matched held-out prompts: reasoning prompts and control prompts of the same problems, each
with its problem's gold solution. `interp.selection.select_direction` then picks one (it owns the filters and
the sign convention). `PromptScorer` is the same scoring as the callable that
`interp.selection.select_reasoning_direction` takes (choose on selection problems, report on others).

METRIC (per prompt; higher = the model finds the gold reasoning LESS likely):
    "gold_nll"       mean NLL per token of the gold solution given the prompt, teacher forced, over its first
                     `max_solution_tokens` tokens (`interp.metrics.gold_solution_nll`)
    "first_tokens"   mean NLL per token of the first `k_first_tokens` gold-solution tokens
                     (= -`interp.metrics.first_tokens_logprob`), the cheap variant
SCORES of candidate (p, l), signed as in `interp.selection` (POSITIVE supports "reasoning direction"):
    ablation_score   mean over reasoning prompts of metric(ablated) - metric(baseline), where "ablated" runs
                     inside AblateDirection with r_hat = r[p, l] / |r[p, l]|: the direction is
                     projected out of the embedding output and of every attention and MLP output, at every layer
                     and every position (prompt and solution tokens).
    induction_score  mean over control prompts of metric(baseline) - metric(added), where "added" runs inside
                     AddDirection(layers=[l]): x <- x + intervention_strength * r[p, l] at
                     blocks.{l}.resid_post (the site r was read from), unnormalised, at every position.
    kl               mean over control prompts of last_token_kl(baseline, ablated): KL(p_base || p_ablated) of the
                     next-token distribution after the prompt (`interp.metrics.next_token_logits`), float64.
The baselines (metric on both prompt sets, next-token logits of the control prompts) are computed once per
call. Cost: 3 forwards over the selection prompts per candidate (two teacher-forced, one next-token).

Every row keeps its per-prompt values ("ablation_per_prompt" [n_reasoning], "induction_per_prompt"
[n_control], "kl_per_prompt" [n_control], float64) for bootstrap confidence intervals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from interp.activations import check_layers
from interp.backbone import decoder_layers
from interp.directions import check_nonzero_norm
from interp.errors import UserError
from interp.interventions import AblateDirection, AddDirection
from interp.metrics import first_tokens_logprob, gold_solution_nll, last_token_kl, next_token_logits
from interp.selection import PER_PROMPT_KEYS

METRICS = ("first_tokens", "gold_nll")


def metric_definition(metric: str, k_first_tokens: int = 8, max_solution_tokens: int | None = 256) -> str:
    """One line saying what `metric` measures (for run metadata)."""
    check_metric(metric)
    if metric == "first_tokens":
        return f"mean NLL per token of the first {k_first_tokens} gold-solution tokens (teacher forced)"
    limit = "all" if max_solution_tokens is None else f"the first {max_solution_tokens}"
    return f"mean NLL per token of the gold solution, {limit} solution tokens (teacher forced)"


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise UserError(f"unknown selection metric {metric!r}; expected one of {', '.join(METRICS)}")


def solution_metric(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    solutions: Sequence[str],
    metric: str = "first_tokens",
    k_first_tokens: int = 8,
    max_solution_tokens: int | None = 256,
    batch_size: int = 8,
) -> torch.Tensor:
    """METRIC (module docstring) of each prompt with its gold solution: float64 [n_prompts], higher = the model
    finds the gold reasoning less likely. Runs the full model, so active interventions apply."""
    check_metric(metric)
    if metric == "first_tokens":
        return -first_tokens_logprob(model, tokenizer, prompts, solutions, k=k_first_tokens, batch_size=batch_size)
    return gold_solution_nll(model, tokenizer, prompts, solutions, batch_size, max_solution_tokens)


@dataclass
class _Scorer:
    """The selection prompts and how to score them; `metric` is float64 [n] (higher = worse reasoning)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    reasoning_prompts: Sequence[str]
    reasoning_solutions: Sequence[str]
    control_prompts: Sequence[str]
    control_solutions: Sequence[str]
    metric_name: str
    k_first_tokens: int
    batch_size: int
    max_solution_tokens: int | None

    def __post_init__(self) -> None:
        check_metric(self.metric_name)
        for side, prompts, solutions in (("reasoning", self.reasoning_prompts, self.reasoning_solutions),
                                         ("control", self.control_prompts, self.control_solutions)):  # fmt: skip
            if len(prompts) == 0:
                raise UserError(f"no {side} prompts to score directions on")
            if len(prompts) != len(solutions):
                raise UserError(f"got {len(prompts)} {side} prompts but {len(solutions)} solutions")
        if self.k_first_tokens < 1 or self.batch_size < 1:
            raise UserError(f"k_first_tokens and batch_size must be >= 1, got {self.k_first_tokens}, "
                            f"{self.batch_size}")  # fmt: skip

    def metric(self, prompts: Sequence[str], solutions: Sequence[str]) -> torch.Tensor:
        return solution_metric(self.model, self.tokenizer, prompts, solutions, self.metric_name,
                               self.k_first_tokens, self.max_solution_tokens, self.batch_size)  # fmt: skip

    def baselines(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(metric on reasoning [n_r], metric on control [n_c], control next-token logits [n_c, vocab])."""
        return (
            self.metric(self.reasoning_prompts, self.reasoning_solutions),
            self.metric(self.control_prompts, self.control_solutions),
            next_token_logits(self.model, self.tokenizer, self.control_prompts, self.batch_size),
        )

    def score(self, direction: torch.Tensor, layer: int, intervention_strength: float, baselines) -> dict:
        """Scores of one unnormalised direction [d_model] read at blocks.{layer}.resid_post."""
        base_reasoning, base_control, base_logits = baselines
        with AblateDirection(self.model, direction):
            ablated = self.metric(self.reasoning_prompts, self.reasoning_solutions)  # [n_r]
            ablated_logits = next_token_logits(self.model, self.tokenizer, self.control_prompts, self.batch_size)
        with AddDirection(self.model, direction, intervention_strength, layers=[layer]):
            added = self.metric(self.control_prompts, self.control_solutions)  # [n_c]
        per_prompt = {
            "ablation_score": ablated - base_reasoning,
            "induction_score": base_control - added,
            "kl": last_token_kl(base_logits, ablated_logits),
        }
        row = {key: float(values.mean()) for key, values in per_prompt.items()}
        row.update({PER_PROMPT_KEYS[key]: values for key, values in per_prompt.items()})
        return row


def _as_positions(directions: torch.Tensor) -> torch.Tensor:
    directions = torch.as_tensor(directions).detach().cpu().to(torch.float32)
    if directions.ndim == 2:
        directions = directions[None]
    if directions.ndim != 3:
        raise UserError(f"directions must be [n_pos, n_layers, d_model] or [n_layers, d_model], "
                        f"got {tuple(directions.shape)}")  # fmt: skip
    return directions


def score_candidates(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    directions: torch.Tensor,
    reasoning_prompts: Sequence[str],
    reasoning_solutions: Sequence[str],
    control_prompts: Sequence[str],
    control_solutions: Sequence[str],
    metric: str = "first_tokens",
    layers: Sequence[int] | None = None,
    k_first_tokens: int = 8,
    batch_size: int = 8,
    intervention_strength: float = 1.0,
    max_solution_tokens: int | None = 256,
) -> list[dict]:
    """Score every candidate direction (position p, layer l) as defined in the module docstring.

    Args:
        directions: [n_pos, n_model_layers, d_model] (or [n_model_layers, d_model] = one position); row l of
            the layer axis is the direction read at blocks.{l}.resid_post of `model`.
        reasoning_prompts / control_prompts: chat-formatted prompts (tokenized as given); the solutions are
            their gold solutions (matched pairs: the same problems on both sides).
        metric: "first_tokens" | "gold_nll"; k_first_tokens: tokens scored by "first_tokens";
            max_solution_tokens: tokens scored by "gold_nll" (None: all).
        layers: candidate layers (model indices; default all). Their directions must have nonzero norm.
        intervention_strength: the multiplier c of the induction intervention x + c r.
    Returns:
        one dict per candidate, position-major then in `layers` order: "position" (index into the position
        axis), "layer", "norm" (|r|), "ablation_score", "induction_score", "kl" (floats) and the per-prompt
        float64 tensors "ablation_per_prompt", "induction_per_prompt", "kl_per_prompt".
    """
    directions = _as_positions(directions)
    n_layers = len(decoder_layers(model))
    if directions.shape[1] != n_layers:
        raise UserError(f"directions cover {directions.shape[1]} layers but the model has {n_layers} "
                        "(put zeros in the rows of layers that are not candidates)")  # fmt: skip
    layers = check_layers(layers, n_layers)
    check_nonzero_norm(directions[:, layers], layers)
    scorer = _Scorer(model, tokenizer, reasoning_prompts, reasoning_solutions, control_prompts,
                     control_solutions, metric, k_first_tokens, batch_size, max_solution_tokens)  # fmt: skip
    baselines = scorer.baselines()
    rows = []
    for position in range(directions.shape[0]):
        for layer in layers:
            direction = directions[position, layer]  # [d_model]
            scores = scorer.score(direction, layer, intervention_strength, baselines)
            norm = float(direction.to(torch.float64).norm())
            rows.append({"position": position, "layer": layer, "norm": norm, **scores})
    return rows


@dataclass
class PromptScorer:
    """The scorer `interp.selection.select_reasoning_direction` takes, on a model: scores as in the module
    docstring, for directions at given layers, on given problems.

    Call: scorer(directions [k, d_model] unnormalised, layers [k] model indices, problems) -> k rows with the
    three scores and their per-prompt values (PER_PROMPT_KEYS); one problem = (reasoning_prompt,
    reasoning_solution, control_prompt, control_solution). The baselines are computed once per call.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    metric: str = "first_tokens"
    k_first_tokens: int = 8
    batch_size: int = 8
    intervention_strength: float = 1.0
    max_solution_tokens: int | None = 256
    on_scored: Callable[[int, int], None] | None = None
    """Called with (scored, of) after each direction of a call: progress for sweeps that take minutes."""

    def __call__(self, directions: torch.Tensor, layers: Sequence[int], problems: Sequence[tuple]) -> list[dict]:
        directions = torch.as_tensor(directions).detach().cpu().to(torch.float32)
        if directions.ndim != 2 or len(directions) != len(layers):
            raise UserError(f"PromptScorer takes directions [k, d_model] and k layers, got {tuple(directions.shape)} "
                            f"and {len(layers)} layers")  # fmt: skip
        n_layers = len(decoder_layers(self.model))
        check_layers(sorted(set(layers)), n_layers)
        norms = directions.to(torch.float64).norm(dim=-1)  # [k]
        bad = [int(layers[i]) for i in (~torch.isfinite(norms) | (norms == 0)).nonzero().flatten().tolist()]
        if bad:
            raise UserError(f"zero-norm or non-finite direction at layer {bad[0]}")
        columns = list(zip(*problems)) if problems else [(), (), (), ()]
        scorer = _Scorer(self.model, self.tokenizer, *columns, self.metric, self.k_first_tokens,
                         self.batch_size, self.max_solution_tokens)  # fmt: skip
        baselines = scorer.baselines()
        rows = []
        for direction, layer in zip(directions, layers):
            rows.append(scorer.score(direction, int(layer), self.intervention_strength, baselines))
            if self.on_scored is not None:
                self.on_scored(len(rows), len(directions))
        return rows
