"""The split: train / val / test parts, stratified by class, with groups kept on one side."""
from __future__ import annotations

import random
from collections import defaultdict

from core.config import TrainConfig
from core.data.sources import Dataset, DatasetError, Sample


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
    unit_of = _units(pool, together or [])
    strata: dict[tuple, list[list[int]]] = defaultdict(list)
    for i in pool:
        if unit_of[i][0] == i:  # a unit is listed once, under its first member
            strata[(ds.samples[i].label, ds.samples[i].group)].append(unit_of[i])
    per_class = _class_sizes(ds, pool, need=1 + sum(1 for f in want.values() if f > 0))
    for key in sorted(strata):
        units = sorted(strata[key])
        rng.shuffle(units)
        _carve(units, want, splits)
    _every_class_in_every_part(ds, splits, want, per_class, unit_of, rng)
    return {k: sorted(v) for k, v in splits.items()}


def _units(pool: list[int], together: list[list[int]]) -> dict[int, list[int]]:
    """Each sample's unit: the samples that go to one part with it (itself alone when in no group)."""
    unit_of = {i: [i] for i in pool}
    for g in together:
        members = sorted({i for i in g if i in unit_of})
        if len(members) > 1:
            merged = sorted({j for i in members for j in unit_of[i]})
            for j in merged:
                unit_of[j] = merged
    return unit_of


def _class_sizes(ds: Dataset, pool: list[int], need: int) -> dict[int, int]:
    """Images per class; a class needs one image in every split it is carved into, plus one for training."""
    per_class = defaultdict(int)
    for i in pool:
        per_class[ds.samples[i].label] += 1
    for label, n in per_class.items():
        if n < need:
            raise DatasetError(f"class {ds.classes[label]!r} has only {n} image(s): at least {need} are "
                               "needed to split it into train/val/test. Add images or remove the class.")
    return per_class


def _carve(units: list[list[int]], want: dict[str, float], splits: dict[str, list[int]]) -> None:
    """One stratum's shuffled units into the carved parts, each near its share; the rest to training."""
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


def _every_class_in_every_part(ds: Dataset, splits: dict[str, list[int]], want: dict[str, float],
                               per_class: dict[int, int], unit_of: dict[int, list[int]], rng: random.Random) -> None:
    """Tiny strata can round to zero: move a smallest unit of a missing class from training into the part, when
    training keeps one of its images."""
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


def default_split(ds: Dataset) -> tuple[dict[str, list[int]], str]:
    """The split a new run of `ds` gets with TrainConfig's defaults, and how it was made, in words (the Datasets
    page's preview of what the Train page will do)."""
    cfg = TrainConfig()
    split = stratified_split(ds, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    if ds.given_splits:
        return split, "given by the folders"
    val, test = round(cfg.val_fraction * 100), round(cfg.test_fraction * 100)
    return split, f"stratified {100 - val - test}/{val}/{test}, seed {cfg.split_seed} (the Train page default)"

