"""`predict`, `export`, `serve`: a run's model on new images, out of the studio, and over HTTP."""
from __future__ import annotations

import argparse
import sys

from core.cli.output import Output
from core.config import ConfigError
from core.workspace.store import Workspace

EXPORT_FORMATS = ("onnx", "torchscript")  # core/deploy/export.py's FORMATS, named here without importing torch


def cmd_predict(args, ws: Workspace | None) -> Output:
    if args.model:  # an exported ONNX file: no torch, no workspace
        from core.deploy.portable import OnnxPredictor
        predictor, images = OnnxPredictor(args.model), args.items
    else:
        from core.deploy.predict import get_predictor
        if len(args.items) < 2:
            raise ConfigError("images", "give a run id and at least one image (or --model FILE.onnx and images)")
        predictor, images = get_predictor(ws, args.items[0]), args.items[1:]
    results = predictor.predict(list(images), top_k=args.top_k)
    return Output(results, lambda: [prediction_line(r) for r in results], 1 if all("error" in r for r in results) else 0)


def prediction_line(r: dict) -> str:
    if "error" in r:
        return f"{r['path']}: error: {r['error']}"
    tops = ", ".join(f"{t['label']} {t['prob']:.3f}" for t in r["top"])
    verdict = f"{r['decision']['verdict']}  " if "decision" in r else ""
    return f"{r['path']}: {verdict}{tops}"


def cmd_export(args, ws: Workspace) -> Output:
    from core.deploy.export import export_run
    out = export_run(ws, args.run, args.format, args.out, tta=args.tta, int8=args.int8, force=args.force)
    if not args.json:
        card = out["card"]
        print(f"{out['path']}: {args.format}{' int8' if args.int8 else ''}, classes {', '.join(card['classes'])}, "
              f"input uint8 {card['input']['height']}x{card['input']['width']}x3 RGB, TTA {card['tta']}", file=sys.stderr)
        for line in agreement_lines(card):
            print(line, file=sys.stderr)
    return Output({"path": out["path"], "card_path": out["card_path"], "card": out["card"]}, lambda: [out["path"]])


def agreement_lines(card: dict) -> list[str]:
    """What the card says about the file deciding as the studio does (and int8 against fp32)."""
    lines = []
    for part, f in (card.get("agreement") or {}).items():
        if part == "rule" or not f.get("n"):
            continue
        verdicts = f" and {f['verdict_agree']}/{f['n']} rule decisions" if "verdict_agree" in f else ""
        lines.append(f"  {part}: the file and the studio agree on {f['argmax_agree']}/{f['n']} argmax decisions"
                     f"{verdicts}; largest probability difference {f['max_prob_diff']:.2e}")
    if card.get("agreement"):
        lines.append(f"  rule in the card: {card['agreement']['rule']}")
    q = card.get("int8")
    if q:
        for part in ("test", "golden"):
            if q["fp32"]["accuracy"].get(part) is not None:
                lines.append(f"  {part} accuracy fp32 {q['fp32']['accuracy'][part]:.4f}, int8 "
                             f"{q['int8']['accuracy'][part]:.4f}")
        lines.append(f"  size fp32 {q['fp32']['size_mb']} MB, int8 {q['int8']['size_mb']} MB"
                     + ("  (forced past the accuracy check)" if q["forced"] else ""))
    return lines


def cmd_serve(args, ws: Workspace) -> int:
    from core.deploy.serve import serve
    from core.deploy.uploads import Limits
    limits = Limits(file_mb=args.max_mb, request_mb=args.max_request_mb, files=args.max_files)
    if bool(args.model) == bool(args.release):
        raise ConfigError("serve", "give a run id or .onnx file, or --release NAME|latest (one of them)")
    serve(args.model, ws, args.host, args.port, limits, args.api_key, args.no_auth, args.allowed_host,
          args.max_concurrent, args.queue_wait, args.release, args.follow_interval)
    return 0


