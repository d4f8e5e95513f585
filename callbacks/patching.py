"""PatchingCallback: where the reasoning prompt's residual stream carries what makes the gold solution likely.

At the end of fit (or every N epochs), on up to `n_pairs` VAL problems (a seeded sample, `problem_pairs`),
each a (reasoning prompt, control prompt) pair: `interp.patching.patching_sweep` (method "exact") or
`attribution_patching` (method "attribution", its first-order estimate) patches the reasoning run's
`blocks.{l}.resid_post` at one post-instruction token into the control run, for every (layer, token).
METRIC: log-probability of the first token of the problem's gold solution at the last prompt position
(`target_log_prob`), the same target for both prompts of a pair. The heatmap is the fraction of the
reasoning-minus-control gap recovered (1 = the patch makes the control run score like the reasoning run).
Logged (every logger; rank zero): patching/recovered_max, patching/recovered/L{layer:02d} (max over tokens),
patching/n_usable_pairs, patching/metric_gap (mean reasoning - control); TensorBoard figure
patching/recovered_heatmap (layer x post-instruction token).
Written: <trainer.log_dir>/patching_results.json
    {"epochs_completed", "global_step", "split": "val", "metric", "method", "layers", "post_tokens",
     "recovered": [[float | null per token] per layer], "n_pairs", "n_usable_pairs", "pair_indices",
     "reasoning_rows", "control_rows", "target_tokens", "metric_reasoning", "metric_control", "usable"}
fast_dev_run: 2 pairs, the first and last layer.
"""

from __future__ import annotations

import lightning as L

from callbacks.intervention_report import HeldOutEvaluation, problem_pairs
from interp.activations import check_layers
from interp.backbone import decoder_layers
from interp.errors import UserError
from interp.patching import attribution_patching, patching_sweep, target_log_prob
from interp.plots import plot_heatmap

METHODS = {"exact": patching_sweep, "attribution": attribution_patching}
METRIC = "log-prob of the first gold-solution token at the last prompt position"


def _printable(token: str) -> str:
    return token.encode("unicode_escape").decode("ascii")


class PatchingCallback(HeldOutEvaluation):
    results_file = "patching_results.json"

    def __init__(
        self,
        n_pairs: int = 8,
        layers: list[int] | None = None,
        method: str = "exact",
        every_n_epochs: int | None = None,
        batch_size: int = 8,
        seed: int = 0,
    ):
        """
        Args:
            n_pairs: val problems (reasoning, control prompt pairs) patched.
            layers: layers swept (null = all).
            method: exact (one forward per layer x token) | attribution (gradient estimate, one backward per batch).
            every_n_epochs: run after every N-th epoch; null = once, at the end of fit.
            batch_size: pairs per forward.
            seed: seeds the sample of problems.
        """
        super().__init__(every_n_epochs)
        if method not in METHODS:
            raise UserError(f"unknown patching method {method!r}; expected one of {', '.join(METHODS)}")
        if n_pairs < 1 or batch_size < 1:
            raise UserError(f"n_pairs and batch_size must be >= 1, got {n_pairs}, {batch_size}")
        self.n_pairs, self.layers, self.method = n_pairs, layers, method
        self.batch_size, self.seed = batch_size, seed

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, fast: bool) -> tuple[dict, dict, dict]:
        model, tokenizer = pl_module.backbone_model, pl_module.tokenizer
        pairs = problem_pairs(trainer.datamodule, "val", 2 if fast else self.n_pairs, self.seed)
        targets = []
        for reasoning, _ in pairs:
            ids = tokenizer(reasoning.gold_solution, add_special_tokens=False)["input_ids"]
            if not ids:
                raise UserError(f"problem {reasoning.problem_id} has an empty gold solution")
            targets.append(ids[0])
        layers = check_layers(self.layers, len(decoder_layers(model)))
        layers = sorted({layers[0], layers[-1]}) if fast else layers
        result = METHODS[self.method](
            model, tokenizer, [r.prompt for r, _ in pairs], [c.prompt for _, c in pairs], target_log_prob(targets),
            layers=layers, batch_size=self.batch_size,
        )  # fmt: skip
        results = {
            "split": "val", "metric": METRIC, **result.to_dict(),
            "pair_indices": [r.pair_index for r, _ in pairs], "reasoning_rows": [r.row_index for r, _ in pairs],
            "control_rows": [c.row_index for _, c in pairs], "target_tokens": targets,
            "metric_reasoning": result.metric_reasoning.tolist(), "metric_control": result.metric_control.tolist(),
            "usable": result.usable.tolist(),
        }  # fmt: skip
        per_layer = result.recovered.nan_to_num(nan=float("-inf")).max(-1).values  # [n_layers]
        gap = result.metric_reasoning - result.metric_control
        scalars = {
            "patching/recovered_max": float(per_layer.max()),
            "patching/n_usable_pairs": float(result.usable.sum()),
            "patching/metric_gap": float(gap.mean()),
        }
        scalars.update({f"patching/recovered/L{layer:02d}": float(v) for layer, v in zip(layers, per_layer)})
        fig = plot_heatmap(
            result.recovered.tolist(), layers, [_printable(t) for t in result.post_tokens], xlabel="post-instruction token",
            ylabel="layer", title=f"Fraction recovered ({self.method} patching, {len(pairs)} val pairs)",
            colorbar_label="recovered", center=0.0,
        )  # fmt: skip
        return results, scalars, {"patching/recovered_heatmap": fig}
