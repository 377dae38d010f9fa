import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.data.images import ImageLoadError
from core.data.labels import LabelStore, relabel
from core.deploy.predict import get_predictor, nearest_training
from core.explain.gradcam import METHODS
from core.infer.evaluate import evaluate_run, gallery
from pages import _audit, _decide, _ui

st.title("Evaluate")
ws = _ui.ws()

rows = _ui.require_trained_runs()

run_id = _ui.pick_run("Run", rows, key="eval_run")
run = ws.run(run_id)
ev = run.evaluation()
if ev is None:
    st.warning("This run has not been evaluated on its test split yet.")
    if st.button("Evaluate now", type="primary"):
        with st.spinner("Evaluating…"):
            ev = evaluate_run(ws, run)
    else:
        st.stop()

c1, c2, c3, c4 = st.columns(4)
c1.metric(f"{ev['split'].capitalize()} accuracy", f"{ev['accuracy']:.1%}")
c2.metric("Macro F1", f"{ev['macro_f1']:.3f}")
if "grade_mae" in ev:  # an ordinal run: how many grades off, on average
    c3.metric("Mean grade error", f"{ev['grade_mae']:.3f}", help="Grades between the predicted and the true class, "
              "averaged over the images (0: every grade right).")
else:
    c3.metric("Loss", f"{ev['loss']:.4f}")
c4.metric("Images", ev["n"])
averaged = " (the averaged weights: they validated better than the trained ones)" \
    if ev.get("checkpoint_weights") == "averaged" else ""
st.caption(f"Best checkpoint from epoch {ev.get('checkpoint_epoch')}{averaged} "
           f"(validation accuracy {ev['best_val_acc']:.1%})" if ev.get("best_val_acc") is not None else "")

per_class = pd.DataFrame(ev["per_class"])
st.dataframe(per_class, hide_index=True, column_config={
    "precision": st.column_config.NumberColumn(format="%.3f"),
    "recall": st.column_config.NumberColumn(format="%.3f"),
    "f1": st.column_config.NumberColumn(format="%.3f")})

history = run.history()
if history:
    h1, h2 = st.columns(2)
    full = _ui.image_side(run)
    h1.plotly_chart(_ui.curves_figure(history, "loss", "Loss", full_size=full), key="eval_loss")
    h2.plotly_chart(_ui.curves_figure(history, "acc", "Accuracy", full_size=full), key="eval_acc")

# --- confusion matrix: click a cell to filter the gallery ---------------------------------------------
st.subheader("Confusion matrix")
classes = ev["classes"]
cm = np.array(ev["confusion_matrix"])
normalized = st.toggle("Row-normalized (recall per true class)", key="cm_norm")
row_sums = cm.sum(1, keepdims=True)
shown = np.divide(cm, row_sums, out=np.zeros_like(cm, dtype=float), where=row_sums > 0) if normalized else cm
text = [[(f"{shown[i, j]:.0%}" if normalized else str(cm[i, j])) for j in range(len(classes))]
        for i in range(len(classes))]
fig = go.Figure(go.Heatmap(z=shown, x=classes, y=classes, colorscale="Blues", text=text, texttemplate="%{text}",
                           hovertemplate="true %{y}<br>predicted %{x}<br>%{text}<extra></extra>"))
# Heatmap cells do not report clicks; an invisible marker on each cell does.
xs, ys = np.meshgrid(range(len(classes)), range(len(classes)))
fig.add_scatter(x=[classes[j] for j in xs.ravel()], y=[classes[i] for i in ys.ravel()], mode="markers",
                marker=dict(size=40, opacity=0.01, symbol="square"), hoverinfo="skip", showlegend=False)
fig.update_layout(xaxis_title="predicted", yaxis_title="true", yaxis_autorange="reversed",
                  height=260 + 40 * len(classes), margin=dict(l=10, r=10, t=10, b=10))
event = st.plotly_chart(fig, on_select="rerun", selection_mode="points", key="cm_chart")
points = (event or {}).get("selection", {}).get("points", []) if event else []
if points:
    cell = (points[0]["y"], points[0]["x"])
    if st.session_state.get("_cm_cell") != cell:  # a new click; later reruns keep the user's own choice
        st.session_state["_cm_cell"] = cell
        st.session_state["cell_true"], st.session_state["cell_pred"] = cell
        st.session_state["gallery_page"] = 1

f1, f2 = st.columns(2)
options = ["(any)"] + classes
true_f = f1.selectbox("True class", options, key="cell_true")
pred_f = f2.selectbox("Predicted class", options, key="cell_pred")

