"""Training on several devices: PyTorch's DistributedDataParallel, one process per device, started by
torch.distributed.elastic (what `torchrun` runs). No scheduler of our own.

    python -m core train --data D --devices 2                  # this machine, 2 processes (2 GPUs, or CPU halves)
    torchrun --standalone --nproc_per_node 2 -m core train --data D
    torchrun --nnodes 2 --nproc_per_node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29400 --rdzv-id ID \\
        -m core train --data D --workspace /shared/ws           # every machine, same command

What N devices change: each batch of `batch_size` images is split across them (each computes batch_size/N), and
their gradients are averaged with weights that make the step the one a single device takes on the whole batch. So
batch size, learning rate and schedule mean what they mean on one device; with SyncBatchNorm (GPUs) the steps are
the same as one device's, and N devices do them up to N times as fast.

Rank 0 alone writes the run's files, checkpoints and database row; every rank computes the same validation
metrics (gathered from all shards), so early stopping and "best" are decided alike everywhere.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from core.errors import UserError
from core.runs.life import exit_reason

# Gloo and NCCL wait this long in a collective before giving up (a rank that died mid-step is noticed sooner by
# the elastic agent, which then ends the others).
COLLECTIVE_TIMEOUT_S = 30 * 60


class RankFailure(UserError):
    """A rank of a multi-device run died; the message names the rank and why."""


@dataclass(frozen=True)
class Ranks:
    """Who this process is among the run's processes. World 1: a plain single-device run."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1   # ranks on this machine (they share its CPU cores)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls) -> "Ranks":
        """As torch.distributed.elastic (torchrun) sets them; a process started otherwise is rank 0 of 1."""
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


SINGLE = Ranks()


def start(ranks: Ranks, device_pref: str = "auto") -> torch.device:
    """Join the run's process group (NCCL on GPUs, Gloo on CPUs) and return this rank's device."""
    from datetime import timedelta

    from core.models.device import select_device
    device = select_device(device_pref)
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if ranks.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        watch_parent()
    return device


def barrier() -> None:
    """All ranks meet here (after a successful training only: a rank that failed never reaches it). A rank
    tearing its connections down while another still uses them was seen to abort the process."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj, ranks: Ranks):
    """Rank 0's `obj`, on every rank."""
    if not ranks.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(indices: np.ndarray, ranks: Ranks) -> np.ndarray:
    """This rank's contiguous share of a batch (or of the validation part); shares differ by at most one."""
    if not ranks.distributed:
        return indices
    return np.array_split(indices, ranks.world)[ranks.rank]


def loss_weight(n_local: int, n_global: int, ranks: Ranks) -> float:
    """DDP averages the ranks' gradients; weighting each rank's mean loss by world * n_local / n_global makes
    that average the gradient of the mean loss over the whole batch, however unevenly it was split."""
    return ranks.world * n_local / max(n_global, 1) if ranks.distributed else 1.0


def sum_across(values: list[float], ranks: Ranks) -> list[float]:
    """Element-wise sums over ranks (one small all-reduce; the stop flag travels in it)."""
    if not ranks.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()


def gather_rows(array: np.ndarray, ranks: Ranks) -> np.ndarray:
    """Every rank's rows, concatenated in rank order, on every rank."""
    if not ranks.distributed:
        return array
    parts: list = [None] * ranks.world
    dist.all_gather_object(parts, array)
    return np.concatenate(parts)


def sync_buffers(model: torch.nn.Module, ranks: Ranks) -> None:
    """Rank 0's batch-norm statistics on every rank, so that every shard is validated by rank 0's model (the one
    the checkpoint holds)."""
    if not ranks.distributed:
        return
    for b in model.buffers():
        dist.broadcast(b.data, src=0)


def wrap(model: torch.nn.Module, ranks: Ranks, device: torch.device, batch_norm: str) -> torch.nn.Module:
    """The module the training steps call: `model` itself on one device, DDP around it on several. Batch norm:
    "sync" (or "auto" on GPUs) computes the statistics over the whole batch (SyncBatchNorm, GPUs only); "frozen"
    keeps the running statistics and trains the rest; otherwise each device normalizes by its own share."""
    if not ranks.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    if batch_norm == "sync" or (batch_norm == "auto" and device.type == "cuda"):
        if device.type != "cuda":
            raise UserError("batch_norm=sync needs GPUs (PyTorch's SyncBatchNorm); use auto or frozen on CPUs")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def watch_parent(interval_s: float = 1.0) -> None:
    """End this rank when the process that started it (the elastic agent) is gone: a rank never outlives its job,
    whatever killed the agent."""
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def check_devices(devices: int, device_pref: str = "auto") -> None:
    """Refuse a device count this machine cannot give (more processes than GPUs)."""
    from core.models.device import select_device
    device = select_device(device_pref)
    if device.type == "cuda" and devices > torch.cuda.device_count():
        raise UserError(f"{devices} devices asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and devices > 1:
        raise UserError("Apple MPS trains on one device; set devices to 1")


# ----------------------------------------------------------------------------------------------------
# Launching N processes on this machine (what `torchrun --standalone --nproc_per_node N` does)


def launch_local(nproc: int, args: list[str], job_id: str) -> None:
    """Run `python -m core <args>` as `nproc` ranks on this machine through torch.distributed.elastic, with no
    restarts. Returns when all ranks exited 0; raises RankFailure naming the first rank that failed and why."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=job_id,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.5, start_method="spawn")
    try:
        elastic_launch(config, sys.executable)("-m", "core", *args)
    except ChildFailedError as exc:
        raise RankFailure(rank_failure_message(exc)) from None


def rank_failure_message(exc) -> str:
    """'rank 1 (pid 123) was killed by signal 9 (SIGKILL) ...' from torch.distributed.elastic's failures."""
    failures = getattr(exc, "failures", {}) or {}
    if not failures:
        return f"training processes failed: {exc}"
    rank, f = min(failures.items(), key=lambda kv: _cause_order(kv[1]))
    return f"rank {rank} (pid {f.pid}) " + exit_reason(f.exitcode, _error_text(f))


def _cause_order(failure) -> tuple:
    """Which failure caused the others: a rank killed by a signal (not the agent's own SIGTERM to the survivors),
    then an exception that is not a lost connection to a peer, then the rest; the earliest first within each."""
    code = failure.exitcode
    text = _error_text(failure).lower()
    echo = "closed by peer" in text or "remote worker" in text or "connection reset" in text
    kind = 0 if code is not None and code < 0 and code != -signal.SIGTERM else (1 if not echo else 2)
    if code == -signal.SIGTERM:
        kind = 3
    return kind, failure.timestamp


def _error_text(failure) -> str:
    message = getattr(failure, "message", "") or ""
    if isinstance(message, dict):
        message = message.get("message", "")
    # The error file's message is the exception's last line; elastic's own text for signals is "Signal N ...".
    first = str(message).strip().splitlines()
    text = next((line for line in reversed(first) if line.strip()), "")
    return "" if text.startswith("Signal ") or text.startswith("To enable traceback") else text
