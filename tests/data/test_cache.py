"""The decoded-image cache and the per-channel statistics read off it."""
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_class_folders
from core.data.cache import ImageCache


def test_cache_reuses_decoded_images_and_notices_changed_files(tmp_path):
    root = write_class_folders(tmp_path / "d", per_class=3, size=16)
    paths = sorted(str(p) for p in root.rglob("*.png"))
    cache = ImageCache(max_bytes=10 * 2**20)
    first = cache.get(paths, (8, 8))
    assert cache.get(paths, (8, 8)) is first
    time.sleep(0.01)
    Image.new("RGB", (16, 16), (255, 0, 0)).save(paths[0])
    os.utime(paths[0], ns=(time.time_ns(), time.time_ns() + 10**9))
    second = cache.get(paths, (8, 8))
    assert second is not first
    assert second.array[0, 0, 0].tolist() == [255, 0, 0]


def test_cache_spills_to_memory_mapped_file_past_its_bound(tmp_path):
    root = write_class_folders(tmp_path / "d", per_class=10, size=16)
    paths = sorted(str(p) for p in root.rglob("*.png"))
    (root / "dot" / "zz_broken.png").write_bytes(b"junk")
    paths.append(str(root / "dot" / "zz_broken.png"))
    cache = ImageCache(max_bytes=1000)  # smaller than 21 images of 16x16x3
    d = cache.get(paths, (16, 16), cache_dir=tmp_path / "cache")
    assert d.on_disk and isinstance(d.array, np.memmap)
    assert cache.memory_bytes() == 0
    assert list(d.failed) == [20]
    np.testing.assert_array_equal(d.array[0], np.asarray(Image.open(paths[0]).convert("RGB")))
    again = ImageCache(max_bytes=1000).get(paths, (16, 16), cache_dir=tmp_path / "cache")  # a new process
    assert again.on_disk and list(again.failed) == [20]
    assert len(list((tmp_path / "cache").glob("*.u8"))) == 1


def test_channel_stats_are_the_pixels_mean_and_std():
    from core.data.cache import channel_stats
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (300, 8, 9, 3), dtype=np.uint8)
    images[..., 2] //= 4  # a darker, narrower third channel
    idx = np.arange(3, 300, 2)  # a subset, as the training part is
    mean, std = channel_stats(images, idx)
    ref = images[idx].reshape(-1, 3) / 255.0
    assert mean == pytest.approx(ref.mean(0).tolist(), abs=1e-6)
    assert std == pytest.approx(ref.std(0).tolist(), abs=1e-6)
    big = np.concatenate([images] * 2)  # 600 images: three chunks
    assert channel_stats(big, np.arange(600))[0] == pytest.approx((big.reshape(-1, 3) / 255.0).mean(0).tolist(), abs=1e-6)
    # Images kept on the GPU are counted where they are (a CPU tensor takes the same path here)
    assert channel_stats(torch.from_numpy(big), np.arange(600)) == channel_stats(big, np.arange(600))
    with pytest.raises(TypeError, match="8-bit"):
        channel_stats(torch.from_numpy(big).float(), np.arange(600))
