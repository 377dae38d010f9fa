"""The learning curve: the power-law fit, nested subsets, the job and the CLI."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT


def test_power_law_fit_recovers_known_parameters():
    from core.studies.learning_curve import fit_power_law, power_law_at
    n = np.array([100, 200, 400, 800, 1600])
    rng = np.random.default_rng(2)
    err = 0.9 * n ** -0.35 * np.exp(rng.normal(0, 0.01, len(n)))
    fit = fit_power_law(n, err)
    assert fit["a"] == pytest.approx(0.9, rel=0.1) and fit["b"] == pytest.approx(0.35, abs=0.02)
    mid, lo, hi = power_law_at(fit, 3200)
    assert lo < 0.9 * 3200 ** -0.35 < hi and mid == pytest.approx(0.9 * 3200 ** -0.35, rel=0.05)
    exact = fit_power_law(n[:4], 0.5 * n[:4] ** -0.5)
    assert exact["b"] == pytest.approx(0.5) and exact["se_b"] == pytest.approx(0, abs=1e-9)


def test_nested_subsets_are_stratified_and_grow_by_adding():
    from core.studies.learning_curve import nested_subsets
    rows = [[f"a{i}", "a"] for i in range(40)] + [[f"b{i}", "b"] for i in range(8)]
    subs = nested_subsets(rows, ["a", "b"], (0.25, 0.5, 1.0), seed=3)
    assert [sum(r[1] == "a" for r in subs[f]) for f in (0.25, 0.5, 1.0)] == [10, 20, 40]
    assert [sum(r[1] == "b" for r in subs[f]) for f in (0.25, 0.5, 1.0)] == [2, 4, 8]
    assert {r[0] for r in subs[0.25]} <= {r[0] for r in subs[0.5]} <= {r[0] for r in subs[1.0]}


@pytest.mark.slow
def test_learning_curve_job_measures_each_fraction_and_advises(decided_run):
    from core.jobs.queue import JobManager
    from core.runs import life as runs
    from core.studies.learning_curve import latest_for, read_learning_curve
    ws, run, _, _ = decided_run
    jm = JobManager(ws)
    lc_id = jm.submit_learning_curve(run.id, epochs=1)
    assert jm.wait(lc_id, timeout=300).status == "done", ws.run_row(lc_id)["error"]
    lc = read_learning_curve(ws.run(lc_id))
    assert [p["fraction"] for p in lc["points"]] == [0.25, 0.5, 0.75, 1.0]
    n = [p["n_train"] for p in lc["points"]]
    assert n == sorted(n) and n[-1] == len(run.split()["train"])
    assert lc["held_out"] == "test" and len(lc["advice"]) == 2
    assert latest_for(ws, run.id).id == lc_id
    assert runs.last_run(ws, run.config().data).id == run.id  # a study of a run is not offered as its recipe


@pytest.mark.slow
def test_learning_curve_cli(decided_run):
    ws, run, _, _ = decided_run
    out = subprocess.run([sys.executable, "-m", "core", "--workspace", str(ws.root), "learning-curve", run.id,
                          "--epochs", "1", "--quiet", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["status"] == "done" and len(doc["points"]) == 4 and set(doc["fits"]) == {"blank", "dot"}
