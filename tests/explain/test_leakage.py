"""A run's leakage report: near-duplicate groups that straddle its split, from the engine and the CLI."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, in_process, tiny_config, write_set_with_twins
from core.explain.leakage import run_duplicates


@pytest.fixture
def twins(tmp_path):
    return write_set_with_twins(tmp_path / "twins")


def test_runs_split_with_groups_do_not_leak_and_the_report_says_so(twins, workspace):
    from core.runs.life import prepare_run
    root, planted = twins
    plain = prepare_run(workspace, tiny_config(root))
    grouped = prepare_run(workspace, tiny_config(root, split_groups="duplicates"))
    r_plain = run_duplicates(workspace, plain)
    r_grouped = run_duplicates(workspace, grouped)
    assert r_plain["n_groups"] == r_grouped["n_groups"] == len(planted)
    assert r_plain["n_straddling"] > 0 and r_grouped["n_straddling"] == 0
    assert sum(r_plain["straddling_by_parts"].values()) == r_plain["n_straddling"]
    leaking = next(g for g in r_plain["groups"] if g["straddles"])
    assert len({m["part"] for m in leaking["members"]}) == 2
    assert {frozenset(g) for g in grouped.split()["kept_together"]} == {frozenset(p) for p in planted}
    assert "near-duplicate groups" in grouped.log_path.read_text()


@pytest.mark.slow
def test_duplicates_cli_reports_groups_and_leaks(twins, tmp_path, capsys):
    from core.runs.life import prepare_run
    from core.workspace.store import Workspace
    root, planted = twins
    ws = Workspace(tmp_path / "ws")
    run = prepare_run(ws, tiny_config(root))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "core", "--workspace", str(ws.root), *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    out = cli("duplicates", run.id, "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["n_groups"] == len(planted)
    assert report["n_straddling"] == sum(g["straddles"] for g in report["groups"]) > 0
    assert all({"path", "label", "part"} <= set(m) for g in report["groups"] for m in g["members"])
    # The rest through the same main() in this process: a process start costs seconds of imports each.
    status, text, _ = in_process(capsys, "duplicates", run.id, ws=ws.root)
    assert status == 0 and "LEAKS" in text and "--split-groups duplicates" in text
    status, _, err = in_process(capsys, "duplicates", run.id, "--by", "colour", ws=ws.root)
    assert status == 2 and err.startswith("error:") and "hash and/or features" in err
    status, _, err = in_process(capsys, "duplicates", "no-such-run", ws=ws.root)
    assert status == 2 and "no run" in err
    status, _, err = in_process(capsys, "duplicates", run.id, "--by", "features", ws=ws.root)
    assert status == 2 and "train it first" in err
