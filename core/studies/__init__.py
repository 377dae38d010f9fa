"""Studies made of several trainings of one run's data.

    curation.py        k-fold cross-validation for likely label errors; exporting curated labels
    learning_curve.py  accuracy against training-set size, and what more images would bring
"""
