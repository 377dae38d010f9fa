"""Shared fixtures: small generated image sets (no network, no real data) and trained runs."""
from __future__ import annotations

import io
import os
import shutil
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
# Studios without the example dataset (studio/test_pages.py checks that one is registered by default): every Train
# page would otherwise scan and time ELPV's 2,624 images before the test picks its own small set.
os.environ.setdefault("STUDIO_EXAMPLE", "0")
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


# Two workers, whole modules: pytest-xdist hands each worker a module at a time (its module-scoped fixtures are then
# built once), the longest first, so that the last minute holds short modules that even the two out (the longest
# processing time rule). Seconds per module measured on 2 workers (2026-12-03, AMD EPYC, 2 cores). Only the order
# depends on these figures, never a result: a stale list costs balance, not a failure. Seen with the default
# scheduling: one worker still had a minute of torchrun tests queued when the other ran out (404 s against 336 s).
LONGEST_FIRST = ["studio/test_pages.py",         # 76 s
                 "studio/test_browser.py",       # 57
                 "train/test_distributed.py",    # 63
                 "benches/test_benches.py",      # 61
                 "infer/test_tta.py",            # 52
                 "deploy/test_export.py",        # 49
                 "deploy/test_release.py",       # 55
                 "explain/test_cam_audit.py",    # 47
                 "studies/test_curation.py",     # 41
                 "test_faults.py",               # 35
                 "jobs/test_queue.py",           # 33
                 "train/test_loop.py",           # 27
                 "cli/test_cli.py",              # 27
                 "runs/test_life.py",            # 25
                 "deploy/test_int8.py",          # 25
                 "deploy/test_watch.py",         # 22
                 "studies/test_learning_curve.py"]  # 23; the rest: under 20 s each, in pytest's order


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadFileScheduling
    config.option.loadscopereorder = False  # keep the order below (xdist would sort by test count)
    return LoadFileScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        path = item.path.as_posix()
        return next((i for i, name in enumerate(LONGEST_FIRST) if path.endswith("tests/" + name)), len(LONGEST_FIRST))
    items.sort(key=rank)  # stable: the order inside a module, and of the other modules, is pytest's


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


def brightness_of(clf, level: int) -> float:
    """What the model's first convolution sees (normalized red) in a uniform image of this gray level."""
    x = torch.full((1, 8, 8, 3), level, dtype=torch.uint8)
    return float(clf.normalizer(x)[0, 0].mean())


def plant_bright_spot_detector(ws, run, positive: str, low: int, high: int) -> None:
    """Replace the run's weights by a ResNet18 whose answer is known by construction: its stem's channel 0 fires
    where the red channel is brighter than (low + high) / 2 over a 7x7 window (the other 63 channels are off),
    every residual branch is switched off (bn2 = 0) so layer4's channel 0 is that map, subsampled, and the head
    says `positive` (a two-class run's other class otherwise) when the pooled map exceeds the midpoint between the
    classes' training images. Its Grad-CAM for `positive` is that map itself: a test then reads where the bright
    thing is, whatever a few epochs of training would have learned on this CPU with this seed."""
    from core.infer.classifier import Classifier
    from core.models.checkpoint import load_checkpoint, save_checkpoint
    from core.runs.rundata import load_run_data
    clf = Classifier.from_checkpoint(run.best_path)
    model = clf.model.float().eval()
    state, meta, _ = load_checkpoint(run.best_path)
    threshold = (brightness_of(clf, low) + brightness_of(clf, high)) / 2
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.zero_()
        for bn in [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]:
            bn.running_var.fill_(1.0)
        model.conv1.weight[0, 0] = 1 / 49  # the mean of normalized red over the window
        model.bn1.weight[0], model.bn1.bias[0] = 10.0, -10.0 * threshold
        for layer in (model.layer2, model.layer3, model.layer4):
            layer[0].downsample[0].weight[0, 0] = 1.0  # the shortcut carries channel 0 on, subsampled
            layer[0].downsample[1].weight[0] = 1.0
        head = model.fc if isinstance(model.fc, torch.nn.Linear) else model.fc[-1]
        pooled = []
        hook = model.avgpool.register_forward_hook(lambda m, i, out: pooled.append(out.flatten(1)[:, 0]))
        data = load_run_data(ws, run, clf.hw, torch.device("cpu"), parts=("train", "test"))
        x, y = data.batch(np.asarray(data.parts["train"]), torch.device("cpu"))
        model(clf.normalizer(x).float())
        hook.remove()
        f, bad = pooled[0], torch.as_tensor(y) == data.classes.index(positive)
        assert f[~bad].max() < f[bad].min(), "the bright spot should tell the classes apart by construction"
        cut = float(f[~bad].max() + f[bad].min()) / 2
        sign = torch.tensor([1.0 if c == positive else -1.0 for c in data.classes])
        head.weight[:, 0], head.bias[:] = sign * 10.0, -sign * 10.0 * cut
    save_checkpoint(run.best_path, model.state_dict(), meta)
    from core.infer.evaluate import evaluate_run
    assert evaluate_run(ws, run)["accuracy"] == 1.0  # the studio's own path (its precision) tells them apart too


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


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The folder `build(folder)` fills, built once per test run whichever pytest-xdist worker asks first (the others
    wait on a lock, then find it done): a trained run costs seconds in every worker otherwise. Callers copy what they
    change (the workspace) and share what they only read (the images)."""
    from filelock import FileLock
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the workers' common parent: this run's
    folder, done = shared / f"built-{name}", shared / f"built-{name}.done"
    with FileLock(str(shared / f"built-{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a builder that failed half-way
            build(folder)
            done.touch()
    return folder


def own_workspace(tmp_path_factory, built: Path, name: str):
    """This worker's copy of a built workspace, and its one run."""
    from core.workspace.store import Workspace
    root = tmp_path_factory.mktemp(name) / "ws"
    shutil.copytree(built / "ws", root)
    ws = Workspace(root)
    return ws, ws.run(ws.list_runs()[0]["id"])


