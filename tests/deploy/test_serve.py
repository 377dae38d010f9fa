"""The prediction server as a user runs it: `python -m core serve` in its own process, real HTTP on loopback."""
import io
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import ROOT, free_port, make_dot_image, without_torch
from core.deploy.predict import get_predictor
from core.infer.evaluate import read_predictions

pytestmark = pytest.mark.slow  # each starts processes of its own (see tests/README.md)


def _start(args, tmp_path, env=None):
    port = free_port()
    log = open(tmp_path / f"serve-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "core", *args, "--port", str(port), "--max-mb", "1",
                             "--max-files", "4"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail("server exited: " + (tmp_path / f"serve-{port}.log").read_text())
        try:
            if requests.get(f"{url}/health", timeout=2).json() == {"status": "ok"}:
                return proc, url
        except requests.RequestException:
            time.sleep(0.3)
    proc.kill()
    pytest.fail("server did not answer /health")


def _stop(proc):
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    proc, url = _start(["--workspace", str(trained["ws"].root), "serve", trained["run"].id], tmp)
    yield url
    _stop(proc)


def test_predict_health_model_and_gradcam(server, trained):
    card = requests.get(f"{server}/model", timeout=10).json()
    assert card["classes"] == ["blank", "dot"] and card["run_id"] == trained["run"].id
    rows = read_predictions(trained["run"])[:3]
    files = [("files", (os.path.basename(r["path"]), open(r["path"], "rb").read(), "image/png")) for r in rows]
    reply = requests.post(f"{server}/predict", files=files, params={"top_k": 2}, timeout=60)
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    assert [r["file"] for r in results] == [os.path.basename(r["path"]) for r in rows]
    local = get_predictor(trained["ws"], trained["run"].id).predict([r["path"] for r in rows], top_k=2)
    for got, want in zip(results, local):
        assert got["top"][0]["label"] == want["top"][0]["label"] and len(got["top"]) == 2
        assert abs(got["probs"]["dot"] - want["probs"]["dot"]) < 1e-5  # the same inference path
    cam = requests.post(f"{server}/predict", files=files[:1], params={"gradcam": "true"}, timeout=60).json()
    png = Image.open(io.BytesIO(__import__("base64").b64decode(cam["results"][0]["gradcam_png"])))
    assert png.size == (trained["size"], trained["size"])
    assert requests.get(f"{server}/openapi.json", timeout=10).json()["paths"]["/predict"]


def test_bad_requests_get_a_reason_and_the_server_lives_on(server, trained):
    good = _png(make_dot_image(np.random.default_rng(1), 32, True)[0])
    whole = _png(make_dot_image(np.random.default_rng(2), 64, True)[0])
    bomb = io.BytesIO()
    Image.new("L", (9000, 9000)).save(bomb, format="PNG")  # 81 Mpx in a small file: refused before decoding
    cases = [
        ({"files": ("notes.png", b"this is text", "image/png")}, 422, "not a recognised image"),
        ({"files": ("cut.png", whole[: len(whole) // 2], "image/png")}, 422, "truncated"),
        ({"files": ("bomb.png", bomb.getvalue(), "image/png")}, 422, "decompression bomb"),
        ({"files": ("big.png", b"\0" * (2**20 + 10), "image/png")}, 413, "over the per-file limit"),
        ([("files", (f"{i}.png", good, "image/png")) for i in range(5)], 413, "the limit is 4"),
        (None, 400, "no image in the request"),
    ]
    for files, status, reason in cases:
        reply = requests.post(f"{server}/predict", files=files, timeout=60)
        assert reply.status_code == status, (reason, reply.text)
        assert reason in reply.json()["detail"]
    huge = requests.post(f"{server}/predict", data=b"x" * (6 * 2**20),
                         headers={"Content-Type": "multipart/form-data; boundary=x"}, timeout=60)
    assert huge.status_code == 413
    assert requests.post(f"{server}/predict", files={"files": ("ok.png", good, "image/png")}, timeout=60).ok


def test_eight_clients_at_once_all_answered(server, trained):
    """A bounded load test on loopback: 8 concurrent clients x 25 requests against the real server process, with
    the client of bench/serve_load.py."""
    sys.path.insert(0, str(ROOT / "bench"))
    from serve_load import load
    image = open(read_predictions(trained["run"])[0]["path"], "rb").read()
    row = load(server, [image], clients=8, per_client=25)
    print(f"\n8 clients x 25 requests: {row}")
    assert row["requests"] == 200 and row["errors"] == 0


def test_serving_an_onnx_file_needs_no_torch(trained, tmp_path):
    from core.deploy.export import export_run
    model = tmp_path / "model.onnx"
    export_run(trained["ws"], trained["run"].id, "onnx", out=model)
    proc, url = _start(["serve", str(model)], tmp_path, env=without_torch(tmp_path))
    try:
        path = read_predictions(trained["run"])[0]["path"]
        reply = requests.post(f"{url}/predict", files={"files": ("a.png", open(path, "rb").read())}, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["results"][0]["top"][0]["label"] in ("blank", "dot")
        no_cam = requests.post(f"{url}/predict", files={"files": ("a.png", open(path, "rb").read())},
                               params={"gradcam": "true"}, timeout=60)
        assert no_cam.status_code == 400 and "Grad-CAM needs the run's checkpoint" in no_cam.json()["detail"]
    finally:
        _stop(proc)
