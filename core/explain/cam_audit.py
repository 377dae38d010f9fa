"""The Grad-CAM audit: where a run's model looks across its whole test part, against a region of interest.

Accuracy does not show shortcut learning: a model that tells defective parts by a label sticker, a ruler or the
tray they were photographed on scores well until the background changes. The audit computes Grad-CAM (batched,
on an fp32 copy of the model, for the class it predicts) for every test image, measures the share of the map's
mass outside the region where the evidence should be, and reports it per class with the images where the model
looked mostly elsewhere.

The region is a rectangle drawn once per dataset (fractions of the image, kept in the workspace's regions.json),
or found automatically on each image as its foreground: the large connected areas that differ from the colour of
the image's border, as a rectangle. The audit's result is the run's cam_audit.json.
"""
from __future__ import annotations

import copy
import json
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from core.errors import UserError
from core.workspace.files import write_json_atomic
from core.workspace.store import Run, Workspace

AUDIT_FILE = "cam_audit.json"
REGIONS_FILE = "regions.json"
# An image is listed when more than this share of its attention lies outside the region.
OUTSIDE_FLAG = 0.5


# ----------------------------------------------------------------------------------------------------
# The region of interest


@dataclass(frozen=True)
class Region:
    """A rectangle (x0, y0, x1, y1) in fractions of the image's width and height, or None: each image's
    foreground, found automatically."""
    box: tuple[float, float, float, float] | None = None

    def mask(self, rgb: np.ndarray) -> np.ndarray:
        """HxW bool: True inside the region."""
        h, w = rgb.shape[:2]
        if self.box is None:
            return foreground_mask(rgb)
        x0, y0, x1, y1 = self.box
        m = np.zeros((h, w), dtype=bool)
        m[int(round(y0 * h)):max(int(round(y1 * h)), int(round(y0 * h)) + 1),
          int(round(x0 * w)):max(int(round(x1 * w)), int(round(x0 * w)) + 1)] = True
        return m

    def describe(self) -> str:
        if self.box is None:
            return "each image's foreground (found automatically)"
        x0, y0, x1, y1 = self.box
        return f"the rectangle x {x0:.0%}-{x1:.0%}, y {y0:.0%}-{y1:.0%} of each image"

    def to_json(self) -> dict:
        return {"auto": True} if self.box is None else {"box": list(self.box)}

    @classmethod
    def from_json(cls, d: dict) -> "Region":
        return cls(None) if d.get("auto") or not d.get("box") else cls(box_from(d["box"]))


def box_from(values) -> tuple[float, float, float, float]:
    """A validated (x0, y0, x1, y1) in fractions, from 4 numbers or the text 'x0,y0,x1,y1'."""
    if isinstance(values, str):
        try:
            values = [float(v) for v in values.split(",")]
        except ValueError:
            raise UserError(f"a region is four numbers x0,y0,x1,y1 between 0 and 1, not {values!r}") from None
    values = [float(v) for v in values]
    if len(values) != 4:
        raise UserError(f"a region is four numbers x0,y0,x1,y1 between 0 and 1, got {len(values)}")
    x0, y0, x1, y1 = values
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise UserError(f"a region needs 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got {values}")
    return (x0, y0, x1, y1)


