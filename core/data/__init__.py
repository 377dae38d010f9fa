"""Images and datasets, up to uint8 batches: nothing here knows about models.

    images.py      open any image as upright RGB, or say why not
    zips.py        zips, read safely (paths, bombs, encryption)
    sources.py     dataset sources: class folders, split folders, CSV, the ELPV example
    split.py       the stratified train/val/test split, groups kept on one side
    cache.py       decoded, resized images, in memory or memory-mapped; channel statistics
    duplicates.py  near-duplicates by perceptual hash
    labels.py      corrected labels and exclusions (SQLite), with history and undo
    golden.py      the golden set: frozen labels by content hash, kept out of every later split
    transforms.py  uint8 -> model input, normalization, batched augmentation, mixup / CutMix
"""
