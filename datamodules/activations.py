"""Per-layer probe data read from the activation cache.

It exposes the small protocol the probe module relies on:
    n_layers, d_model, num_classes, class_names, layers, train_moments() -> RunningMoments over train features
and yield batches {"x": [batch, n_layers, d_model] float32, "y": [batch], "y_control": [batch]}.

Control task for selectivity (datamodules/tensors.py): a row's type is its problem's `question_type`, the first
word of the question, lower-cased, punctuation stripped (both prompts of a problem share it); each type gets one
seeded label drawn from the train split's label distribution. After setup: `train_class_counts` ([num_classes]
int64, label counts of the train rows) and `control_type_coverage` (split -> (rows whose type occurs among the
train rows, rows)).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import lightning as L
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset

from datamodules.prompt_rows import LABELS
from datamodules.prompts import ReasoningPromptsDataModule
from datamodules.tensors import control_task_labels, control_type_seen, epoch_seeded_sampler, question_type
from interp.activations import check_layers
from interp.backbone import BackboneSpec
from interp.cache import SPLITS, STORAGE_DTYPES, ActivationCache, ShardReader, cache_key
from interp.errors import UserError
from interp.positions import PositionSpec
from interp.prompts import post_instruction_ids
from interp.stats import RunningMoments

PROBE_LABELS = tuple(label for label in LABELS if label != "problem")


class _CachedRows(Dataset):
    """Rows of the cache read through memory-mapped shards: x [n_layers, d_model] at one cached position,
    or [n_pos, n_layers, d_model] with position=None."""

    def __init__(self, reader: ShardReader, shard_id, shard_offset, position: int | None, y, y_control):
        self.reader, self.shard_id, self.shard_offset = reader, shard_id, shard_offset
        self.position, self.y, self.y_control = position, y, y_control

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        x = self.reader.row(int(self.shard_id[i]), int(self.shard_offset[i]))
        x = x if self.position is None else x[self.position]
        return {"x": x, "y": self.y[i], "y_control": self.y_control[i]}


class CachedActivationDataModule(L.LightningDataModule):
    """Residual-stream activations of the prompts' rows, extracted once into the activation cache
    (`interp.cache`, keyed by backbone, data, layers and positions), then served per split as probe batches.

    `train.py` fills an incomplete cache first (`extract_activations`: `Trainer.predict` over `prompts` with
    `ActivationExtractor`); `setup` then reads the finished cache through memory-mapped shards. Batches:
    {"x": [batch, n_layers, d_model] float32 (or [batch, n_pos, n_layers, d_model] with batch_position None),
    "y": [batch] labels of `label`, "y_control": [batch] control-task labels}.
    """

    def __init__(
        self,
        prompts: ReasoningPromptsDataModule,
        backbone: BackboneSpec | None = None,
        layers: list[int] | None = None,
        positions: str = "last",
        batch_position: int | None = -1,
        label: str = "reasoning",
        cache_dir: str = ".cache/activations",
        batch_size: int = 64,
        num_workers: int = 0,
        control_seed: int = 0,
        cache_dtype: str = "float32",
    ):
        """
        Args:
            prompts: the prompt datamodule (GSM8K/MATH reasoning vs control prompts).
            backbone: the frozen model to read (its name also selects the prompts' tokenizer).
            layers: layer indices to cache and probe; None = all.
            positions: which tokens to cache: last | last_<k> | post_instruction | mean.
            batch_position: which cached position the batches hold (-1 = the last one; null = all cached positions,
                x [batch, n_pos, n_layers, d_model], e.g. for directions per post-instruction position).
            label: what the probes predict: reasoning | dataset | subject | level.
            cache_dir: where activation caches live (one sub-directory per cache key).
            batch_size: probe-training batch size (extraction uses prompts.batch_size).
            control_seed: seed of the control-task labels (type -> label hash; selectivity).
            cache_dtype: float32 | bfloat16 | float16: how the cache stores the activations (bfloat16 halves it at
                ~3 significant digits; float16 keeps more digits but overflows above 65504, refused at extraction).
                Batches are float32 either way.
        """
        super().__init__()
        self.backbone = backbone or BackboneSpec()
        self.prompts = prompts
        prompts.bind_backbone(self.backbone)
        self.layers = check_layers(layers, self.backbone.num_layers())
        self.positions = PositionSpec.parse(positions)
        if label not in PROBE_LABELS:
            raise UserError(f"data.label {label!r} is not one of {list(PROBE_LABELS)}")
        sources = sorted({source.name for source in prompts.sources})
        if label in ("subject", "level") and "math" not in sources:
            raise UserError(f"data.label {label} needs MATH problems (only MATH has subjects and levels); the "
                            f"prompt sources are {', '.join(sources)}")  # fmt: skip
        if batch_size < 1:
            raise UserError(f"data.batch_size must be >= 1, got {batch_size}")
        if batch_position is not None and self.positions.kind != "post_instruction":
            n_positions = self.positions.num_positions()
            if not -n_positions <= batch_position < n_positions:
                raise UserError(f"data.batch_position {batch_position} is out of range for positions "
                                f"{self.positions} ({n_positions} cached position(s) per prompt)")  # fmt: skip
        self.batch_position, self.label, self.cache_dir = batch_position, label, Path(cache_dir)
        self.batch_size, self.num_workers, self.control_seed = batch_size, num_workers, control_seed
        if cache_dtype not in STORAGE_DTYPES:
            raise UserError(f"data.cache_dtype {cache_dtype!r} is not one of {list(STORAGE_DTYPES)}")
        self.cache_dtype = cache_dtype
        self.datasets: dict[str, Dataset] = {}

    # ---- the cache -------------------------------------------------------------------------------------------
    def cache_spec(self) -> dict:
        self.prompts.setup("predict")
        return {
            "backbone": self.backbone.fingerprint(),
            "data": self.prompts.data_spec(),
            "layers": self.layers,
            "positions": str(self.positions),
            # a float32 cache keeps the key it had before storage dtypes existed, so existing caches stay valid
            **({"dtype": self.cache_dtype} if self.cache_dtype != "float32" else {}),
        }

    @cached_property
    def cache(self) -> ActivationCache:
        return ActivationCache(self.cache_dir / cache_key(self.cache_spec()))

    def manifest(self) -> dict:
        self.prompts.setup("predict")
        post = len(post_instruction_ids(self.prompts.tokenizer)) if self.positions.kind == "post_instruction" else None
        return {
            "key": self.cache.directory.name,
            "spec": self.cache_spec(),
            "n_rows": len(self.prompts.rows),
            "layers": self.layers,
            "positions": str(self.positions),
            "n_positions": self.positions.num_positions(post),
            "d_model": self.backbone.hidden_size(),
            "dtype": self.cache_dtype,
            "label_names": self.prompts.label_names,
        }

    # ---- probe data ------------------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return self.backbone.hidden_size()

    @property
    def class_names(self) -> list[str]:
        return list(self.cache.manifest["label_names"][self.label])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _check_extracted(self) -> None:
        """The cache must be complete; a fast_dev_run also reads the rows `extract_activations` wrote for it."""
        fast_dev_run = self.trainer is not None and bool(self.trainer.fast_dev_run)
        if not (self.cache.complete or (fast_dev_run and self.cache.manifest is not None)):
            raise UserError(f"activation cache {self.cache.directory} is incomplete: run extraction first")

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self._check_extracted()
        meta = self.cache.metadata()
        y = meta[f"label.{self.label}"]
        valid = y >= 0  # e.g. MATH subject/level are undefined (-1) for GSM8K rows
        train = valid & (meta["split"] == 0)
        if int(train.sum()) == 0:
            raise UserError(f"no training rows have a {self.label!r} label")
        self.prompts.setup("predict")  # the rows' questions give the control types
        types = [question_type(self.prompts.rows[i].question) for i in meta["row_index"].tolist()]
        y_control = control_task_labels(y.clamp(min=0), types, train, self.control_seed)
        seen = control_type_seen(types, train)
        self.train_class_counts = torch.bincount(y[train], minlength=self.num_classes)
        in_split = {split: valid & (meta["split"] == k) for k, split in enumerate(SPLITS)}
        self.control_type_coverage = {split: (int(seen[m].sum()), int(m.sum())) for split, m in in_split.items()}
        reader = ShardReader(self.cache.shards())
        self.row_index: dict[str, torch.Tensor] = {}
        for split_id, split in enumerate(SPLITS):
            keep = valid & (meta["split"] == split_id)
            self.row_index[split] = meta["row_index"][keep]
            self.datasets[split] = _CachedRows(
                reader, meta["shard_id"][keep], meta["shard_offset"][keep], self.batch_position, y[keep], y_control[keep]
            )

    def train_moments(self) -> RunningMoments:
        """Feature mean/variance over the training rows, [n_layers, d_model], one batch at a time."""
        self.setup()
        moments = RunningMoments()
        for batch in DataLoader(self.datasets["train"], batch_size=256, num_workers=self.num_workers):
            moments.update(batch["x"])
        return moments

    def split_features(self, split: str, layer_slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [n, d_model], y [n]) of one split at one probed layer (slot into `layers`), for scikit-learn."""
        self.setup()
        xs, ys = [], []
        for batch in DataLoader(self.datasets[split], batch_size=256, num_workers=self.num_workers):
            xs.append(batch["x"][:, layer_slot])
            ys.append(batch["y"])
        return torch.cat(xs), torch.cat(ys)

    def split_slice(self, split: str, position: int, layer_slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [n, d_model] float32, y [n]) of one split's labelled rows at one cached position (index into the
        cached positions) and layer slot (index into `layers`), in row order. Reads one [rows, d_model] slice
        per memory-mapped shard: never whole rows, never the whole cache."""
        x, y, _ = self.split_slice_problems(split, position, layer_slot)
        return x, y

    def split_slice_problems(
        self, split: str, position: int, layer_slot: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`split_slice` plus problem [n] int64, each row's problem id (the cache's label.problem: the reasoning
        and control rows of one problem share it), for the paired nulls. Same single read per shard."""
        if not 0 <= layer_slot < self.n_layers:
            raise UserError(f"cached layer slot {layer_slot} out of range ({self.n_layers} layers)")
        rows = self.split_position(split, position, layer_slot)
        return rows["x"], rows["y"], rows["problem"]

    def split_position(self, split: str, position: int, layer_slot: int | None = None) -> dict[str, torch.Tensor]:
        """One split's labelled rows at one cached position (index into the cached positions), in row order:
        {"x": [n, n_layers, d_model] float32 (every cached layer; [n, d_model] for one layer_slot), "y": [n] the
        `label`, "problem": [n] the cache's label.problem, "row_index": [n] the prompt rows}. One slice read per
        memory-mapped shard: never whole rows, never the whole cache."""
        self._check_extracted()
        n_pos = int(self.cache.manifest["n_positions"])
        if not 0 <= position < n_pos:
            raise UserError(f"cached position {position} out of range ({n_pos} positions)")
        meta = self.cache.metadata()
        y = meta[f"label.{self.label}"]
        keep = (y >= 0) & (meta["split"] == SPLITS.index(split))
        shard_id, offset = meta["shard_id"][keep], meta["shard_offset"][keep]
        width = (self.d_model,) if layer_slot is not None else (self.n_layers, self.d_model)
        shards, x = self.cache.shards(), torch.empty(int(keep.sum()), *width)
        for sid in shard_id.unique().tolist():
            rows = shard_id == sid
            with safe_open(str(shards[sid]), framework="pt") as f:
                sliced = f.get_slice("activations")
                block = sliced[:, position] if layer_slot is None else sliced[:, position, layer_slot]
            x[rows] = block[offset[rows]].float()  # [rows, (n_layers,) d_model]
        return {"x": x, "y": y[keep], "problem": meta["label.problem"][keep], "row_index": meta["row_index"][keep]}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        sampler = epoch_seeded_sampler(self.datasets[split], self.trainer, self.prompts.seed) if shuffle else None
        return DataLoader(
            self.datasets[split], batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )  # fmt: skip

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("val", shuffle=False)

    def test_dataloader(self):
        return self._loader("test", shuffle=False)
