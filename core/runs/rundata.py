"""A run's images as the model gets them: the saved split, decoded once into the image cache, served as
batches of NxHxWx3 uint8 (from memory, a memory-mapped file, or kept on the GPU)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from core.data.cache import IMAGE_CACHE
from core.data.sources import Sample
from core.data.split import samples_from_split
from core.workspace.store import Run, Workspace


@dataclass
class RunData:
    classes: list[str]
    images: object            # MxHxWx3 uint8: numpy array/memmap, or a torch tensor (maybe on GPU)
    parts: dict[str, np.ndarray]  # sample indices per split part
    labels: np.ndarray        # per sample
    paths: list[str]          # per sample
    rows: np.ndarray          # per sample: its row in `images`
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): could not be decoded

    def batch(self, idx: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows[idx]
        if isinstance(self.images, torch.Tensor):
            x = self.images.index_select(0, torch.as_tensor(rows, device=self.images.device))
        else:
            x = torch.from_numpy(np.ascontiguousarray(self.images[rows]))
        y = torch.from_numpy(self.labels[idx]).long()
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def batches(self, idx: np.ndarray, batch_size: int, device: torch.device, check_stop=None):
        """uint8 image batches of the given samples, in order. `check_stop()` runs before each batch (it raises
        data.Stopped when the user asked to stop)."""
        for start in range(0, len(idx), batch_size):
            if check_stop is not None:
                check_stop()
            yield self.batch(idx[start:start + batch_size], device)[0]

    def train_arrays(self):
        """(images, rows of the training samples), for statistics such as the dataset mean/std (data.channel_stats
        counts images kept on the GPU there)."""
        return self.images, self.rows[self.parts["train"]]


def load_run_data(ws: Workspace, run: Run, hw: tuple[int, int], device: torch.device, reporter=None,
                  parts=("train", "val", "test"), shared: bool = False) -> RunData:
    """`shared`: decode into the workspace's disk cache (once, under a lock) and memory-map it, so that other
    processes (the ranks of a multi-device run, the next run) read the same pages instead of decoding again."""
    split = run.split()
    classes = split["classes"]
    samples, part_of = [], []
    for part in parts:
        # "unlabeled": images without a label (label -1), for self-supervised pretraining only
        part_samples = ([Sample(path, -1) for path in split.get("unlabeled", [])] if part == "unlabeled"
                        else samples_from_split(split, part))
        for s in part_samples:
            samples.append(s)
            part_of.append(part)
    paths = [s.path for s in samples]

    def progress(done, total):
        if reporter:
            reporter.stage("decoding images", done, total)

    # The cache is asked for the images in one canonical order (sorted paths), so runs over the same images
    # in another split order (the folds of a cross-validation, a re-split) decode them once, not once each.
    unique = sorted(set(paths))
    row_of = {p: i for i, p in enumerate(unique)}
    rows = np.array([row_of[p] for p in paths], dtype=np.int64)
    decoded = IMAGE_CACHE.get(unique, hw, ws.cache_dir, progress, reporter.should_stop if reporter else None,
                              on_disk=shared)
    skipped = [(unique[r], reason) for r, reason in sorted(decoded.failed.items())]
    part_arr = np.array(part_of)
    ok = ~np.isin(rows, list(decoded.failed))
    idx = {p: np.nonzero((part_arr == p) & ok)[0] for p in parts}
    images = decoded.array
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if images.nbytes < 0.5 * free:  # keep the whole set resident on the GPU: no host copies per batch
            with warnings.catch_warnings():  # a read-only memory map: copied to the GPU at once, never written
                warnings.simplefilter("ignore", UserWarning)
                images = torch.from_numpy(np.asarray(images)).to(device)
    return RunData(classes, images, idx, np.array([s.label for s in samples], dtype=np.int64), paths, rows,
                   skipped)
