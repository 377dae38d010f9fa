"""Importing a zip of class folders into the workspace, safely.

A zip from a stranger may try to write outside the target (`../`, absolute paths, drive letters), hold
symlinks, be a zip bomb, be truncated or encrypted, or nest more zips. Each entry is checked before it
is written; sizes are counted while streaming (the sizes a zip declares can lie); extraction goes into a
temporary folder inside the workspace and is moved into place only when complete, so a failed import
leaves nothing behind.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from core.data.images import is_image_name
from core.errors import UserError

MAX_ENTRIES = 100_000
MAX_TOTAL_BYTES = 8 * 2**30      # extracted bytes in all
MAX_FILE_BYTES = 512 * 2**20     # one extracted file
MAX_RATIO = 200                  # extracted / compressed, per file (images barely compress)
CHUNK = 1 << 20


class ImportError_(UserError):
    """The zip cannot be imported; the message says why. Nothing was written."""


@dataclass
class ImportResult:
    name: str
    path: Path
    files: int
    skipped: list[tuple[str, str]] = field(default_factory=list)


def safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._ -]+", "_", text).strip(" ._")
    return name[:80] or "dataset"


def _entry_parts(name: str) -> list[str] | None:
    """The entry's path parts if it is safe to write inside the target; None otherwise."""
    if "\\" in name:
        name = name.replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return None
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".")]
    if any(p == ".." for p in parts) or not parts:
        return None
    if any("\0" in p for p in parts):
        return None
    return parts


@dataclass
class Limits:
    entries: int = MAX_ENTRIES
    total: int = MAX_TOTAL_BYTES
    file: int = MAX_FILE_BYTES
    ratio: float = MAX_RATIO


def _open_zip(source) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(source)
    except zipfile.BadZipFile:
        raise ImportError_("not a zip file, or the zip is truncated or corrupt") from None
    except OSError as exc:
        raise ImportError_(f"cannot read the zip: {exc.strerror or exc}") from None


def _image_entries(zf: zipfile.ZipFile, limits: Limits, skipped: list):
    """(info, safe path parts) of each image entry; every other entry is skipped with its reason (hidden files
    and macOS resource forks silently). An encrypted zip or one with too many entries is refused whole."""
    infos = zf.infolist()
    if len(infos) > limits.entries:
        raise ImportError_(f"the zip has {len(infos):,} entries; the limit is {limits.entries:,}")
    for info in infos:
        if info.is_dir():
            continue
        parts = _entry_parts(info.filename)
        if parts is None:
            skipped.append((info.filename, "unsafe path (outside the dataset folder)"))
        elif any(p.startswith(".") or p == "__MACOSX" for p in parts):
            continue
        elif stat.S_ISLNK(info.external_attr >> 16):
            skipped.append((info.filename, "symbolic link (not followed)"))
        elif info.flag_bits & 0x1:
            raise ImportError_("the zip is encrypted; export it without a password")
        elif parts[-1].lower().endswith(".zip"):
            skipped.append((info.filename, "nested zip (not extracted; import it separately)"))
        elif not is_image_name(parts[-1]):
            skipped.append((info.filename, "not an image file"))
        elif info.file_size > limits.file:
            raise ImportError_(f"{info.filename} would be {info.file_size:,} bytes; the per-file limit "
                               f"is {limits.file:,}")
        else:
            yield info, parts


def _stream(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: Limits, spent: list[int], write) -> None:
    """Copy one entry to `write` in blocks, counting the bytes actually extracted (the sizes a zip declares can
    lie) against the per-file, ratio and total limits; spent[0] carries the total across entries."""
    size = 0
    try:
        with zf.open(info) as src:
            while block := src.read(CHUNK):
                size += len(block)
                spent[0] += len(block)
                if size > limits.file:
                    raise ImportError_(f"{info.filename} is larger than the per-file limit ({limits.file:,} bytes)")
                if size > max(info.compress_size, 1) * limits.ratio and size > CHUNK:
                    raise ImportError_(f"{info.filename} expands more than {limits.ratio}x: "
                                       "refused as a possible zip bomb")
                if spent[0] > limits.total:
                    raise ImportError_(f"the zip expands past the total limit ({limits.total:,} bytes)")
                write(block)
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise ImportError_(f"the zip is truncated or corrupt at {info.filename} ({exc})") from None
    except RuntimeError as exc:  # zipfile raises RuntimeError for encrypted members
        raise ImportError_(f"cannot extract {info.filename}: {exc}") from None


def read_zip_images(source, max_images: int = 500, limits: Limits | None = None):
    """The images of an uploaded zip in memory, for prediction: ([(entry name, bytes)], skipped, more), where
    `more` counts images beyond max_images. The same checks as an import; ImportError_ refuses the whole zip."""
    limits = limits or Limits(total=2 * 2**30)
    skipped: list[tuple[str, str]] = []
    images, more, spent = [], 0, [0]
    with _open_zip(source) as zf:
        for info, _ in _image_entries(zf, limits, skipped):
            if len(images) >= max_images:
                more += 1
                continue
            buf = io.BytesIO()
            _stream(zf, info, limits, spent, buf.write)
            images.append((info.filename, buf.getvalue()))
    return images, skipped, more


def import_zip(source, datasets_dir: str | Path, name: str | None = None,
               max_entries: int = MAX_ENTRIES, max_total: int = MAX_TOTAL_BYTES,
               max_file: int = MAX_FILE_BYTES, max_ratio: float = MAX_RATIO) -> ImportResult:
    """Extract the images of a zip (path or file object) into datasets_dir/<name>.

    Entries that are unsafe or not images are skipped and listed; limits breached abort the whole import.
    """
    limits = Limits(max_entries, max_total, max_file, max_ratio)
    datasets_dir = Path(datasets_dir)
    datasets_dir.mkdir(parents=True, exist_ok=True)
    final_name = safe_name(name or Path(getattr(source, "name", str(source))).stem)
    target = datasets_dir / final_name
    n = 2
    while target.exists():
        target = datasets_dir / f"{final_name}-{n}"
        n += 1
    zf = _open_zip(source)
    tmp = Path(tempfile.mkdtemp(prefix=".import-", dir=datasets_dir))
    skipped: list[tuple[str, str]] = []
    written, spent = 0, [0]
    try:
        with zf:
            for info, parts in _image_entries(zf, limits, skipped):
                dest = tmp.joinpath(*parts)
                dest.parent.mkdir(parents=True, exist_ok=True)
                with open(dest, "wb") as out:
                    _stream(zf, info, limits, spent, out.write)
                written += 1
        if written == 0:
            raise ImportError_("the zip holds no image files")
        # Moved into place only now that everything is extracted: a failed import leaves nothing behind.
        root = _content_root(tmp)
        if root == tmp:
            os.replace(tmp, target)
        else:
            shutil.move(str(root), str(target))
        return ImportResult(name=target.name, path=target, files=written, skipped=skipped)
    except OSError as exc:
        raise ImportError_(f"could not write the dataset: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _content_root(folder: Path) -> Path:
    """Zips often wrap everything in one top folder: use it as the dataset root."""
    current = folder
    while True:
        entries = [p for p in current.iterdir() if not p.name.startswith(".")]
        dirs = [p for p in entries if p.is_dir()]
        if len(dirs) == 1 and len(entries) == 1:
            current = dirs[0]
            continue
        return current
