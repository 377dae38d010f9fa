"""Shared fixtures: small generated image sets (no network, no real data) and trained runs."""
from __future__ import annotations

import io
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("STUDIO_WORKSPACE", str(ROOT / "test-artifacts" / "default-workspace"))
# bf16-or-fp32 is measured once per machine (core/models/device.py); the tests measure afresh, as a cold machine would,
# and share the result with the processes they start (CLI, studio server).
os.environ.setdefault("STUDIO_PRECISION_CACHE", str(Path(tempfile.mkdtemp(prefix="studio-precision-")) / "p.json"))

# With pytest-xdist each worker is a process of its own: one CPU thread each, and for the processes they start
# (the environment is inherited; core/models/device.py's cpu_threads reads it), so that two workers on two cores
# do not fight over them. Alone, the suite uses up to two.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = 1 if WORKERS > 1 else max(1, min(2, os.cpu_count() or 1))
if WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

# Bytecode for the engine and pages before any test starts a thread (see precompile: a CPython 3.11 race between
# a thread compiling an import and Streamlit parsing a page, seen in CI on a fresh clone).
from core.runs.life import Reporter  # noqa: E402
from pages._ui import precompile  # noqa: E402

precompile()

torch.set_num_threads(THREADS)


def make_dot_image(rng: np.random.Generator, size: int, dot: bool, dot_size: int | None = None) -> tuple[np.ndarray, tuple]:
    """Gray noise; class "dot" adds a bright square somewhere. Returns (HxWx3 uint8, patch box or None)."""
    a = (rng.random((size, size, 3)) * 90 + 20).astype(np.uint8)
    box = None
    if dot:
        s = dot_size or size // 3
        y, x = rng.integers(0, size - s, 2)
        a[y:y + s, x:x + s] = 240
        box = (int(y), int(x), int(s))
    return a, box


