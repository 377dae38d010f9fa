"""Dataset sources: where the images are and their labels.

Sources (load_dataset):
- a folder with one sub-folder per class (images may sit in nested folders inside a class folder);
- a folder with train/ and val|valid|validation/ and/or test/, each holding class sub-folders;
- a CSV file of `path,label[,split][,group]` (paths relative to the CSV; other columns are ignored);
- the built-in ELPV example: "elpv" (functional/defective) or "elpv4" (the 4 defect probabilities).
The split is core/data/split.py; the decoded pixels core/data/cache.py.
"""
from __future__ import annotations

import csv
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from core.data.images import ImageLoadError, check_image, is_image_name
from core.errors import UserError

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
IGNORED_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}
BUILTIN = ("elpv", "elpv4")
IMBALANCE_RATIO = 3  # the largest class with this many times the images of the smallest: worth a class-weighted loss
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


DATA_ROOTS_ENV = "STUDIO_DATA_ROOTS"  # folders (os.pathsep-separated) a shared studio may register datasets under


def data_roots() -> list[Path] | None:
    """The folders the administrator allows datasets under (STUDIO_DATA_ROOTS), resolved; None: anywhere."""
    text = os.environ.get(DATA_ROOTS_ENV, "").strip()
    if not text:
        return None
    return [Path(p).expanduser().resolve() for p in text.split(os.pathsep) if p.strip()]


def check_data_roots(source: str, also: tuple[Path, ...] = ()) -> None:
    """DatasetError unless the folder or CSV a user types is under the data roots (or `also`: the workspace's own
    imports). Checked before anything is read, on the resolved path, so a symlink or ../ cannot step outside. The
    built-in example is always allowed."""
    roots = data_roots()
    if roots is None or source.strip().lower() == "elpv":
        return
    allowed = roots + [Path(a).resolve() for a in also]
    path = Path(source.strip()).expanduser().resolve()
    if not any(path == r or path.is_relative_to(r) for r in allowed):
        raise DatasetError(f"{source.strip()} is outside the folders this studio may read "
                           f"({', '.join(str(r) for r in roots)}); ask the administrator, who sets {DATA_ROOTS_ENV}")


def check_samples_in_data_roots(ds: Dataset, also: tuple[Path, ...] = ()) -> None:
    """A CSV may list images anywhere: each must be under the data roots too."""
    roots = data_roots()
    if roots is None or ds.source.strip().lower() == "elpv":
        return
    allowed = roots + [Path(a).resolve() for a in also]
    for path in [s.path for s in ds.samples] + list(ds.unlabeled):
        real = Path(path).resolve()
        if not any(real.is_relative_to(r) for r in allowed):
            raise DatasetError(f"{ds.source} lists {path}, which is outside the folders this studio may read")


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


def imbalance(counts: dict[str, int]) -> float | None:
    """How many times the images of the smallest class the largest has, when that is IMBALANCE_RATIO or more."""
    smallest, largest = min(counts.values(), default=0), max(counts.values(), default=0)
    return largest / smallest if smallest and largest / smallest >= IMBALANCE_RATIO else None

