"""Test-time augmentation beyond flips: the 8 dihedral views, the choice made on validation, and the same views
in every use of the model (evaluation, prediction, export)."""
import numpy as np
import pytest
import torch

from conftest import plant_seeded_weights, tiny_config, write_class_folders
from core.data.split import samples_from_split
from core.deploy.export import export_run
from core.infer.classifier import Classifier, run_tta, tta_views
from core.infer.evaluate import read_predictions
from core.models.checkpoint import load_checkpoint
from core.runs.life import prepare_run
from core.train.loop import fit


def test_dihedral_views_are_the_eight_symmetries_of_a_square_image():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    views = tta_views(x, "dihedral")
    assert len(views) == 8 and torch.equal(views[0], x)
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8  # all different
    for v in views:  # each only moves an image's own pixels
        assert torch.equal(v.flatten(1).sort(1).values, x.flatten(1).sort(1).values)
    assert len(tta_views(x, "flips")) == 3
    assert len(tta_views(torch.zeros(1, 3, 4, 6), "dihedral")) == 3  # a quarter turn would change the shape


def test_a_choice_is_read_only_where_the_config_asked_for_one():
    meta = {"config": tiny_config("x", tta=True, tta_views="auto").to_dict(), "tta_views": "dihedral"}
    assert run_tta(meta) == (True, "dihedral")
    assert run_tta({**meta, "tta_views": "none"})[0] is False          # no views beat the image alone
    fixed = {**meta, "config": tiny_config("x", tta=True, tta_views="flips").to_dict()}
    assert run_tta(fixed) == (True, "flips")                           # a stale choice of an earlier config
    assert run_tta({"config": tiny_config("x").to_dict()})[0] is False  # TTA off


@pytest.fixture(scope="module")
def dots(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tta")
    return write_class_folders(tmp / "dots", per_class=24, size=48, seed=3), tmp


def train(dots, name, **over):
    from core.workspace.store import Workspace
    data, tmp = dots
    ws = Workspace(tmp / name)
    run = prepare_run(ws, tiny_config(data, image_size=48, epochs=2, hflip=True, rot90=True, tta=True, **over))
    assert fit(ws, run)["status"] == "done"
    return ws, run


def test_auto_chooses_the_views_that_validate_best_and_every_use_follows(dots):
    ws, run = train(dots, "auto", tta_views="auto")
    _, meta, _ = load_checkpoint(run.best_path)
    scores, chosen = meta["tta_validation"], meta["tta_views"]
    assert set(scores) == {"none", "flips", "dihedral"} and chosen in scores
    best = max(scores.values(), key=lambda s: (s["val_acc"], -s["val_loss"]))
    assert (scores[chosen]["val_acc"], scores[chosen]["val_loss"]) == (best["val_acc"], best["val_loss"])
    clf = Classifier.from_checkpoint(run.best_path)
    assert clf.tta is (chosen != "none") and run.evaluation()["tta"] is clf.tta
    if clf.tta:
        assert clf.tta_views == chosen
    # The recorded validation accuracy is what the model, used with the chosen views, scores on that part.
    val = samples_from_split(run.split(), "val")
    probs = clf.probs(torch.from_numpy(np.stack([clf.image(s.path) for s in val])))
    acc = float(np.mean(probs.argmax(1) == np.array([s.label for s in val])))
    assert acc == pytest.approx(scores[chosen]["val_acc"], abs=1.01 / len(val))


@pytest.mark.slow
def test_onnx_and_torchscript_exports_carry_the_eight_views(dots):
    import onnxruntime as ort
    ws, run = train(dots, "dihedral", tta_views="dihedral")
    plant_seeded_weights(run.best_path)  # a model whose output is known to move with the views, on any CPU
    clf = Classifier.from_checkpoint(run.best_path)
    clf.amp = None  # the exported graph is fp32
    assert (clf.tta, clf.tta_views) == (True, "dihedral")
    images = np.stack([clf.image(r["path"]) for r in read_predictions(run)])
    out = export_run(ws, run.id, "onnx")
    got = ort.InferenceSession(out["path"], providers=["CPUExecutionProvider"]).run(None, {"images": images})[0]
    assert np.abs(got - clf.probs(torch.from_numpy(images))).max() < 1e-4
    clf.tta = False  # the views matter: without them the probabilities differ, by far more than the tolerance
    moved = np.abs(got - clf.probs(torch.from_numpy(images))).max()
    print(f"the views move a probability by up to {moved:.4f}")
    assert moved > 1e-3
    assert "8 flips and quarter turns" in out["card"]["tta"]
    scripted = torch.jit.load(export_run(ws, run.id, "torchscript")["path"])
    assert np.abs(scripted(torch.from_numpy(images)).detach().numpy() - got).max() < 1e-4
