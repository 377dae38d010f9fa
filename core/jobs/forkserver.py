"""Training processes forked from a warm server that has torch imported already.

A training process started afresh spends its first seconds importing torch, torchvision (which imports torch's
compiler stack) and the studio's training modules: 5 to 8 CPU-seconds on a 2-core machine, before the first
batch, for every job. The studio instead starts one server process (`python -m core.jobs.forkserver`) the first
time it trains; the server imports all that once and then forks each training process from itself, which then runs
`python -m core job RUN_ID` exactly as a fresh process would (`core.cli.main.main`). What stays the same:

- a training process is a process of its own, in a session of its own, its output appended to the run's
  process.log, its pid the one the run records; killing it (even the out-of-memory killer's SIGKILL) ends it and
  never the studio, and its exit status reaches the job thread as Popen's returncode would (negative: a signal);
- it stops when the studio that started it is gone (worker.stop_with_parent watches its parent, the server, and the
  server exits as soon as the studio's end of its pipe closes);
- its environment and working directory are the studio's at the moment it starts.
What differs: `ps` shows it as `python -m core.jobs.forkserver` (the run records its pid), and should the server
itself die while trainings run (it never exits while the studio lives), they stop as they would with the studio
gone: "stopped", best checkpoint kept, resumable.

Why this is safe: the server never runs a torch operation, never touches CUDA (forking after CUDA is initialised is
what breaks) and never starts a thread, so each child is forked from a single-threaded process with nothing in
flight. Linux only (macOS forbids fork after some system frameworks are loaded); elsewhere, or with
STUDIO_FORKSERVER=0, every training process is started afresh with subprocess as before.

The protocol is JSON lines. The studio writes {"id", "argv", "log", "env", "cwd"}; the server answers
{"id", "pid"} (or {"id", "error"}) at once and {"exited": pid, "code": returncode} when it reaps the child.

No torch in the studio's half of this module (it runs in the studio); the server's half imports it in `serve`.
"""
from __future__ import annotations

import itertools
import json
import os
import select
import signal
import subprocess
import sys
import threading

ENABLE = "STUDIO_FORKSERVER"  # "0": start every training process afresh (subprocess), as on macOS and Windows
READY_TIMEOUT_S = 300.0  # a cold machine's first import of torch reads a few hundred MB from disk
# What a training process imports before it trains (core.cli.main imports the command groups lazily).
PRELOAD = ("torch", "torchvision", "core.cli.main", "core.cli.train", "core.jobs.worker", "core.train.loop",
           "core.infer.evaluate", "core.models.resnet", "core.studies.curation", "core.studies.learning_curve")


def enabled() -> bool:
    return sys.platform.startswith("linux") and os.environ.get(ENABLE, "1") != "0"


