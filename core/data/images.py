"""Opening any image a user has as upright 3-channel RGB, or a clear reason why not.

Policy (also in the README):
- Only common image formats are opened (see ALLOWED_FORMATS); a PDF or text file named .png is refused.
- EXIF orientation is applied, so phone photos are upright everywhere (training, prediction, overlays).
- Animated GIFs and multi-page TIFFs: the first frame is used.
- Transparency (RGBA, LA, P with a transparent colour) is composited on white.
- 16-bit and 32-bit grayscale are scaled from their full range to 8 bit (never clipped to white).
- Images with more than MAX_PIXELS pixels are refused before decoding (decompression bombs).
- Memory: a large image (over REDUCE_ABOVE pixels) being loaded at a model's size is converted and shrunk a strip at a
  time, so loading holds its decoded pixels (a JPEG's are decoded at a reduced scale) and one strip, never a full-size
  converted copy: an 8000x8000 16-bit PNG took 1.7 GB as float64 before, see tests/data/test_images.py.
- Truncated files fail at load; Pillow's global LOAD_TRUNCATED_IMAGES flag is left alone.
"""
from __future__ import annotations

import io
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core.errors import UserError

ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM", "TGA")
IMAGE_EXTENSIONS = {
    ".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga",
}
MAX_PIXELS = 64_000_000  # ~8000x8000; anything larger is refused as a possible decompression bomb


