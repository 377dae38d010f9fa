"""The Grad-CAM audit: a model that learned a background marker instead of the part is flagged; one that learned
the part is not. Generated 224 px images: layer4 is then 7x7 (at 128 px its 4x4 cells were too coarse to tell a
corner sticker from the centre; seen: both models' maps were alike)."""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import in_process, plant_bright_spot_detector, tiny_config
from core.errors import UserError
from core.explain.cam_audit import (
    AUDIT_FILE,
    CamAudits,
    Region,
    box_from,
    foreground_mask,
    load_cam_audit,
    outside_share,
    run_cam_audit,
    save_region,
    saved_region,
)

ROOT = Path(__file__).resolve().parents[2]
SIZE = 224
CENTRE = Region((0.25, 0.25, 0.75, 0.75))  # where the part is in every image
PART, STICKER = 230, 255  # gray levels of the part and of the corner sticker


def write_parts(root: Path, marker: bool, per_class: int = 24, seed: int = 0) -> Path:
    """Two classes, 'good' and 'bad', on gray noise. With `marker`: every image holds the same kind of bright
    square inside the centre, and 'bad' images also a white sticker in the top-left corner, outside the centre:
    the sticker is the only thing that tells the classes apart. Without: only 'bad' images hold the square."""
    rng = np.random.default_rng(seed)
    for c in ("good", "bad"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            a = (rng.random((SIZE, SIZE, 3)) * 90 + 20).astype(np.uint8)
            if marker or c == "bad":
                q = SIZE // 4  # a square of a quarter of the side, inside the centre region (25%-75%)
                y, x = rng.integers(int(SIZE * 0.32), int(SIZE * 0.43), 2)
                a[y:y + q, x:x + q] = PART
            if marker and c == "bad":
                a[:40, :40] = STICKER
            Image.fromarray(a).save(root / c / f"{c}_{i:03d}.png")
    return root


def train(tmp: Path, marker: bool):
    """A real run of the parts (its split, checkpoint and metadata), its weights then planted: with the sticker,
    a model that reads the corner sticker (brighter than the part); without, one that reads the part."""
    from core.runs import life as runs
    from core.runs.life import prepare_run
    from core.train.loop import fit
    from core.workspace.store import Workspace
    data = write_parts(tmp / "parts", marker)
    ws = Workspace(tmp / "ws")
    run = prepare_run(ws, tiny_config(data, image_size=SIZE, epochs=1, batch_size=16))
    result = runs.execute(ws, run.id, lambda: fit(ws, run), runs.Reporter())
    assert result["status"] == "done", result
    if marker:  # the sticker (255) and not the part (230)
        plant_bright_spot_detector(ws, run, "bad", low=PART, high=STICKER)
    else:  # the part (230) and not the noise (at most 110)
        plant_bright_spot_detector(ws, run, "bad", low=110, high=PART)
    return ws, run


@pytest.fixture(scope="module")
def shortcut(tmp_path_factory):
    return train(tmp_path_factory.mktemp("shortcut"), marker=True)


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    return train(tmp_path_factory.mktemp("honest"), marker=False)


def by_class(result: dict) -> dict:
    return {c["class"]: c for c in result["per_class"]}


@pytest.mark.slow
def test_a_model_that_learned_the_background_marker_is_flagged(shortcut, honest):
    ws, run = shortcut
    result = run_cam_audit(ws, run, CENTRE)
    bad = by_class(result)["bad"]
    assert bad["mean_outside"] > 0.5, result["per_class"]
    assert bad["mostly_outside"] >= bad["images"] / 2
    assert any(i["label"] == "bad" for i in result["flagged"])
    assert result["flagged"] == sorted(result["flagged"], key=lambda i: -i["outside"])
    assert result["n"] == len(run.split()["test"]) and result["part"] == "test"
    assert load_cam_audit(run)["per_class"] == result["per_class"]  # kept with the run

    ws_h, run_h = honest
    fair = run_cam_audit(ws_h, run_h, CENTRE)
    fair_bad = by_class(fair)["bad"]
    assert fair_bad["mean_outside"] < 0.5, fair["per_class"]
    assert fair_bad["mostly_outside"] < fair_bad["images"] / 2
    assert bad["mean_outside"] > fair_bad["mean_outside"] + 0.15
    # 'good' is told by what it lacks (no sticker, or no square): its maps are diffuse in both models, and the
    # audit's reading is about classes whose evidence is a thing in the picture.


def test_outside_share_and_rectangles():
    heat = np.zeros((8, 8), dtype=np.float32)
    heat[0, 0] = 3.0
    heat[4, 4] = 1.0
    inside = Region((0.25, 0.25, 0.75, 0.75)).mask(np.zeros((8, 8, 3), np.uint8))
    assert inside.sum() == 16 and inside[4, 4] and not inside[0, 0]
    assert outside_share(heat, inside) == pytest.approx(0.75)
    assert outside_share(np.zeros((8, 8)), inside) == 0.0
    assert box_from("0.1,0.2,0.9,1") == (0.1, 0.2, 0.9, 1.0)
    for bad in ("0.5,0.2,0.4,0.9", "0,0,1", "a,b,c,d", "0,0,1.5,1"):
        with pytest.raises(UserError):
            box_from(bad)


def test_the_automatic_foreground_is_the_part_not_a_small_sticker():
    rng = np.random.default_rng(1)
    a = (rng.random((SIZE, SIZE, 3)) * 20 + 40).astype(np.uint8)  # a plain, slightly noisy background
    a[40:90, 30:100] = 200   # the part
    a[4:12, 4:12] = 255      # a small sticker
    m = foreground_mask(a)
    ys, xs = np.nonzero(m)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (40, 89, 30, 99)
    assert foreground_mask(np.full((16, 16, 3), 90, np.uint8)).all()  # nothing stands out: nothing is outside


def test_a_saved_region_is_the_datasets_default(shortcut, tmp_path):
    ws, run = shortcut
    source = run.config().data
    save_region(ws, source, CENTRE)
    assert saved_region(ws, source) == CENTRE
    result = run_cam_audit(ws, run)  # no region given: the dataset's
    assert result["region"] == {"box": [0.25, 0.25, 0.75, 0.75]}
    save_region(ws, source, None)
    assert saved_region(ws, source) is None
    assert run_cam_audit(ws, run)["region"] == {"auto": True}


@pytest.mark.slow
def test_the_audit_runs_in_the_background_and_from_the_cli(shortcut, capsys):
    ws, run = shortcut
    (run.dir / AUDIT_FILE).unlink(missing_ok=True)
    audits = CamAudits(ws)
    assert audits.status(run.id)["status"] == "idle"
    assert audits.start(run.id, CENTRE)
    deadline = time.time() + 120
    while audits.status(run.id)["status"] == "running" and time.time() < deadline:
        time.sleep(0.1)
    st = audits.status(run.id)
    assert st["status"] == "done", st
    assert st["done"] == st["total"] == len(run.split()["test"])
    assert load_cam_audit(run) is not None

    out = subprocess.run([sys.executable, "-m", "core", "--workspace", str(ws.root), "cam-audit", run.id,
                          "--region", "0.25,0.25,0.75,0.75", "--json"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert by_class(doc)["bad"]["mean_outside"] > 0.5 and "images" not in doc
    status, _, err = in_process(capsys, "cam-audit", run.id, "--region", "0.9,0,0.1,1", ws=ws.root)  # main(), here
    assert status == 2 and "0 <= x0 < x1 <= 1" in err


def test_the_audit_pack_is_one_self_contained_report_and_the_files_it_cites(shortcut, tmp_path):
    import re
    import zipfile

    from core.deploy.audit_pack import build_audit_pack
    from core.deploy.export import dataset_hash
    ws, run = shortcut
    run_cam_audit(ws, run, CENTRE)
    out = build_audit_pack(ws, run.id, tmp_path / "pack")
    report = Path(out["html"]).read_text()
    with zipfile.ZipFile(out["zip"]) as z:
        names = set(z.namelist())
        assert z.read("audit.html").decode() == report
        assert json.loads(z.read("files/cam_audit.json"))["per_class"] == load_cam_audit(run)["per_class"]
    for name in ("config.json", "split.json", "metrics.csv", "evaluation.json", "calibration.json", "leakage.json",
                 "cam_audit.json", "environment.json"):
        assert f"files/{name}" in names, names
    assert any(n.startswith("files/heatmaps/") and n.endswith(".png") for n in names)
    assert sorted(names) == out["files"]
    cited = set(re.findall(r'href="(files/[^"]+)"', report))
    assert cited and cited <= names  # every file the report cites is in the zip
    assert "<script" not in report and not re.search(r'src="(?!data:)', report)  # nothing fetched to read it
    assert dataset_hash(run) in report and f"{run.evaluation()['accuracy']:.2%}" in report
    assert "Where the model looks (Grad-CAM audit)" in report and "mostly outside" in report


def test_an_audit_pack_needs_an_evaluated_run(tmp_path):
    from conftest import write_class_folders
    from core.deploy.audit_pack import build_audit_pack
    from core.runs.life import prepare_run
    from core.workspace.store import Workspace
    ws = Workspace(tmp_path / "ws")
    run = prepare_run(ws, tiny_config(write_class_folders(tmp_path / "d", per_class=6, size=32), batch_size=4))
    with pytest.raises(UserError, match="no evaluation yet"):
        build_audit_pack(ws, run.id)
    out = subprocess.run([sys.executable, "-m", "core", "--workspace", str(ws.root), "audit-pack", run.id],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "no evaluation yet" in out.stderr


def test_the_automatic_foreground_keeps_a_part_split_by_lines_whole():
    # a cell crossed by dark lines (a solar cell's busbars): three bright strips, each its own connected area
    a = np.full((SIZE, SIZE, 3), 30, np.uint8)
    a[20:200, 20:200] = 180
    a[80:84, 20:200] = 30
    a[140:144, 20:200] = 30
    a[2:8, 210:218] = 255  # and a small sticker
    ys, xs = np.nonzero(foreground_mask(a))
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (20, 199, 20, 199)