def write_class_folders(root: Path, per_class: int = 30, size: int = 48, seed: int = 0,
                        classes=("blank", "dot")) -> Path:
    """A separable set: `dot` images hold a bright square, `blank` ones do not."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a, _ = make_dot_image(rng, size, dot=(c != classes[0]))
            Image.fromarray(a).save(root / c / f"{c}_{i:03d}.png")
    return root


TWINS = 8  # planted near-duplicate pairs per class


def near_copy(a: np.ndarray, kind: int) -> Image.Image:
    """A near-identical copy of an image: kind 0 re-saved as JPEG, 1 scaled up and back down, 2 the same."""
    im = Image.fromarray(a)
    if kind == 0:  # re-saved as JPEG
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind == 1:  # scaled up and back down
        return im.resize((a.shape[1] * 2, a.shape[0] * 2), Image.Resampling.BICUBIC).resize(
            (a.shape[1], a.shape[0]), Image.Resampling.LANCZOS)
    return im  # a byte-identical copy


def write_set_with_twins(root, per_class=24, size=48, seed=0):
    """Two classes of dot images; the first TWINS images of each class have a near-identical twin in the same
    class folder. Returns the root and the planted pairs as (original path, twin path)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for c in ("blank", "dot"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            a, _ = make_dot_image(rng, size, dot=(c == "dot"))
            path = root / c / f"{c}_{i:03d}.png"
            Image.fromarray(a).save(path)
            if i < TWINS:
                twin = root / c / f"{c}_{i:03d}_twin.png"
                near_copy(a, i % 3).save(twin)
                pairs.append((str(path), str(twin)))
    return root, pairs


@pytest.fixture
def dot_folder(tmp_path) -> Path:
    return write_class_folders(tmp_path / "dots")


@pytest.fixture
def workspace(tmp_path):
    from core.workspace.store import Workspace
    return Workspace(tmp_path / "ws")


def pytest_addoption(parser):
    parser.addoption("--train-seed", type=int, default=0,
                     help="the seed of the tests' tiny trainings (tiny_config): a test that passes for one seed "
                          "only leans on a trained model's luck")


def pytest_configure(config):
    os.environ["STUDIO_TEST_TRAIN_SEED"] = str(config.getoption("--train-seed"))  # xdist workers inherit it


def tiny_config(data, **over):
    from core.config import TrainConfig
    base = dict(data=str(data), weights="none", image_size=32, epochs=4, batch_size=16, hflip=False,
                seed=int(os.environ.get("STUDIO_TEST_TRAIN_SEED", "0")), num_threads=THREADS)
    base.update(over)
    return TrainConfig(**base)


def plant_seeded_weights(checkpoint, seed: int = 0) -> None:
    """Replace a trained checkpoint's weights by a seeded random initialization of the same model. A test that needs
    a model whose output responds to a flip or a turn uses it instead of the trained weights: a model trained for a
    few epochs on a tiny set can be saturated (p = 0.99999) on one CPU and not on another, while a random ResNet's
    probabilities sit near 1/classes and change with any transform of the image (its filters are not symmetric)."""
    from core.models.checkpoint import load_checkpoint, save_checkpoint
    from core.models.resnet import build_model
    state, meta, _ = load_checkpoint(checkpoint)
    cfg = meta["config"]
    torch.manual_seed(seed)
    model = build_model(cfg["arch"], len(meta["classes"]), "none", cfg.get("dropout", 0.0))
    assert set(model.state_dict()) == set(state)
    save_checkpoint(checkpoint, model.state_dict(), meta)


class StopAfter(Reporter):
    """A reporter that asks to stop after `batches` training batches (the Stop button, at a known moment)."""
    def __init__(self, batches):
        self.batches_left = batches
        self.seen = 0

    def batch(self, epoch, batch, batches, images_per_s):
        self.seen += 1
        self.batches_left -= 1

    def should_stop(self):
        return self.batches_left <= 0


def write_graded_folders(root, per_class=16, size=40):
    """Three grades by the size of a bright square: 1_none < 2_small < 3_large."""
    rng = np.random.default_rng(0)
    for grade, side in (("1_none", 0), ("2_small", 6), ("3_large", 16)):
        (root / grade).mkdir(parents=True)
        for i in range(per_class):
            a = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            if side:
                y, x = rng.integers(0, size - side, 2)
                a[y:y + side, x:x + side] = 230
            Image.fromarray(a).save(root / grade / f"{i:02d}.png")
    return root


@pytest.fixture(scope="session")  # decide/test_stored.py, studies/test_learning_curve.py
def decided_run(tmp_path_factory):
    """A run that errs now and then (one epoch on small dots), evaluated: scores and temperature stored."""
    from core.infer.evaluate import evaluate_run
    from core.runs import life as runs
    from core.runs.life import prepare_run
    from core.train.loop import fit
    from core.workspace.store import Workspace
    tmp = tmp_path_factory.mktemp("decide")
    data = write_class_folders(tmp / "dots", per_class=60, size=32, seed=5)
    ws = Workspace(tmp / "ws")
    run = prepare_run(ws, tiny_config(data, image_size=32, epochs=1))
    assert runs.execute(ws, run.id, lambda: fit(ws, run), runs.Reporter())["status"] == "done"
    metrics = evaluate_run(ws, run)
    return ws, run, metrics, data


@pytest.fixture
def twins(tmp_path):
    return write_set_with_twins(tmp_path / "twins")


SIZE = 128


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    # 128 px: layer4 is then 4x4, fine enough for Grad-CAM to localise a 42 px square
    """One run trained to the end on a generated set; shared by evaluation, Grad-CAM, predict, CLI tests."""
    from core.runs.life import prepare_run
    from core.train.loop import fit
    from core.workspace.store import Workspace
    tmp = tmp_path_factory.mktemp("trained")
    data = write_class_folders(tmp / "dots", per_class=40, size=SIZE, seed=1)
    ws = Workspace(tmp / "ws")
    cfg = tiny_config(data, image_size=SIZE, epochs=8, batch_size=16)
    from core.runs import life as runs
    run = prepare_run(ws, cfg)
    result = runs.execute(ws, run.id, lambda: fit(ws, run), runs.Reporter())
    return {"ws": ws, "run": run, "result": result, "data": data, "size": SIZE}


def train_small_run(tmp: Path, tta: bool, seed: int):
    """(workspace, run) of a 48 px run trained to the end, flip-augmented, with or without TTA."""
    from core.runs import life as runs
    from core.runs.life import prepare_run
    from core.train.loop import fit
    from core.workspace.store import Workspace
    data = write_class_folders(tmp / "dots", per_class=24, size=48, seed=seed)
    ws = Workspace(tmp / "ws")
    run = prepare_run(ws, tiny_config(data, image_size=48, epochs=2, tta=tta, hflip=True))
    result = runs.execute(ws, run.id, lambda: fit(ws, run), runs.Reporter())
    assert result["status"] == "done", result
    return ws, run


def without_torch(tmp: Path) -> dict:
    """An environment for a child process in which `import torch` (and torchvision) fails."""
    fake = tmp / "no-torch"
    for name in ("torch", "torchvision"):
        (fake / name).mkdir(parents=True, exist_ok=True)
        (fake / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed on this machine')\n")
    return dict(os.environ, PYTHONPATH=str(fake))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server a test or benchmark starts)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
