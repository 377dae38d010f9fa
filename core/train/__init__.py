"""Training: the loop and everything it is made of.

    loop.py         fit / train_one_epoch / validate, checkpoints of the best weights
    schedule.py     the learning rate as a pure function of the step
    averaging.py    a moving average of the weights (EMA, SWA), validated beside them
    losses.py       cross-entropy, plus an ordinal term for ordered grades
    graphs.py       CUDA graphs for the training step (an eager twin elsewhere)
    distributed.py  several devices: ranks, sharding, collectives
    pretrain.py     self-supervised pretraining (SimCLR) on the run's own images
    estimate.py     how long a run will take here, before it starts
    recipe.py       the auto recipe: settings chosen from the data, the device and a time budget
"""
