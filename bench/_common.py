"""What the benchmarks share: a memory-peak sampler and the environment stamped on every JSON document."""
from __future__ import annotations

import platform
import threading
import time


def status_bytes(field: str) -> int:
    """A field of /proc/self/status (VmRSS, VmHWM, RssAnon, ...) in bytes; 0 where there is no /proc."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class MemoryPeak:
    """Peak of a /proc/self/status field while the block runs, sampled every 50 ms. VmRSS counts memory-mapped
    file pages (the disk-backed cache) too; RssAnon only memory the kernel cannot drop."""

    def __init__(self, field: str = "VmRSS"):
        self.field = field
        self.peak = 0

    def __enter__(self):
        self.peak = status_bytes(self.field)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, status_bytes(self.field))

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, status_bytes(self.field))


def environment() -> dict:
    import torch
    return {"torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


def untrained_elpv_run(root, size: int):
    """(workspace, run, test image paths): a run on ELPV's 70/15/15 split whose best.pt is an untrained resnet18
    written by the engine's own save_checkpoint (speed does not depend on the weights' values)."""
    import json
    from pathlib import Path

    from core.config import TrainConfig
    from core.data.sources import load_dataset
    from core.data.split import split_to_json, stratified_split
    from core.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from core.models.checkpoint import save_checkpoint
    from core.models.resnet import build_model
    from core.workspace.store import Workspace
    ds = load_dataset("elpv")
    split = split_to_json(ds, stratified_split(ds, 0.15, 0.15, 42))
    ws = Workspace(Path(root) / "ws")
    cfg = TrainConfig(data="elpv", weights="none", image_size=size)
    run = ws.create_run(cfg, "elpv")
    run.split_path.write_text(json.dumps(split))
    meta = {"run_id": run.id, "classes": ds.classes, "config": cfg.to_dict(),
            "normalization": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD},
            "input_hw": [size, size], "epoch": 1, "metrics": {}, "best": {"val_acc": 0.0}}
    save_checkpoint(run.best_path, build_model("resnet18", len(ds.classes)).state_dict(), meta)
    return ws, run, [row[0] for row in split["test"]]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server a test or benchmark starts)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ws_root, run_id: str):
    """(process, url): `python -m core serve RUN_ID` on a free loopback port with its default limits, once it answers
    /health. SystemExit if it exits first."""
    import subprocess
    import sys
    from pathlib import Path

    import requests
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "core", "--workspace", str(ws_root), "serve", run_id,
                             "--port", str(port)], cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            requests.get(f"{url}/health", timeout=2)
            return proc, url
        except requests.RequestException:
            if proc.poll() is not None:
                raise SystemExit("the server exited") from None
            time.sleep(0.3)


def emit(document: dict, out: str | None) -> int:
    """Print a benchmark's JSON document, and write it to `out` when given; the script's exit status."""
    import json
    from pathlib import Path
    text = json.dumps(document, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
    return 0
