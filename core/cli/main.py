"""The headless interface: `python -m core train|resume|evaluate|predict|export|serve|runs|presets`.

User mistakes (bad paths, bad options, unusable checkpoints) print one line on stderr and exit 2;
a failed training run exits 1. Tracebacks are only for bugs.

torch is imported by the commands that use it, not here: `predict --model FILE.onnx` runs where only
onnxruntime, numpy and Pillow are installed.
"""
from __future__ import annotations

import sys

from core.cli.output import USER_ERRORS, Output
from core.cli.parser import build_parser
from core.workspace.store import Workspace


def open_workspace(args) -> Workspace | None:
    """The workspace a command works in, opened here once (or None for a command that needs none)."""
    mode = args.workspace_mode
    if callable(mode):
        mode = mode(args)
    if not mode:
        return None
    ws = Workspace(args.workspace)
    if mode == "run" and ws.run_row(args.run) is None:
        raise KeyError(f"no run {args.run!r} in {ws.root}")
    return ws


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.fn(args, open_workspace(args))
        return result.print(args.json) if isinstance(result, Output) else result
    except USER_ERRORS as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
