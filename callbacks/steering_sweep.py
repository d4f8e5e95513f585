"""SteeringSweepCallback: what the steering does at other strengths while it trains, on a few val problems.

Every N epochs (after that epoch's validation) or once at the end of fit, with the module's steering at each
strength s (`module.steered(None, s)`: steering vectors or the LoRA adapter times s; 0 = the unsteered backbone),
on the first `n_prompts` VAL problems with a reasoning and a control prompt:
    gold_nll     per reasoning prompt, the teacher-forced mean NLL per token of its gold solution
                 (`interp.metrics.gold_solution_nll`, first max_solution_tokens tokens; default the data's
                 max_completion_tokens, the length trained on, as in the report); mean, percentile bootstrap 95% CI
                 over problems
    control_kl   per control prompt, KL(unsteered || steered) of the next-token distribution after the prompt
                 (`last_token_kl` of `next_token_logits`); mean
These are training curves: the val split also picks best.ckpt, so the reported sweep is evaluate.py's, on the
test split (lightning_modules/steering_report.py).
Logged (every logger; rank zero): sweep/gold_nll@{s:g}, sweep/control_kl@{s:g}; TensorBoard figure
sweep/gold_nll_vs_strength.
Written: <trainer.log_dir>/steering_sweep.json
    {"epochs_completed", "global_step", "split": "val", "pair_indices", "max_solution_tokens", "strengths",
     "conditions": [{"strength", "gold_nll": {"mean", "ci", "per_prompt"}, "control_kl": {"mean", "per_prompt"}}]}
fast_dev_run: 2 problems, strengths 0 and 1.
"""

from __future__ import annotations

import lightning as L
import torch

from callbacks.held_out import HeldOutEvaluation
from interp.errors import UserError
from interp.metrics import gold_solution_nll, last_token_kl, next_token_logits
from interp.plots import plot_layer_curves
from interp.selection import bootstrap_ci
from lightning_modules.steering_report import paired_rows

STRENGTHS = (-1.0, 0.0, 0.5, 1.0, 2.0)


class SteeringSweepCallback(HeldOutEvaluation):
    """Gold-solution NLL and control KL per steering strength on val problems, logged while training."""

    results_file = "steering_sweep.json"

    def __init__(self, n_prompts: int = 8, every_n_epochs: int | None = 1, strengths: list[float] | None = None,
                 max_solution_tokens: int | None = None, batch_size: int = 8, n_bootstrap: int = 1000):  # fmt: skip
        """strengths: default STRENGTHS (0 is always added); every_n_epochs None: once at the end of fit;
        max_solution_tokens None: the datamodule's max_completion_tokens."""
        super().__init__(every_n_epochs)
        if n_prompts < 1 or batch_size < 1:
            raise UserError(f"n_prompts and batch_size must be >= 1, got {n_prompts}, {batch_size}")
        self.n_prompts, self.batch_size, self.n_bootstrap = n_prompts, batch_size, n_bootstrap
        self.strengths = sorted({0.0, *(float(s) for s in (STRENGTHS if strengths is None else strengths))})
        self.max_solution_tokens = max_solution_tokens

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, fast: bool) -> tuple[dict, dict, dict]:
        if not hasattr(pl_module, "steered"):
            raise UserError(f"{type(self).__name__} needs a steering module (SteeringVectorModule, LoraSteeringModule)")
        rows = paired_rows(trainer.datamodule, "val", 2 if fast else self.n_prompts)
        reasoning = [row for row in rows if row.kind == "reasoning"]
        control = [row.prompt for row in rows if row.kind == "control"]
        model, tokenizer = pl_module.backbone_model, trainer.datamodule.prompts.tokenizer
        strengths = [0.0, 1.0] if fast else self.strengths
        max_tokens = self.max_solution_tokens or trainer.datamodule.max_completion_tokens
        measured = {}
        for s in strengths:
            with torch.no_grad(), pl_module.steered(None, s):
                nll = gold_solution_nll(model, tokenizer, [r.prompt for r in reasoning],
                                        [r.gold_solution for r in reasoning], self.batch_size,
                                        max_tokens)  # fmt: skip  [n_problems]
                logits = next_token_logits(model, tokenizer, control, self.batch_size)  # [n_problems, vocab]
            measured[s] = (nll, logits)
        base_logits = measured[0.0][1]
        conditions, scalars = [], {}
        for s, (nll, logits) in measured.items():
            kl = last_token_kl(base_logits, logits)  # [n_problems] float64
            conditions.append({
                "strength": s,
                "gold_nll": {"mean": float(nll.mean()), "ci": list(bootstrap_ci(nll, self.n_bootstrap, seed=0)),
                             "per_prompt": nll.tolist()},
                "control_kl": {"mean": float(kl.mean()), "per_prompt": kl.tolist()},
            })  # fmt: skip
            scalars[f"sweep/gold_nll@{s:g}"] = float(nll.mean())
            scalars[f"sweep/control_kl@{s:g}"] = float(kl.mean())
        fig = plot_layer_curves(strengths, {"gold-solution NLL": [c["gold_nll"]["mean"] for c in conditions]},
                                ylabel="nats per token (val)", xlabel="steering strength",
                                title=f"epoch {trainer.current_epoch + 1}")  # fmt: skip
        results = {"split": "val", "pair_indices": [row.pair_index for row in reasoning],
                   "max_solution_tokens": max_tokens, "strengths": strengths, "conditions": conditions}
        return results, scalars, {"sweep/gold_nll_vs_strength": fig}
