"""The training step's forward and backward, eager or replayed as a CUDA graph.

On an H100 a ResNet18 step at ELPV's batch (64 images of 80-160 px) is bound by kernel launches, not by the GPU
(bench/gpu_profile.py): Python and the launches of some 400 kernels take longer than the kernels. A CUDA graph
records those launches once per batch shape and replays them in one call. The update (fused AdamW), the loss and
the augmentation stay eager, so the learning-rate and momentum schedule still changes every step.

`build_forward` returns the eager forward everywhere else (CPU, MPS, several processes, configs that turn graphs
off): that twin is what every test on a machine without a GPU runs, and the graphed one calls the same module
under the same autocast.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from core.models.device import autocast

# The estimate captures a step inside the studio's own process, where another page may be running a prediction on
# the same GPU: by default ("global") a capture makes CUDA calls such as cudaMalloc fail in every other thread.
# "thread_local" limits that to the capturing thread (torch passes it to cudaStreamBeginCapture).
_THIS_THREAD_ONLY = ({"capture_error_mode": "thread_local"}
                     if "capture_error_mode" in inspect.signature(torch.cuda.make_graphed_callables).parameters else {})
MAX_CAPTURES = 12  # a shape that keeps changing (it should not: progressive resizing only grows) falls back to eager


class EagerForward:
    """logits (float32) of a training batch: the model under the run's autocast."""

    def __init__(self, model: nn.Module, amp: torch.dtype | None):
        self.model, self.amp = model, amp

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(x.device, self.amp):
            return self.model(x).float()


class _Autocast(nn.Module):
    """The model under autocast without its cast cache (graph capture cannot use the cache)."""

    def __init__(self, model: nn.Module, amp: torch.dtype | None):
        super().__init__()
        self.model, self.amp = model, amp

    def forward(self, x):
        with torch.autocast("cuda", dtype=self.amp or torch.float32, enabled=self.amp is not None,
                            cache_enabled=False):
            return self.model(x).float()


class GraphedForward(EagerForward):
    """EagerForward, replayed as a CUDA graph for full batches of the shape last seen. A new shape (the next
    progressive-resizing size) is captured when it arrives and the previous graph freed, so one graph's memory is
    held at a time; the short last batch of an epoch runs eagerly."""

    def __init__(self, model: nn.Module, amp: torch.dtype | None, batch_size: int, log=print):
        super().__init__(model, amp)
        self.batch_size, self.log = batch_size, log
        self.shape, self.graphed = None, None
        self.captures, self.failed = 0, False
        # The graphed backward hands each parameter its gradient from the capture's stream; autograd warns about
        # that once per process, though the update is the eager one's (bench/cuda_graphs.py: the same losses).
        quiet = getattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch", None)
        if quiet is not None:
            quiet(False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.failed or len(x) != self.batch_size or not self.model.training:
            return super().__call__(x)
        if tuple(x.shape) != self.shape:
            if self.captures >= MAX_CAPTURES:
                return super().__call__(x)
            self.graphed = None  # free the last shape's graph before capturing the next
            try:
                self.graphed = self._capture(x)
            except Exception as exc:  # an op that cannot be captured: train on eagerly, as before
                self.failed = True
                self.log(f"CUDA graphs off for this run ({type(exc).__name__}: {exc}); training eagerly")
                return super().__call__(x)
            self.shape = tuple(x.shape)
            self.captures += 1
        return self.graphed(x)

    def _capture(self, x: torch.Tensor):
        # The capture's warm-up passes run the batch forward three times in training mode: they would move
        # BatchNorm's running statistics, so those are put back afterwards (in place: the graph holds their memory).
        buffers = [b.detach().clone() for b in self.model.buffers()]
        try:
            return torch.cuda.make_graphed_callables(_Autocast(self.model, self.amp), (x.detach(),),
                                                     **_THIS_THREAD_ONLY)
        finally:  # a capture that failed half-way leaves them as they were too
            with torch.no_grad():
                for b, saved in zip(self.model.buffers(), buffers):
                    b.copy_(saved)


def build_forward(model: nn.Module, amp: torch.dtype | None, device: torch.device, enabled: bool,
                  batch_size: int, log=print) -> EagerForward:
    """The training forward for a run: graphed on one CUDA device when `enabled` (TrainConfig.cuda_graphs), eager
    otherwise. Several processes (DDP) train eagerly: their gradient hooks cannot be captured this way."""
    if enabled and device.type == "cuda":
        return GraphedForward(model, amp, batch_size, log)
    return EagerForward(model, amp)
