"""The studio's engine: plain Python/PyTorch, no Streamlit.

One package per stage of the data flow, listed bottom-up: each imports only those above it in this list
(.importlinter says so, and `lint-imports` checks it in the test command). Each package's __init__ lists its modules.

    errors.py    UserError, the base of every error a user can act on
    config.py    TrainConfig: every setting of a run, with its default and its check
    workspace/   the workspace's folders, the SQLite index of runs, atomic writes and keyed caches
    data/        images, zips, dataset sources, the split, the decoded-image cache, duplicates, labels, transforms
    models/      the ResNets, checkpoints, device and precision
    runs/        a run's life (creation, status, resume) and its decoded images
    decide/      calibration, a cost-based rule, the rule stored with a run
    infer/       the one path from images to probabilities, and evaluation
    train/       the training loop, schedule, averaging, losses, CUDA graphs, devices, pretraining, estimate, recipe
    studies/     cross-validation for label errors, the learning curve
    explain/     Grad-CAM, features and neighbours, leakage, the embedding map, the Grad-CAM audit
    deploy/      prediction, the portable ONNX predictor, export, the HTTP server, the audit pack
    jobs/        the studio's job queue and the training process
    cli/         python -m core ...
"""
