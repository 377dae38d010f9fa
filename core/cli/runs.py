"""`runs` and `presets`: what the workspace holds, and the named recipes."""
from __future__ import annotations

import json

from core.cli.output import Output
from core.config import PRESETS
from core.runs import life as runs
from core.workspace.store import Workspace


def cmd_runs(args, ws: Workspace) -> Output:
    runs.mark_interrupted(ws)
    rows = ws.list_runs()
    return Output(rows, lambda: run_table(ws, rows))


def run_table(ws: Workspace, rows: list[dict]) -> list[str]:
    if not rows:
        return [f"no runs in {ws.root}"]

    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else "-"

    def golden(r):  # the version beside the score: scores of two versions are not on the same labels
        return f"{r['golden_acc']:.4f} v{r['golden_version']}" if r.get("golden_acc") is not None else "-"

    return [f"{'run':<22} {'status':<12} {'dataset':<16} {'arch':<16} {'epochs':>7} {'best val':>9} {'test':>7} "
            f"{'golden':>11}"] + [
        f"{r['id']:<22} {r['status']:<12} {r['dataset'][:16]:<16} {r['arch']:<16} "
        f"{r['epochs_done']:>3}/{r['epochs']:<3} {fmt(r['best_val_acc']):>9} {fmt(r['test_acc']):>7} {golden(r):>11}"
        for r in rows]


def cmd_presets(args, ws: None) -> int:
    print("auto: chosen for the dataset on this machine (image size, epochs, batch, schedule, precision); "
          "the default")
    for name, over in PRESETS.items():
        print(f"{name}: {json.dumps(over) if over else '(the seed notebooks: Adam 1e-3, 10 epochs, batch 32, 224 px)'}")
    return 0


def add_commands(add) -> None:
    p = add("runs", cmd_runs, "list runs")
    p.add_argument("--json", action="store_true")
    add("presets", cmd_presets, "list named training recipes", workspace=False)
