"""Studio start-up: seconds from a fresh `streamlit run app.py` to a page's title in a real browser (Chromium
through Playwright), and to the sidebar's device line (torch loads in the background after the first page).

    python bench/start_time.py [--repeats 3] [--pages / /train]

Each repeat starts a new server on a free port with an empty workspace. Also reports whether Streamlit's
auto-discovered page list (data-testid stSidebarNav) was ever seen while polling every 20 ms. Prints one JSON
document. The floor of the measure: a one-line Streamlit app takes about 1.4 s here to its title.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _common import environment, free_port  # noqa: E402

TITLES = {"/": "Image classifier studio", "/train": "Train", "/datasets": "Datasets", "/runs": "Runs"}


def one_start(browser, path: str) -> dict:
    port = free_port()
    env = dict(os.environ, STUDIO_WORKSPACE=tempfile.mkdtemp(prefix="studio-start-"))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                             "--server.address", "127.0.0.1"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1):
                    break
            except OSError:
                time.sleep(0.02)
        server_s = time.perf_counter() - t0
        page = browser.new_page()
        t1 = time.perf_counter()
        page.goto(f"http://127.0.0.1:{port}{path}")
        title_s = device_s = None
        auto_list_seen = False
        while time.perf_counter() - t1 < 60 and (device_s is None or title_s is None):
            auto_list_seen |= page.get_by_test_id("stSidebarNav").count() > 0
            if title_s is None and page.locator("h1", has_text=TITLES.get(path, "")).count():
                title_s = time.perf_counter() - t1
            if device_s is None and (page.get_by_text("Device: CPU").count() or page.get_by_text("Device: CUDA").count()):
                device_s = time.perf_counter() - t1
            time.sleep(0.02)
        page.close()
        return {"server_ready_s": round(server_s, 2), "title_s": title_s and round(title_s, 2),
                "device_line_s": device_s and round(device_s, 2), "auto_list_seen": auto_list_seen}
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pages", nargs="+", default=["/", "/train"])
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright
    results = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
        for path in args.pages:
            runs = [one_start(browser, path) for _ in range(args.repeats)]
            titles = [r["title_s"] for r in runs if r["title_s"] is not None]
            results[path] = {"title_median_s": round(statistics.median(titles), 2) if titles else None,
                             "auto_list_seen": any(r["auto_list_seen"] for r in runs), "runs": runs}
        browser.close()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(json.dumps({"benchmark": "start_time", "cpu": cpu, "cores": os.cpu_count(), "pages": results,
                      **environment()}, indent=2))


if __name__ == "__main__":
    main()
