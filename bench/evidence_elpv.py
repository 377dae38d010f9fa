"""The evidence beside a prediction, on a trained run (ELPV): how often test images and generated out-of-domain
images (gray noise with a bright square, tests/conftest.py) are flagged "unlike anything in training", how often
the nearest training image has the test image's label, and what feature-similarity near-duplicates look like
against the perceptual-hash ones.

    .venv/bin/python bench/evidence_elpv.py WORKSPACE RUN_ID > bench/results/evidence-elpv-....json
"""
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from PIL import Image

from conftest import make_dot_image
from core.deploy.predict import nearest_training
from core.explain.features import run_features, training_neighbours
from core.explain.leakage import run_duplicates
from core.explain.neighbours import feature_pairs, nearest
from core.workspace.store import Workspace

ws = Workspace(sys.argv[1])
run = ws.run(sys.argv[2])
t = time.time()
rf = run_features(ws, run)
tf = time.time() - t
idx = training_neighbours(ws, run)
test = rf.part("test")
q = idx.query(rf.features[test], k=3)
unlike_test = np.mean([r["unlike"] for r in q])
# label agreement of nearest training image on test
agree = np.mean([r["neighbours"][0]["label"] == rf.labels[i] for r, i in zip(q, test)])
rng = np.random.default_rng(0)
ood = [Image.fromarray(make_dot_image(rng, 128, dot=bool(k % 2))[0]) for k in range(40)]
o = nearest_training(ws, run.id, ood)
out = {"features_seconds": round(tf, 1), "threshold": idx.threshold,
       "val_distance_pct": np.percentile(idx.val_distance, [50, 95, 99]).round(3).tolist(),
       "test_unlike_rate": float(unlike_test), "test_nearest_label_agrees": float(agree),
       "ood_generated_unlike_rate": float(np.mean([r["unlike"] for r in o])),
       "ood_distance_median": float(np.median([r["distance"] for r in o]))}
centred = rf.features - rf.features[rf.part("train")].mean(0)
hash_groups = run_duplicates(ws, run, ("hash",))
hash_pairs_set = {frozenset(m["path"] for m in g["members"]) for g in hash_groups["groups"]}
for s in (0.95, 0.97, 0.98, 0.99):
    pairs = feature_pairs(centred, s)
    out[f"feature_pairs_{s}"] = len(pairs)
    r = run_duplicates(ws, run, ("features",), similarity=s)
    out[f"feature_groups_{s}"] = {"n_groups": r["n_groups"], "straddling": r["n_straddling"],
                                  "largest": max([len(g["members"]) for g in r["groups"]], default=0)}
# similarity of the hash-twins in feature space
pos = {p: i for i, p in enumerate(rf.paths)}
sims = []
for g in hash_groups["groups"]:
    ids = [pos[m["path"]] for m in g["members"]]
    u = centred[ids] / np.linalg.norm(centred[ids], axis=1, keepdims=True)
    sims.append(float((u @ u.T)[np.triu_indices(len(ids), 1)].min()))
out["hash_twins_feature_similarity_pct"] = np.percentile(sims, [10, 50, 90]).round(3).tolist()
allnn = nearest(centred, centred, 1, exclude_self=True)[1][:, 0]
out["all_nearest_similarity_pct"] = np.percentile(allnn, [10, 50, 90, 99]).round(3).tolist()
print(json.dumps(out, indent=1))