def cmd_watch(args, ws: Workspace) -> int:
    from core.deploy.watch import HotFolder
    if ws.run_row(args.model) is not None:
        from core.deploy.predict import get_predictor
        predictor, name = get_predictor(ws, args.model), f"run {args.model}"
    else:
        from core.deploy.serve import load_release
        served = load_release(ws, args.model)
        predictor, name = served.predictor, served.card["release"]["name"]
    hot = HotFolder(ws, args.folder, predictor, name, args.out, args.settle)
    print(f"watching {hot.folder} with {name}: rows to {hot.out_csv}; Ctrl+C stops", file=sys.stderr)
    hot.run(args.interval, once=args.once)
    return 0


def add_commands(add) -> None:
    p = add("predict", cmd_predict, "predict images with a run's best checkpoint (RUN_ID IMAGE...) or an exported "
                                     "ONNX file (--model FILE IMAGE...)", workspace=lambda args: not args.model)
    p.add_argument("items", nargs="+", metavar="RUN_ID|IMAGE", help="a run id then images; with --model, images only")
    p.add_argument("--model", help="an ONNX file from `core export`: predicts without torch")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p = add("export", cmd_export, "write a run's model as ONNX or TorchScript with its model card; prints the path")
    p.add_argument("run")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="onnx")
    p.add_argument("--out", help="the file to write (default: the run's exports/ folder)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="put the run's test-time augmentation (its flips or 8 views) in the graph, or leave it out "
                        "(default: as the run was evaluated)")
    p.add_argument("--int8", action="store_true", help="ONNX quantized to int8 (static, calibrated on training images); "
                                                       "refused if it loses more than a point of test or golden accuracy")
    p.add_argument("--force", action="store_true", help="with --int8: write it even if it loses more than that")
    p.add_argument("--json", action="store_true")
    p = add("watch", cmd_watch, "predict each new image a camera writes into a folder, once, into a CSV and the "
                                "workspace; the rule's review images go to the Label page's queue")
    p.add_argument("model", metavar="RELEASE|latest|RUN_ID")
    p.add_argument("folder", metavar="IN_DIR")
    p.add_argument("--out", required=True, metavar="RESULTS.csv", help="appended to, one row per image")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="how often to look (file events, "
                                                                                   "where there are some, wake it sooner)")
    p.add_argument("--settle", type=float, default=1.0, metavar="SECONDS",
                   help="a file is complete when its size and time stayed the same this long (or it was renamed in)")
    p.add_argument("--once", action="store_true", help="predict what is there (once settled), then stop")
    p = add("serve", cmd_serve, "serve a run's model (or an exported .onnx file) as an HTTP JSON API")
    p.add_argument("model", metavar="RUN_ID|FILE.onnx", nargs="?")
    p.add_argument("--release", metavar="NAME|latest", help="serve a release (core release); `latest` follows the "
                                                           "newest, switching without dropping a request")
    p.add_argument("--follow-interval", type=float, default=2.0, metavar="SECONDS",
                   help="with --release latest: how often to look for a newer release")
    p.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (this machine only) unless you mean otherwise")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-mb", type=float, default=20, help="largest image file accepted, in MB")
    p.add_argument("--max-request-mb", type=float, default=64, help="largest request body accepted, in MB")
    p.add_argument("--max-files", type=int, default=32, help="most images in one request")
    p.add_argument("--max-concurrent", type=int, default=4,
                   help="requests read and predicted at once; others wait (--queue-wait), then get 503 + Retry-After")
    p.add_argument("--queue-wait", type=float, default=10, metavar="SECONDS",
                   help="how long a request waits for its turn before it is answered 503")
    p.add_argument("--api-key", help="require this key (header 'Authorization: Bearer KEY' or 'X-API-Key: KEY'); "
                                     "default: the STUDIO_API_KEY environment variable, if set")
    p.add_argument("--no-auth", action="store_true",
                   help="serve on a network address without an API key (refused otherwise)")
    p.add_argument("--allowed-host", action="append", metavar="NAME",
                   help="a host name clients may use to reach the server, besides loopback (repeat; '*' for any); "
                        "checked against DNS rebinding")
