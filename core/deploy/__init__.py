"""From a run to the line: prediction, exported files, a server, an audit pack.

    predict.py     a loaded model for new images, with heatmaps and evidence
    portable.py    prediction from an exported ONNX file, without torch
    export.py      ONNX / TorchScript files with a model card
    serve.py       an HTTP JSON API for a model (FastAPI on uvicorn)
    audit_pack.py  one report and zip that document a run for an auditor (its HTML: templates/audit_pack.html)
"""
