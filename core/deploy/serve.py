"""An HTTP JSON API for a model, for the inspection software that calls it: FastAPI on uvicorn.

    POST /predict   one or more images (multipart field "files"); ?top_k=3&gradcam=false; each result has the
                    calibrated probabilities and, when the run has a decision rule (`core decide`), its "decision"
    GET  /health    {"status": "ok"}: open without a key, answered at once however busy the server is
    GET  /model     the model card (classes, input, normalization, TTA, test metrics)
    GET  /docs      OpenAPI documentation (FastAPI's); /openapi.json describes every status the server answers

The model is a run's best checkpoint (the studio's Predictor: Grad-CAM available), an exported ONNX file
(core/deploy/portable.py: no torch), or a release's ONNX file (core/deploy/release.py). Serving the `latest` release,
the server looks for a newer one every few seconds and switches to it when it is loaded: a request keeps the model it
started with, so none in flight is dropped or answered by half of each; /model names the release.
One request cannot knock the server over:
- its body is read as it streams, refused (413) the moment it passes a limit: the whole body, one file, the number
  of files or of other fields (core/deploy/uploads.py);
- a large image is decoded in bounded memory (core/data/images.py), a bad one is a 422 naming the file and why;
- at most `max_concurrent` requests are read and predicted at once; others wait up to `queue_wait_s` for a turn,
  then get 503 with Retry-After, so a burst is answered late instead of running the machine out of memory.
Access (core/deploy/access.py): an API key when given, a Host allow-list always; binding beyond loopback without a
key refuses to start unless the user says --no-auth.
"""
from __future__ import annotations

import asyncio
import base64
import io
import os
import sys
from dataclasses import dataclass

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from core.deploy.access import API_KEY_ENV, OPEN_PATHS, AccessGuard, allowed_hosts, check_bind
from core.deploy.uploads import FIELD, Limits, read_images
from core.workspace.store import Workspace

DEFAULT_MAX_CONCURRENT = 4   # requests read and predicted at once: each holds at most Limits.request_mb of body
DEFAULT_QUEUE_WAIT_S = 10.0  # how long a request waits for a turn before it gets 503
DEFAULT_LIMITS = Limits()


@dataclass
class ServedModel:
    predictor: object      # core.predict.Predictor or core.portable.OnnxPredictor: predict(sources, top_k)
    card: dict
    gradcam: bool          # a run's checkpoint can explain; an ONNX file cannot


class Holder:
    """The model being served now. A request takes `current` once and keeps it to the end; a switch replaces the
    reference (one assignment), so the old model answers what it started."""

    def __init__(self, model: ServedModel):
        self.current = model


def load_release(ws: Workspace, name: str) -> ServedModel:
    from core.deploy.portable import OnnxPredictor
    from core.deploy.release import find_release, release_model_path
    release = find_release(ws, name)
    predictor = OnnxPredictor(release_model_path(release))
    card = {**predictor.card, "release": {"name": release["name"], "version": release["version"],
                                          "dataset": release["dataset"], "run_id": release["run_id"]}}
    return ServedModel(predictor, card, gradcam=False)


