"""Ordered classes (cfg.ordinal): the loss charges by grades off, and an ordinal run reports its grade error."""
import numpy as np
import pytest
import torch

from conftest import tiny_config, write_graded_folders
from core.runs.life import prepare_run
from core.train.loop import build_trainer, fit
from core.train.losses import OrdinalLoss, build_criterion


def logits_for(probs):
    return torch.tensor(probs, dtype=torch.float32).log()


def test_ordinal_loss_charges_more_the_more_grades_off():
    ce, ordinal = build_criterion(False), build_criterion(True)
    target = torch.tensor([0])
    one_off = logits_for([[0.4, 0.5, 0.05, 0.05]])
    three_off = logits_for([[0.4, 0.05, 0.05, 0.5]])
    # Cross-entropy sees only the true class's probability: the same for both.
    assert ce(one_off, target).item() == pytest.approx(ce(three_off, target).item(), abs=1e-6)
    assert ordinal(three_off, target).item() > ordinal(one_off, target).item() + 0.3
    # Right and certain: the ordinal term vanishes.
    sure = logits_for([[1 - 3e-6, 1e-6, 1e-6, 1e-6]])
    assert ordinal(sure, target).item() == pytest.approx(ce(sure, target).item(), abs=1e-4)


def test_ordinal_loss_takes_class_indices_or_distributions():
    loss = OrdinalLoss(torch.nn.CrossEntropyLoss())
    logits = torch.randn(5, 4)
    y = torch.tensor([0, 1, 2, 3, 1])
    onehot = torch.nn.functional.one_hot(y, 4).float()
    assert loss(logits, y).item() == pytest.approx(loss(logits, onehot).item(), rel=1e-5)
    between = torch.tensor([[0.0, 0.5, 0.5, 0.0]])  # a soft label half-way between grades 1 and 2
    near, far = logits_for([[0.05, 0.45, 0.45, 0.05]]), logits_for([[0.45, 0.05, 0.05, 0.45]])
    assert loss(near, between).item() < loss(far, between).item()


def test_class_weights_and_smoothing_reach_the_cross_entropy_part():
    w = torch.tensor([1.0, 3.0])
    crit = build_criterion(True, w, 0.1)
    assert torch.equal(crit.ce.weight, w) and crit.ce.label_smoothing == 0.1





def test_an_ordinal_run_trains_with_the_ordinal_loss_and_reports_grade_error(tmp_path, workspace):
    from core.runs.life import Reporter
    data = write_graded_folders(tmp_path / "graded")
    run = prepare_run(workspace, tiny_config(data, epochs=2, ordinal=True, val_fraction=0.25, test_fraction=0.25))
    assert isinstance(build_trainer(workspace, run, run.config(), Reporter()).criterion, OrdinalLoss)
    assert fit(workspace, run)["status"] == "done"
    ev = run.evaluation()
    cm = np.array(ev["confusion_matrix"])
    grades_off = np.abs(np.arange(3)[:, None] - np.arange(3)[None, :])
    assert ev["grade_mae"] == pytest.approx((cm * grades_off).sum() / cm.sum())


def test_ordinal_cost_matrix_decides_the_median_grade():
    from core.decide.rule import Rule, cost_matrix
    grades = ["g0", "g1", "g2", "g3"]
    cost = cost_matrix(grades, ordinal=True)
    assert cost[0].tolist() == [0, 1, 2, 3] and cost[3, 1] == 2
    assert cost_matrix(["a", "b"], "b", 5, 1, ordinal=True)[1, 0] == 5  # a positive class keeps its costs
    rule = Rule(classes=grades, cost=cost.tolist())
    probs = np.array([[0.45, 0.10, 0.10, 0.35]])  # argmax: grade 0; half the mass is reached at grade 1
    decided, _, _ = rule.decide(probs)
    assert probs.argmax(1)[0] == 0 and decided[0] == 1
