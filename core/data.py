"""Datasets: where the images are, their labels, the split, and the decoded-image cache.

Sources (load_dataset):
- a folder with one sub-folder per class (images may sit in nested folders inside a class folder);
- a folder with train/ and val|valid|validation/ and/or test/, each holding class sub-folders;
- a CSV file of `path,label[,split][,group]` (paths relative to the CSV; other columns are ignored);
- the built-in ELPV example: "elpv" (functional/defective) or "elpv4" (the 4 defect probabilities).
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import threading
from collections import OrderedDict, defaultdict
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import UserError
from .images import ImageLoadError, check_image, is_image_name, load_array

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
IGNORED_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}
BUILTIN = ("elpv", "elpv4")
UNLABELED = "unlabeled"  # a folder of images waiting for labels (the Label page's queue), not a class


class DatasetError(UserError):
    """The dataset cannot be used as given; the message says what to change."""


@dataclass
class Sample:
    path: str
    label: int
    group: str = ""  # optional sub-population (ELPV: mono/poly), used for stratification and reports
    origin: str = ""  # where the image comes from (module, batch, day): a CSV's group column, or the sub-folder
                      # inside its class folder; split_groups="origin" keeps each origin in one part


@dataclass
class Dataset:
    name: str
    source: str
    classes: list[str]
    samples: list[Sample]
    given_splits: dict[str, list[int]] = field(default_factory=dict)  # from the layout, if any
    skipped: list[tuple[str, str]] = field(default_factory=list)      # (path, reason)
    unlabeled: list[str] = field(default_factory=list)                 # images in an unlabeled/ folder

    def class_counts(self) -> dict[str, int]:
        counts = {c: 0 for c in self.classes}
        for s in self.samples:
            counts[self.classes[s.label]] += 1
        return counts


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_NAMES


def _check_header(path: str) -> str | None:
    """None if the file looks usable (header only, no decode), else the reason."""
    try:
        check_image(path)
    except ImageLoadError as exc:
        return str(exc)
    except Exception as exc:  # any parser error is the file's fault, never the run's
        return f"cannot read: {exc}"
    return None


def _images_under(folder: Path) -> list[str]:
    """All image files under folder, recursively, skipping hidden entries; symlinked dirs not followed."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not _hidden(d))
        for f in sorted(files):
            if not _hidden(f) and is_image_name(f):
                found.append(os.path.join(root, f))
    return found


def _class_dirs(folder: Path) -> list[Path]:
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except PermissionError:
        raise DatasetError(f"cannot read folder {folder}: permission denied") from None
    return [p for p in entries if p.is_dir() and not _hidden(p.name)]


def _scan_class_folders(folder: Path, classes: list[str] | None = None):
    """(classes, [(path, class_name, origin)]) for a folder of class sub-folders; the origin is the sub-folder
    path inside the class folder ("" for an image directly in it)."""
    items = []
    names = []
    for d in _class_dirs(folder):
        if d.name.lower() == UNLABELED:
            continue
        files = _images_under(d)
        if files:
            names.append(d.name)
            for f in files:
                inside = os.path.relpath(os.path.dirname(f), d)
                items.append((f, d.name, "" if inside == "." else inside.replace(os.sep, "/")))
    return names, items


def _build(name, source, classes, items, split_of=None, groups=None) -> Dataset:
    classes = sorted(set(classes))
    index = {c: i for i, c in enumerate(classes)}
    samples, skipped = [], []
    given: dict[str, list[int]] = defaultdict(list)
    seen_paths = set()
    for k, (path, label, *rest) in enumerate(items):  # rest: the origin, where there is one
        reason = _check_header(path)
        if reason:
            skipped.append((path, reason))
            continue
        if split_of is not None:
            given[split_of[k]].append(len(samples))
        seen_paths.add(path)
        samples.append(Sample(path=path, label=index[label], group=groups[k] if groups else "",
                              origin=rest[0] if rest else ""))
    if not samples:
        raise DatasetError(f"no usable images found in {source}"
                           + (f" ({len(skipped)} files skipped)" if skipped else ""))
    present = sorted({classes[s.label] for s in samples})
    if len(present) < 2:
        raise DatasetError(f"only one class found ({present[0]!r}) in {source}: a classifier needs at "
                           "least two class sub-folders")
    return Dataset(name=name, source=str(source), classes=classes, samples=samples,
                   given_splits=dict(given), skipped=skipped)


