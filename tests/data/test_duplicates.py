"""Near-duplicates by perceptual hash: planted twins found, strangers not, groups as connected components."""

import numpy as np
from PIL import Image

from conftest import make_dot_image, near_copy
from core.data.duplicates import dataset_duplicate_groups, groups_from_pairs, hash_pairs, perceptual_hashes
from core.data.sources import load_dataset


def test_planted_twins_are_the_near_duplicate_groups(twins):
    root, planted = twins
    ds = load_dataset(str(root))
    groups = dataset_duplicate_groups(ds)
    found = {frozenset(ds.samples[i].path for i in g) for g in groups}
    assert found == {frozenset(p) for p in planted}  # every twin found, and nothing else grouped


def test_hash_distances_tell_twins_from_strangers():
    rng = np.random.default_rng(3)
    originals = [make_dot_image(rng, 48, dot=bool(i % 2))[0] for i in range(12)]
    twins = [np.asarray(near_copy(a, k % 2)) for k, a in enumerate(originals)]
    h = perceptual_hashes(np.stack([np.asarray(Image.fromarray(a).resize((32, 32), Image.Resampling.BILINEAR))
                                    for a in originals + twins]))
    d = np.bitwise_count(h[:, None] ^ h[None, :])
    n = len(originals)
    assert d[np.arange(n), np.arange(n) + n].max() <= 2
    strangers = d[:n, :n][~np.eye(n, dtype=bool)]
    assert strangers.min() > 6
    assert [tuple(p[:2]) for p in hash_pairs(h, 2)] == [(i, i + n) for i in range(n)]


def test_groups_are_connected_components():
    assert groups_from_pairs(6, [(0, 2, 1), (2, 5, 1), (3, 4, 1)]) == [[0, 2, 5], [3, 4]]
    assert groups_from_pairs(3, []) == []
