"""The one activation-cache format: a directory of safetensors shards plus a JSON manifest.

Layout of one cache (its directory name is the key, a hash of everything that determines its content):

    <cache_dir>/<key>/manifest.json
        {"format": 1, "key": str, "spec": {...what the key hashes...}, "complete": bool, "n_rows": int,
         "layers": [int], "positions": str, "n_positions": int, "d_model": int, "dtype": a STORAGE_DTYPES name,
         "label_names": {label: [class names]}}
    <cache_dir>/<key>/shards/rows-<first row:08d>.safetensors, each holding
        "activations"  [rows, n_pos, n_layers, d_model]  residual stream at blocks.{l}.resid_post, stored in the
                       manifest's dtype (float32 by default; bfloat16 / float16 halve the cache) and read as float32
        "row_index"    [rows] int64    global prompt index (rows of a shard need not be contiguous)
        "split"        [rows] int64    0 train, 1 val, 2 test
        "label.<name>" [rows] int64    one per label (reasoning, dataset, subject, level, problem)

Shards are written atomically (temp file, fsync, rename: interp/atomic.py), one per extraction batch, by whichever
process computed them, so an interrupted extraction resumes by skipping finished rows and DDP ranks never write the
same file. The manifest is marked complete only when every row is present exactly once; a complete manifest also
records each shard's size and sha256 ("shards": {name: {"bytes", "sha256"}}), checked whenever the cache is reused
(`damaged_shards`: one read of the cache); a damaged shard is named, removed and its rows extracted again.
Readers memory-map the shards: nothing loads the whole cache into RAM.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from interp.atomic import file_sha256, replaced_atomically, write_text
from interp.errors import UserError

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_key(spec: dict) -> str:
    """Stable short hash of a JSON-able spec (sorted keys)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:20]