def _load_folder(folder: Path, depth: int = 0) -> Dataset:
    dirs = _class_dirs(folder)
    loose = [f for f in os.listdir(folder) if is_image_name(f) and not _hidden(f)]
    if (len(dirs) == 1 and not loose and depth < 3 and _class_dirs(dirs[0])
            and not any(is_image_name(f) for f in os.listdir(dirs[0]))):
        # A single wrapper folder (data/cats, data/dogs): the classes are one level down.
        return _load_folder(dirs[0], depth + 1)
    unlabeled_dirs = [p for p in dirs if p.name.lower() == UNLABELED]
    dirs = [p for p in dirs if p.name.lower() != UNLABELED]
    subdirs = {p.name.lower(): p for p in dirs}
    split_dirs = {SPLIT_NAMES[k]: p for k, p in subdirs.items() if k in SPLIT_NAMES}
    if "train" in split_dirs and len(split_dirs) >= 2 or set(split_dirs) == {"train"}:
        items, split_of, classes = [], [], []
        for split, d in split_dirs.items():
            names, its = _scan_class_folders(d)
            classes += names
            items += its
            split_of += [split] * len(its)
        if not items:
            raise DatasetError(f"{folder} has split folders but no class sub-folders with images in them")
        return _with_unlabeled(_build(folder.name, folder, classes, items, split_of), unlabeled_dirs)
    classes, items = _scan_class_folders(folder)
    if not items:
        if loose:
            raise DatasetError(f"{folder} has images but no class sub-folders: put each class's images in "
                               "a sub-folder named after the class")
        raise DatasetError(f"no images found in {folder}: expected one sub-folder per class")
    return _with_unlabeled(_build(folder.name, folder, classes, items), unlabeled_dirs)


def _with_unlabeled(ds: Dataset, unlabeled_dirs: list[Path]) -> Dataset:
    ds.unlabeled = [f for d in unlabeled_dirs for f in _images_under(d) if _check_header(f) is None]
    return ds


def _load_csv(path: Path) -> Dataset:
    base = path.parent
    items, split_of, classes = [], [], []
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except UnicodeDecodeError:
        raise DatasetError(f"{path} is not a UTF-8 text CSV") from None
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        header = [c.strip().lower() for c in rows[0]]
        rows = rows[1:]
    else:
        header = ["path", "label"]
    has_split = "split" in header
    origin_col = next((header.index(c) for c in ("group", "origin") if c in header), None)
    for line_no, row in enumerate(rows, start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2:
            raise DatasetError(f"{path}, line {line_no}: expected path,label")
        rel, label = row[0].strip(), row[1].strip()
        full = str((base / rel).resolve()) if not os.path.isabs(rel) else rel
        if not is_image_name(full):
            continue
        origin = row[origin_col].strip() if origin_col is not None and origin_col < len(row) else ""
        items.append((full, label, origin))
        classes.append(label)
        if has_split:
            split = SPLIT_NAMES.get(row[header.index("split")].strip().lower(), "train")
            split_of.append(split)
    if not items:
        raise DatasetError(f"{path} lists no image files")
    return _build(path.stem, path, classes, items, split_of if has_split else None)


def elpv_root() -> Path:
    try:
        import elpv_dataset
    except ImportError:
        raise DatasetError("the ELPV example needs the elpv-dataset package: pip install elpv-dataset") from None
    return Path(elpv_dataset.__file__).parent / "data"


def load_elpv_table() -> list[tuple[str, float, str]]:
    """(image path, defect probability, cell type) for each of the 2,624 ELPV cells."""
    root = elpv_root()
    rows = []
    with open(root / "labels.csv") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) == 3:
                rows.append((str(root / parts[0]), float(parts[1]), parts[2]))
    return rows


def elpv_label(prob: float, four_class: bool) -> str:
    if four_class:
        return f"p={prob:.2f}"  # p=0.00, p=0.33, p=0.67, p=1.00
    return "defective" if prob >= 0.5 else "functional"


def _load_elpv(four_class: bool) -> Dataset:
    rows = load_elpv_table()
    items = [(p, elpv_label(prob, four_class)) for p, prob, _ in rows]
    groups = [t for _, _, t in rows]
    return _build("elpv4" if four_class else "elpv", "elpv4" if four_class else "elpv",
                  [lbl for _, lbl in items], items, groups=groups)


def load_dataset(source: str) -> Dataset:
    """Load any supported source; raises DatasetError with a message for the user."""
    source = str(source).strip()
    if source in BUILTIN:
        return _load_elpv(four_class=source == "elpv4")
    path = Path(source).expanduser()
    if not path.exists():
        raise DatasetError(f"{source} does not exist")
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return _load_csv(path)
        raise DatasetError(f"{source} is a file: give a folder of class sub-folders, or a CSV of path,label")
    if not os.access(path, os.R_OK | os.X_OK):
        raise DatasetError(f"cannot read folder {source}: permission denied")
    return _load_folder(path)


# ----------------------------------------------------------------------------------------------------
# Split


