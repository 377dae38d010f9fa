"""A run's stored scores, temperature and decision rule: fitted after evaluation, read by every consumer."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from core.decide.calibration import MIN_VAL_FOR_CALIBRATION, calibrate, fit_temperature, nll, reliability
from core.decide.rule import DecisionError, Rule, coverage_curve, fit_rule, report, wilson_interval
from core.workspace.files import save_npz_atomic, write_json_atomic


@dataclass
class Scores:
    """A run's uncalibrated probabilities on its validation part and on the part it is evaluated on."""
    classes: list[str]
    val_probs: np.ndarray
    val_y: np.ndarray
    test_probs: np.ndarray
    test_y: np.ndarray
    test_part: str = "test"


def calibrate_run(run, scores: Scores) -> dict:
    """Fit the run's temperature on validation, keep the raw scores for later decisions, and return (and store)
    the calibration: T, and NLL / ECE / reliability bins on the evaluated part before and after."""
    t = fit_temperature(scores.val_probs, scores.val_y)
    before, after = scores.test_probs, calibrate(scores.test_probs, t)
    rel_before, rel_after = reliability(before, scores.test_y), reliability(after, scores.test_y)
    n_val = len(scores.val_y)
    note = (f"fewer than {MIN_VAL_FOR_CALIBRATION} validation images: not calibrated"
            if n_val < MIN_VAL_FOR_CALIBRATION else None)
    cal = {"temperature": t, "fitted_on": "val", "n_val": int(n_val), "note": note, "evaluated_on": scores.test_part,
           "n": int(len(scores.test_y)),
           "nll_before": nll(before, scores.test_y), "nll_after": nll(after, scores.test_y),
           "ece_before": rel_before["ece"], "ece_after": rel_after["ece"],
           "val_nll_before": nll(scores.val_probs, scores.val_y),
           "val_nll_after": nll(calibrate(scores.val_probs, t), scores.val_y),
           "reliability_before": rel_before["bins"], "reliability_after": rel_after["bins"]}
    save_npz_atomic(run.scores_path, classes=np.array(scores.classes), val_probs=scores.val_probs, val_y=scores.val_y,
                    test_probs=scores.test_probs, test_y=scores.test_y, test_part=np.array(scores.test_part))
    write_json_atomic(run.calibration_path, cal)
    return cal


def load_scores(run) -> Scores:
    if not run.scores_path.exists():
        raise DecisionError(f"run {run.id} has no stored scores: evaluate it first (Evaluate page, or "
                            f"`python -m core evaluate {run.id}`)")
    with np.load(run.scores_path) as z:
        return Scores([str(c) for c in z["classes"]], z["val_probs"], z["val_y"], z["test_probs"], z["test_y"],
                      str(z["test_part"]))


def _band_json(rule: Rule):
    if not rule.has_band:
        return None
    if rule.binary:
        lo, hi = rule.band_range()
        return {"p_low": lo, "p_high": hi, "none_needed": lo == hi}
    return {"min_confidence": rule.band, "none_needed": rule.band == 0}


def decide_run(run, positive: str | None = None, cost_miss: float = 1.0, cost_false_alarm: float = 1.0,
               cost: list[list[float]] | None = None, target_accuracy: float | None = None,
               review_budget: float | None = None, save: bool = True) -> dict:
    """Choose a rule on the run's validation part (calibrated), score it on the evaluated part, and save it with the
    run (Predict, the CLI, exports and the predictions CSV then use it). Returns the rule and both reports."""
    sc = load_scores(run)
    t = run.temperature()
    val, test = calibrate(sc.val_probs, t), calibrate(sc.test_probs, t)
    rule = fit_rule(val, sc.val_y, sc.classes, positive, cost_miss, cost_false_alarm, cost, target_accuracy,
                    review_budget)
    on_test, on_val = report(rule, test, sc.test_y), report(rule, val, sc.val_y)
    curves = {}
    for name, probs, y in (("val", val, sc.val_y), ("test", test, sc.test_y)):
        decided, margin, _ = rule.decide(probs)
        curves[name] = coverage_curve(margin, decided == y)
    if save:
        save_rule(run, rule)
    return {"run_id": run.id, "part": sc.test_part, "temperature": t, "threshold": rule.threshold,
            "test_cost": on_test["rule"]["cost"], "test_cost_argmax": on_test["argmax"]["cost"],
            "band": _band_json(rule), "band_reachable": rule.has_band or (target_accuracy is None
                                                                                 and review_budget is None),
            "coverage": on_test["coverage"], "band_accuracy": on_test["band_accuracy"],
            "val_band_interval": _val_interval(on_val),
            "rule": rule.to_dict(), "test": on_test, "val": on_val, "curves": curves}


def _val_interval(on_val: dict) -> list[float] | None:
    """The 95% interval of the accuracy the band was chosen on (the validation images decided automatically):
    a band chosen on a few hundred images can land below its target on test."""
    if on_val["coverage"] is None or on_val["band_accuracy"] is None:
        return None
    decided = on_val["n"] - on_val["reviewed"]
    found = wilson_interval(round(on_val["band_accuracy"] * decided), decided)
    return [round(found[0], 4), round(found[1], 4)] if found else None


def refit_saved_rule(run) -> Rule | None:
    """After a re-evaluation (new weights or temperature), choose the saved rule again from the user's same inputs."""
    old = load_rule(run)
    if old is None:
        return None
    try:
        return Rule.from_dict(decide_run(run, **old.inputs)["rule"])
    except DecisionError:
        clear_rule(run)  # the classes changed under it: a stale rule would decide wrongly
        return None


def save_rule(run, rule: Rule) -> None:
    write_json_atomic(run.rule_path, rule.to_dict())


def load_rule(run) -> Rule | None:
    return Rule.from_dict(json.loads(run.rule_path.read_text())) if run.rule_path.exists() else None


def clear_rule(run) -> None:
    run.rule_path.unlink(missing_ok=True)
