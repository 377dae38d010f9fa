"""The one path from images to probabilities, and evaluation on a run's test part.

    classifier.py  a model with its normalization, precision and test-time views: images -> probabilities
    evaluate.py    test metrics, the per-image table, the misclassified gallery
"""
