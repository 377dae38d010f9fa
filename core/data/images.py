"""Opening any image a user has as upright 3-channel RGB, or a clear reason why not.

Policy (also in the README):
- Only common image formats are opened (see ALLOWED_FORMATS); a PDF or text file named .png is refused.
- EXIF orientation is applied, so phone photos are upright everywhere (training, prediction, overlays).
- Animated GIFs and multi-page TIFFs: the first frame is used.
- Transparency (RGBA, LA, P with a transparent colour) is composited on white.
- 16-bit and 32-bit grayscale are scaled from their full range to 8 bit (never clipped to white).
- Images with more than MAX_PIXELS pixels are refused before decoding (decompression bombs).
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


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16"):
            arr = arr / 65535.0  # full 16-bit range: dark stays dark, bright stays bright
        elif mode == "I":
            hi = 65535.0 if arr.max(initial=0) > 255 else 255.0
            arr = arr / hi
        else:  # float images have no fixed range: stretch what is there
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        arr = np.clip(np.nan_to_num(arr) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


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
        img = img.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy needs one


def load_array(source, hw: tuple[int, int]) -> np.ndarray:
    """open_image then resize_to_array. A grayscale file is resized before it becomes RGB: the same pixels (each
    channel is the gray one, resized alike) for a third of the resizing (ELPV's cells are grayscale)."""
    if isinstance(source, Image.Image):
        return resize_to_array(open_image(source), hw)
    with _opened(source) as img:
        up = _upright(img)
        if up.mode == "L":
            return np.repeat(resize_to_array(up, hw)[..., None], 3, axis=2)
        return resize_to_array(_to_rgb(up), hw)
