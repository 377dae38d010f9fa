"""The command line's parser: one sub-command per operation, each registered by its command group."""
from __future__ import annotations

import argparse

from core.cli import deploy, release, review, runs, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m core", description="Train and inspect image classifiers.")
    parser.add_argument("--workspace", default=None, help="workspace folder (default ./workspace or $STUDIO_WORKSPACE)")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, fn, help_, workspace=True):
        """A sub-command. `workspace`: open the workspace for it (True), not at all (False), only when a
        function of the arguments says so, or "run": open it and check that it holds the run named."""
        p = sub.add_parser(name, help=help_)
        p.add_argument("--workspace", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        p.set_defaults(fn=fn, workspace_mode=workspace, json=False)
        return p

    for group in (train, review, deploy, release, runs):
        group.add_commands(add)
    return parser
