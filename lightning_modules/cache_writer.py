"""Extraction into the activation cache: `Trainer.predict` of the extractor with a prediction writer.

`extract_activations(trainer, datamodule)` is what train.py / evaluate.py call before fitting or testing:
it reuses a complete cache with the same key, resumes an interrupted one (finished rows are skipped), and
otherwise runs the prompts through the backbone on the trainer's own accelerator/strategy. Under DDP every
rank writes the shards of the rows it computed; rank zero writes the manifest after a barrier. Under
fast_dev_run it extracts only the rows of the first FAST_DEV_PROBLEMS problems of each split: the manifest then
says incomplete, the datamodule serves those rows to the fast_dev_run only, and a later real run resumes the cache.
`ActivationCacheWriter` is a callback, but only as the extractor's output stage: it lives beside the extraction
so that the study modules' reports (protocol.py) extract a missing cache without importing callbacks/.
"""

from __future__ import annotations

import contextlib
import random

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from datamodules.activations import CachedActivationDataModule
from datamodules.prompts import PromptRow
from interp.cache import ActivationCache
from lightning_modules.extractor import ActivationExtractor

FAST_DEV_PROBLEMS = 2  # problems per split that a fast_dev_run extracts (both prompts of each)


class ActivationCacheWriter(BasePredictionWriter):
    """Writes each predicted batch as one shard, then the manifest (complete only if every row is there)."""

    def __init__(self, cache: ActivationCache, manifest: dict):
        super().__init__(write_interval="batch")
        self.cache = cache
        self.manifest = manifest

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        self.cache.write_shard(
            prediction["activations"], prediction["row_index"], prediction["split"], prediction["labels"],
            dtype=self.manifest["dtype"],
        )

    def on_predict_end(self, trainer, pl_module):
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            self.cache.finalize(self.manifest)
        trainer.strategy.barrier()


@contextlib.contextmanager
def _random_state_kept():
    """Restore Python's, numpy's and torch's (CPU and CUDA) random states on exit."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)  # fmt: skip
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


def fast_dev_rows(rows: list[PromptRow]) -> set[int]:
    """Row indices of the first FAST_DEV_PROBLEMS problems of each split (both rows of each problem)."""
    chosen: dict[str, list[int]] = {}
    for row in rows:
        problems = chosen.setdefault(row.split, [])
        if row.problem_index not in problems and len(problems) < FAST_DEV_PROBLEMS:
            problems.append(row.problem_index)
    return {row.row_index for row in rows if row.problem_index in chosen[row.split]}


def extract_activations(trainer: L.Trainer, datamodule: CachedActivationDataModule) -> ActivationCache:
    """Make sure `datamodule.cache` is complete (under fast_dev_run: holds `fast_dev_rows`), extracting what is
    missing with `trainer`."""
    cache = datamodule.cache
    if trainer.is_global_zero:
        for name, problem in cache.drop_damaged_shards().items():
            rank_zero_warn(f"activation cache shard {cache.shard_dir / name}: {problem}; removed it, its rows are "
                           "extracted again")  # fmt: skip
    trainer.strategy.barrier()
    if cache.complete:
        rank_zero_info(f"Reusing activation cache {cache.directory}")
        return cache
    prompts = datamodule.prompts
    prompts.setup("predict")
    manifest = datamodule.manifest()
    wanted = fast_dev_rows(prompts.rows) if trainer.fast_dev_run else set(range(manifest["n_rows"]))
    finished = cache.finished_rows()
    prompts.exclude_rows = finished | (set(range(manifest["n_rows"])) - wanted)
    if len(prompts.exclude_rows) == manifest["n_rows"]:  # nothing to extract, e.g. done before the manifest
        if trainer.is_global_zero:
            cache.finalize(manifest)
        trainer.strategy.barrier()
        return cache
    rank_zero_info(f"Extracting activations of {manifest['n_rows'] - len(prompts.exclude_rows)} prompts into "
                   f"{cache.directory}" + (f" (reusing {len(finished)} already cached)" if finished else ""))
    extractor = ActivationExtractor(datamodule.backbone, datamodule.layers, str(datamodule.positions))
    writer = ActivationCacheWriter(cache, manifest)
    # fast_dev_run's one-batch limit would leave rows of `wanted` out: the rows are limited above instead.
    saved_limit, trainer.limit_predict_batches = trainer.limit_predict_batches, 1.0
    trainer.callbacks.append(writer)
    try:
        with _random_state_kept():  # a run that extracts first trains exactly like one that reuses the cache
            trainer.predict(extractor, datamodule=prompts, return_predictions=False)
    finally:
        trainer.callbacks.remove(writer)
        trainer.limit_predict_batches = saved_limit
    if not (cache.complete or wanted <= cache.finished_rows()):
        raise RuntimeError(f"extraction finished but the cache {cache.directory} is incomplete")
    return cache
