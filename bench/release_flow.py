"""From a run to the line on ELPV: golden set, releases and the gate, int8, and the hot folder, with their figures.

    python bench/release_flow.py [--size 64] [--epochs 8] [--out bench/results/release_flow.json]

1. Run A (from scratch) is trained; its whole test part becomes the golden set (stratified, frozen labels).
2. Run B is trained on the split that now leaves the golden images out, and released (the first release).
3. Run C is trained while two thirds of the `defective` images are labelled `functional` (the planted worse
   candidate); the gate must refuse it. The label change is undone.
4. B's release file against the studio (the agreement in its card), and B exported to int8 (fp32 / int8 test and
   golden accuracy, size, decision agreement).
5. The hot folder: the golden images copied into a watched folder, predicted by the fp32 release and by the int8
   file; images per second on this CPU.
Prints one JSON document (the CPU named) and writes it to --out.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import environment  # noqa: E402


def train(ws, size, epochs, seed=0):
    from core.config import TrainConfig
    from core.runs import life
    from core.train.loop import fit
    run = life.prepare_run(ws, TrainConfig(data="elpv", weights="none", image_size=size, epochs=epochs, seed=seed))
    t = time.perf_counter()
    assert life.execute(ws, run.id, lambda: fit(ws, run), life.Reporter())["status"] == "done"
    return run, time.perf_counter() - t


def hot_folder_rate(ws, predictor, name, images, tmp) -> dict:
    from core.deploy.watch import HotFolder
    inbox = Path(tmp) / f"inbox-{name}"
    inbox.mkdir()
    for p in images:
        shutil.copyfile(p, inbox / Path(p).name)
    hot = HotFolder(ws, inbox, predictor, name, Path(tmp) / f"{name}.csv", settle_s=0)
    t = time.perf_counter()
    n = hot.process()
    s = time.perf_counter() - t
    return {"images": n, "seconds": round(s, 2), "images_per_s": round(n / s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "release_flow.json"))
    args = ap.parse_args()
    import torch

    from core.data.golden import GoldenStore, carve_from_test
    from core.data.labels import LabelStore
    from core.data.sources import load_dataset
    from core.deploy.export import export_run
    from core.deploy.portable import OnnxPredictor
    from core.deploy.release import GateRefused, make_release, release_model_path
    from core.models.device import cpu_name, cpu_threads
    from core.workspace.store import Workspace
    torch.set_num_threads(cpu_threads())
    doc = {"benchmark": "release_flow", "cpu": cpu_name(), "image_size": args.size, "epochs": args.epochs}
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(Path(tmp) / "ws")
        a, doc["train_s_a"] = train(ws, args.size, args.epochs)
        ds = load_dataset("elpv")
        GoldenStore(ws).create(ds.source, carve_from_test(a.split(), 1.0), "bench: run A's test part")
        doc["golden_images"] = len(GoldenStore(ws).images(ds.source))
        b, doc["train_s_b"] = train(ws, args.size, args.epochs, seed=1)
        t = time.perf_counter()
        first = make_release(ws, b.id, actor="bench")
        doc["release_s"] = round(time.perf_counter() - t, 1)
        card = json.loads((Path(first["dir"]) / "model.onnx.card.json").read_text())
        doc["b"] = {"test_acc": ws.run_row(b.id)["test_acc"], "golden_acc": ws.run_row(b.id)["golden_acc"],
                    "agreement_studio_vs_fp32_file": card["agreement"]}
        defective = sorted(s.path for s in ds.samples if ds.classes[s.label] == "defective")
        random.Random(0).shuffle(defective)
        labels = LabelStore(ws)
        labels.set_labels(ds.source, {p: "functional" for p in defective[:len(defective) * 2 // 3]}, actor="bench")
        c, doc["train_s_c"] = train(ws, args.size, args.epochs, seed=2)
        labels.undo(ds.source, actor="bench")
        t = time.perf_counter()
        try:
            make_release(ws, c.id, actor="bench")
            doc["gate_on_scrambled"] = {"refused": False}
        except GateRefused as exc:
            r = exc.report
            doc["gate_on_scrambled"] = {"refused": True, "reasons": r["reasons"], "mcnemar_p": r["mcnemar_p"],
                                        "regressions": len(r["regressions"]), "fixes": len(r["fixes"]),
                                        "per_class": r["per_class"], "gallery_images": len(r["gallery"]["regressions"])
                                        + len(r["gallery"]["fixes"])}
        doc["gate_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        int8 = export_run(ws, b.id, "onnx", int8=True, force=True)
        doc["int8_export_s"] = round(time.perf_counter() - t, 1)
        doc["int8"] = int8["card"]["int8"]
        golden_paths = [g.path for g in GoldenStore(ws).images(ds.source)]
        doc["hot_folder"] = {
            "fp32_release": hot_folder_rate(ws, OnnxPredictor(release_model_path(first)), "fp32", golden_paths, tmp),
            "int8": hot_folder_rate(ws, OnnxPredictor(int8["path"]), "int8", golden_paths, tmp)}
    doc.update(environment())
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
