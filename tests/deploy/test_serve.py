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


def _start(args, tmp_path, env=None, limits=("--max-mb", "1", "--max-files", "4", "--max-request-mb", "6")):
    port = free_port()
    log = open(tmp_path / f"serve-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "core", *args, "--port", str(port), *limits], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, env=env)
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
        (None, 415, "send images as multipart/form-data"),
        ({"other": ("x.txt", b"x", "text/plain")}, 400, "no image in the request"),
    ]
    for files, status, reason in cases:
        reply = requests.post(f"{server}/predict", files=files, timeout=60)
        assert reply.status_code == status, (reason, reply.text)
        assert reason in reply.json()["detail"]
    huge = requests.post(f"{server}/predict", data=b"x" * (7 * 2**20),
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


# --- limits while the body streams, turns, access (issue 36) ---------------------------------------------------

BOUNDARY = "studio-test-boundary"


def _part(name: str, filename: str | None, data: bytes) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return (f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\nContent-Type: application/octet-stream\r\n\r\n"
            .encode() + data + b"\r\n")


def _raw_post(url: str, chunks, headers: dict | None = None, pause_s: float = 0.0):
    """POST /predict over a plain socket, sending the body chunked, a chunk at a time, stopping as soon as the server
    answers (as a client would see it). Returns (status, body text, bytes of body sent)."""
    import select
    import socket
    host, port = url.rsplit("/", 1)[-1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = {"Host": f"{host}:{port}", "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
            "Transfer-Encoding": "chunked", **(headers or {})}
    sock.sendall(("POST /predict HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n").encode())
    sent = 0
    try:
        for chunk in chunks:
            if select.select([sock], [], [], pause_s)[0]:
                break  # the server has answered: a client stops sending
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            sent += len(chunk)
        else:
            sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    reply = b""
    while b"\r\n\r\n" not in reply or len(reply) < reply.index(b"\r\n\r\n") + 4 + _length(reply):
        part = sock.recv(65536)
        if not part:
            break
        reply += part
    sock.close()
    status = int(reply.split(b" ", 2)[1])
    return status, reply.split(b"\r\n\r\n", 1)[1].decode(errors="replace"), sent


def _length(reply: bytes) -> int:
    for line in reply.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def test_a_chunked_body_is_refused_as_it_streams(server):
    # The server above allows 1 MB a file and 6 MB a request. A chunked body has no Content-Length to check: the
    # limit must hold while it streams, and the answer come before the client has sent everything.
    one_file = _part("files", "big.png", b"\0" * (30 * 2**20))
    status, body, sent = _raw_post(server, (one_file[i:i + 65536] for i in range(0, len(one_file), 65536)))
    assert status == 413 and "over the per-file limit of 1 MB" in body
    assert sent < 12 * 2**20, f"{sent:,} bytes sent before the refusal"  # old: all 30 MB parsed and spooled
    # within every per-part limit, the rest of 30 MB after the closing boundary (an epilogue the parser skips)
    body = _part("files", "a.png", b"\0" * 900_000) + f"--{BOUNDARY}--\r\n".encode() + b"\0" * (30 * 2**20)
    status, text, sent = _raw_post(server, (body[i:i + 65536] for i in range(0, len(body), 65536)))
    assert status == 413 and "over the limit of 6 MB" in text and sent < 16 * 2**20


def test_the_file_count_is_refused_at_the_first_file_too_many(server):
    # With a pause after each part, the server has time to answer: it must refuse at the fifth file (limit 4),
    # not after parsing the fifty a client sends.
    good = _png(make_dot_image(np.random.default_rng(3), 32, True)[0])
    status, body, sent = _raw_post(server, (_part("files", f"{i}.png", good) for i in range(50)), pause_s=0.3)
    assert status == 413 and "the limit is 4" in body
    assert sent <= 6 * len(_part("files", "0.png", good)), "the server read far past the fifth file"
    fields = b"".join(_part(f"f{i}", None, b"x") for i in range(17)) + f"--{BOUNDARY}--\r\n".encode()
    status, body, _ = _raw_post(server, [fields])
    assert status == 413 and "form fields" in body


def test_health_answers_at_once_while_predictions_queue(server, trained):
    # 48 requests of 4 images each at once: predictions take their turns (4 at a time), /health is not one of them.
    import threading
    image = open(read_predictions(trained["run"])[0]["path"], "rb").read()
    files = [("files", (f"{i}.png", image, "image/png")) for i in range(4)]
    codes = []
    clients = [threading.Thread(target=lambda: codes.append(
        requests.post(f"{server}/predict", files=files, timeout=120).status_code)) for _ in range(48)]
    for c in clients:
        c.start()
    time.sleep(0.5)
    waits = []
    for _ in range(3):
        t = time.perf_counter()
        assert requests.get(f"{server}/health", timeout=10).json() == {"status": "ok"}
        waits.append(time.perf_counter() - t)
    for c in clients:
        c.join()
    assert max(waits) < 1.0, waits
    assert codes.count(200) + codes.count(503) == 48 and codes.count(200) > 0


@pytest.fixture(scope="module")
def guarded(trained, tmp_path_factory):
    """A server with an API key, one extra host name, one request at a time and half a second of queue."""
    tmp = tmp_path_factory.mktemp("guarded")
    proc, url = _start(["--workspace", str(trained["ws"].root), "serve", trained["run"].id, "--api-key", "s3cret",
                        "--allowed-host", "studio.local", "--max-concurrent", "1", "--queue-wait", "0.5"], tmp)
    yield url
    _stop(proc)


def test_the_api_key_is_required_but_not_for_health(guarded, trained):
    image = open(read_predictions(trained["run"])[0]["path"], "rb").read()
    post = lambda headers: requests.post(f"{guarded}/predict", files={"files": ("a.png", image)},  # noqa: E731
                                         headers=headers, timeout=60)
    assert post({}).status_code == 401
    assert post({"Authorization": "Bearer wrong"}).status_code == 401
    assert post({"X-API-Key": "s3cre"}).status_code == 401
    assert requests.get(f"{guarded}/model", timeout=10).status_code == 401
    assert post({"Authorization": "Bearer s3cret"}).status_code == 200
    assert post({"X-API-Key": "s3cret"}).status_code == 200
    assert requests.get(f"{guarded}/health", timeout=10).json() == {"status": "ok"}


def test_a_foreign_host_name_is_refused(guarded):
    # DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 sends Host: evil.example
    key = {"X-API-Key": "s3cret"}
    port = guarded.rsplit(":", 1)[1]
    for host, ok in [(f"evil.example:{port}", False), ("evil.example", False), (f"localhost:{port}", True),
                     (f"studio.local:{port}", True), (f"[::1]:{port}", True), (f"127.0.0.1:{port}", True)]:
        reply = requests.get(f"{guarded}/model", headers={**key, "Host": host}, timeout=10)
        assert reply.ok == ok, (host, reply.status_code, reply.text)
        if not ok:
            assert reply.status_code == 400 and "--allowed-host" in reply.json()["detail"]


def test_beyond_its_turns_a_request_gets_503_with_retry_after(guarded, trained):
    import threading
    image = open(read_predictions(trained["run"])[0]["path"], "rb").read()
    holder_done = threading.Event()

    def slow_sender():  # holds the one turn: its body trickles in for ~3 s
        body = _part("files", "slow.png", image) + f"--{BOUNDARY}--\r\n".encode()
        pieces = [body[i:i + 64] for i in range(0, 64 * 12, 64)] + [body[64 * 12:]]
        _raw_post(guarded, iter(pieces), headers={"X-API-Key": "s3cret"}, pause_s=0.25)
        holder_done.set()

    threading.Thread(target=slow_sender, daemon=True).start()
    time.sleep(0.5)
    busy = requests.post(f"{guarded}/predict", files={"files": ("a.png", image)}, headers={"X-API-Key": "s3cret"},
                         timeout=30)
    assert busy.status_code == 503 and busy.headers.get("Retry-After") == "1", busy.text
    assert holder_done.wait(30)
    after = requests.post(f"{guarded}/predict", files={"files": ("a.png", image)}, headers={"X-API-Key": "s3cret"},
                          timeout=30)
    assert after.status_code == 200, after.text


def test_a_network_address_without_a_key_refuses_to_start(tmp_path, capsys, monkeypatch):
    from core.cli.main import main
    monkeypatch.delenv("STUDIO_API_KEY", raising=False)
    # no such run either: the refusal must come first, before anything is loaded
    assert main(["--workspace", str(tmp_path), "serve", "no-such-run", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "has no API key" in err and "--no-auth" in err and len(err.strip().splitlines()) == 1


def _schemathesis(url: str, workdir, *extra: str) -> str:
    """`st run URL/openapi.json --checks all` as a user runs it (seeded: the same cases on every machine), with the
    image strategy of schemathesis_hooks.py and the 413 of schemathesis.toml; returns its report. It runs in
    `workdir`: hypothesis and schemathesis keep their databases in the working directory."""
    here = ROOT / "tests" / "deploy"
    st = subprocess.run([str(os.path.join(os.path.dirname(sys.executable), "st")), "--config-file",
                         str(here / "schemathesis.toml"), "run", f"{url}/openapi.json", "--checks", "all",
                         "--max-examples", "25", "--seed", "1", "--no-color", *extra], cwd=workdir,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks", "PYTHONPATH": str(here)})
    report = st.stdout + st.stderr
    assert st.returncode == 0, report[-6000:]
    return report


def test_schemathesis_finds_the_schema_true(server, tmp_path):
    import re
    report = _schemathesis(server, tmp_path)
    cases = int(re.search(r"(\d+) generated", report).group(1))
    print(f"\nschemathesis: {cases} cases, no issues")
    assert cases > 50 and "No issues found" in report


def test_schemathesis_with_the_api_key(guarded, tmp_path):
    report = _schemathesis(guarded, tmp_path, "-H", "Authorization: Bearer s3cret")
    assert "No issues found" in report
