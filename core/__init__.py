"""The studio's engine: plain Python/PyTorch, no Streamlit.

Data flow, one module per stage:
    images.py      open any image as upright RGB
    data.py        dataset sources, split, decoded-image cache
    transforms.py  normalization, batched augmentation, the one eval transform
    model.py       ResNet builders and weight loading
    train.py       train_one_epoch / evaluate_loss_acc / fit
    checkpoint.py  state_dict + JSON metadata, atomic, weights_only loading
    evaluate.py    test metrics and the per-image table
    explain.py     Grad-CAM and friends
    predict.py     a loaded model for new images
    storage.py     the workspace and its SQLite index
    jobs.py        background training jobs
    cli.py         python -m core ...
"""
