"""From a run to the line: prediction, exported files, a server, an audit pack.

    predict.py     a loaded model for new images, with heatmaps and evidence
    portable.py    prediction from an exported ONNX file, without torch
    export.py      ONNX / TorchScript files with a model card
    agreement.py   an export checked against the studio's own decisions; int8 quantization
    watch.py       the hot folder: each new image a camera writes predicted once, into a CSV and the workspace
    release.py     immutable, numbered releases of a run, let through by the gate, with their ledger
    serve.py       an HTTP JSON API for a model (FastAPI on uvicorn), one request at most its limits and its turn
    uploads.py     the images of a request, read as the body streams, refused the moment a limit is passed
    access.py      who may call the server: the API key, the Host allow-list, binding beyond loopback
    audit_pack.py  one report and zip that document a run for an auditor (its HTML: templates/audit_pack.html)
"""
