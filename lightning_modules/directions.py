"""The directions run: localize a reasoning direction per (cached position, layer) and select one.

Data: `CachedActivationDataModule` with `label: reasoning` and `batch_position: null`, so batches hold
x [batch, n_pos, n_layers, d_model] (every cached position, e.g. the post-instruction template tokens) and
y [batch] (1 reasoning prompt, 0 control prompt).

Fit = one pass over the cached TRAIN rows; there is no optimizer (automatic_optimization False,
configure_optimizers returns None). Each step adds its rows to one float64 `RunningMoments` per class; at the
end of the epoch (on validation start, and again on train-epoch end)
    directions = mean(reasoning) - mean(control)    [n_pos, n_layers, d_model] float32, unnormalised
(the semantics of `interp.directions.compute_contrastive_directions`), a registered buffer, so checkpoints hold
it. Under DDP the per-rank sums (count * mean, float64) and counts are all-reduced before dividing; note that
Lightning's DistributedSampler may repeat up to world_size - 1 rows to even out the shards. Two Lightning
accommodations: each training batch counts as one global step (ModelCheckpoint saves only after steps), and an
empty placeholder parameter (dropped from checkpoints) lets DDP wrap a module with nothing to train.

Validation (once per epoch, not in the sanity check; the validation batches are not used) chooses one candidate on
some val problems and reports it on others: `interp.selection.select_reasoning_direction` (the protocol, with
definitions) over the complete val problem pairs, split by seed into disjoint SELECTION (n_selection_prompts) and
REPORT (n_report_prompts) sets. Candidates are scored with `interp.direction_scoring.PromptScorer`; the selected r's
`n_random` null directions of kind `null_kind` (`interp.null_directions.site_null_factory`) and the optional
max-statistic null (`searched_placebo_candidates`) come from the TRAIN rows' cached activations
(`CachedActivationDataModule.split_slice_problems`). Every rank scores the same prompts; rank zero writes the files.
Candidate layers: `candidate_layers`, or every cached layer below max_layer_fraction * n_layers. Cost: 3 forwards over
the selection prompts per candidate (n_pos x n_candidate_layers) + 3 over the report prompts per direction
(1 + n_random). fast_dev_run checks the wiring: <= 2 + 2 problems, 2 layers, <= 2 nulls, 20 bootstraps.

Logged (validation): `interp.directions.selection_summary` under val/, e.g. val/ablation_score/L{layer:02d},
val/selected_layer, val/selected_ablation_score (selection set; ModelCheckpoint monitors it; NaN when nothing was
selected), val/report_{ablation_score,induction_score,kl} and val/z_{...} (report set vs the null directions).
Written to trainer.log_dir: reasoning_directions.safetensors + .json (`interp.directions.save_directions`):
per-prompt selection-set scores of every candidate (rows in selection-table order) and "null_directions"
[n_null, d_model] (also in the checkpoint, so evaluate.py uses the same null). The JSON's "selection" record
(`interp.directions.selection_stats`) names the problems of both sets, the requested and the actually used numbers
of problems (fewer val problems shrink both sets), the null and its definitions, and holds the report-set numbers
under selection.report. Undefined numbers (NaN, e.g. a z-score against a zero-spread null) are written as JSON null.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from datamodules.prompts import problem_pairs
from interp.activations import check_layers
from interp.direction_scoring import PromptScorer, check_metric, metric_definition
from interp.directions import (
    SCORE_DEFINITIONS,
    position_labels,
    problem_sets,
    save_directions,
    selection_stats,
    selection_summary,
)
from interp.errors import UserError
from interp.null_directions import (
    NULL_DEFINITIONS,
    NULLS,
    SEARCHED_NULL_DEFINITION,
    searched_placebo_candidates,
    site_null_factory,
)
from interp.selection import PER_PROMPT_KEYS, select_reasoning_direction
from interp.stats import RunningMoments
from lightning_modules.direction_report import RESULTS_FILE, directions_report, write_intervention_report
from lightning_modules.frozen_backbone import ReadsBackbone
from lightning_modules.layout import LayerStudyModule
from lightning_modules.protocol import DIRECTION_STRENGTHS

CLASSES = {"reasoning": 1, "control": 0}  # the datamodule's "reasoning" label encoding


class _ProgressLine:
    """`PromptScorer.on_scored`: one line every 15 s of a scoring call (selection, report and null sweeps)."""

    def __init__(self, every_s: float = 15.0):
        self.every_s, self.started, self.last = every_s, time.monotonic(), time.monotonic()

    def __call__(self, scored: int, of: int) -> None:
        now = time.monotonic()
        if scored == 1:
            self.started = now
        if now - self.last >= self.every_s or (scored == of and now - self.started >= self.every_s):
            self.last = now
            rank_zero_info(f"scoring directions: {scored}/{of} ({now - self.started:.0f} s)")


class ReasoningDirectionModule(ReadsBackbone, LayerStudyModule):
    """The directions run (module docstring): class means over the cached train rows -> a direction per
    (position, layer); validation selects one on held-out problems and reports it, with its null, on others."""

    checkpoint_monitor = ("val/selected_ablation_score", "max")
    layout_key = "direction_layout"
    results_file = RESULTS_FILE  # what evaluate.py writes
    trained_keys = ("directions",)

    def __init__(
        self,
        selection_metric: str = "first_tokens",
        n_selection_prompts: int = 32,
        kl_threshold: float = 0.1,
        min_induction_score: float | None = 0.0,
        max_layer_fraction: float = 0.8,
        n_random: int = 19,
        null_kind: str = "placebo",
        n_report_prompts: int | None = None,
        n_bootstrap: int = 1000,
        batch_size: int = 8,
        seed: int = 0,
        k_first_tokens: int = 8,
        intervention_strength: float = 1.0,
        candidate_layers: list[int] | None = None,
        n_searched_null: int = 0,
    ):
        """
        Args:
            selection_metric: first_tokens (NLL of the first k_first_tokens gold-solution tokens) | gold_nll
                (NLL of the gold solution, first 256 tokens).
            n_selection_prompts: val problems every candidate is scored on to choose one (each gives a
                reasoning and a control prompt).
            n_report_prompts: other val problems (disjoint from the selection ones) on which the selected
                direction and its null directions are re-scored for the reported scores, z-scores and CIs;
                null = n_selection_prompts. Too few val problems: both sets shrink in proportion.
            kl_threshold: discard candidates whose ablation moves the control prompts' next-token distribution
                by more than this KL.
            min_induction_score: discard candidates whose induction_score (control-prompt metric change when
                intervention_strength * r is added) is below this; null = keep them all (the score's sign is
                not evidence on its own: adding any vector of norm |r| moves it too; README "The toy pair").
            max_layer_fraction: discard candidates at layers >= this fraction of the model's depth.
            n_random: null directions m (norm |r|, selected site) for the z-scores and p-values; 0 = none, else
                >= 2. The rank p-value is >= 1 / (m + 1), so it can reach 0.05 only for m >= 19.
            null_kind: placebo (balanced within-pair sign flips of the train problems' reasoning - control
                differences) | covariance (Gaussian with the covariance of those differences) | isotropic
                (uniform) | pooled_placebo (random splits of the pooled train rows, ignoring the pairs;
                for comparison only).
            n_bootstrap: bootstrap resamples of the report problems for the 95% CIs.
            batch_size: prompts per scoring forward.
            seed: seeds the selection / report split of the val problems, the null directions and the bootstrap.
            k_first_tokens: solution tokens scored by first_tokens.
            intervention_strength: multiplier c of the induction intervention x + c r.
            candidate_layers: model layers to score (must be cached); null = cached layers below
                max_layer_fraction of the depth.
            n_searched_null: draws of the max-statistic null (0 = off, else >= 2): each draw puts one placebo
                candidate per searched site (balanced within-pair sign flips, one sign vector shared by all sites,
                rescaled to the real candidate's norm there) through the same selection and scores its winner on
                the report problems; r's report scores are then compared with those winners
                (`searched_zscores`, `searched_pvalues`), which accounts for the search over sites and
                directions that the site null does not. Cost: n_searched_null more selection sweeps.
        """
        super().__init__()
        check_metric(selection_metric)
        if n_selection_prompts < 1 or batch_size < 1 or k_first_tokens < 1 or n_bootstrap < 1:
            raise UserError("n_selection_prompts, batch_size, k_first_tokens and n_bootstrap must be >= 1")
        if n_searched_null == 1 or n_searched_null < 0:
            raise UserError(f"n_searched_null must be 0 (off) or >= 2, got {n_searched_null}")
        if n_random == 1 or n_random < 0:
            raise UserError(f"n_random must be 0 (no null directions) or >= 2, got {n_random}")
        if null_kind not in NULLS:
            raise UserError(f"unknown null {null_kind!r}; expected one of {', '.join(NULLS)}")
        if n_report_prompts is not None and n_report_prompts < 1:
            raise UserError(f"n_report_prompts must be >= 1 or null (= n_selection_prompts), got {n_report_prompts}")
        if not 0 < max_layer_fraction <= 1 or kl_threshold < 0:
            raise UserError(f"need 0 < max_layer_fraction <= 1 and kl_threshold >= 0, got {max_layer_fraction}, "
                            f"{kl_threshold}")  # fmt: skip
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.register_buffer("directions", None)  # [n_pos, n_layers, d_model] after _build
        # DistributedDataParallel refuses a module without trainable parameters: an empty one (never used, dropped
        # from checkpoints) lets the same trainer run DDP extraction and then this fit.
        self._ddp_placeholder = torch.nn.Parameter(torch.empty(0))
        self.n_model_layers: int | None = None
        self.positions: str | None = None  # the position spec, e.g. "post_instruction"
        self.position_labels: list[str] = []
        self.post_instruction_tokens: list[str] | None = None
        self.backbone = None  # the FrozenBackbone that scores the candidates (`ReadsBackbone`); never a submodule
        self._moments: dict[int, RunningMoments] | None = None
        self.n_train: dict[str, int] = {}
        self.selected: dict | None = None  # {"position", "layer", "slot"}
        self.selection_table: list[dict] = []  # annotated select_direction rows, without per-prompt values
        self.selection_stats: dict = {}  # report-set scores, z-scores, CIs, problems used, settings
        self.per_prompt_scores: dict[str, torch.Tensor] = {}  # "ablation_per_prompt" -> [n_candidates, n_selection]
        self.problem_sets: dict[str, dict] = {}  # "selection" / "report" -> pair_indices, reasoning_rows, control_rows
        self.null_directions: torch.Tensor | None = None  # [n_null, d_model] at the selected site, norm |r|
        self.last_metrics: dict[str, dict] = {}

    @property
    def n_report(self) -> int:
        return self.hparams.n_report_prompts or self.hparams.n_selection_prompts

    # ---- building (from the datamodule when fitting, from the checkpoint when loading) -------------------------
    def _build(self, layout: dict) -> None:
        self.layers, self.n_model_layers = list(layout["layers"]), int(layout["n_model_layers"])
        self.positions, self.position_labels = layout["positions"], list(layout["position_labels"])
        self.post_instruction_tokens = self.position_labels if self.positions == "post_instruction" else None
        self.directions = torch.zeros(len(self.position_labels), len(self.layers), layout["d_model"],
                                      device=self.device)  # fmt: skip
        self.backbone_from_layout(layout.get("backbone"))  # loaded on first use (see `backbone_model`)

    def layout(self) -> dict:
        return {
            "layers": self.layers, "n_model_layers": self.n_model_layers, "positions": self.positions,
            "position_labels": self.position_labels, "d_model": int(self.directions.shape[-1]),
            "backbone": self.backbone.layout_entry() if self.backbone else None,
        }  # fmt: skip

    def check_data(self, datamodule) -> None:
        if getattr(datamodule, "label", None) != "reasoning" or getattr(datamodule, "batch_position", -1) is not None:
            raise UserError("the directions run needs data.label: reasoning and data.batch_position: null "
                            "(batches with every cached position)")  # fmt: skip

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        self.check_data(dm)
        dm.prompts.setup()
        n_pos = int(dm.cache.manifest["n_positions"])
        layout = {
            "layers": list(dm.layers), "n_model_layers": dm.backbone.num_layers(), "positions": str(dm.positions),
            "position_labels": position_labels(str(dm.positions), dm.prompts.tokenizer, n_pos), "d_model": dm.d_model,
        }  # fmt: skip
        if self.layers and len(layout["position_labels"]) != len(self.position_labels):
            raise UserError(f"data.positions differ from the checkpoint's ({self.positions})")
        self.build_or_check(layout, "data.layers")
        self.place_backbone(dm.backbone, self.trainer.strategy.root_device)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["direction_selection"] = {
            "selected": self.selected, "table": self.selection_table, "stats": self.selection_stats,
            "n_train": self.n_train, "problem_sets": self.problem_sets, "null_directions": self.null_directions,
        }  # fmt: skip
        checkpoint["state_dict"].pop("_ddp_placeholder", None)
        super().on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        selection = checkpoint.get("direction_selection", {})
        self.selected, self.selection_table = selection.get("selected"), selection.get("table", [])
        self.selection_stats, self.n_train = selection.get("stats", {}), selection.get("n_train", {})
        self.problem_sets, self.null_directions = selection.get("problem_sets", {}), selection.get("null_directions")

    # ---- the directions -------------------------------------------------------------------------------------
    def directions_by_layer(self, position: int) -> torch.Tensor:
        """[n_model_layers, d_model] float32 CPU: the directions at one position, zeros for uncached layers
        (the layout `InterventionHandler` takes)."""
        out = torch.zeros(self.n_model_layers, self.directions.shape[-1])
        out[self.layers] = self.directions[position].detach().cpu().float()
        return out

    def selected_direction(self) -> torch.Tensor:
        """The selected candidate's unnormalised direction [d_model] float32 (CPU)."""
        if self.selected is None:
            raise UserError("no direction was selected (every candidate was discarded, or selection has not run)")
        return self.directions[self.selected["position"], self.selected["slot"]].detach().cpu().float()

    # ---- fit: accumulate the class means --------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        self._moments = {label: RunningMoments() for label in CLASSES.values()}

    def training_step(self, batch: dict, batch_idx: int) -> None:
        x, y = batch["x"], batch["y"]  # [batch, n_pos, n_layers, d_model], [batch]
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.directions.shape):
            raise UserError(f"expected batches x [batch, {', '.join(map(str, self.directions.shape))}], "
                            f"got {tuple(x.shape)}")  # fmt: skip
        for label, moments in self._moments.items():
            moments.update(x[y == label])
        # No optimizer steps, but ModelCheckpoint saves only once the global step has moved (and resuming counts
        # on it): each accumulated batch counts as one step of the manual-optimization progress.
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()
        return None

    def _finalize_directions(self) -> None:
        """directions = mean(reasoning) - mean(control), from float64 sums and counts reduced over ranks."""
        means = {}
        for name, label in CLASSES.items():
            moments = self._moments[label]
            total = torch.zeros(self.directions.shape, dtype=torch.float64, device=self.device)
            if moments.count:
                total = moments.mean.to(self.device) * moments.count  # [n_pos, n_layers, d_model]
            count = torch.tensor(float(moments.count), dtype=torch.float64, device=self.device)
            total = self.trainer.strategy.reduce(total, reduce_op="sum")
            count = self.trainer.strategy.reduce(count, reduce_op="sum")
            if float(count) == 0:
                raise UserError(f"the training split holds no {name} rows")
            means[name], self.n_train[name] = total / count, int(count)
        self.directions = (means["reasoning"] - means["control"]).to(torch.float32)

    def on_train_epoch_end(self) -> None:
        self._finalize_directions()

    def configure_optimizers(self):
        return None

    # ---- validation: select one candidate on held-out prompts -----------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        return None  # the selection needs the backbone, not the cached batches: see on_validation_epoch_end

    def on_validation_epoch_start(self) -> None:
        if not self.trainer.sanity_checking and self._moments is not None:  # same decision on every rank
            self._finalize_directions()

    def val_pairs(self, datamodule, split: str = "val") -> list[tuple]:
        """Every (reasoning PromptRow, control PromptRow) pair of `split` in the cache, in pair order."""
        return problem_pairs(datamodule, split, rows=datamodule.row_index[split].tolist())

    def default_candidate_layers(self) -> list[int]:
        if self.hparams.candidate_layers is not None:
            layers = check_layers(self.hparams.candidate_layers, self.n_model_layers)
            missing = [layer for layer in layers if layer not in self.layers]
            if missing:
                raise UserError(f"candidate_layers {missing} are not cached (data.layers: {self.layers})")
            return layers
        limit = self.hparams.max_layer_fraction * self.n_model_layers
        layers = [layer for layer in self.layers if layer < limit]
        if not layers:
            raise UserError(f"no cached layer is below max_layer_fraction * n_layers = {limit:g}")
        return layers

    def run_selection(self, datamodule, fast: bool = False) -> dict | None:
        """Choose on the selection problems, report on the disjoint report problems (module docstring);
        returns `selected`. fast=True: the fast_dev_run wiring check (<= 2 + 2 problems, 2 layers, <= 2
        null directions, 20 bootstraps)."""
        hp = self.hparams
        layers = self.default_candidate_layers()
        n_sel, n_rep, n_random, n_boot = hp.n_selection_prompts, self.n_report, hp.n_random, hp.n_bootstrap
        if fast:
            layers = sorted({layers[0], layers[-1]})
            n_sel, n_rep, n_random, n_boot = min(n_sel, 2), min(n_rep, 2), min(n_random, 2), min(n_boot, 20)
        n_searched = min(hp.n_searched_null, 2) if fast else hp.n_searched_null
        pairs = self.val_pairs(datamodule)
        problems = [(r.prompt, r.gold_solution, c.prompt, c.gold_solution) for r, c in pairs]
        scorer = PromptScorer(self.backbone_model, self.tokenizer, hp.selection_metric, hp.k_first_tokens,
                              hp.batch_size, hp.intervention_strength, on_scored=_ProgressLine())  # fmt: skip
        full = torch.stack([self.directions_by_layer(p) for p in range(len(self.position_labels))])

        def train_rows(position: int, layer: int) -> tuple:  # the rows the directions were built from, one site
            return datamodule.split_slice_problems("train", position, self.layers.index(layer))  # one slice per shard

        result = select_reasoning_direction(
            full, layers, problems, scorer, n_selection=n_sel, n_report=n_rep, seed=hp.seed,
            n_layers=self.n_model_layers, max_layer_fraction=hp.max_layer_fraction, kl_threshold=hp.kl_threshold,
            min_induction_score=hp.min_induction_score,
            null_factory=site_null_factory(hp.null_kind, n_random, hp.seed, train_rows) if n_random else None,
            searched_null_candidates=searched_placebo_candidates(full, layers, train_rows, n_searched, hp.seed + 1)
            if n_searched else None, n_searched_null=n_searched, n_bootstrap=n_boot,
        )  # fmt: skip
        for row in result.table:
            row.update(slot=self.layers.index(row["layer"]), position_label=self.position_labels[row["position"]])
        self.per_prompt_scores = {key: torch.stack([r[key] for r in result.table]) for key in PER_PROMPT_KEYS.values()}
        self.selection_table = [{k: v for k, v in r.items() if k not in PER_PROMPT_KEYS.values()} for r in result.table]
        best = result.selected
        self.selected = None if best is None else {"position": best["position"], "layer": best["layer"],
                                                   "slot": self.layers.index(best["layer"])}  # fmt: skip
        self.problem_sets, self.null_directions = problem_sets(pairs, result), result.null_directions
        self.selection_stats = selection_stats(result, self.problem_sets, {
            "n_selection_prompts": hp.n_selection_prompts, "n_report_prompts": self.n_report,
            "candidate_layers": layers, "metric": hp.selection_metric,
            "metric_definition": metric_definition(hp.selection_metric, hp.k_first_tokens),
            "kl_threshold": hp.kl_threshold, "min_induction_score": hp.min_induction_score,
            "max_layer_fraction": hp.max_layer_fraction,
            "intervention_strength": hp.intervention_strength, "n_bootstrap": n_boot, "alpha": 0.05, "seed": hp.seed,
            "null": hp.null_kind, "null_definition": NULL_DEFINITIONS[hp.null_kind], "n_searched_null": n_searched,
            "searched_null_definition": SEARCHED_NULL_DEFINITION if n_searched else None,
        })  # fmt: skip
        return self.selected

    def _log_selection(self) -> None:
        summary = selection_summary(self.selection_table, self.selection_stats.get("report"))
        logged = {f"val/{name}": value for name, value in summary.items()}
        for name, value in logged.items():
            self.log(name, value, prog_bar=name == "val/selected_ablation_score")
        self.last_metrics["val"] = logged

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.run_selection(self.trainer.datamodule, fast=bool(self.trainer.fast_dev_run))
        self._log_selection()
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank calls it
        if log_dir is not None and self.trainer.is_global_zero:
            path = self.save_directions_file(log_dir)
            rank_zero_info(f"Wrote {path} (selected: {self.selected})")

    def metadata(self) -> dict:
        """What reasoning_directions.json records (see the module docstring)."""
        spec = self.backbone_spec
        return {
            "model": spec.name_or_path if spec else None,
            "backbone": spec.fingerprint() if spec else None,
            "layers": self.layers,
            "n_model_layers": self.n_model_layers,
            "positions": self.positions,
            "position_tokens": self.position_labels,
            "method": "contrastive: mean(reasoning) - mean(control) over the train split, float64 means",
            "n_train": self.n_train,
            "site": "blocks.{layer}.resid_post",
            "score_definitions": SCORE_DEFINITIONS,
            "null": self.hparams.null_kind,
            "n_null": 0 if self.null_directions is None else len(self.null_directions),
            "selection": self.selection_stats,
            "selection_table": self.selection_table,
            "selected": self.selected,
        }

    # ---- the evaluation protocol (lightning_modules/protocol.py) ------------------------------------------------
    def build_report(self, trainer: L.Trainer, datamodule, split: str, options, checkpoint: str) -> dict:
        """`lightning_modules.direction_report.directions_report` of the selected direction on `split` problems,
        generating with the evaluate options; the trainer is not used (the backbone follows this module)."""
        self.to("cuda" if torch.cuda.is_available() else "cpu")  # the backbone follows the module's device
        report = directions_report(
            self, datamodule, split=split, n_prompts=options.n_prompts, strengths=list(options.strengths or DIRECTION_STRENGTHS),
            n_random=options.n_random, max_new_tokens=options.max_new_tokens, do_sample=not options.greedy,
            seed=options.seed,
        )  # fmt: skip
        return {"checkpoint": str(checkpoint), **report}

    @staticmethod
    def write_report(report: dict, output_dir: Path) -> dict[str, Path]:
        """intervention_results.json + visualizations/interventions.png (`write_intervention_report`)."""
        return write_intervention_report(report, output_dir)

    def save_directions_file(self, directory) -> str:
        """Write reasoning_directions.safetensors + .json into `directory`; returns the tensor file's path."""
        extra = dict(self.per_prompt_scores)
        if self.null_directions is not None:
            extra["null_directions"] = self.null_directions
        return str(save_directions(directory, self.directions, self.metadata(), extra=extra))
