"""The decoded-image cache: images decoded and resized once, kept in memory or memory-mapped on disk,
and their per-channel statistics."""
from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from core.data.images import ImageLoadError, load_array


def _default_cache_bytes() -> int:
    env = os.environ.get("STUDIO_CACHE_MB")
    if env:
        return int(float(env) * 2**20)
    return 4 * 2**30  # 4 GiB of decoded pixels in memory; larger sets go to a memory-mapped file


def _fingerprint(paths: list[str], hw: tuple[int, int]) -> str:
    h = hashlib.sha1(f"v1|{hw[0]}x{hw[1]}".encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"|{p}|{st.st_size}|{st.st_mtime_ns}".encode("utf-8", "surrogateescape"))
        except OSError:
            h.update(f"|{p}|missing".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:20]


@dataclass
class DecodedImages:
    """N decoded, resized images as an NxHxWx3 uint8 array (in memory or memory-mapped)."""
    array: np.ndarray
    failed: dict[int, str]  # index -> reason; those slots are zeros and must not be used
    key: str
    on_disk: bool = False


class ImageCache:
    """Process-wide cache of decoded images, keyed by file paths, sizes, mtimes and target size,
    so a changed file is decoded again. In memory up to max_bytes (LRU); a set larger than that is
    written once to a memory-mapped file under cache_dir and read from there."""

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = _default_cache_bytes() if max_bytes is None else max_bytes
        self._mem: OrderedDict[str, DecodedImages] = OrderedDict()
        self._lock = threading.Lock()

    def memory_bytes(self) -> int:
        return sum(d.array.nbytes for d in self._mem.values() if not d.on_disk)

    def get(self, paths: list[str], hw: tuple[int, int], cache_dir: str | Path | None = None,
            progress: Callable[[int, int], None] | None = None,
            should_stop: Callable[[], bool] | None = None, on_disk: bool = False) -> DecodedImages:
        """`on_disk`: memory-mapped from cache_dir whatever the size (shared with other processes)."""
        key = _fingerprint(paths, hw)
        with self._lock:
            if key in self._mem:
                self._mem.move_to_end(key)
                return self._mem[key]
        n, (h, w) = len(paths), hw
        nbytes = n * h * w * 3
        disk = cache_dir is not None and (nbytes > self.max_bytes or on_disk)
        if disk:
            decoded = self._from_disk(paths, hw, Path(cache_dir), key, progress, should_stop)
        else:
            arr = np.zeros((n, h, w, 3), dtype=np.uint8)
            failed = _decode_into(arr, paths, hw, progress, should_stop)
            decoded = DecodedImages(arr, failed, key)
        with self._lock:
            self._mem[key] = decoded
            while self.memory_bytes() > self.max_bytes and len(self._mem) > 1:
                self._mem.popitem(last=False)
        return decoded

    def _from_disk(self, paths, hw, cache_dir: Path, key, progress, should_stop) -> DecodedImages:
        cache_dir.mkdir(parents=True, exist_ok=True)
        data_path, meta_path = cache_dir / f"{key}.u8", cache_dir / f"{key}.json"
        shape = (len(paths), hw[0], hw[1], 3)
        # One process decodes; others asking for the same images meanwhile (ranks of one machine) wait for it.
        with _file_lock(cache_dir / f"{key}.lock"):
            if data_path.exists() and meta_path.exists():
                meta = json.loads(meta_path.read_text())
                os.utime(data_path)  # recently used: evicted last
                arr = np.memmap(data_path, dtype=np.uint8, mode="r", shape=shape)
                return DecodedImages(arr, {int(k): v for k, v in meta["failed"].items()}, key, on_disk=True)
            _evict_disk_cache(cache_dir, keep_free=int(np.prod(shape)))
            tmp = data_path.with_suffix(f".u8.{os.getpid()}.tmp")
            try:
                arr = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=shape)
                failed = _decode_into(arr, paths, hw, progress, should_stop)
                arr.flush()
                del arr
                os.replace(tmp, data_path)
            finally:
                tmp.unlink(missing_ok=True)
            meta_path.write_text(json.dumps({"failed": failed, "n": len(paths), "hw": list(hw)}))
        arr = np.memmap(data_path, dtype=np.uint8, mode="r", shape=shape)
        return DecodedImages(arr, failed, key, on_disk=True)


