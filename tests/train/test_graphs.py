"""CUDA graphs for the training step: eager off CUDA, and a fallback when a capture fails."""

import torch

from core.models.resnet import build_model


def test_the_training_forward_is_eager_off_cuda_and_falls_back_when_a_graph_cannot_be_captured():
    # core/train/graphs.py: CUDA graphs only on one CUDA device; this is the twin every CPU runs. A graph that cannot be
    # captured (here: no CUDA at all) must leave training eager and say so once, with the same logits.
    from core.train.graphs import EagerForward, GraphedForward, build_forward
    torch.manual_seed(0)
    model = build_model("resnet18", 3, "none").train()
    cpu = torch.device("cpu")
    assert type(build_forward(model, None, cpu, True, 4)) is EagerForward
    lines = []
    graphed = GraphedForward(model, None, batch_size=4, log=lines.append)
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    ref = EagerForward(model, None)(x).detach()
    out = graphed(x)
    assert out.dtype == torch.float32 and out.requires_grad
    # BatchNorm in training mode normalizes by the batch: the same input gives the same logits
    torch.testing.assert_close(out.detach(), ref)
    graphed(x)
    assert graphed.failed and len(lines) == 1 and "CUDA graphs off" in lines[0]
