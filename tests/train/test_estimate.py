"""The time estimate before a run: the run's own arithmetic over the engine's own timed step."""

import pytest

from conftest import tiny_config


def test_the_estimate_is_the_runs_arithmetic():
    from core.train.estimate import estimate_seconds
    # decode 1400 images x 10 ms on 2 threads = 7 s; an epoch = 1000/50 + 200/3/50 s; the test with TTA = 3 passes
    got = estimate_seconds(10, 1000, 200, 200, images_per_s=50, decode_s_per_image=0.01, tta=True, workers=2)
    assert got == pytest.approx(7 + 10 * (20 + 200 / 3 / 50) + 200 / 3 * 3 / 50)
    assert estimate_seconds(1, 100, 0, 0, images_per_s=100) == pytest.approx(1.0)
    # checkpoints: a 1 s epoch with 0.05 s of writes writes every epoch; with 0.5 s of writes (longer than a
    # ninth of the epoch) it is written every few epochs, adding a ninth of the epoch
    assert estimate_seconds(10, 100, 0, 0, images_per_s=100, write_s=0.05) == pytest.approx(10 * 1.05)
    assert estimate_seconds(10, 100, 0, 0, images_per_s=100, write_s=0.5) == pytest.approx(10 * (1 + 1 / 9))


def test_an_estimate_times_the_engines_own_step(dot_folder, workspace):
    from core.train.estimate import estimate_run
    est = estimate_run(workspace, tiny_config(dot_folder, epochs=3, batch_size=8))
    assert est.images_per_s > 0 and est.decode_s_per_image > 0 and est.seconds > 0
    assert sum(est.counts.values()) == 60 and est.text().startswith("about ")
    assert workspace.list_runs() == []  # nothing was trained or created


def test_a_steps_timing_is_kept_for_its_shape_and_the_faster_of_two_wins(monkeypatch):
    import core.train.estimate as estimate
    from core.config import TrainConfig
    speeds = iter([100.0, 300.0, 200.0, 50.0, 400.0])
    timed = []

    def timed_steps(cfg, device=None, steps=4):
        timed.append(cfg.batch_size)
        return next(speeds), None, None
    monkeypatch.setattr(estimate, "_timed_training_steps", timed_steps)
    monkeypatch.setattr(estimate, "checkpoint_write_seconds", lambda model, opt: 0.25)
    monkeypatch.setattr(estimate, "_step_timings", {})
    a = TrainConfig(data="/first", weights="none", image_size=32, batch_size=8)
    first = estimate.time_step(a)
    assert (first.images_per_s, first.takes, timed) == (100.0, 1, [8])
    # another dataset, seed or epoch count: the same step, not timed again
    same = estimate.time_step(TrainConfig(data="/second", weights="none", image_size=32, batch_size=8, epochs=3, seed=4))
    assert same.images_per_s == 100.0 and timed == [8]
    assert estimate.time_step(a, fresh=True).images_per_s == 300.0 and timed == [8, 8]  # timed, the faster kept
    assert estimate.time_step(a, fresh=True).images_per_s == 300.0  # 200 is slower: 300 stays
    assert estimate.time_step(a).takes == 3
    other = estimate.time_step(TrainConfig(data="/first", weights="none", image_size=32, batch_size=16))
    assert other.images_per_s == 50.0 and timed == [8, 8, 8, 16]  # another batch size is another step
    monkeypatch.setattr(estimate, "STEP_TIMING_TTL_S", 0.0)  # too old: timed again, the old figure forgotten
    old = estimate.time_step(a)
    assert (old.images_per_s, old.takes) == (400.0, 1) and len(timed) == 5