def _disk_cache_limit() -> int:
    return int(float(os.environ.get("STUDIO_DISK_CACHE_GB", 20)) * 2**30)


def _evict_disk_cache(cache_dir: Path, keep_free: int) -> None:
    """Least recently used decoded sets go until the cache plus `keep_free` bytes fits the limit
    (STUDIO_DISK_CACHE_GB, default 20). A set another process has open stays readable: unlinking keeps its pages."""
    files = sorted(cache_dir.glob("*.u8"), key=lambda f: f.stat().st_mtime)
    total = sum(f.stat().st_size for f in files)
    while files and total + keep_free > _disk_cache_limit():
        f = files.pop(0)
        total -= f.stat().st_size
        f.unlink(missing_ok=True)
        f.with_suffix(".json").unlink(missing_ok=True)


@contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # Windows: no lock; two processes may decode the same set, each writing its own temp file
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class Stopped(Exception):
    """Raised inside long loops when the user asked to stop."""


def decode_workers() -> int:
    """Threads that decode images into the cache (PIL releases the GIL while decoding and resizing)."""
    return max(1, min(16, os.cpu_count() or 1))


def _decode_into(arr, paths, hw, progress, should_stop) -> dict[int, str]:
    failed: dict[int, str] = {}
    done = 0
    chunk = 256

    def one(i):
        try:
            arr[i] = load_array(paths[i], hw)
            return i, None
        except ImageLoadError as exc:
            return i, str(exc)
        except Exception as exc:  # a decoder bug must not take the run down
            return i, f"cannot decode image: {exc}"

    with ThreadPoolExecutor(max_workers=decode_workers()) as pool:
        for start in range(0, len(paths), chunk):
            if should_stop and should_stop():
                raise Stopped()
            for i, reason in pool.map(one, range(start, min(len(paths), start + chunk))):
                if reason:
                    failed[i] = reason
            done = min(len(paths), start + chunk)
            if progress:
                progress(done, len(paths))
    return failed


IMAGE_CACHE = ImageCache()


def channel_stats(array, indices: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean/std (on the 0-1 scale) of the given 8-bit images, computed in chunks from each channel's
    256-bin histogram: exact, and about 10x faster than summing the pixels as floats (2.2 s for ELPV's training
    part at 160 px, longer than the GPU's first epochs)."""
    hist = np.zeros((3, 256), dtype=np.int64)
    if not isinstance(array, np.ndarray):  # a torch tensor: images kept on the GPU are counted there
        import torch
        if array.dtype != torch.uint8:
            raise TypeError(f"channel_stats expects 8-bit images, got {array.dtype}")
        rows = torch.as_tensor(np.asarray(indices), device=array.device)
        counts = torch.zeros((3, 256), dtype=torch.int64, device=array.device)
        for start in range(0, len(rows), 256):
            block = array.index_select(0, rows[start:start + 256])
            for c in range(3):
                counts[c] += torch.bincount(block[..., c].reshape(-1), minlength=256)
        hist += counts.cpu().numpy()
    else:
        if array.dtype != np.uint8:
            raise TypeError(f"channel_stats expects 8-bit images, got {array.dtype}")
        for start in range(0, len(indices), 256):
            block = array[indices[start:start + 256]]
            for c in range(3):
                hist[c] += np.bincount(block[..., c].ravel(), minlength=256)
    count = max(int(hist[0].sum()), 1)
    levels = np.arange(256) / 255.0
    mean = hist @ levels / count
    std = np.sqrt(np.maximum(hist @ levels ** 2 / count - mean ** 2, 1e-12))
    std = np.maximum(std, 1e-3)
    return mean.round(6).tolist(), std.round(6).tolist()
