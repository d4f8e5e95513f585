"""PatchingCallback: where the reasoning prompt's residual stream carries what makes the gold solution likely.

At the end of fit (or every N epochs), on up to `n_pairs` VAL problems (a seeded sample, `problem_pairs`),
each a (reasoning prompt, control prompt) pair: `interp.patching_sweep.patching_sweep` (method "exact") or
`attribution_patching` (method "attribution", its first-order estimate) patches the reasoning run's
`blocks.{l}.resid_post` at one post-instruction token into the control run, for every (layer, token).
METRIC: log-probability of the first token of the problem's gold solution at the last prompt position
(`target_log_prob`), the same target for both prompts of a pair. The heatmap is the fraction of the
reasoning-minus-control gap recovered, a RATIO OF MEANS over the pairs (1 = the patch makes the control runs
score like the reasoning runs on average), with Fieller's 95% CI for that ratio of paired means (no resampling;
null with a "ci_reason" for one pair or a mean gap not significantly non-zero); its exact definition, the relative
cutoff (`rel_tol`) and the CI are in `interp.patching_stats` (copied into the JSON as "definition").
Logged (every logger; rank zero): patching/recovered_max, patching/recovered/L{layer:02d} (max over tokens;
NaN when every cell is cut), patching/n_usable_pairs (pairs behind the heatmap: all of them, 0 when the mean
gap is cut), patching/metric_gap (mean reasoning - control); TensorBoard figure patching/recovered_heatmap
(layer x post-instruction token; cut cells blank).
Written: <trainer.log_dir>/patching_results.json
    {"epochs_completed", "global_step", "split": "val", "metric", "definition", "method", "layers", "post_tokens",
     "recovered", "recovered_ci_low", "recovered_ci_high": [[float | null per token] per layer],
     "ci_method": "fieller", "ci_level", "t_quantile", "ci_reason", "mean_gap", "mean_gap_se", "gap_scale",
     "rel_tol", "cutoff",
     "cut": [[bool per token] per layer], "cut_reason", "n_pairs", "metric_reasoning", "metric_control": [per pair],
     "metric_patched": [pair][layer][token], "per_pair_ratio" (diagnostic only, never averaged),
     "pair_indices", "reasoning_rows", "control_rows", "target_tokens"}
fast_dev_run: 2 pairs, the first and last layer.
"""

from __future__ import annotations

import lightning as L

from callbacks.held_out import HeldOutEvaluation
from datamodules.prompts import problem_pairs
from interp.activations import check_layers
from interp.backbone import decoder_layers
from interp.errors import UserError
from interp.patching_stats import check_summary_settings, target_log_prob
from interp.patching_sweep import attribution_patching, patching_sweep
from interp.plots import plot_heatmap

METHODS = {"exact": patching_sweep, "attribution": attribution_patching}
METRIC = "log-prob of the first gold-solution token at the last prompt position"


def _printable(token: str) -> str:
    return token.encode("unicode_escape").decode("ascii")


class PatchingCallback(HeldOutEvaluation):
    """Activation patching (exact or attribution) reasoning -> control on held-out val problems (module docstring)."""

    results_file = "patching_results.json"

    def __init__(
        self,
        n_pairs: int = 8,
        layers: list[int] | None = None,
        method: str = "exact",
        every_n_epochs: int | None = None,
        batch_size: int = 8,
        seed: int = 0,
        rel_tol: float = 0.1,
    ):
        """
        Args:
            n_pairs: val problems (reasoning, control prompt pairs) patched.
            layers: layers swept (null = all).
            method: exact (one forward per layer x token) | attribution (gradient estimate, one backward per batch).
            every_n_epochs: run after every N-th epoch; null = once, at the end of fit.
            batch_size: pairs per forward.
            seed: seeds the sample of problems.
            rel_tol: cut (NaN) the heatmap when |mean gap| <= rel_tol * mean |per-pair gap|, in [0, 1).
        """
        super().__init__(every_n_epochs)
        if method not in METHODS:
            raise UserError(f"unknown patching method {method!r}; expected one of {', '.join(METHODS)}")
        if n_pairs < 1 or batch_size < 1:
            raise UserError(f"n_pairs and batch_size must be >= 1, got {n_pairs}, {batch_size}")
        self.n_pairs, self.layers, self.method = n_pairs, layers, method
        check_summary_settings(rel_tol)
        self.batch_size, self.seed, self.rel_tol = batch_size, seed, rel_tol

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
            layers=layers, batch_size=self.batch_size, rel_tol=self.rel_tol,
        )  # fmt: skip
        results = {
            "split": "val", "metric": METRIC, **result.to_dict(),
            "pair_indices": [r.pair_index for r, _ in pairs], "reasoning_rows": [r.row_index for r, _ in pairs],
            "control_rows": [c.row_index for _, c in pairs], "target_tokens": targets,
        }  # fmt: skip
        per_layer = result.recovered.max(-1).values  # [n_layers] max over tokens; NaN when cut (NaN propagates)
        all_cut = bool(result.cut.all())  # one denominator: every cell is cut or none is
        scalars = {
            "patching/recovered_max": float(per_layer.max()),
            "patching/n_usable_pairs": 0.0 if all_cut else float(len(pairs)),
            "patching/metric_gap": result.mean_gap,
        }
        scalars.update({f"patching/recovered/L{layer:02d}": float(v) for layer, v in zip(layers, per_layer)})
        fig = plot_heatmap(
            result.recovered.tolist(), layers, [_printable(t) for t in result.post_tokens], xlabel="post-instruction token",
            ylabel="layer", title=f"Fraction recovered, ratio of means ({self.method} patching, {len(pairs)} val pairs)"
            + (" - cut: mean gap under the cutoff" if all_cut else ""),
            colorbar_label="recovered", center=0.0,
        )  # fmt: skip
        return results, scalars, {"patching/recovered_heatmap": fig}