class ActivationCache:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.shard_dir = self.directory / "shards"

    # ---- writing -------------------------------------------------------------------------------------------
    def write_shard(
        self,
        activations: torch.Tensor,
        row_index: torch.Tensor,
        split: torch.Tensor,
        labels: dict[str, torch.Tensor],
        dtype: str = "float32",
    ) -> Path:
        """Write one batch: activations [rows, n_pos, n_layers, d_model], stored as `dtype` (a STORAGE_DTYPES
        name), and its per-row metadata."""
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        stored = activations.to(STORAGE_DTYPES[dtype])
        if dtype == "float16" and not bool(torch.isfinite(stored).all()) and bool(torch.isfinite(activations).all()):
            raise UserError(f"activations up to {float(activations.abs().max()):.4g} overflow {dtype}: cache them as "
                            "bfloat16 or float32 (data.cache_dtype)")  # fmt: skip
        tensors = {
            "activations": stored.contiguous(),
            "row_index": row_index.to(torch.int64).cpu().contiguous(),
            "split": split.to(torch.int64).cpu().contiguous(),
            **{f"label.{name}": value.to(torch.int64).cpu().contiguous() for name, value in labels.items()},
        }
        path = self.shard_dir / f"rows-{int(row_index.min()):08d}.safetensors"
        with replaced_atomically(path) as tmp:
            save_file(tensors, str(tmp))
        return path

    def finalize(self, manifest: dict) -> dict:
        """Write the manifest; `complete` is True only if rows 0..n_rows-1 each appear exactly once. A complete
        manifest records every shard's size and sha256 (`damaged_shards` checks them)."""
        rows = self._all_row_indices()
        n_rows = manifest["n_rows"]
        complete = len(rows) == n_rows and bool(torch.equal(rows.sort().values, torch.arange(n_rows)))
        manifest = {**manifest, "format": FORMAT_VERSION, "complete": complete}
        if complete:
            manifest["shards"] = {path.name: {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
                                  for path in self.shards()}  # fmt: skip
        write_text(self.directory / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
        return manifest

    # ---- reading -------------------------------------------------------------------------------------------
    def shards(self) -> list[Path]:
        return sorted(self.shard_dir.glob("rows-*.safetensors")) if self.shard_dir.is_dir() else []

    @property
    def manifest(self) -> dict | None:
        path = self.directory / "manifest.json"
        return json.loads(path.read_text()) if path.is_file() else None

    @property
    def complete(self) -> bool:
        manifest = self.manifest
        return bool(manifest and manifest.get("complete") and manifest.get("format") == FORMAT_VERSION)

    def damaged_shards(self) -> dict[str, str]:
        """{shard name: what is wrong} for every shard that cannot be read, and, in a complete cache, every shard
        whose size or sha256 differs from the manifest's record (truncated, corrupted, missing or foreign)."""
        damaged = {}
        for path in self.shards():
            try:
                self._read(path, "row_index")
            except Exception as error:  # safetensors' error for a truncated header or body
                damaged[path.name] = f"unreadable ({type(error).__name__}: {str(error).splitlines()[0][:80]})"
        recorded = (self.manifest or {}).get("shards") if self.complete else None
        for name, record in (recorded or {}).items():
            path = self.shard_dir / name
            if name in damaged:
                continue
            if not path.is_file():
                damaged[name] = "missing"
            elif path.stat().st_size != record["bytes"]:
                damaged[name] = f"{path.stat().st_size} bytes where the manifest recorded {record['bytes']}"
            elif file_sha256(path) != record["sha256"]:
                damaged[name] = "its sha256 differs from the manifest's: the file changed after it was written"
        if recorded is not None:
            for path in self.shards():
                if path.name not in recorded:
                    damaged.setdefault(path.name, "not listed in the manifest")
        return damaged

    def drop_damaged_shards(self) -> dict[str, str]:
        """Delete the `damaged_shards` and mark the cache incomplete, so the next extraction recomputes exactly
        their rows; also delete the temporaries of writers that were killed. Returns what was dropped and why.
        Call it only while no process extracts into this cache."""
        for leftover in self.shard_dir.glob(".rows-*.tmp*") if self.shard_dir.is_dir() else []:
            leftover.unlink(missing_ok=True)
        damaged = self.damaged_shards()
        if damaged:
            for name in damaged:
                (self.shard_dir / name).unlink(missing_ok=True)
            if self.manifest is not None:
                manifest = {key: value for key, value in self.manifest.items() if key != "shards"}
                write_text(self.directory / "manifest.json", json.dumps({**manifest, "complete": False}, indent=2,
                                                                        sort_keys=True))  # fmt: skip
        return damaged

    def _all_row_indices(self) -> torch.Tensor:
        parts = [self._read(path, "row_index") for path in self.shards()]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    def finished_rows(self) -> set[int]:
        """Rows already written (an interrupted extraction skips them)."""
        return set(self._all_row_indices().tolist())

    @staticmethod
    def _read(path: Path, name: str) -> torch.Tensor:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)

    def metadata(self) -> dict[str, torch.Tensor]:
        """Per-row metadata of the whole cache in row order: row_index, split, label.<name>, plus
        shard_id / shard_offset locating each row's activations. Small: no activations are read."""
        columns: dict[str, list[torch.Tensor]] = {}
        for shard_id, path in enumerate(self.shards()):
            with safe_open(str(path), framework="pt") as f:
                names = [k for k in f.keys() if k != "activations"]
                for name in names:
                    columns.setdefault(name, []).append(f.get_tensor(name))
                n = f.get_slice("row_index").get_shape()[0]
            columns.setdefault("shard_id", []).append(torch.full((n,), shard_id, dtype=torch.int64))
            columns.setdefault("shard_offset", []).append(torch.arange(n, dtype=torch.int64))
        if not columns:
            raise UserError(f"activation cache {self.directory} holds no shards")
        table = {name: torch.cat(parts) for name, parts in columns.items()}
        order = table["row_index"].argsort()
        return {name: value[order] for name, value in table.items()}

    def iter_shards(self) -> Iterator[dict[str, torch.Tensor]]:
        """Each shard's tensors in turn (one shard in memory at a time)."""
        for path in self.shards():
            with safe_open(str(path), framework="pt") as f:
                yield {name: f.get_tensor(name) for name in f.keys()}


class ShardReader:
    """Random access to rows of a cache through memory-mapped shards (one open handle per shard)."""

    def __init__(self, shards: list[Path]):
        self.shards = shards
        self._handles: dict[int, object] = {}

    def row(self, shard_id: int, offset: int) -> torch.Tensor:
        """[n_pos, n_layers, d_model] float32 activations of one row."""
        handle = self._handles.get(shard_id)
        if handle is None:
            handle = safe_open(str(self.shards[shard_id]), framework="pt")
            self._handles[shard_id] = handle
        return handle.get_slice("activations")[offset].float()

    def __getstate__(self):  # handles are per process (DataLoader workers re-open them)
        return {"shards": self.shards, "_handles": {}}
