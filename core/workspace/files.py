"""Files written whole or not at all, and caches of arrays keyed by what they were computed from.

Every file the studio writes for later (checkpoints, configs, metrics, evaluations, rules, caches) goes through
write_atomic: a temporary file beside the target is filled, flushed to disk (fsync) and renamed over it, so a
crash, a kill or a full disk leaves the previous file, never half of one. Two writers keep their own way, each
saying why: the decoded-image cache fills a memory-mapped file in place (core/data/cache.py) and a zip import
moves a whole extracted folder (core/data/zips.py).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np


def write_atomic(path: str | Path, write, durable: bool = True, suffix: str = ".tmp") -> None:
    """`write(tmp)` fills a temporary file (a path) beside `path`, which then replaces it. A failure (a full disk,
    an exception in `write`, an interrupt) leaves the previous file and no temporary one. `durable`: the bytes
    reach the disk before the rename (off only for files rewritten every second, whose loss costs nothing).
    `suffix`: the temporary name's ending, for writers that add their own (numpy's savez adds .npz)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_text_atomic(path: str | Path, text: str, durable: bool = True) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text), durable=durable)


def write_json_atomic(path: str | Path, obj, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent))


def save_npz_atomic(path: str | Path, **arrays) -> None:
    write_atomic(path, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")


def load_keyed_npz(path: str | Path, key: str) -> dict | None:
    """The arrays of a cache file that save_keyed_npz wrote under the same key; None when it is absent, was
    computed from something else (another key), or cannot be read (another version, a torn disk)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            return {name: z[name] for name in z.files if name != "key"}
    except (OSError, ValueError, KeyError):
        return None


def save_keyed_npz(path: str | Path, key: str, **arrays) -> None:
    """A cache of arrays computed from what `key` names. A failure to write it (a full disk) costs a
    recomputation next time, nothing else."""
    try:
        save_npz_atomic(path, key=np.array(key), **arrays)
    except OSError:
        pass
