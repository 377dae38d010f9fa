"""The prediction server under hostile load: does it stay up, in bounded memory, and answer every normal request?

    python bench/serve_abuse.py [--seconds 60] [--normal 10] [--giants 3] [--floods 3] [--size 224]

`python -m core serve` (its own process, loopback, default limits: 20 MB a file, 64 MB a request, 4 requests at a
time, 10 s of queue) on an untrained ELPV ResNet18 for the whole time, while 16 clients send at once:
- normal: one ELPV test image per request; on 503 a client waits Retry-After and sends it again, as clients should;
- giants: 16-bit grayscale PNGs of 8000x7999 pixels (under the pixel limit; 1.7 GB each to decode before issue 36),
  as many per request as the per-request limit lets through;
- floods: chunked bodies with no Content-Length that never end (a 30 MB file part, sent until refused).
The server's peak resident memory is read from /proc (VmHWM) at the end. Prints one JSON document.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import requests  # noqa: E402
from PIL import Image  # noqa: E402

from _common import environment, start_server, untrained_elpv_run  # noqa: E402
from core.models.device import cpu_name  # noqa: E402


def giant_png() -> bytes:
    a = (np.indices((7999, 8000)).sum(0) * 7 % 65536).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def flood(url: str) -> str:
    """A chunked body that would go on for 30 MB in one file part: what the server answers, and when."""
    host, port = url.rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /predict HTTP/1.1\r\nHost: {host}:{port}\r\nTransfer-Encoding: chunked\r\n"
                     "Content-Type: multipart/form-data; boundary=b\r\n\r\n".encode())
        head = b'--b\r\nContent-Disposition: form-data; name="files"; filename="flood.png"\r\n\r\n'
        chunk = b"\0" * 65536
        try:
            sock.sendall(f"{len(head):x}\r\n".encode() + head + b"\r\n")
            for _ in range(30 * 16):
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        except OSError:
            pass  # refused mid-body: the server closed the connection
        try:
            reply = sock.recv(200)
        except OSError:
            return "reset"
        return reply.split(b" ", 2)[1].decode() if reply.startswith(b"HTTP/") else "closed"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--normal", type=int, default=10, help="clients sending one normal image per request")
    ap.add_argument("--giants", type=int, default=3, help="clients sending 16-bit 8000x7999 PNGs")
    ap.add_argument("--floods", type=int, default=3, help="clients sending endless chunked bodies")
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    giant = giant_png()
    per_request = min(32, int(64 * 2**20 // (len(giant) + 512)))
    with tempfile.TemporaryDirectory() as tmp:
        ws, run, test_paths = untrained_elpv_run(tmp, args.size)
        images = [Path(p).read_bytes() for p in test_paths[:64]]
        proc, url = start_server(ws.root, run.id)
        requests.post(f"{url}/predict", files={"files": ("w.png", images[0])}, timeout=60)  # warm-up
        baseline_mb = _status_mb(proc.pid, "VmRSS")
        stop = time.perf_counter() + args.seconds
        counts: dict[str, dict[str, int]] = {"normal": {}, "giant": {}, "flood": {}}
        normal_ms: list[float] = []
        health_ms: list[float] = []
        lock = threading.Lock()

        def count(kind: str, outcome) -> None:
            with lock:
                counts[kind][str(outcome)] = counts[kind].get(str(outcome), 0) + 1

        def normal(k: int) -> None:
            with requests.Session() as s:
                i = 0
                while time.perf_counter() < stop:
                    t = time.perf_counter()
                    while True:  # a well-behaved client: on 503 wait Retry-After, then the same request again
                        try:
                            r = s.post(f"{url}/predict", files={"files": ("cell.png", images[(k + i) % 64])},
                                       timeout=120)
                            outcome = r.status_code
                        except requests.RequestException as exc:
                            outcome = type(exc).__name__
                        if outcome != 503:
                            break
                        count("normal", "503 (retried)")
                        time.sleep(float(r.headers.get("Retry-After", "1")))
                    count("normal", outcome)
                    with lock:
                        normal_ms.append((time.perf_counter() - t) * 1000)
                    i += 1

        def giants() -> None:
            files = [("files", (f"g{i}.png", giant, "image/png")) for i in range(per_request)]
            while time.perf_counter() < stop:
                try:
                    count("giant", requests.post(f"{url}/predict", files=files, timeout=300).status_code)
                except requests.RequestException as exc:
                    count("giant", type(exc).__name__)

        def floods() -> None:
            while time.perf_counter() < stop:
                count("flood", flood(url))

        def health() -> None:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                try:
                    requests.get(f"{url}/health", timeout=30)
                    health_ms.append((time.perf_counter() - t) * 1000)
                except requests.RequestException:
                    health_ms.append(float("inf"))
                time.sleep(0.5)

        threads = ([threading.Thread(target=normal, args=(k,)) for k in range(args.normal)]
                   + [threading.Thread(target=giants) for _ in range(args.giants)]
                   + [threading.Thread(target=floods) for _ in range(args.floods)] + [threading.Thread(target=health)])
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        alive = proc.poll() is None
        peak_mb = _status_mb(proc.pid, "VmHWM") if alive else None
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    ms = np.array(normal_ms)
    print(json.dumps({
        "benchmark": "serve_abuse", "cpu": cpu_name(), "cores": os.cpu_count(), "seconds": args.seconds,
        "clients": {"normal": args.normal, "giants": args.giants, "floods": args.floods},
        "giant_png_bytes": len(giant), "giants_per_request": per_request, "server_alive": alive,
        "server_rss_mb_after_warmup": baseline_mb, "server_peak_rss_mb": peak_mb, "outcomes": counts,
        "normal_answered_200": counts["normal"].get("200", 0),
        "normal_failed": sum(v for k, v in counts["normal"].items() if k not in ("200", "503 (retried)")),
        "normal_p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
        "normal_p95_ms": round(float(np.percentile(ms, 95)), 1) if len(ms) else None,
        "health_max_ms": round(max(health_ms), 1) if health_ms else None,
        **environment()}, indent=2))


def _status_mb(pid: int, field: str) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


if __name__ == "__main__":
    main()
