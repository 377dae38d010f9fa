"""The prediction server under load: requests/s and latency at 1, 4 and 16 concurrent clients, each sending one
ELPV test image per request to `python -m core serve` (its own process, loopback only, bounded requests).

    python bench/serve_load.py [--size 224] [--requests 40] [--clients 1 4 16]

The model is an untrained resnet18 for the 2 ELPV classes (speed does not depend on the weights). Prints one
JSON document.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import requests  # noqa: E402

from _common import environment, start_server, untrained_elpv_run  # noqa: E402
from core.models.device import cpu_name  # noqa: E402


def load(url: str, images: list[bytes], clients: int, per_client: int) -> dict:
    latencies, errors = [], []

    def client(k: int):
        with requests.Session() as session:
            for i in range(per_client):
                data = images[(k * per_client + i) % len(images)]
                t = time.perf_counter()
                try:
                    r = session.post(f"{url}/predict", files={"files": ("cell.png", data, "image/png")}, timeout=120)
                    if r.status_code != 200:
                        errors.append(r.status_code)
                except requests.RequestException as exc:
                    errors.append(repr(exc))
                latencies.append(time.perf_counter() - t)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(latencies) * 1000
    return {"clients": clients, "requests": len(latencies), "errors": len(errors),
            "requests_per_s": round(len(latencies) / wall, 1), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p95_ms": round(float(np.percentile(ms, 95)), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--requests", type=int, default=40, help="requests per client")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ws, run, test_paths = untrained_elpv_run(tmp, args.size)
        images = [Path(p).read_bytes() for p in test_paths[:64]]
        proc, url = start_server(ws.root, run.id)
        try:
            load(url, images, 1, 5)  # warm-up: the first requests pick oneDNN's kernels
            rows = [load(url, images, c, args.requests) for c in args.clients]
            card = requests.get(f"{url}/model", timeout=10).json()
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
    print(json.dumps({"benchmark": "serve_load", "cpu": cpu_name(), "cores": os.cpu_count(), "image_size": args.size,
                      "classes": card["classes"], "one_image_per_request": True, "load": rows, **environment()},
                     indent=2))


if __name__ == "__main__":
    main()