class ImageLoadError(UserError):
    """The file is not an image we can use; str(error) is a short reason for the user."""


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _to_rgb(img: Image.Image, extrema: tuple | None = None) -> Image.Image:
    """Any mode as RGB. extrema: the whole image's (min, max) when img is one strip of an "I" or "F" image, whose
    range is read from all of it."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(_to_uint8(img, extrema), "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _to_uint8(img: Image.Image, extrema: tuple | None) -> np.ndarray:
    """A 16-bit, 32-bit or float gray image as 8 bit: 16 bit from its full range (dark stays dark, bright stays
    bright), 32-bit integers from 0..255 or 0..65535, floats stretched over what is there."""
    mode = img.mode
    arr = np.asarray(img)
    if mode.startswith("I;16"):
        # round(a * 255 / 65535) in integers: exactly what the float formula gives (a / 257 is never a tie), at a
        # quarter of float64's memory
        return ((arr.astype(np.uint32) * 510 + 65535) // 131070).astype(np.uint8)
    if mode == "I":
        hi = extrema[1] if extrema is not None else arr.max(initial=0)
        scaled = arr.astype(np.float64) / (65535.0 if hi > 255 else 255.0)
    else:
        lo, hi = extrema if extrema is not None else (np.nanmin(arr), np.nanmax(arr))
        lo, hi = float(np.nan_to_num(lo)), float(np.nan_to_num(hi))
        scaled = (arr.astype(np.float64) - lo) / (hi - lo) if hi > lo else np.zeros(arr.shape)
    return np.clip(np.nan_to_num(scaled) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _file(source):
    """What Image.open reads for a path, bytes or file object; an empty or unreachable file is refused."""
    if isinstance(source, (bytes, bytearray)):
        if len(source) == 0:
            raise ImageLoadError("empty file (0 bytes)")
        return io.BytesIO(source)
    if not isinstance(source, (str, os.PathLike)):
        return source
    path = Path(source)
    try:
        if path.stat().st_size == 0:
            raise ImageLoadError("empty file (0 bytes)")
    except FileNotFoundError:
        raise ImageLoadError("file not found") from None
    except PermissionError:
        raise ImageLoadError("permission denied") from None
    except OSError as exc:
        raise ImageLoadError(f"cannot read file: {exc.strerror or exc}") from None
    return path


@contextmanager
def _opened(source):
    """The image opened lazily (its header read, no pixels decoded) after the checks the header allows; any
    error inside the block, decoding included, becomes an ImageLoadError with a readable reason."""
    try:
        with Image.open(_file(source), formats=ALLOWED_FORMATS) as img:
            w, h = img.size
            if w < 1 or h < 1:
                raise ImageLoadError("image has no pixels")
            if w * h > MAX_PIXELS:
                raise ImageLoadError(
                    f"image too large ({w}x{h} pixels, limit {MAX_PIXELS:,}): refused as a possible "
                    "decompression bomb")
            yield img
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError("not a recognised image file (or a format that is not allowed)") from None
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"refused as a possible decompression bomb: {exc}") from None
    except FileNotFoundError:
        raise ImageLoadError("file not found") from None
    except PermissionError:
        raise ImageLoadError("permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        msg = str(exc) or type(exc).__name__
        if "truncated" in msg.lower():
            msg = "image file is truncated"
        raise ImageLoadError(f"cannot decode image: {msg}") from None
    except MemoryError:
        raise ImageLoadError("image too large to decode in memory") from None


def check_image(source) -> None:
    """The cheap check of a dataset scan: header only, nothing decoded. ImageLoadError says why not."""
    with _opened(source):
        pass


def open_image(source) -> Image.Image:
    """Open a path, bytes, or file object (or pass a PIL image through) as upright RGB.

    Raises ImageLoadError with a readable reason for anything unusable.
    """
    if isinstance(source, Image.Image):
        try:
            return _to_rgb(ImageOps.exif_transpose(source) or source)
        except Exception as exc:  # pragma: no cover - exotic in-memory images
            raise ImageLoadError(f"cannot convert image: {exc}") from exc
    with _opened(source) as img:
        rgb = _to_rgb(_upright(img))
        return img.copy() if rgb is img else rgb


def _upright(img: Image.Image) -> Image.Image:
    """The decoded first frame (policy for animations and multi-page files), turned as its EXIF says."""
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    img.load()
    return ImageOps.exif_transpose(img) or img


def skip_kind(reason: str) -> str:
    """The kind of a reason given above: empty, not an image, too many pixels, truncated, or unreadable."""
    text = reason.lower()
    for kind, words in (("empty", ("empty file", "no pixels")), ("not an image", ("not a recognised",)),
                        ("too many pixels", ("too large", "decompression bomb")), ("truncated", ("truncated",))):
        if any(w in text for w in words):
            return kind
    return "unreadable"


def resize_to_array(img: Image.Image, hw: tuple[int, int]) -> np.ndarray:
    """The one resize used everywhere (cache, evaluation, prediction, Grad-CAM): HxWx3 uint8."""
    h, w = hw
    if img.size != (w, h):
        img = img.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP)
    return np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy needs one


def load_array(source, hw: tuple[int, int]) -> np.ndarray:
    """open_image then resize_to_array. A grayscale file is resized before it becomes RGB: the same pixels (each
    channel is the gray one, resized alike) for a third of the resizing (ELPV's cells are grayscale). A large image is
    shrunk while it is converted (_reduced_while_converting), in bounded memory."""
    if isinstance(source, Image.Image):
        return resize_to_array(open_image(source), hw)
    with _opened(source) as img:
        w, h = img.size
        if w * h > REDUCE_ABOVE:
            if img.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 scale, still at least REDUCING_GAP x the target
                side = int(REDUCING_GAP * max(hw))
                img.draft(None, (side, side))
            return _reduced_while_converting(img, hw)
        up = _upright(img)
        if up.mode == "L":
            return np.repeat(resize_to_array(up, hw)[..., None], 3, axis=2)
        return resize_to_array(_to_rgb(up), hw)


REDUCE_ABOVE = 4_000_000   # pixels: larger images are converted and shrunk a strip at a time
REDUCING_GAP = 3.0         # resize_to_array's: box-reduce to at least 3x the target, then resample
STRIP_PIXELS = 1_000_000   # how much of a large image is converted at once
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}  # EXIF orientation -> the turn that makes it upright (ImageOps' table)


def _reduced_while_converting(img: Image.Image, hw: tuple[int, int]) -> np.ndarray:
    """resize_to_array(_to_rgb(upright image), hw) without a full-size converted copy: the decoded image is converted
    a strip of rows at a time and each strip box-reduced by the factor Pillow's resize would use (reducing_gap), then
    the small image is turned upright and resampled. Without EXIF rotation this gives resize_to_array's pixels exactly
    (the conversions are per pixel, the reduction blocks line up, the resample box is the same); with one, the
    reduction's leftover edge falls on the other side."""
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    img.load()
    orientation = img.getexif().get(0x0112, 1)
    th, tw = hw if orientation not in (5, 6, 7, 8) else hw[::-1]  # the target in the file's own orientation
    w, h = img.size
    fx, fy = max(1, int(w / tw / REDUCING_GAP)), max(1, int(h / th / REDUCING_GAP))
    extrema = img.getextrema() if img.mode in ("I", "F") else None
    gray = img.mode == "L"
    rows = max(fy, STRIP_PIXELS // w // fy * fy)  # a multiple of fy, so each strip's blocks are the whole image's
    small = Image.new("L" if gray else "RGB", (-(-w // fx), -(-h // fy)))
    for top in range(0, h, rows):
        strip = img.crop((0, top, w, min(h, top + rows)))
        strip = strip if gray else _to_rgb(strip, extrema)
        small.paste(strip.reduce((fx, fy)), (0, top // fy))
    if orientation in _TRANSPOSE:
        small = small.transpose(_TRANSPOSE[orientation])
        box = (0, 0, small.width, small.height)
    else:
        box = (0, 0, w / fx, h / fy)  # what Pillow's resize keeps after its own reduce: partial blocks excluded
    out = small.resize((hw[1], hw[0]), Image.Resampling.BILINEAR, box=box)
    arr = np.array(out, dtype=np.uint8)
    return np.repeat(arr[..., None], 3, axis=2) if gray else arr