@pytest.fixture(scope="session")  # decide/test_stored.py, studies/test_learning_curve.py
def decided_run(tmp_path_factory):
    """A run that errs now and then (one epoch on small dots), evaluated: scores and temperature stored."""
    def build(folder):
        from core.infer.evaluate import evaluate_run
        from core.runs import life as runs
        from core.runs.life import prepare_run
        from core.train.loop import fit
        from core.workspace.store import Workspace
        data = write_class_folders(folder / "dots", per_class=60, size=32, seed=5)
        ws = Workspace(folder / "ws")
        run = prepare_run(ws, tiny_config(data, image_size=32, epochs=1))
        assert runs.execute(ws, run.id, lambda: fit(ws, run), runs.Reporter())["status"] == "done"
        evaluate_run(ws, run)
    built = built_once(tmp_path_factory, "decided", build)
    ws, run = own_workspace(tmp_path_factory, built, "decide")
    return ws, run, run.evaluation(), built / "dots"


@pytest.fixture
def twins(tmp_path):
    return write_set_with_twins(tmp_path / "twins")


SIZE = 128


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    # 128 px: layer4 is then 4x4, fine enough for Grad-CAM to localise a 42 px square
    """One run trained to the end on a generated set; shared by evaluation, Grad-CAM, predict, CLI tests."""
    def build(folder):
        from core.runs import life as runs
        from core.runs.life import prepare_run
        from core.train.loop import fit
        from core.workspace.store import Workspace
        data = write_class_folders(folder / "dots", per_class=40, size=SIZE, seed=1)
        ws = Workspace(folder / "ws")
        run = prepare_run(ws, tiny_config(data, image_size=SIZE, epochs=4, batch_size=16))
        assert runs.execute(ws, run.id, lambda: fit(ws, run), runs.Reporter())["status"] == "done"
    built = built_once(tmp_path_factory, "trained", build)
    ws, run = own_workspace(tmp_path_factory, built, "trained")
    return {"ws": ws, "run": run, "data": built / "dots", "size": SIZE}


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


def in_process(capsys, *args, ws) -> tuple[int, str, str]:
    """The same main() in this process: (exit status, stdout, stderr). For the commands that only read the workspace
    or refuse: a process of their own would cost seconds of imports each and test nothing more."""
    from core.cli.main import main
    capsys.readouterr()
    status = main(["--workspace", str(ws), *map(str, args)])
    out = capsys.readouterr()
    return status, out.out, out.err


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
