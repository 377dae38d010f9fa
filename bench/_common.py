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
