"""Every image Pillow opens becomes upright 3-channel RGB, or a clear ImageLoadError."""
import io

import numpy as np
import pytest
from PIL import Image

from core.data.images import ImageLoadError, load_array, open_image


def _save(img, path, **kw):
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "CMYK", "1", "P", "I", "F", "RGB"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    img = Image.new("RGB", (20, 10), (200, 100, 50)).convert(mode)
    fmt = "TIFF" if mode in ("I", "F", "CMYK", "LA") else "PNG"
    path = _save(img, tmp_path / f"x.{fmt.lower()}", format=fmt)
    out = open_image(path)
    assert out.mode == "RGB" and out.size == (20, 10)


def test_16bit_gray_is_scaled_not_clipped(tmp_path):
    arr = np.full((8, 8), 30000, dtype=np.uint16)  # ~46% of the 16-bit range
    path = tmp_path / "g16.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")
    px = np.asarray(open_image(path))
    assert 110 <= px[0, 0, 0] <= 125  # 30000/65535*255 = 116.7; clipping would give 255


def test_palette_transparency_composited_on_white(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.info["transparency"] = 0
    path = tmp_path / "p.png"
    img.save(path, transparency=0)
    assert np.asarray(open_image(path))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (30, 10), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 10))  # white block on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=95)
    out = open_image(path)
    assert out.size == (10, 30)
    arr = np.asarray(out)
    assert arr[:10].mean() > 200 and arr[-10:].mean() < 50  # the block is now on top


def test_first_frame_of_animation(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "a.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    r, g, b = np.asarray(open_image(path))[0, 0]
    assert r > 200 and b < 50


@pytest.mark.parametrize("content,reason", [
    (b"", "empty"),
    (b"hello, I am text", "not a recognised image"),
    (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n", "not a recognised image"),
])
def test_unusable_files_have_a_reason(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=reason):
        open_image(path)


def test_truncated_jpeg_is_refused_and_global_flag_untouched(tmp_path):
    from PIL import ImageFile
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, format="JPEG")
    path = tmp_path / "t.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageLoadError):
        open_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decompression_bomb_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (20000, 10000)).save(path)  # small file, 200 megapixels declared
    assert path.stat().st_size < 1_000_000
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        open_image(path)


def test_tiny_and_strip_images_resize(tmp_path):
    Image.new("RGB", (1, 1), (9, 9, 9)).save(tmp_path / "one.png")
    Image.new("RGB", (10000, 10), (9, 9, 9)).save(tmp_path / "strip.png")
    for name in ("one.png", "strip.png"):
        arr = load_array(tmp_path / name, (32, 24))
        assert arr.shape == (32, 24, 3) and arr.dtype == np.uint8


def test_a_grayscale_file_decodes_to_the_pixels_it_has_as_rgb(tmp_path):
    # load_array resizes a grayscale file before it becomes RGB (a third of the work): the pixels must be the ones
    # the RGB route gives, at shrinking, enlarging and odd sizes.
    from PIL import Image

    from core.data.images import load_array, open_image, resize_to_array
    rng = np.random.default_rng(1)
    path = tmp_path / "gray.png"
    Image.fromarray(rng.integers(0, 256, (300, 290), dtype=np.uint8), "L").save(path)
    for hw in [(160, 160), (96, 128), (300, 290), (451, 333), (17, 5)]:
        fast = load_array(path, hw)
        assert fast.shape == (*hw, 3)
        np.testing.assert_array_equal(fast, resize_to_array(open_image(path), hw))


def _mode_image(mode: str, size: tuple[int, int], rng) -> Image.Image:
    w, h = size
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(0, 4000, (h, w), dtype=np.int32))
    if mode == "F":
        return Image.fromarray(rng.normal(5, 3, (h, w)).astype(np.float32))
    img = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    if mode == "P":
        pal = img.convert("RGB").quantize(64)
        pal.info["transparency"] = 3
        return pal
    return img.convert(mode)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "P", "CMYK", "I;16", "I", "F", "1"])
def test_a_large_image_shrunk_while_converting_has_the_full_size_routes_pixels(tmp_path, mode, monkeypatch):
    # Large images are converted and reduced a strip at a time (bounded memory): the pixels must be the ones the
    # full-size route (convert everything, then resize) gives, for every mode, with strips that do not divide the
    # image evenly and reduction factors that leave partial blocks.
    import core.data.images as images
    rng = np.random.default_rng(7)
    path = tmp_path / f"big-{mode.replace(';', '')}.tiff"
    _mode_image(mode, (1003, 701), rng).save(path)
    monkeypatch.setattr(images, "REDUCE_ABOVE", 0)
    monkeypatch.setattr(images, "STRIP_PIXELS", 50_000)  # ~50 rows: many strips, the last one short
    for hw in [(64, 64), (40, 100), (233, 301)]:
        got = images.load_array(path, hw)
        assert got.shape == (*hw, 3)
        np.testing.assert_array_equal(got, images.resize_to_array(images.open_image(path), hw))


def test_a_large_rotated_image_comes_out_upright(tmp_path, monkeypatch):
    import core.data.images as images
    arr = np.zeros((600, 900, 3), np.uint8)
    arr[:300] = (255, 0, 0)  # red on top
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # stored turned: upright is 90 degrees clockwise
    img.save(tmp_path / "turned.png", exif=exif)
    monkeypatch.setattr(images, "REDUCE_ABOVE", 0)
    got = images.load_array(tmp_path / "turned.png", (90, 60))
    full = images.resize_to_array(images.open_image(tmp_path / "turned.png"), (90, 60))
    assert np.abs(got.astype(int) - full.astype(int)).mean() < 2  # only the reduction's leftover edge moves
    assert got[:, -5:, 0].mean() > 250 and got[:, :5, 0].mean() < 5  # the red half is on the right


def test_a_16bit_giant_decodes_in_bounded_memory(tmp_path):
    # The case: a small 16-bit PNG of 6000x6000 pixels took >1 GB as float64 before it was resized. Now its
    # decoded pixels (72 MB) and a strip at a time; measured in a fresh process (peak resident memory).
    import subprocess
    import sys
    path = tmp_path / "giant16.png"
    Image.fromarray((np.indices((6000, 6000)).sum(0) % 65536).astype(np.uint16)).save(path)
    probe = ("import resource, sys; from core.data.images import load_array; "
             "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; a = load_array(sys.argv[1], (224, 224)); "
             "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, a.shape)")
    out = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, check=True,
                         cwd=__import__("pathlib").Path(__file__).resolve().parents[2]).stdout.split()
    assert int(out[0]) < 200, f"loading took {out[0]} MB more"  # was ~1 GB (float64 at full size and copies)