def follow_latest(ws: Workspace, holder: Holder, interval_s: float = 2.0, stop=None) -> None:
    """Switch `holder` to each newer release as it appears (a thread's loop; `stop`: a threading.Event)."""
    import threading

    from core.deploy.release import find_release
    stop = stop or threading.Event()
    while not stop.wait(interval_s):
        try:
            newest = find_release(ws, "latest")["name"]
            if newest != holder.current.card["release"]["name"]:
                holder.current = load_release(ws, newest)  # loaded first, then swapped: no request waits on it
                print(f"now serving release {newest}", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001  a half-made release, a locked database: the old model serves on
            print(f"release check: {exc}", file=sys.stderr)


def load_model(source: str, ws: Workspace | None = None) -> ServedModel:
    """A run id (in the workspace) or a path to an exported .onnx file."""
    if source.lower().endswith(".onnx"):
        from core.deploy.portable import OnnxPredictor
        predictor = OnnxPredictor(source)
        return ServedModel(predictor, predictor.card, gradcam=False)
    from core.deploy.export import model_card
    from core.deploy.predict import get_predictor
    ws = ws or Workspace()
    predictor = get_predictor(ws, source)
    card = model_card(ws.run(source), predictor.meta, "run", predictor.classifier.tta,
                      predictor.classifier.tta_views)  # the card an export carries
    return ServedModel(predictor, card, gradcam=True)


def _error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": {
        "type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]}}}}


def create_app(model: ServedModel | Holder, limits: Limits = DEFAULT_LIMITS, api_key: str | None = None,
               hosts: list[str] | None = None, max_concurrent: int = DEFAULT_MAX_CONCURRENT,
               queue_wait_s: float = DEFAULT_QUEUE_WAIT_S) -> FastAPI:
    holder = model if isinstance(model, Holder) else Holder(model)
    first = holder.current
    app = FastAPI(title="Image classifier studio: prediction API", version="1",
                  description=f"Model {first.card.get('run_id', '')}: classes {', '.join(first.card['classes'])}")
    app.add_middleware(AccessGuard, api_key=api_key, hosts=hosts if hosts is not None else allowed_hosts("", None))
    turns = asyncio.Semaphore(max_concurrent)
    errors = {400: _error("Malformed request, no image, an unknown Host, or Grad-CAM asked of an ONNX model"),
              408: _error("The body did not arrive in time"),
              413: _error("Over a limit: the body, one file, the number of files or of fields"),
              415: _error("The body is not multipart/form-data"),
              422: _error("A file is not a usable image (each named with its reason), or a bad query parameter"),
              503: _error("Busy: every turn was taken for the whole wait; retry after the Retry-After seconds")}
    if api_key:
        errors[401] = _error("Missing or wrong API key")

    @app.exception_handler(RequestValidationError)
    async def one_line(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default is a list of objects; every other refusal here is {"detail": "one readable line"}
        where = lambda e: ".".join(str(x) for x in e.get("loc", ())[1:]) or "request"  # noqa: E731
        return JSONResponse({"detail": "; ".join(f"{where(e)}: {e.get('msg', '')}" for e in exc.errors())}, 422)

    @app.get("/health")
    async def health() -> dict:  # async: answered on the event loop, never queued behind predictions
        return {"status": "ok"}

    @app.get("/model", responses={k: v for k, v in errors.items() if k in (400, 401)})
    async def card() -> dict:
        return holder.current.card

    body = {"type": "object", "required": [FIELD], "properties": {FIELD: {
        "type": "array", "minItems": 1, "maxItems": limits.files, "items": {"type": "string", "format": "binary"},
        "description": f"one or more image files (PNG, JPEG, BMP, GIF, TIFF, WebP...), each at most "
                       f"{limits.file_mb:g} MB, {limits.request_mb:g} MB in all"}}}

    @app.post("/predict", responses=errors, openapi_extra={"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": body, "encoding": {FIELD: {"contentType": "image/png"}}}}}})
    async def predict(request: Request, top_k: int = Query(3, ge=1, le=100),
                      gradcam: bool = Query(False)) -> dict:
        model = holder.current  # this request's model to the end, whatever a release switch does meanwhile
        if gradcam and not model.gradcam:
            raise HTTPException(400, "Grad-CAM needs the run's checkpoint: this server runs an exported ONNX file")
        try:
            await asyncio.wait_for(turns.acquire(), queue_wait_s)
        except TimeoutError:
            raise HTTPException(503, f"busy: {max_concurrent} requests in progress for the last {queue_wait_s:g} s",
                                headers={"Retry-After": "1"}) from None
        try:
            named = await read_images(request, limits)
            return await run_in_threadpool(_predict, model, named, top_k, gradcam)
        finally:
            turns.release()

    if api_key:
        _document_the_key(app)
    return app


def _document_the_key(app: FastAPI) -> None:
    """The schema says every path but OPEN_PATHS needs the key, in either header (clients and fuzzers read it)."""
    plain = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = plain()
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
            for path, operations in schema["paths"].items():
                if path not in OPEN_PATHS:
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}, {"apiKey": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _predict(model: ServedModel, named: list[tuple[str, bytes]], top_k: int, gradcam: bool) -> dict:
    results = model.predictor.predict([data for _, data in named], top_k=top_k)
    bad = [f"{name}: {r['error']}" for (name, _), r in zip(named, results) if "error" in r]
    if bad:  # a request with an unusable image is refused whole, each bad file named with its reason
        raise HTTPException(422, "; ".join(bad))
    for (name, data), result in zip(named, results):
        result["file"] = name
        result.pop("path", None)
        if gradcam:
            result["gradcam_png"] = _gradcam_png(model.predictor, data, result["top"][0]["label"])
    return {"model": model.card.get("run_id"), **({"release": model.card["release"]["name"]}
                                                 if "release" in model.card else {}), "results": results}


def _gradcam_png(predictor, data: bytes, label: str) -> str:
    from PIL import Image
    out = predictor.explain(data, target=label)
    buf = io.BytesIO()
    Image.fromarray(out["overlay"]).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def serve(source: str, ws: Workspace | None = None, host: str = "127.0.0.1", port: int = 8000,
          limits: Limits = DEFAULT_LIMITS, api_key: str | None = None, no_auth: bool = False,
          extra_hosts: list[str] | None = None, max_concurrent: int = DEFAULT_MAX_CONCURRENT,
          queue_wait_s: float = DEFAULT_QUEUE_WAIT_S, release: str | None = None, follow_s: float = 2.0) -> None:
    """Serve `source` (a run id or an .onnx file), or with `release` a release by name or the `latest` one (followed:
    a newer release is switched to as it appears)."""
    import threading

    import uvicorn
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    warning = check_bind(host, api_key, no_auth)  # before the model loads: a refusal costs nothing
    if warning:
        print(warning, file=sys.stderr)
    ws = ws or Workspace()
    holder = Holder(load_release(ws, release) if release else load_model(source, ws))
    what = f"release {holder.current.card['release']['name']}" if release else source
    print(f"serving {what} on http://{host}:{port} (docs at /docs); Ctrl+C stops", file=sys.stderr)
    if release == "latest":
        threading.Thread(target=follow_latest, args=(ws, holder, follow_s), daemon=True).start()
    app = create_app(holder, limits, api_key, allowed_hosts(host, extra_hosts), max_concurrent, queue_wait_s)
    uvicorn.run(app, host=host, port=port, log_level="warning")
