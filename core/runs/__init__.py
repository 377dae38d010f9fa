"""A run: its life (creation, split, status, scores, resume and extension) and its decoded images.

    life.py        prepare / transition / record / execute a run; the progress Reporter
    rundata.py     a run's decoded images, served as uint8 batches
"""