# --- error gallery ----------------------------------------------------------------------------------
true_sel = None if true_f == "(any)" else true_f
pred_sel = None if pred_f == "(any)" else pred_f
items = gallery(run, true_sel, pred_sel)
if true_sel is not None and true_sel == pred_sel:
    st.subheader(f"Correct: {true_sel} ({len(items)})")
else:
    st.subheader(f"Misclassified ({len(items)})")

g1, g2, g3, g4 = st.columns(4)
show_cam = g1.toggle("Grad-CAM overlay", value=True, key="show_cam")
method = g2.selectbox("Method", METHODS, key="cam_method", disabled=not show_cam)
show_near = g3.toggle("Nearest training images", value=False, key="show_near",
                      help="The 3 training images the model finds most alike, with their labels: a mislabeled twin "
                           "in training, or a test image unlike anything in training, shows here.")
page_size = 12
pages = max(1, (len(items) + page_size - 1) // page_size)
page_no = g4.number_input(f"Page (of {pages})", 1, pages, 1, key="gallery_page") if pages > 1 else 1

store = LabelStore(ws)
dataset_key = run.split().get("source", "")
overrides = store.overrides(dataset_key)


def _fix(paths: list[str], label: str | None, exclude: bool = False) -> None:
    shown = {p: next((i["true"] for i in items if i["path"] == p), None) for p in paths}
    relabel(store, dataset_key, shown, label, exclude, actor=_ui.actor())
    st.toast(f"{'Excluded' if exclude else 'Relabeled'} {len(paths)} image(s); the next training run uses it. "
             "Undo on the Label page.")


if not items:
    st.caption("Nothing here: no misclassified images for this selection.")
else:
    predictor = get_predictor(ws, run_id)
    cols = st.columns(4)
    shown_items = items[(page_no - 1) * page_size: page_no * page_size]
    evidence = {}
    if show_near:
        with st.spinner("Comparing with the training images (the first time, the run's features are computed)…"):
            evidence = dict(zip((i["path"] for i in shown_items),
                                nearest_training(ws, run_id, [i["path"] for i in shown_items], k=3)))
    for k, item in enumerate(shown_items):
        with cols[k % 4], st.container(border=True):
            caption = (f"true **{item['true']}** → predicted **{item['predicted']}** "
                       f"({item['confidence']:.0%}), loss {item['loss']:.2f}")
            try:
                if show_cam:
                    out = predictor.explain(item["path"], target=item["predicted"], method=method)
                    st.image(out["overlay"], width="stretch")
                else:
                    st.image(predictor.image(item["path"]), width="stretch")
            except ImageLoadError as exc:
                st.warning(f"cannot open: {exc}")
            st.markdown(caption)
            st.caption(item["path"].rsplit("/", 1)[-1])
            if "neighbours" in evidence.get(item["path"], {}):
                _ui.nearest_training_row(evidence[item["path"]], predictor.image)
            label_now, excluded_now = overrides.get(item["path"], (None, False))
            if excluded_now:
                st.caption("excluded from training")
            elif label_now and label_now != item["true"]:
                st.caption(f"label changed to **{label_now}**")
            st.checkbox("select", key=f"sel_{item['path']}")
            with st.popover("Fix label"):
                for c in classes:
                    if st.button(c, key=f"fix_{k}_{c}", disabled=c == (label_now or item["true"])):
                        _fix([item["path"]], c)
                        st.rerun()
                if st.button("Exclude", key=f"excl_{k}"):
                    _fix([item["path"]], None, exclude=True)
                    st.rerun()
    selected = [i["path"] for i in shown_items if st.session_state.get(f"sel_{i['path']}")]
    a1, a2 = st.columns([2, 1])
    target = a1.selectbox(f"Assign the {len(selected)} selected image(s) to", classes,
                          index=classes.index(pred_sel) if pred_sel in classes else 0, key="bulk_target")

    def _bulk_assign(paths, label):
        _fix(paths, label)
        for p in paths:  # clear the ticks (allowed in a callback, before the widgets are drawn again)
            st.session_state[f"sel_{p}"] = False

    a2.button("Assign", disabled=not selected, key="bulk_assign", on_click=_bulk_assign, args=(selected, target))

_decide.calibration_section(ws, run)
_decide.decide_section(ws, run)
_decide.learning_curve_section(ws, run, _ui.manager())
_audit.cam_audit_section(ws, run, get_predictor(ws, run_id))

st.download_button("Download per-image predictions (CSV)", run.predictions_path.read_bytes(),
                   file_name=f"{run_id}-predictions.csv", mime="text/csv")