def stratified_split(ds: Dataset, val_fraction: float, test_fraction: float, seed: int,
                     together: list[list[int]] | None = None) -> dict[str, list[int]]:
    """train/val/test sample indices. A split given by the layout is kept; missing parts are carved
    out of train, stratified by class (and group), reproducible for a seed.

    `together`: groups of sample indices (near-duplicates, one module's cells) that must land in one part: each
    group is carved as a unit, stratified by its first member. Without groups every image is its own unit and
    the split is the one this function always gave for the seed."""
    given = ds.given_splits
    pool = given.get("train", list(range(len(ds.samples)))) if given else list(range(len(ds.samples)))
    want = {}
    if not given or "val" not in given:
        want["val"] = val_fraction
    if not given or "test" not in given:
        want["test"] = test_fraction
    splits = {"train": [], "val": list(given.get("val", [])), "test": list(given.get("test", []))}
    rng = random.Random(seed)
    unit_of = {i: [i] for i in pool}
    for g in together or []:
        members = sorted({i for i in g if i in unit_of})
        if len(members) > 1:
            merged = sorted({j for i in members for j in unit_of[i]})
            for j in merged:
                unit_of[j] = merged
    strata: dict[tuple, list[list[int]]] = defaultdict(list)
    for i in pool:
        if unit_of[i][0] == i:  # a unit is listed once, under its first member
            strata[(ds.samples[i].label, ds.samples[i].group)].append(unit_of[i])
    # A class needs one image in every split it is carved into, plus one for training.
    need = 1 + sum(1 for f in want.values() if f > 0)
    per_class = defaultdict(int)
    for i in pool:
        per_class[ds.samples[i].label] += 1
    for label, n in per_class.items():
        if n < need:
            raise DatasetError(f"class {ds.classes[label]!r} has only {n} image(s): at least {need} are "
                               "needed to split it into train/val/test. Add images or remove the class.")
    for key in sorted(strata):
        units = sorted(strata[key])
        rng.shuffle(units)
        n = sum(len(u) for u in units)
        start = 0
        for part, frac in want.items():
            k = int(round(n * frac))
            k = min(k, n - start - 1)  # always leave at least one for training
            taken, rest = 0, []
            # Whole units in shuffled order, each only if it brings the part nearer its share and leaves training
            # one image (for single images: exactly the first k of them).
            for u in units:
                if taken < k and taken + len(u) / 2 <= k and n - start - taken - len(u) >= 1:
                    splits[part].extend(u)
                    taken += len(u)
                else:
                    rest.append(u)
            units = rest
            start += taken
        for u in units:
            splits["train"].extend(u)
    # Tiny strata can round to zero: make sure each class appears in each carved split.
    for part, frac in want.items():
        if frac <= 0:
            continue
        have = {ds.samples[i].label for i in splits[part]}
        for label in per_class:
            if label not in have:
                candidates = [i for i in splits["train"] if ds.samples[i].label == label]
                in_train = len(candidates)
                if in_train > 1:
                    smallest = min(len(unit_of[i]) for i in candidates)  # move as few images as it takes
                    candidates = [i for i in candidates if len(unit_of[i]) == smallest]
                    unit = unit_of[candidates[rng.randrange(len(candidates))]]
                    if in_train > sum(ds.samples[i].label == label for i in unit):  # one stays in train
                        for i in unit:
                            splits["train"].remove(i)
                        splits[part].extend(unit)
    return {k: sorted(v) for k, v in splits.items()}


def origin_groups(ds: Dataset) -> list[list[int]]:
    """Sample indices per origin (module, batch, day), for a split that keeps each origin in one part."""
    by_origin: dict[str, list[int]] = defaultdict(list)
    for i, smp in enumerate(ds.samples):
        if smp.origin:
            by_origin[smp.origin].append(i)
    return [g for _, g in sorted(by_origin.items()) if len(g) > 1]


def _split_row(ds: Dataset, s: Sample) -> list:
    """[path, label, group] + [origin] where there is one."""
    row = [s.path, ds.classes[s.label], s.group]
    if s.origin:
        row.append(s.origin)
    return row


def split_to_json(ds: Dataset, split: dict[str, list[int]], together: list[list[int]] | None = None) -> dict:
    out = {
        "dataset": ds.name, "source": ds.source, "classes": ds.classes,
        **{part: [_split_row(ds, ds.samples[i]) for i in idx] for part, idx in split.items()},
    }
    if together is not None:  # the groups the split kept on one side, by path: the record of why
        out["kept_together"] = [[ds.samples[i].path for i in g] for g in together]
    return out


def samples_from_split(split_json: dict, part: str) -> list[Sample]:
    index = {c: i for i, c in enumerate(split_json["classes"])}
    out = []
    for row in split_json.get(part, []):  # runs from before 2026-11-25 may carry a 5th item, a label probability
        path, label = row[0], row[1]
        out.append(Sample(path=path, label=index[label], group=row[2] if len(row) > 2 else "",
                          origin=row[3] if len(row) > 3 else ""))
    return out


# ----------------------------------------------------------------------------------------------------
# Decoded-image cache


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
