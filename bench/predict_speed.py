"""Prediction speed: checkpoint load, single-image latency, batch throughput, Grad-CAM latency, and the time
to evaluate the ELPV test split, all through the engine's own API (core.predict / core.evaluate).

    python bench/predict_speed.py [--size 224] [--repeats 50]

The checkpoint is a resnet18 for the 2 ELPV classes written by the engine's own save_checkpoint (weights
untrained: speed does not depend on their values). Prints one JSON document with the keys predict_p50_ms,
predict_p95_ms, onnxruntime_predict_p50_ms (the same images through the exported ONNX file, fp32),
int8_predict_p50_ms and onnx_file_mb (the int8 file beside the fp32 one),
gradcam_p50_ms, gradcam_p95_ms, load_s, device, and more.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import environment, untrained_elpv_run  # noqa: E402


def percentile_ms(samples: list[float], q: float) -> float:
    return round(float(np.percentile(np.array(samples) * 1000, q)), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()

    from core.data.cache import IMAGE_CACHE
    from core.deploy.predict import Predictor
    from core.infer.evaluate import evaluate_run
    from core.models.device import cpu_name, cpu_threads, describe_device, select_device
    torch.set_num_threads(cpu_threads())
    device = select_device("auto")

    with tempfile.TemporaryDirectory() as tmp:
        ws, run, test_paths = untrained_elpv_run(tmp, args.size)

        t0 = time.perf_counter()
        predictor = Predictor(run.best_path)
        load_s = time.perf_counter() - t0

        images = test_paths[: args.repeats]
        predictor.predict(images[0])  # warm-up (oneDNN builds its kernels on the first call)
        single = []
        for path in images:
            t = time.perf_counter()
            predictor.predict(path)
            single.append(time.perf_counter() - t)

        batch = test_paths[: args.batch * 4]
        predictor.predict(batch[: args.batch], batch_size=args.batch)
        t = time.perf_counter()
        predictor.predict(batch, batch_size=args.batch)
        batch_ips = len(batch) / (time.perf_counter() - t)

        predictor.explain(images[0])
        cams = []
        for path in images[: max(10, args.repeats // 2)]:
            t = time.perf_counter()
            predictor.explain(path)
            cams.append(time.perf_counter() - t)

        # The same single-image path through onnxruntime and the exported fp32 graph (decode and resize included).
        import onnxruntime as ort

        from core.data.images import load_array
        from core.deploy.export import export_run
        hw = (args.size, args.size)
        fp32_path = export_run(ws, run.id, "onnx", tta=False)["path"]
        # int8 (static, calibrated on training images); forced: untrained weights have no accuracy to keep
        int8_path = export_run(ws, run.id, "onnx", tta=False, int8=True, force=True)["path"]
        onnx_single, int8_single = [], []
        for path_, out in ((fp32_path, onnx_single), (int8_path, int8_single)):
            session = ort.InferenceSession(path_, providers=["CPUExecutionProvider"])
            session.run(None, {"images": load_array(images[0], hw)[None]})
            for path in images:
                t = time.perf_counter()
                session.run(None, {"images": load_array(path, hw)[None]})
                out.append(time.perf_counter() - t)
        import os
        sizes = {"fp32_mb": round(os.path.getsize(fp32_path) / 1e6, 1), "int8_mb": round(os.path.getsize(int8_path) / 1e6, 1)}

        IMAGE_CACHE._mem.clear()
        t = time.perf_counter()
        ev = evaluate_run(ws, run, device=device)
        eval_cold_s = time.perf_counter() - t
        t = time.perf_counter()
        evaluate_run(ws, run, device=device)
        eval_warm_s = time.perf_counter() - t

    doc = {
        "benchmark": "predict_speed",
        "device": describe_device(device),
        "image_size": args.size,
        "load_s": round(load_s, 3),
        "predict_p50_ms": percentile_ms(single, 50),
        "predict_p95_ms": percentile_ms(single, 95),
        "onnxruntime_predict_p50_ms": percentile_ms(onnx_single, 50),
        "onnxruntime_predict_p95_ms": percentile_ms(onnx_single, 95),
        "int8_predict_p50_ms": percentile_ms(int8_single, 50),
        "int8_predict_p95_ms": percentile_ms(int8_single, 95),
        "onnx_file_mb": sizes,
        "onnxruntime": ort.__version__,
        "batch_images_per_s": round(batch_ips, 1),
        "batch_size": args.batch,
        "gradcam_p50_ms": percentile_ms(cams, 50),
        "gradcam_p95_ms": percentile_ms(cams, 95),
        "eval_test_split_images": ev["n"],
        "eval_cold_s": round(eval_cold_s, 2),
        "eval_warm_s": round(eval_warm_s, 2),
        "single_image_includes": "file read, decode, resize, normalize, forward, softmax",
        "cpu": cpu_name(),
        **environment(),
    }
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
