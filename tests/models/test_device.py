"""Device and precision: bf16 only where measured faster, per CPU, without touching the random state."""
import json

import pytest
import torch

from conftest import tiny_config
from core.runs.life import prepare_run
from core.train.loop import fit


@pytest.fixture
def fresh_precision(tmp_path, monkeypatch):
    import core.models.device as dev
    monkeypatch.setenv("STUDIO_PRECISION_CACHE", str(tmp_path / "precision.json"))
    monkeypatch.setattr(dev, "_measured", {})
    monkeypatch.setattr(dev, "cpu_supports_bf16", lambda: True)
    return dev


@pytest.mark.parametrize("fp32_s,bf16_s,chosen", [(1.0, 1.02, None), (1.0, 0.42, torch.bfloat16)],
                         ids=["xeon-like-0.98x", "epyc-like-2.4x"])
def test_cpu_bf16_only_where_measured_faster(fresh_precision, monkeypatch, fp32_s, bf16_s, chosen):
    dev, cpu, calls = fresh_precision, torch.device("cpu"), []
    monkeypatch.setattr(dev, "time_training_steps", lambda: calls.append(1) or {"fp32_s": fp32_s, "bf16_s": bf16_s})
    assert dev.autocast_dtype(cpu, "auto") == chosen
    assert dev.autocast_dtype(cpu, "bf16") == torch.bfloat16 and dev.autocast_dtype(cpu, "off") is None
    monkeypatch.setattr(dev, "_measured", {})  # another process on the same machine: reads the file
    assert dev.autocast_dtype(cpu, "auto") == chosen and calls == [1]
    saved = json.loads((dev.precision_cache_path()).read_text())
    assert [v["speedup"] for v in saved.values()] == [pytest.approx(fp32_s / bf16_s, abs=1e-3)]
    used = dev.describe_device(cpu).split(", ")[1].split(":")[0]
    assert used == ("bf16" if chosen else "fp32")


def test_a_cpu_of_the_same_name_but_another_generation_measures_again(fresh_precision, monkeypatch):
    """A home directory kept across machines: a VM's CPU is often just "AMD EPYC", whatever its generation."""
    dev, calls = fresh_precision, []
    monkeypatch.setattr(dev, "cpu_name", lambda: "AMD EPYC")
    monkeypatch.setattr(dev, "time_training_steps", lambda: calls.append(1) or {"fp32_s": 1.0, "bf16_s": 0.5 * len(calls)})
    monkeypatch.setattr(dev, "cpu_signature", lambda: "family 25 model 17 stepping 1; avx2 avx512f avx512_bf16")
    assert dev.cpu_bf16_measurement()["bf16"] is True               # 2x: measured on the first machine
    monkeypatch.setattr(dev, "_measured", {})                       # a later process on another machine
    monkeypatch.setattr(dev, "cpu_signature", lambda: "family 26 model 2 stepping 1; avx2 avx512f avx512_bf16")
    assert dev.cpu_bf16_measurement()["bf16"] is False and calls == [1, 1]  # 1x: its own measurement
    assert len(json.loads(dev.precision_cache_path().read_text())) == 2


def test_the_cpu_signature_names_family_model_and_precision_flags():
    from core.models.device import cpu_signature
    sig = cpu_signature()
    if sig:  # Linux
        assert sig.startswith("family ") and ("avx2" in sig or "no avx2" in sig)


def test_the_calibration_times_real_steps_and_leaves_the_random_state_alone():
    from core.models.device import time_training_steps
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    t = time_training_steps(size=32, batch=4, steps=1)
    assert set(t) == {"fp32_s", "bf16_s"} and all(0 < v < 60 for v in t.values())
    # A run seeds torch, then (first on a machine) measures: its initial weights must be the seed's all the same.
    assert torch.equal(torch.rand(3), expected)


def test_a_seed_trains_alike_whether_or_not_the_process_measured_the_precision(fresh_precision, dot_folder,
                                                                             tmp_path):
    from core.workspace.store import Workspace
    losses = []
    for name in ("measures", "reads"):  # the first fit measures bf16 (fresh cache file), the second reads it
        ws = Workspace(tmp_path / name)
        run = prepare_run(ws, tiny_config(dot_folder, epochs=1, amp="off"))
        fit(ws, run)
        losses.append(run.history()[0]["train_loss"])
    assert fresh_precision.precision_cache_path().exists()
    assert losses[0] == losses[1]
