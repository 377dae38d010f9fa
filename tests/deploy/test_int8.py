"""The studio and its exports decide alike: agreement figures in the card, a rule chosen again on the file's own
probabilities where they differ, and the int8 file with its accuracy check."""
import numpy as np
import pytest

from core.decide.rule import Rule, cost_matrix
from core.deploy import agreement as ag
from core.deploy.export import ExportError, export_run, read_onnx_card
from core.deploy.portable import OnnxPredictor

CLASSES = ["blank", "dot"]


def test_agreement_counts_argmax_and_rule_decisions():
    rule = Rule(CLASSES, cost_matrix(CLASSES, "dot").tolist(), positive="dot", threshold=0.5)
    studio = np.array([[0.9, 0.1], [0.505, 0.495], [0.2, 0.8]])
    file = np.array([[0.9, 0.1], [0.495, 0.505], [0.21, 0.79]])  # the second image crosses the threshold
    got = ag.agreement(studio, file, rule)
    assert got == {"n": 3, "argmax_agree": 2, "max_prob_diff": pytest.approx(0.01), "verdict_agree": 2}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, decided_run):
    """This module's own copy of the decided run's workspace (it saves a rule and writes exports)."""
    import shutil

    from core.workspace.store import Workspace
    root = tmp_path_factory.mktemp("int8") / "ws"
    shutil.copytree(decided_run[0].root, root)
    ws = Workspace(root)
    return ws, ws.run(decided_run[1].id)


def test_where_decisions_differ_the_rule_is_chosen_on_the_files_probabilities(monkeypatch, small_run):
    """A file whose probabilities are the studio's mirrored: the card's rule is fitted again on the file's validation
    probabilities, from the user's same costs, and says so; a file that agrees keeps the studio's rule. The saved
    rule's threshold is set (0.5), not fitted, so the disagreement does not depend on how the tiny model trained."""
    from core.decide.rule import fit_rule
    from core.decide.stored import clear_rule, save_rule
    ws, run = small_run
    classes = run.split()["classes"]
    parts = ag.parts_for_checking(ws, run, tuple(run.config().input_hw))
    studio = ag.studio_probs(ws, run, parts)
    rule = fit_rule(studio["val"], parts["val"][1], classes, positive="dot", cost_miss=5.0)  # a saved rule's inputs
    rule.threshold = 0.5
    save_rule(run, rule)
    assert all((np.abs(v[:, 1] - 0.5) > 1e-9).all() for v in studio.values())  # so a mirror crosses 0.5 everywhere
    mirrored = {k: v[:, ::-1].copy() for k, v in studio.items()}
    monkeypatch.setattr(ag, "onnx_probs", lambda path, x: mirrored[next(k for k, (px, _) in parts.items() if px is x)])
    checked = ag.check_file(ws, run, "unused.onnx", parts, studio)
    assert all(f["verdict_agree"] == 0 for k, f in checked["agreement"].items() if k != "rule" and f["n"])
    assert checked["agreement"]["rule"].startswith("chosen again on this file's validation probabilities")
    refit = Rule.from_dict(checked["rule"])
    assert refit.inputs == rule.inputs
    assert refit == fit_rule(mirrored["val"], parts["val"][1], classes, **rule.inputs)  # on the file's own probs
    monkeypatch.setattr(ag, "onnx_probs", lambda path, x: studio[next(k for k, (px, _) in parts.items() if px is x)])
    same = ag.check_file(ws, run, "unused.onnx", parts, studio)
    assert same["agreement"]["rule"].startswith("the studio's rule") and Rule.from_dict(same["rule"]) == rule
    clear_rule(run)


@pytest.mark.slow
def test_the_fp32_card_states_its_agreement_with_the_studio(small_run):
    ws, run = small_run
    card = export_run(ws, run.id, "onnx")["card"]
    split = run.split()
    for part in ("val", "test"):
        f = card["agreement"][part]
        assert f["n"] == len(split[part]) and 0 <= f["argmax_agree"] <= f["n"] and f["max_prob_diff"] < 0.05
    assert card["precision"] == "fp32" and card["agreement"]["golden"]["n"] == 0  # no golden set here


@pytest.mark.slow
def test_int8_is_smaller_checked_and_refused_when_it_loses_too_much(small_run, monkeypatch):
    """With the allowed loss set below zero every int8 file "loses too much": refused with its figures and nothing
    written, then written with --force, its card carrying the fp32 and int8 figures."""
    ws, run = small_run
    monkeypatch.setattr(ag, "MAX_INT8_DROP", -1.0)
    target = run.dir / "exports" / "strict.onnx"
    with pytest.raises(ExportError, match=r"int8 loses more than .*test accuracy .*nothing written"):
        export_run(ws, run.id, "onnx", out=target, int8=True)
    assert not list(target.parent.glob("*strict.onnx*"))
    out = export_run(ws, run.id, "onnx", out=target, int8=True, force=True)
    card = read_onnx_card(out["path"])
    q = card["int8"]
    assert card["precision"] == "int8" and q["forced"]
    assert q["int8"]["size_mb"] < 0.35 * q["fp32"]["size_mb"]  # int8 weights: about a quarter
    assert q["agreement_with_fp32"]["test"]["n"] == len(run.split()["test"])
    assert set(q["fp32"]["accuracy"]) == set(q["int8"]["accuracy"]) == {"val", "test", "golden"}
    predictor = OnnxPredictor(out["path"])  # the line-side predictor reads it as any other export
    assert predictor.predict([r[0] for r in run.split()["test"][:2]])[0]["top"]
