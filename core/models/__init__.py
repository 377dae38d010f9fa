"""Models and where they run.

    resnet.py      ResNet builders (torchvision's and the hand-built ResNet18), weight loading, a model from a checkpoint
    checkpoint.py  state_dict + JSON metadata, atomic, weights_only loading
    device.py      device and precision choice (bf16 measured on this CPU)
"""
