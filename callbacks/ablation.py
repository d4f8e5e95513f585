"""AblationCallback: what breaks the model's reasoning on held-out prompts, per layer and per direction.

At the end of fit (or every N epochs), on up to `n_prompts` VAL problems that took no part in choosing the
module's direction (their reasoning prompts, each with its gold solution; a seeded sample, `problem_pairs`, of
the val problems minus the module's `problem_sets["selection"]` problems, when it has them):
    (a) per layer l: metric(layer l ablated with `interp.interventions.LayerAblator`) - metric(baseline)
        ablation_method "zero": the layer's contribution resid_post - resid_pre is removed (the layer is skipped);
        ablation_method "mean": replaced by its mean over every token of the sampled val prompts (reasoning and control)
    (b) when the module has a selected direction (`selected_direction()`, e.g. ReasoningDirectionModule): the
        same change with that direction ablated everywhere (`interp.interventions.AblateDirection`) and with
        `n_random` null directions (z-score of the selected one among them when n_random >= 2): the first
        n_random of the module's `null_directions` (its hparams.null_kind, e.g. placebo) when it has them, else
        isotropic random directions of the same norm
METRIC (higher = the gold reasoning is less likely; `interp.direction_scoring` definitions):
    "first_tokens" = mean NLL per token of the first k_first_tokens gold-solution tokens, "gold_nll" = of the first
    256; default: the module's `hparams.selection_metric` / `k_first_tokens` when it has them, else first_tokens / 8.
Logged (every logger; rank zero): ablation/baseline_metric, ablation/layer_delta/L{layer:02d},
ablation/selected_direction_delta, ablation/random_direction_delta (mean over the random directions),
ablation/direction_zscore; TensorBoard figure ablation/metric_change_vs_layer.
Written: <trainer.log_dir>/ablation_results.json
    {"epochs_completed", "global_step", "split": "val", "metric", "metric_definition", "ablation_method", "pair_indices",
     "row_indices", "excluded_selection_pairs": [pair_index] (the module's selection problems, never used here),
     "null": a `interp.directions.NULLS` kind, "n_null", "n_bootstrap", "baseline": {"mean", "per_prompt"},
     "layers": [{"layer", "delta", "ci": [low, high], "delta_per_prompt"}],
     "direction": null | {"position", "layer", "norm", "delta", "ci", "delta_per_prompt", "random_deltas",
                          "random_mean", "zscore", "pvalues": {"t", "rank", ["reason"]} (`null_pvalues`)}}
fast_dev_run: 2 problems, the first and last layer, at most 2 random directions.
"""

from __future__ import annotations

import lightning as L
import torch

from callbacks.held_out import HeldOutEvaluation
from datamodules.prompts import problem_pairs
from interp.ablation import LayerAblator
from interp.activations import check_layers
from interp.backbone import decoder_layers
from interp.direction_scoring import check_metric, metric_definition, solution_metric
from interp.directions import random_directions
from interp.errors import UserError
from interp.interventions import AblateDirection
from interp.plots import plot_layer_curves
from interp.selection import bootstrap_ci, null_pvalues, zscore

METHODS = ("zero", "mean")


