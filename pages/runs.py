from pathlib import Path

import pandas as pd
import streamlit as st

from core.config import RUN_KIND_NAMES
from core.deploy.audit_pack import build_audit_pack
from core.deploy.export import FORMATS, ExportError, export_run
from core.errors import UserError
from pages import _release, _ui

st.title("Runs")
ws = _ui.ws()
jm = _ui.manager()
rows = _ui.require(ws.list_runs(), "No runs yet.", "pages/train.py", "Go to Train", ":material/model_training:")


def _duration(r):
    if r["started"] and r["finished"]:
        return _ui.format_seconds(r["finished"] - r["started"])
    return "-"


def _kind(run_id: str) -> str:
    """training, or a job that studies data or a run (cross-validation, learning curve of run X)."""
    try:
        cfg = ws.run(run_id).config()
    except (OSError, ValueError):
        return "?"
    kind = RUN_KIND_NAMES.get(cfg.kind, cfg.kind)
    return f"{kind} of {cfg.extra['of']}" if cfg.extra.get("of") else kind


frame = pd.DataFrame([{
    "run": r["id"], "kind": _kind(r["id"]), "status": f"{_ui.STATUS_ICON.get(r['status'], '')} {r['status']}",
    "dataset": r["dataset"],
    "architecture": r["arch"], "weights": r["weights"], "epochs": f"{r['epochs_done']}/{r['epochs']}",
    "best val acc": r["best_val_acc"], "test acc": r["test_acc"],
    # the same golden images for every run of a dataset; the version says which labels it was scored with
    "golden acc": r["golden_acc"], "golden v": r["golden_version"], "duration": _duration(r),
    "error": r["error"] or "",
} for r in rows])
event = st.dataframe(frame, hide_index=True, on_select="rerun", selection_mode="multi-row", key="runs_table",
                     column_config={"best val acc": st.column_config.NumberColumn(format="percent"),
                                    "test acc": st.column_config.NumberColumn(format="percent"),
                                    "golden acc": st.column_config.NumberColumn(format="percent")})
selected_rows = event.selection.rows if event and event.selection else []
ids = [r["id"] for r in rows]
selected = st.multiselect("Runs to compare or act on", ids, default=[ids[i] for i in selected_rows] or ids[:1],
                          key="runs_selected")

if selected:
    histories = {rid: ws.run(rid).history() for rid in selected}
    c1, c2 = st.columns(2)
    c1.plotly_chart(_ui.curves_figure([], "loss", "Validation loss", runs=histories), key="cmp_loss")
    c2.plotly_chart(_ui.curves_figure([], "acc", "Validation accuracy", runs=histories), key="cmp_acc")

if len(selected) == 1:
    rid = selected[0]
    row = ws.run_row(rid)
    st.subheader(f"Run {rid}")
    cfg = ws.run(rid).config()
    st.caption(f"{cfg.arch}, weights {cfg.weights}, {cfg.epochs} epochs, image {cfg.input_hw[0]}x{cfg.input_hw[1]}, "
               f"batch {cfg.batch_size}, lr {cfg.lr}, {cfg.optimizer}, schedule {cfg.schedule}")
    a, b, c = st.columns(3)
    if row["status"] in ("stopped", "interrupted", "failed", "done") and ws.run(rid).last_path.exists():
        finished = row["status"] == "done"
        more = a.number_input("Train up to epoch", 1, 1000, max(row["epochs"], row["epochs_done"] + 1)
                              if finished else row["epochs"], key=f"resume_epochs_{rid}",
                              help="A finished run trains on from its last epoch's weights and optimizer state; "
                                   "the added epochs get a learning-rate cycle of their own (one-cycle warms up and "
                                   "decays again, cosine decays again from the initial rate). A stopped or "
                                   "interrupted run continues its own schedule from its last finished epoch. "
                                   "best.pt is replaced only if validation accuracy improves.")
        if a.button("Train on" if finished else "Resume", key=f"resume_{rid}"):
            try:
                jm.resume(rid, epochs=int(more))
                st.success(f"Run {rid} queued to resume; follow it on the Train page.")
                st.session_state["train_run"] = rid
            except (RuntimeError, KeyError) as exc:
                st.error(str(exc))
    if row["status"] in ("queued", "running", "stopping"):
        if b.button("Stop", key=f"stop_{rid}", help="Stops within one batch; the best checkpoint is kept. A training "
                                                    "that does not answer within 60 s is terminated, then killed."):
            jm.stop(rid)
            st.rerun()
    else:
        confirm = c.checkbox("I want to delete this run", key=f"confirm_{rid}")
        if c.button("Delete run", key=f"delete_{rid}", disabled=not confirm, type="primary"):
            try:
                ws.delete_run(rid)
                st.success(f"Deleted run {rid}.")
                st.rerun()
            except (RuntimeError, OSError) as exc:
                st.error(str(exc))
    if ws.run(rid).eval_path.exists():
        st.page_link("pages/evaluate.py", label="Open its evaluation", icon=":material/fact_check:",
                     query_params={"run": rid})
    if ws.run(rid).best_path.exists():
        with st.expander("Export the model"):
            st.caption("An ONNX or TorchScript file that takes uint8 RGB images resized to the run's input size and "
                       "returns the studio's probabilities (normalization and, if the run uses it, the flip TTA are "
                       "inside), with a model card (classes, input, normalization, config, test metrics).")
            fmt = st.radio("Format", list(FORMATS), horizontal=True, key=f"export_fmt_{rid}")
            if st.button("Export", key=f"export_{rid}"):
                try:
                    with st.spinner("Exporting…"):
                        st.session_state[f"exported_{rid}"] = export_run(ws, rid, fmt)["path"]
                except ExportError as exc:
                    st.error(str(exc))
            exported = st.session_state.get(f"exported_{rid}")
            if exported and Path(exported).exists():
                st.download_button(f"Download {Path(exported).name}", Path(exported).read_bytes(),
                                   file_name=Path(exported).name, key=f"download_{rid}")
                st.caption(f"Saved at `{exported}` with its card `{Path(exported).name}.card.json`.")
    if row["status"] == "done" and ws.run(rid).eval_path.exists():
        _release.release_panel(ws, rid)
    if ws.run(rid).eval_path.exists():
        with st.expander("Export audit pack"):
            st.caption("One self-contained HTML report (plots and heatmaps inside) and a zip with it and every file it "
                       "cites: config, data hash and split, metrics, evaluation and confusion matrix, calibration, "
                       "decision rule, near-duplicates and leakage, the Grad-CAM audit, sample heatmaps, environment.")
            if st.button("Export audit pack", key=f"audit_pack_{rid}"):
                try:
                    with st.spinner("Writing the audit pack…"):
                        st.session_state[f"audit_pack_{rid}_out"] = build_audit_pack(ws, rid)
                except UserError as exc:
                    st.error(str(exc))
            pack = st.session_state.get(f"audit_pack_{rid}_out")
            if pack and Path(pack["zip"]).exists():
                d1, d2 = st.columns(2)
                d1.download_button("Download the report (HTML)", Path(pack["html"]).read_bytes(),
                                   file_name=Path(pack["html"]).name, mime="text/html", key=f"audit_html_{rid}")
                d2.download_button(f"Download the pack (zip, {len(pack['files'])} files)", Path(pack["zip"]).read_bytes(),
                                   file_name=Path(pack["zip"]).name, mime="application/zip", key=f"audit_zip_{rid}")
    log = ws.run(rid).log_path
    with st.expander("Log"):
        st.code(log.read_text(errors="replace")[-6000:] if log.exists() else "(no log)", language=None)

_release.releases_section(ws)
