"""An HTTP JSON API for a model, for the inspection software that calls it: FastAPI on uvicorn.

    POST /predict   one or more images (multipart field "files"); ?top_k=3&gradcam=false; each result has the
                    calibrated probabilities and, when the run has a decision rule (`core decide`), its "decision"
    GET  /health    {"status": "ok"}
    GET  /model     the model card (classes, input, normalization, TTA, test metrics)
    GET  /docs      OpenAPI documentation (FastAPI's)

The model is a run's best checkpoint (the studio's Predictor: Grad-CAM available) or an exported ONNX file
(core/deploy/portable.py: no torch). Bad input is a 4xx with a reason and never takes the server down: no file, too many
files, a file over the size limit, or a file that is not a usable image (the reason names it: not an image,
truncated, too many pixels...). The server binds to 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import JSONResponse

from core.workspace.store import Workspace

DEFAULT_MAX_MB = 20
DEFAULT_MAX_FILES = 32


@dataclass
class ServedModel:
    predictor: object      # core.predict.Predictor or core.portable.OnnxPredictor: predict(sources, top_k)
    card: dict
    gradcam: bool          # a run's checkpoint can explain; an ONNX file cannot


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


def create_app(model: ServedModel, max_mb: float = DEFAULT_MAX_MB, max_files: int = DEFAULT_MAX_FILES):
    max_bytes = int(max_mb * 2**20)
    app = FastAPI(title="Image classifier studio: prediction API", version="1",
                  description=f"Model {model.card.get('run_id', '')}: classes {', '.join(model.card['classes'])}")

    @app.middleware("http")
    async def refuse_oversized_bodies(request: Request, call_next):
        # Checked before the multipart body is parsed (and spooled to disk): the whole request's size.
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_bytes * max_files + 2**20:
            return JSONResponse({"detail": f"request of {int(length):,} bytes is over the limit "
                                           f"({max_files} files of {max_mb:g} MB)"}, status_code=413)
        return await call_next(request)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/model")
    def card() -> dict:
        return model.card

    @app.post("/predict")
    def predict(files: list[UploadFile] | None = File(None, description="one or more images"),
                top_k: int = Query(3, ge=1, le=100), gradcam: bool = Query(False)) -> dict:
        if not files:
            raise HTTPException(400, "no image in the request: send one or more files as multipart field 'files'")
        if len(files) > max_files:
            raise HTTPException(413, f"{len(files)} files in one request; the limit is {max_files}")
        if gradcam and not model.gradcam:
            raise HTTPException(400, "Grad-CAM needs the run's checkpoint: this server runs an exported ONNX file")
        named = [(f.filename or f"file {i + 1}", _read_limited(f, max_bytes)) for i, f in enumerate(files)]
        for name, data in named:
            if data is None:
                raise HTTPException(413, f"{name} is over the per-file limit of {max_mb:g} MB")
        results = model.predictor.predict([data for _, data in named], top_k=top_k)
        bad = [f"{name}: {r['error']}" for (name, _), r in zip(named, results) if "error" in r]
        if bad:  # a request with an unusable image is refused whole, each bad file named with its reason
            raise HTTPException(422, "; ".join(bad))
        for (name, data), result in zip(named, results):
            result["file"] = name
            result.pop("path", None)
            if gradcam:
                result["gradcam_png"] = _gradcam_png(model.predictor, data, result["top"][0]["label"])
        return {"model": model.card.get("run_id"), "results": results}

    return app


def _read_limited(upload, max_bytes: int) -> bytes | None:
    """The upload's bytes, or None when it is over max_bytes (read no further than that)."""
    data = upload.file.read(max_bytes + 1)
    return None if len(data) > max_bytes else data


def _gradcam_png(predictor, data: bytes, label: str) -> str:
    from PIL import Image
    out = predictor.explain(data, target=label)
    buf = io.BytesIO()
    Image.fromarray(out["overlay"]).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def serve(source: str, ws: Workspace | None = None, host: str = "127.0.0.1", port: int = 8000,
          max_mb: float = DEFAULT_MAX_MB, max_files: int = DEFAULT_MAX_FILES) -> None:
    import uvicorn
    app = create_app(load_model(source, ws), max_mb, max_files)
    uvicorn.run(app, host=host, port=port, log_level="warning")
