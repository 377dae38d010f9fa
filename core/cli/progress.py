"""The command line's progress reporter: a one-line bar on stderr, log lines above it."""
from __future__ import annotations

import sys
import time

from core.jobs.worker import stop_requested
from core.runs.life import Reporter


class ProgressBar(Reporter):
    """A one-line progress bar on stderr; epoch summaries and log lines above it, and in the run's log.txt
    (as a studio job writes it) when a run is given."""

    def __init__(self, stream=None, quiet: bool = False, run=None):
        # sys.stderr as it is now, not as it was when this module was imported (a caller may have replaced it since)
        self.stream, self.quiet, self.run = stream or sys.stderr, quiet, run
        self._last = 0.0
        self._tty = self.stream.isatty()

    def _line(self, text: str, final: bool = False) -> None:
        if self.quiet:
            return
        if self._tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        elif final:
            self.stream.write(text + "\n")
        self.stream.flush()

    def log(self, message: str) -> None:
        self._line(message, final=True)
        if self.run is not None:
            self.run.log(message)

    def stage(self, name: str, done: int = 0, total: int = 0) -> None:
        if total and time.monotonic() - self._last > 0.2:
            self._last = time.monotonic()
            self._line(f"{name}: {done}/{total}", final=done >= total and not self._tty)

    def should_stop(self) -> bool:
        """The studio's Stop reaches a run started here too (core/jobs/worker.py's stop request)."""
        return self.run is not None and stop_requested(self.run)

    def batch(self, epoch: int, batch: int, batches: int, images_per_s: float) -> None:
        if time.monotonic() - self._last < 0.2 and batch < batches:
            return
        self._last = time.monotonic()
        width = 30
        filled = int(width * batch / max(batches, 1))
        self._line(f"epoch {epoch} [{'#' * filled}{'.' * (width - filled)}] {batch}/{batches} "
                   f"{images_per_s:.0f} img/s")
