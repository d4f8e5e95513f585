"""Files that appear whole or not at all: every result, cache shard, manifest and figure the tool writes goes
through `replaced_atomically`, so a run killed at any moment leaves either the previous file or the new one under
the final name, never half of one (a temporary name next to it, fsync, then os.replace)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from interp.errors import UserError


@contextmanager
def replaced_atomically(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in `path`'s directory to write to; on success it is fsynced and renamed over
    `path`; on any error (or a kill) it never takes `path`'s name, and it is removed when Python gets the chance."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # hidden, and matches no reader's glob
    try:
        yield tmp
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"no space left on the device while writing {path}: free some and rerun the same "
                            "command (every file finished before this one is kept)") from error
        raise
    finally:
        tmp.unlink(missing_ok=True)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text(path: str | Path, text: str) -> Path:
    with replaced_atomically(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, payload, indent: int = 2, **kwargs) -> Path:
    """`payload` as standard JSON (NaN / inf -> null through `interp.directions.finite_json`)."""
    from interp.directions import finite_json

    return write_text(path, json.dumps(finite_json(payload), indent=indent, **kwargs) + "\n")


def copy_file(source: str | Path, path: str | Path) -> Path:
    with replaced_atomically(path) as tmp:
        shutil.copyfile(source, tmp)
    return Path(path)


def save_figure(figure, path: str | Path, **kwargs) -> Path:
    """A matplotlib figure, in the format of `path`'s suffix."""
    path = Path(path)
    with replaced_atomically(path) as tmp:
        figure.savefig(tmp, format=path.suffix.lstrip(".") or None, **kwargs)
    return path
