"""Temperature scaling and the expected calibration error, on hand-made probabilities."""
from __future__ import annotations

import numpy as np
import pytest

from core.decide.calibration import calibrate, ece, fit_temperature, nll


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_temperature_lowers_the_nll_of_overconfident_logits_and_recovers_the_scale():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 1.5, (4000, 4))
    y = np.array([rng.choice(4, p=row) for row in _softmax(z)])
    overconfident = _softmax(3.0 * z)  # what a model trained too long says: the true logits times 3
    t = fit_temperature(overconfident, y)
    assert t == pytest.approx(3.0, rel=0.1)
    assert nll(calibrate(overconfident, t), y) < nll(overconfident, y) - 0.1
    assert ece(calibrate(overconfident, t), y) < ece(overconfident, y) / 2
    np.testing.assert_array_equal(calibrate(overconfident, t).argmax(1), overconfident.argmax(1))


def test_temperature_stays_finite_when_validation_is_all_right():
    probs = np.array([[0.7, 0.3], [0.2, 0.8]] * 10)
    y = np.array([0, 1] * 10)
    t = fit_temperature(probs, y)
    assert 0.05 < t < 1.0  # sharpened, but not to certainty (Platt's targets: 1 - 1/22)
    assert calibrate(probs, t).max() < 0.99
    certain = np.array([[0.999, 0.001], [0.002, 0.998]] * 10)
    assert fit_temperature(certain, y) == 1.0  # all right and sure of it: nothing says soften


def test_ece_of_hand_made_confidences():
    right = np.array([[0.8, 0.2]] * 10)
    y = np.array([0] * 8 + [1] * 2)  # 80% confident, 80% right
    assert ece(right, y) == pytest.approx(0.0)
    over = np.array([[0.9, 0.1]] * 10)
    y = np.array([0] * 5 + [1] * 5)  # 90% confident, 50% right
    assert ece(over, y) == pytest.approx(0.4)
