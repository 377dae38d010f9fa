"""How long each projection of the embedding map takes (core/explain/embedding.py) at the sizes users have: a run's real
features (ELPV: 2,624 images) and 20,000 rows made from them (each repeated with small noise, so that neighbours
stay realistic). UMAP is measured when umap-learn is installed (it compiles with numba on first use: the first
call's time includes that and is reported apart).

    .venv/bin/python bench/embedding_map.py --workspace WS --run RUN_ID [--sizes 2624,20000] [--methods pca,tsne,umap]

Prints one JSON document (and writes it to --out).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import MemoryPeak, emit, environment  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workspace", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--sizes", default="2624,20000")
    ap.add_argument("--methods", default="pca,tsne,umap")
    ap.add_argument("--out")
    args = ap.parse_args()
    from core.explain.embedding import project
    from core.explain.features import run_features
    from core.workspace.store import Workspace
    ws = Workspace(args.workspace)
    t0 = time.perf_counter()
    rf = run_features(ws, ws.run(args.run))
    out = {"bench": "embedding_map", "run": args.run, "n_features": len(rf.paths), "dims": int(rf.features.shape[1]),
           "features_seconds": round(time.perf_counter() - t0, 1), "env": environment(), "results": []}
    rng = np.random.default_rng(0)
    scale = float(rf.features.std()) * 0.05
    for n in [int(x) for x in args.sizes.split(",")]:
        reps = -(-n // len(rf.features))
        x = np.concatenate([rf.features + (rng.normal(0, scale, rf.features.shape) if r else 0)
                            for r in range(reps)])[:n].astype(np.float32)
        for method in args.methods.split(","):
            row = {"n": n, "method": method}
            try:
                if method == "umap":  # the numba compile, once per process, measured apart
                    t = time.perf_counter()
                    project(x[:200], "umap")
                    row["first_call_compile_seconds"] = round(time.perf_counter() - t, 1)
                with MemoryPeak() as mem:
                    t = time.perf_counter()
                    xy = project(x, method)
                    row["seconds"] = round(time.perf_counter() - t, 1)
                row["peak_rss_mb"] = round(mem.peak / 2**20)
                row["finite"] = bool(np.isfinite(xy).all())
            except Exception as exc:  # a method that is not installed: said in the document
                row["error"] = str(exc)
            out["results"].append(row)
            print(json.dumps(row), file=sys.stderr)
    return emit(out, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
