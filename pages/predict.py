import pandas as pd
import plotly.express as px
import streamlit as st

from core.data.images import ImageLoadError
from core.data.zips import ImportError_, read_zip_images
from core.deploy.predict import get_predictor, nearest_training
from core.explain.gradcam import METHODS
from pages import _ui

MAX_ZIP_IMAGES = 500

st.title("Predict")
ws = _ui.ws()
rows = _ui.require_trained_runs()

run_id = _ui.pick_run("Model (run)", rows, key="predict_run")
predictor = get_predictor(ws, run_id)
rule = predictor.rule
st.caption(f"Classes: {', '.join(predictor.classes)} · input {predictor.hw[0]}x{predictor.hw[1]} · "
           + (f"calibrated (temperature {predictor.classifier.temperature:.2f})"
              if predictor.classifier.temperature != 1.0 else "not calibrated")
           + (" · decision rule: " + (f"fail when p({rule.positive}) ≥ {rule.threshold:.3f}" if rule.binary else
                                      "least expected cost") + (", review band" if rule.has_band else "")
              if rule else " · no decision rule (choose one in Evaluate → Decide)"))

uploads = st.file_uploader("Images (or a zip of images)", accept_multiple_files=True, key="predict_files")
c1, c2, c3, c4 = st.columns(4)
top_k = c1.number_input("Top-k", 1, max(1, len(predictor.classes)), min(3, len(predictor.classes)))
show_cam = c2.toggle("Grad-CAM", value=True)
method = c3.selectbox("Method", METHODS, disabled=not show_cam)
show_near = c4.toggle("Nearest training images", value=True,
                      help="The 3 training images the model finds most alike (cosine of its penultimate features), "
                           "and a warning when the model places an image farther from every training image than 95% "
                           "of the validation images: it has seen nothing like it, so its confidence means little.")

if not uploads:
    st.stop()


def _expand(files):
    """(name, bytes, error) for each upload; a zip gives its images through core's safe reader."""
    for f in files:
        if not f.name.lower().endswith(".zip"):
            yield f.name, f.getvalue(), None
            continue
        try:
            images, skipped, more = read_zip_images(f, max_images=MAX_ZIP_IMAGES)
        except ImportError_ as exc:
            yield f.name, None, f"unusable zip: {exc}"
            continue
        if more:
            st.warning(f"{f.name}: only the first {MAX_ZIP_IMAGES} images are predicted ({more} more left out).")
        for entry, reason in skipped:
            yield f"{f.name}/{entry}", None, reason
        for entry, data in images:
            yield f"{f.name}/{entry}", data, None


items = list(_expand(uploads))
results = []
for name, data, error in items:
    if error:
        results.append({"path": name, "error": error})
        continue
    r = predictor.predict([data], top_k=top_k)[0]
    r["path"] = name
    r["data"] = data
    results.append(r)

if show_near:
    predicted = [r for r in results if "error" not in r]
    with st.spinner("Comparing with the training images (the first time, the run's features are computed)…"):
        for r, ev in zip(predicted, nearest_training(ws, run_id, [r["data"] for r in predicted], k=3)):
            r["evidence"] = ev

table = []
for r in results:
    if "error" in r:
        table.append({"image": r["path"], **({"decision": None} if rule else {}), "prediction": None,
                      "confidence": None, "error": r["error"]})
    else:
        table.append({"image": r["path"], **({"decision": r["decision"]["verdict"]} if rule else {}),
                      "prediction": r["top"][0]["label"], "confidence": r["top"][0]["prob"],
                      "error": None, **({"unlike training": r["evidence"]["unlike"]} if "evidence" in r else {}),
                      **{f"p_{c}": p for c, p in r["probs"].items()}})
frame = pd.DataFrame(table)
ok = sum(1 for r in results if "error" not in r)
st.subheader(f"{ok} of {len(results)} images predicted")
st.dataframe(frame, hide_index=True, column_config={"confidence": st.column_config.ProgressColumn(
    format="percent", min_value=0.0, max_value=1.0)})
st.download_button("Download predictions (CSV)", frame.to_csv(index=False).encode(), file_name="predictions.csv",
                   mime="text/csv")

for n, r in enumerate(results[:50]):
    with st.container(border=True):
        if "error" in r:
            st.error(f"{r['path']}: {r['error']}")
            continue
        a, b, c = st.columns([1, 1, 1.3])
        best = r["top"][0]
        try:
            out = predictor.explain(r["data"], method=method) if show_cam else None
            a.image(out["rgb"] if out else predictor.image(r["data"]), caption=r["path"], width="stretch")
            if out:
                b.image(out["overlay"], caption=f"Grad-CAM for {out['label']}", width="stretch")
        except ImageLoadError as exc:
            a.error(str(exc))
        if "decision" in r:
            verdict = r["decision"]["verdict"]
            color = {"pass": "green", "fail": "red", "review": "orange"}.get(verdict, "blue")
            c.markdown(f":{color}-badge[{verdict}]")
        c.markdown(f"**{best['label']}** · {best['prob']:.1%}")
        top = pd.DataFrame(r["top"])
        fig = px.bar(top, x="prob", y="label", orientation="h", range_x=[0, 1], text_auto=".1%")
        fig.update_layout(height=60 + 35 * len(top), margin=dict(l=10, r=10, t=10, b=10), yaxis_autorange="reversed",
                          xaxis_title=None, yaxis_title=None)
        c.plotly_chart(fig, key=f"top_{n}")
        if "evidence" in r:
            _ui.nearest_training_row(r["evidence"], predictor.image)
if len(results) > 50:
    st.caption(f"Showing the first 50 images; the table and CSV hold all {len(results)}.")
