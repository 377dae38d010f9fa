"""Checkpoints: a state_dict plus JSON metadata, written atomically, read with weights_only=True.

File layout (a plain dict, nothing pickled but tensors and built-in types):
    {"format": "studio-checkpoint/1", "model": state_dict, "meta": "<json text>",
     "optimizer": ..., "scheduler": ..., "scaler": ...}   # the last three only in last.pt
A sidecar <name>.json repeats the metadata so listings never need torch.
"""
from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch

from core.errors import UserError
from core.workspace.files import write_atomic, write_json_atomic

FORMAT = "studio-checkpoint/1"


class CheckpointError(UserError):
    """A checkpoint cannot be written or is not one we can safely load; the message says which."""


def nonfinite_tensors(state: dict) -> list[str]:
    """Names of the floating-point tensors in a state_dict that hold NaN or infinity."""
    # A float64 sum is finite exactly when every element is (NaN and infinity carry through it; float32's largest
    # value times a tensor's size stays far below float64's): one reduction, 3x faster than isfinite(v).all() on a
    # ResNet18, and it runs at every checkpoint written and loaded.
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v.sum(dtype=torch.float64))]


def refuse_nonfinite(model_state: dict, name: str) -> None:
    """CheckpointError if the weights hold NaN or infinity (`name`: the file they would have gone to)."""
    bad = nonfinite_tensors(model_state)
    if bad:
        raise CheckpointError(f"training diverged: {len(bad)} weight tensor(s) became NaN or infinite "
                              f"(first: {bad[0]}); {name} was not written. Lower the learning rate, "
                              "or turn off mixed precision (--amp off), and try again")


def save_checkpoint(path: str | Path, model_state: dict, meta: dict, **training_state) -> None:
    """Write atomically: the previous file at `path` stays intact if anything fails (disk full...).
    Weights holding NaN or infinity are refused (the loader refuses them too): a diverged model must not replace
    the last good checkpoint."""
    path = Path(path)
    refuse_nonfinite(model_state, path.name)
    payload = {"format": FORMAT, "model": {k: v.detach().cpu() for k, v in model_state.items()},
               "meta": json.dumps(meta)}
    payload.update({k: v for k, v in training_state.items() if v is not None})
    try:
        write_atomic(path, lambda tmp: torch.save(payload, tmp))
        write_json_atomic(path.with_suffix(".json"), meta)
    except OSError as exc:
        raise CheckpointError(f"could not save checkpoint {path.name}: {exc.strerror or exc}") from None


def safe_torch_load(path: str | Path):
    """torch.load with weights_only=True and readable errors. Never falls back to full unpickling."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Unsupported global" in text or "GLOBAL" in text or "REDUCE" in text:
            found = next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln), "")[:160]
            raise CheckpointError(
                "refused: the file contains Python objects, not only weights, and loading it could run code"
                + (f" ({found})" if found else "")) from None
        raise CheckpointError("not a torch checkpoint: the file is unreadable or corrupt") from None
    except (zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(f"file is truncated or corrupt ({type(exc).__name__})") from None
    except RuntimeError as exc:
        msg = str(exc).splitlines()[0][:200]
        if "zip" in msg.lower() or "archive" in msg.lower() or "central directory" in msg.lower():
            raise CheckpointError("file is truncated or corrupt (not a complete torch archive)") from None
        raise CheckpointError(f"cannot read checkpoint: {msg}") from None
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} not found") from None
    except Exception as exc:
        raise CheckpointError(f"not a torch checkpoint ({type(exc).__name__}: {str(exc)[:160]})") from None


def load_checkpoint(path: str | Path) -> tuple[dict, dict, dict]:
    """(model state_dict, meta, full payload) of one of our checkpoints."""
    obj = safe_torch_load(path)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or not isinstance(obj.get("model"), dict):
        raise CheckpointError("not a studio checkpoint (no model state and metadata in it)")
    try:
        meta = json.loads(obj["meta"])
    except (TypeError, ValueError):
        raise CheckpointError("checkpoint metadata is not valid JSON") from None
    for key in ("classes", "config"):
        if key not in meta:
            raise CheckpointError(f"checkpoint metadata lacks {key!r}")
    return obj["model"], meta, obj