class ForkedProcess:
    """A training process forked by the server: the part of subprocess.Popen the job thread uses."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None
        self._exited = threading.Event()

    def _set_exit(self, code: int | None) -> None:
        self.returncode = code
        self._exited.set()

    def wait(self, timeout: float | None = None) -> int | None:
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired(f"training process {self.pid}", timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The studio's handle on its server process: one per studio process, shared by its job threads."""

    def __init__(self, env: dict):
        self._proc = subprocess.Popen([sys.executable, "-m", "core.jobs.forkserver"], env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._answers: dict[int, dict] = {}
        self._answered = threading.Condition(self._lock)
        self._children: dict[int, ForkedProcess] = {}
        self._early_exits: dict[int, int] = {}  # reaped before the studio read the pid's answer
        self.alive = True
        # The server says so once its imports are done; one that cannot import torch exits (its traceback goes to
        # the studio's stderr) and the job starts afresh instead.
        ready, _, _ = select.select([self._proc.stdout], [], [], READY_TIMEOUT_S)
        if not ready or _message(self._proc.stdout.readline()).get("ready") is not True:
            self._proc.kill()
            self._proc.wait()
            raise OSError("the training fork server did not start")
        threading.Thread(target=self._read, name="forkserver-reader", daemon=True).start()

    def start(self, argv: list[str], log: str, env: dict, cwd: str) -> ForkedProcess:
        with self._lock:
            if not self.alive:
                raise OSError("the training fork server has exited")
            rid = next(self._ids)
            self._proc.stdin.write(json.dumps({"id": rid, "argv": argv, "log": log, "env": env,
                                               "cwd": cwd}).encode() + b"\n")
            self._proc.stdin.flush()
            while rid not in self._answers and self.alive:
                self._answered.wait(5.0)
            answer = self._answers.pop(rid, None)
            if answer is None or "error" in answer:
                raise OSError((answer or {}).get("error", "the training fork server has exited"))
            child = ForkedProcess(answer["pid"])
            if child.pid in self._early_exits:
                child._set_exit(self._early_exits.pop(child.pid))
            else:
                self._children[child.pid] = child
            return child

    def _read(self) -> None:
        for line in self._proc.stdout:
            msg = _message(line)
            with self._lock:
                if "exited" in msg:
                    child = self._children.pop(msg["exited"], None)
                    if child is not None:
                        child._set_exit(msg["code"])
                    else:
                        self._early_exits[msg["exited"]] = msg["code"]
                elif "id" in msg:
                    self._answers[msg["id"]] = msg
                    self._answered.notify_all()
        with self._lock:  # the server died (it never exits while the studio lives): no exit status will come
            self.alive = False
            self._answered.notify_all()
            orphans, self._children = list(self._children.values()), {}
        for child in orphans:
            threading.Thread(target=_watch_orphan, args=(child,), daemon=True).start()


def _message(line: bytes) -> dict:
    """One line of the server's: a JSON object, or {} for anything else (nothing else should reach this pipe)."""
    try:
        msg = json.loads(line)
    except ValueError:
        return {}
    return msg if isinstance(msg, dict) else {}


def _watch_orphan(child: ForkedProcess, interval_s: float = 0.5) -> None:
    """A child whose server died is no longer ours to reap: wait until its pid is gone; its status is unknown."""
    import time
    while True:
        try:
            os.kill(child.pid, 0)
        except ProcessLookupError:
            break
        except PermissionError:
            pass
        time.sleep(interval_s)
    child._set_exit(None)


_server: ForkServer | None = None
_server_lock = threading.Lock()


def server(env: dict) -> ForkServer:
    """This studio's fork server, started on first use (and again if it died)."""
    global _server
    with _server_lock:
        if _server is None or not _server.alive:
            _server = ForkServer(env)
        return _server


# ----------------------------------------------------------------------------------------------------
# The server process


def serve() -> None:
    import importlib
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C in the studio's terminal is the studio's to handle
    for name in PRELOAD:
        importlib.import_module(name)
    import torch
    out = sys.stdout.buffer

    def say(msg: dict) -> None:
        out.write(json.dumps(msg).encode() + b"\n")
        out.flush()

    say({"ready": True})
    pending = b""
    while True:
        readable, _, _ = select.select([0], [], [], 0.2)
        _reap(say)
        if not readable:
            continue
        data = os.read(0, 1 << 16)
        if not data:  # the studio is gone; the children notice their parent's exit and stop themselves
            return
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            if torch.cuda.is_initialized():  # never true: nothing here runs torch; a fork would not be safe
                say({"id": request["id"], "error": "the fork server initialised CUDA; restart the studio"})
                continue
            try:
                pid = os.fork()
            except OSError as exc:
                say({"id": request["id"], "error": f"could not fork a training process: {exc}"})
                continue
            if pid == 0:
                _run_child(request)  # never returns
            say({"id": request["id"], "pid": pid})


def _reap(say) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        say({"exited": pid, "code": os.waitstatus_to_exitcode(status)})


def _run_child(request: dict) -> None:
    """In the forked child: run `python -m core ARGV` (runpy, as the interpreter's -m does) with its output in the
    run's log, then exit with its status."""
    try:
        os.setsid()
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.closerange(3, 1 << 16)  # the server's pipes and anything else it had open
    except BaseException:  # noqa: BLE001 - no log to write to (a full disk): nothing may reach the server's pipe
        os._exit(1)
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.stdout.reconfigure(write_through=True)  # as PYTHONUNBUFFERED gives a fresh process
        sys.stderr.reconfigure(write_through=True)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        import numpy as np
        np.random.seed()  # numpy's global generator is seeded at import: each process gets its own, as before
        import runpy
        sys.argv = ["core", *request["argv"]]
        runpy.run_module("core", run_name="__main__", alter_sys=True)  # `python -m core ARGV`: it exits
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - as an uncaught exception ends a fresh process: traceback, status 1
        import traceback
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)


if __name__ == "__main__":
    serve()
