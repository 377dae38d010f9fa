"""The studio's engine: plain Python/PyTorch, no Streamlit.

Data flow, one module per stage (README "How it fits together"):
    images.py      open any image as upright RGB, or say why not
    data.py        dataset sources, split, decoded-image cache
    labels.py      corrected labels and exclusions (SQLite); curation.py finds likely label errors
    rundata.py     a run's decoded images, served as uint8 batches
    transforms.py  uint8 -> model input, normalization, batched augmentation, mixup / CutMix
    model.py       ResNet builders, weight loading, a model from a checkpoint
    device.py      device and precision choice
    schedule.py    the learning rate as a pure function of the step
    estimate.py    how long a run will take here, before it starts
    train.py       train_one_epoch / validate / fit
    averaging.py   a moving average of the weights (EMA), validated beside them
    losses.py      the training loss: cross-entropy, plus an ordinal term for ordered grades
    checkpoint.py  state_dict + JSON metadata, atomic, weights_only loading
    inference.py   the one path from images to probabilities (precision, TTA)
    evaluate.py    test metrics and the per-image table
    explain.py     Grad-CAM and friends
    predict.py     a loaded model for new images
    runs.py        a run's life: creation, status, scores, resume and extension
    storage.py     the workspace folders and its SQLite index
    jobs.py        background jobs for the studio
    imports.py     zips, read safely
    export.py      ONNX / TorchScript files with a model card
    portable.py    prediction from an exported ONNX file, without torch
    serve.py       an HTTP JSON API for a model (FastAPI on uvicorn)
    errors.py      UserError, the base of every error a user can act on
    cli.py         python -m core ...
"""