def foreground_mask(rgb: np.ndarray) -> np.ndarray:
    """The image's foreground as a filled rectangle: pixels farther from the border's median colour than an Otsu
    threshold (at least 20 grey levels), their connected areas at least a quarter the size of the largest, and
    the bounding box of those. An image without any foreground gives the whole image (nothing is then outside)."""
    from scipy import ndimage
    a = rgb.astype(np.int16)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    diff = np.abs(a - np.median(border, axis=0)).max(axis=2).astype(np.uint8)
    fg = diff > max(_otsu(diff), 20)
    labels, n = ndimage.label(fg)
    if n == 0:
        return np.ones(rgb.shape[:2], dtype=bool)
    sizes = np.asarray(ndimage.sum(fg, labels, index=np.arange(1, n + 1)))
    # Every area at least a quarter the size of the largest: a part split by lines (a solar cell's busbars, seen
    # on ELPV: the largest area alone was one strip of the cell) stays whole, a small sticker stays out.
    big = np.flatnonzero(sizes >= 0.25 * sizes.max()) + 1
    ys, xs = np.nonzero(np.isin(labels, big))
    m = np.zeros(rgb.shape[:2], dtype=bool)
    m[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
    return m


def _otsu(values: np.ndarray) -> int:
    """The grey level that best splits an 8-bit image's histogram in two (Otsu's between-class variance)."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    w0 = np.cumsum(hist)
    w1 = hist.sum() - w0
    m0 = np.cumsum(hist * np.arange(256))
    valid = (w0 > 0) & (w1 > 0)
    if not valid.any():
        return 0
    between = np.zeros(256)
    between[valid] = (m0[-1] * w0[valid] / hist.sum() - m0[valid]) ** 2 / (w0[valid] * w1[valid])
    return int(np.argmax(between))


def saved_region(ws: Workspace, source: str) -> Region | None:
    """The region saved for a dataset (its source path), if any."""
    path = ws.root / REGIONS_FILE
    try:
        regions = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    entry = regions.get(str(source))
    return Region.from_json(entry) if isinstance(entry, dict) else None


def save_region(ws: Workspace, source: str, region: Region | None) -> None:
    """Keep (or, with None, forget) a dataset's region; every audit of a run on it starts from it."""
    path = ws.root / REGIONS_FILE
    try:
        regions = json.loads(path.read_text())
    except (OSError, ValueError):
        regions = {}
    if region is None:
        regions.pop(str(source), None)
    else:
        regions[str(source)] = region.to_json()
    write_json_atomic(path, regions)


# ----------------------------------------------------------------------------------------------------
# The audit


def cams(model: torch.nn.Module, x: torch.Tensor, targets: list[int]) -> np.ndarray:
    """N x H x W Grad-CAM maps in [0, 1] for a batch (one backward pass for all of it). `model`: an fp32
    inference copy (the CAM hooks into it)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from core.models.resnet import gradcam_layer
    with GradCAM(model=model, target_layers=[gradcam_layer(model)]) as cam:
        maps = cam(input_tensor=x.float().contiguous(), targets=[ClassifierOutputTarget(int(t)) for t in targets])
    return np.clip(np.nan_to_num(np.asarray(maps, dtype=np.float32)), 0.0, 1.0)


def outside_share(heat: np.ndarray, inside: np.ndarray) -> float:
    """The share of a map's mass outside the region (0 for an empty map)."""
    total = float(heat.sum())
    return float(heat[~inside].sum()) / total if total > 0 else 0.0


def run_cam_audit(ws: Workspace, run: Run, region: Region | None = None, progress=None, should_stop=None,
                  batch_size: int = 32) -> dict:
    """Audit a run's test part (its validation part if it has no test part) and write cam_audit.json.
    `region`: by default the dataset's saved region, else each image's foreground. `progress(done, total)` is
    called after each batch; `should_stop()` true ends the audit early (nothing is written)."""
    from core.infer.classifier import Classifier
    from core.models.device import select_device
    from core.runs.rundata import load_run_data
    if not run.best_path.exists():
        raise UserError(f"run {run.id} has no checkpoint yet: train it first")
    cfg = run.config()
    region = region or saved_region(ws, cfg.data) or Region(None)
    t0 = time.perf_counter()
    device = select_device(cfg.device)
    clf = Classifier.from_checkpoint(run.best_path, device)
    cam_model = copy.deepcopy(clf.model).float().eval()  # the CAM's own fp32 copy: it hooks into the model
    part = "test" if run.split().get("test") else "val"
    data = load_run_data(ws, run, clf.hw, device, parts=(part,))
    idx = np.asarray(data.parts[part], dtype=np.int64)
    if not len(idx):
        raise UserError(f"run {run.id} has no readable {part} image to audit")
    images, done = [], 0
    for start in range(0, len(idx), batch_size):
        if should_stop is not None and should_stop():
            raise AuditStopped()
        chunk = idx[start:start + batch_size]
        x_u8, _ = data.batch(chunk, device)
        predicted = clf.probs(x_u8).argmax(1)
        maps = cams(cam_model, clf.normalizer(x_u8), [int(p) for p in predicted])
        rgb = x_u8.cpu().numpy()
        for i, k in enumerate(chunk):
            images.append({"path": data.paths[k], "label": data.classes[data.labels[k]],
                           "predicted": data.classes[int(predicted[i])],
                           "outside": round(outside_share(maps[i], region.mask(rgb[i])), 4)})
        done += len(chunk)
        if progress is not None:
            progress(done, len(idx))
    result = summarize(images, data.classes, region)
    result.update({"run_id": run.id, "part": part, "seconds": round(time.perf_counter() - t0, 2)})
    write_json_atomic(run.dir / AUDIT_FILE, result)
    return result


def summarize(images: list[dict], classes: list[str], region: Region) -> dict:
    """Per true class: images, mean share outside, images mostly outside; the images mostly outside, worst first."""
    per_class = []
    for c in classes:
        shares = [i["outside"] for i in images if i["label"] == c]
        per_class.append({"class": c, "images": len(shares),
                          "mean_outside": round(float(np.mean(shares)), 4) if shares else None,
                          "mostly_outside": sum(s > OUTSIDE_FLAG for s in shares)})
    flagged = sorted((i for i in images if i["outside"] > OUTSIDE_FLAG), key=lambda i: -i["outside"])
    return {"region": region.to_json(), "region_text": region.describe(), "threshold": OUTSIDE_FLAG,
            "n": len(images), "per_class": per_class, "flagged": flagged, "images": images}


def load_cam_audit(run: Run) -> dict | None:
    try:
        return json.loads((run.dir / AUDIT_FILE).read_text())
    except (OSError, ValueError):
        return None


class AuditStopped(Exception):
    pass


# ----------------------------------------------------------------------------------------------------
# In the background (the studio's pages start it and poll it)


class CamAudits:
    """Audits running in background threads, one per run at most; the pages read their state, never change it.
    Shared by every session of one process (the studio keeps one in st.cache_resource)."""

    def __init__(self, ws: Workspace):
        self.ws = ws
        self._state: dict[str, dict] = {}
        self._lock = threading.Lock()

    def start(self, run_id: str, region: Region | None = None) -> bool:
        """Start an audit of the run; False if one is already running for it."""
        with self._lock:
            if self._state.get(run_id, {}).get("status") == "running":
                return False
            self._state[run_id] = {"status": "running", "done": 0, "total": 0, "error": None, "stop": False}
        threading.Thread(target=self._work, args=(run_id, region), name=f"cam-audit-{run_id}", daemon=True).start()
        return True

    def stop(self, run_id: str) -> None:
        with self._lock:
            if run_id in self._state:
                self._state[run_id]["stop"] = True

    def status(self, run_id: str) -> dict:
        """{"status": "idle"|"running"|"done"|"stopped"|"failed", "done", "total", "error"}."""
        with self._lock:
            return dict(self._state.get(run_id, {"status": "idle", "done": 0, "total": 0, "error": None}))

    def _set(self, run_id: str, **kw) -> None:
        with self._lock:
            self._state[run_id].update(kw)

    def _work(self, run_id: str, region: Region | None) -> None:
        try:
            run_cam_audit(self.ws, self.ws.run(run_id), region,
                          progress=lambda d, t: self._set(run_id, done=d, total=t),
                          should_stop=lambda: self._state[run_id]["stop"])
            self._set(run_id, status="done")
        except AuditStopped:
            self._set(run_id, status="stopped")
        except Exception as exc:  # noqa: BLE001 - shown on the page; the studio keeps serving
            self._set(run_id, status="failed", error=f"{type(exc).__name__}: {exc}")