class AblationCallback(HeldOutEvaluation):
    """Per-layer and per-direction ablation effects on held-out val problems (module docstring)."""

    results_file = "ablation_results.json"

    def __init__(
        self,
        n_prompts: int = 8,
        every_n_epochs: int | None = None,
        layers: list[int] | None = None,
        ablation_method: str = "zero",
        n_random: int = 4,
        metric: str | None = None,
        k_first_tokens: int | None = None,
        batch_size: int = 8,
        n_bootstrap: int = 1000,
        seed: int = 0,
    ):
        """
        Args:
            n_prompts: val problems whose reasoning prompts are scored.
            every_n_epochs: run after every N-th epoch; null = once, at the end of fit.
            layers: layers to ablate one at a time (null = all).
            ablation_method: zero | mean (as LayerAblator's; "resample" needs equal shapes and is not offered).
            n_random: null directions of the selected direction's norm (0 = none): the module's own (its null)
                when it saved them, else isotropic.
            metric: first_tokens | gold_nll; null = the module's selection_metric (else first_tokens).
            k_first_tokens: tokens scored by first_tokens; null = the module's k_first_tokens (else 8).
            batch_size: prompts per forward.
            n_bootstrap: bootstrap resamples of the prompts for the 95% CIs.
            seed: seeds the sample of problems and the random directions.
        """
        super().__init__(every_n_epochs)
        if ablation_method not in METHODS:
            raise UserError(f"unknown ablation_method {ablation_method!r}; expected one of {', '.join(METHODS)}")
        if metric is not None:
            check_metric(metric)
        if n_prompts < 1 or batch_size < 1 or n_bootstrap < 1 or n_random < 0:
            raise UserError("n_prompts, batch_size and n_bootstrap must be >= 1 and n_random >= 0")
        self.n_prompts, self.layers, self.ablation_method, self.n_random = n_prompts, layers, ablation_method, n_random
        self.metric, self.k_first_tokens, self.batch_size = metric, k_first_tokens, batch_size
        self.n_bootstrap, self.seed = n_bootstrap, seed

    def _metric_settings(self, pl_module: L.LightningModule) -> tuple[str, int]:
        hparams = getattr(pl_module, "hparams", {})
        metric = self.metric or hparams.get("selection_metric", "first_tokens")
        check_metric(metric)
        return metric, int(self.k_first_tokens or hparams.get("k_first_tokens", 8))

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, fast: bool) -> tuple[dict, dict, dict]:
        model, tokenizer = pl_module.backbone_model, pl_module.tokenizer
        metric, k = self._metric_settings(pl_module)
        excluded = getattr(pl_module, "problem_sets", {}).get("selection", {}).get("pair_indices", [])
        pairs = problem_pairs(trainer.datamodule, "val", 2 if fast else self.n_prompts, self.seed, exclude=excluded)
        prompts = [reasoning.prompt for reasoning, _ in pairs]
        solutions = [reasoning.gold_solution for reasoning, _ in pairs]

        def score() -> torch.Tensor:  # float64 [n_prompts], higher = gold reasoning less likely
            return solution_metric(model, tokenizer, prompts, solutions, metric, k, batch_size=self.batch_size)

        def summary(delta: torch.Tensor) -> dict:
            ci = bootstrap_ci(delta, self.n_bootstrap, seed=self.seed)
            return {"delta": float(delta.mean()), "ci": list(ci), "delta_per_prompt": delta.tolist()}

        baseline = score()
        layers = check_layers(self.layers, len(decoder_layers(model)))
        layers = sorted({layers[0], layers[-1]}) if fast else layers
        reference = [row.prompt for pair in pairs for row in pair] if self.ablation_method == "mean" else None
        layer_rows = []
        for layer in layers:
            ablator = LayerAblator(model, layer, self.ablation_method, reference_inputs=reference, tokenizer=tokenizer,
                                   batch_size=self.batch_size)  # fmt: skip
            with ablator:
                layer_rows.append({"layer": layer, **summary(score() - baseline)})
        direction, null = self._direction_ablation(pl_module, model, score, baseline, summary, fast)
        results = {
            "split": "val", "metric": metric, "metric_definition": metric_definition(metric, k), "ablation_method": self.ablation_method,
            "pair_indices": [r.pair_index for r, _ in pairs], "row_indices": [r.row_index for r, _ in pairs],
            "excluded_selection_pairs": list(excluded), "null": null,
            "n_null": 0 if direction is None else len(direction["random_deltas"]),
            "n_bootstrap": self.n_bootstrap, "baseline": {"mean": float(baseline.mean()), "per_prompt": baseline.tolist()},
            "layers": layer_rows, "direction": direction,
        }  # fmt: skip
        scalars = {"ablation/baseline_metric": float(baseline.mean())}
        scalars.update({f"ablation/layer_delta/L{row['layer']:02d}": row["delta"] for row in layer_rows})
        curves = {f"layer ablated ({self.ablation_method})": [row["delta"] for row in layer_rows]}
        if direction is not None:
            scalars["ablation/selected_direction_delta"] = direction["delta"]
            curves["selected direction ablated"] = [direction["delta"]] * len(layers)
            if direction["random_mean"] is not None:
                scalars["ablation/random_direction_delta"] = direction["random_mean"]
                curves["random direction ablated (mean)"] = [direction["random_mean"]] * len(layers)
            if direction["zscore"] is not None:
                scalars["ablation/direction_zscore"] = direction["zscore"]
        fig = plot_layer_curves(layers, curves, ylabel=f"{metric} change (ablated - baseline)",
                                title=f"Ablation on {len(pairs)} val reasoning prompts")  # fmt: skip
        return results, scalars, {"ablation/metric_change_vs_layer": fig}

    def _nulls(self, pl_module, r: torch.Tensor, n: int) -> tuple[torch.Tensor, str]:
        """([n, d_model], name): the module's saved null directions when it has them, else isotropic of |r|."""
        saved = getattr(pl_module, "null_directions", None)
        if saved is not None and len(saved):
            return saved[:n], pl_module.hparams.null_kind
        return random_directions(r, max(n, 1), generator=self.seed)[:n], "isotropic"

    def _direction_ablation(self, pl_module, model, score, baseline, summary, fast: bool) -> tuple[dict | None, str]:
        """(b): the selected direction and null directions of its norm, each ablated everywhere."""
        if not hasattr(pl_module, "selected_direction") or getattr(pl_module, "selected", None) is None:
            return None, "none"
        r = pl_module.selected_direction()  # [d_model], unnormalised
        with AblateDirection(model, r):
            selected = summary(score() - baseline)
        n_random = min(self.n_random, 2) if fast else self.n_random
        nulls, null = self._nulls(pl_module, r, n_random)  # [n_random, d_model]
        random_deltas = []
        for direction in nulls:
            with AblateDirection(model, direction):
                random_deltas.append(float((score() - baseline).mean()))
        deltas = torch.tensor(random_deltas, dtype=torch.float64)
        return {
            "position": int(pl_module.selected["position"]), "layer": int(pl_module.selected["layer"]),
            "norm": float(r.double().norm()), **selected, "random_deltas": random_deltas,
            "random_mean": float(deltas.mean()) if random_deltas else None,
            "zscore": zscore(selected["delta"], deltas) if len(random_deltas) >= 2 else None,
            "pvalues": null_pvalues(selected["delta"], deltas) if len(random_deltas) >= 2 else None,
        }, null  # fmt: skip
