"""Importing a zip of class folders into the workspace, safely.

A zip from a stranger may try to write outside the target (`../`, absolute paths, drive letters), hold
symlinks, be a zip bomb, be truncated or encrypted, or nest more zips. Each entry is checked before it
is written; sizes are counted while streaming (the sizes a zip declares can lie); extraction goes into a
temporary folder inside the workspace and is moved into place only when complete, so a failed import
leaves nothing behind (and one killed mid-way is swept up by the next import).

What is refused whole: not a zip, truncated, encrypted, names that claim UTF-8 and are not, too many entries, a
limit passed, not enough free disk. What is skipped and named, the rest imported: an unsafe path, a link, a nested
zip, a non-image, a corrupt entry (bad CRC, broken deflate/bz2/LZMA data, an unsupported method), a second entry of
the same name, a name too long for the file system, a file where a folder of the same name is (or the reverse).
"""
from __future__ import annotations

import errno
import io
import lzma
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
DISK_RESERVE = 512 * 2**20       # left free after an import: the workspace's database and checkpoints need room too
TEMP_PREFIX = ".import-"         # + the importing process's id: a folder whose process is gone is swept up


class ImportError_(UserError):
    """The zip cannot be imported; the message says why. Nothing was written."""


class _BadEntry(Exception):
    """One entry cannot be read (corrupt, unsupported); it is skipped with this reason, the rest imported."""


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
    except UnicodeDecodeError:
        raise ImportError_("the zip's entry names are marked as UTF-8 but are not valid UTF-8; make the zip again "
                           "(7-Zip, `zip -r`, or the system's own 'compress')") from None
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
    lie) against the per-file, ratio and total limits; spent[0] carries the total across entries. A limit passed is
    an ImportError_ (the whole zip); an entry that cannot be read is a _BadEntry (that entry)."""
    size = 0
    try:
        src = zf.open(info)
    except RuntimeError as exc:  # zipfile raises RuntimeError for encrypted members
        raise ImportError_(f"cannot extract {info.filename}: {exc}") from None
    except (zipfile.BadZipFile, NotImplementedError, EOFError, OSError) as exc:
        raise _BadEntry(f"unreadable entry ({exc or type(exc).__name__})") from None
    with src:
        while True:
            try:
                block = src.read(CHUNK)
            except (zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, OSError, NotImplementedError) as exc:
                # bad CRC, broken deflate/bz2/LZMA data (bz2 raises a plain OSError), a cut-off entry
                raise _BadEntry(f"corrupt entry ({exc or type(exc).__name__})") from None
            if not block:
                return
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
            try:
                _stream(zf, info, limits, spent, buf.write)
            except _BadEntry as exc:
                skipped.append((info.filename, str(exc)))
                continue
            images.append((info.filename, buf.getvalue()))
    return images, skipped, more


def import_zip(source, datasets_dir: str | Path, name: str | None = None,
               max_entries: int = MAX_ENTRIES, max_total: int = MAX_TOTAL_BYTES,
               max_file: int = MAX_FILE_BYTES, max_ratio: float = MAX_RATIO, taken=()) -> ImportResult:
    """Extract the images of a zip (path or file object) into datasets_dir/<name>.

    Entries that are unsafe, unreadable or clash are skipped and listed; limits breached abort the whole import.
    The name is made unique among the folders there and `taken` (the datasets already registered elsewhere).
    """
    limits = Limits(max_entries, max_total, max_file, max_ratio)
    datasets_dir = Path(datasets_dir)
    datasets_dir.mkdir(parents=True, exist_ok=True)
    sweep_abandoned_imports(datasets_dir)
    final_name = safe_name(name or Path(getattr(source, "name", str(source))).stem)
    target, n = datasets_dir / final_name, 2
    while target.exists() or target.name in taken:
        target = datasets_dir / f"{final_name}-{n}"
        n += 1
    zf = _open_zip(source)
    skipped: list[tuple[str, str]] = []
    written, spent, seen = 0, [0], set()
    with zf:
        entries = list(_image_entries(zf, limits, skipped))
        _check_free_space(datasets_dir, sum(info.file_size for info, _ in entries))
        tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=datasets_dir))
        try:
            for info, parts in entries:
                key = "/".join(parts)
                if key in seen:
                    skipped.append((info.filename, "a second entry of the same name (the first one is kept)"))
                    continue
                seen.add(key)
                reason = _extract(zf, info, limits, spent, tmp.joinpath(*parts))
                if reason:
                    skipped.append((info.filename, reason))
                else:
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


def _extract(zf, info, limits: Limits, spent: list[int], dest: Path) -> str | None:
    """Write one entry to dest; None when written, else why it was skipped (nothing of it is left). A full disk is
    an ImportError_: nothing more could be written."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest, "xb") as out:
            try:
                _stream(zf, info, limits, spent, out.write)
            except _BadEntry as exc:
                out.close()
                dest.unlink(missing_ok=True)
                return str(exc)
        return None
    except (FileExistsError, NotADirectoryError, IsADirectoryError):
        return "a file and a folder of the same name (the first one is kept)"
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            return "name too long for this file system"
        if exc.errno == errno.ENOSPC:
            raise ImportError_("the disk is full: nothing was imported; free some space and import again") from None
        raise


def _check_free_space(folder: Path, needed: int) -> None:
    """Refuse before extracting when the images would not fit (their declared sizes; the real ones are counted while
    extracting against the limits)."""
    free = shutil.disk_usage(folder).free
    if needed + DISK_RESERVE > free:
        raise ImportError_(f"the zip's images need {needed / 2**30:.2f} GB and {free / 2**30:.2f} GB is free on the "
                           f"workspace's disk (keeping {DISK_RESERVE // 2**20} MB spare): free some space first")


def sweep_abandoned_imports(datasets_dir: Path) -> list[Path]:
    """Remove the temporary folders of imports whose process is gone (killed mid-way); returns them."""
    swept = []
    for folder in Path(datasets_dir).glob(f"{TEMP_PREFIX}*"):
        pid = folder.name[len(TEMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        if not pid.isdigit() or int(pid) != os.getpid():
            shutil.rmtree(folder, ignore_errors=True)
            swept.append(folder)
    return swept


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


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
