import pandas as pd
import plotly.express as px
import streamlit as st

from core.data.images import ImageLoadError
from core.data.labels import LabelStore, relabel
from core.deploy.predict import get_predictor
from core.errors import UserError
from core.explain.embedding import METHODS, run_map
from pages import _ui

MAX_SHOWN = 48
COLOUR_BY = {"label": "label", "prediction": "predicted", "right or wrong": "outcome", "part of the split": "part",
             "label doubt": "label_doubt", "confidence": "confidence"}

st.title("Explore")
st.caption("Every image of a run as a point, placed by what the model sees in it (its penultimate-layer "
           "features, projected to 2-D). Images the model finds alike sit together: a cluster of one class inside "
           "another is a labelling question, a lone island a kind of image the training set has few of. Select "
           "points with the box or lasso to see the images and relabel or exclude them.")
ws = _ui.ws()
rows = _ui.require_trained_runs()
c1, c2, c3 = st.columns([2, 1, 1])
with c1:
    run_id = _ui.pick_run("Run", rows, key="explore_run")
method = c2.selectbox("Projection", METHODS, key="explore_method",
                      help="pca: exact and instant; tsne and umap keep neighbourhoods better and take longer "
                           "(umap needs umap-learn installed).")
colour = c3.selectbox("Colour by", list(COLOUR_BY), key="explore_colour",
                      help="label doubt: how much more the model believes another class than the given label "
                           "(negative: it prefers another); for training images it is in-sample.")
run = ws.run(run_id)
try:
    with st.spinner("Computing the map (the first time, the run's features are computed)…"):
        m = run_map(ws, run, method)
except UserError as exc:
    st.error(str(exc))
    st.stop()

frame = pd.DataFrame({k: m[k] for k in ("x", "y", "path", "label", "predicted", "confidence", "part", "label_doubt")})
frame["outcome"] = ["right" if ok else "wrong" for ok in m["correct"]]
frame["file"] = [p.rsplit("/", 1)[-1] for p in m["path"]]
frame["row"] = range(len(frame))
wrong = int((frame["outcome"] == "wrong").sum())
st.caption(f"{len(frame)} images · {wrong} the model gets wrong · {method.upper()} of {run_id}'s features")
fig = px.scatter(frame, x="x", y="y", color=COLOUR_BY[colour], custom_data=["row"], symbol="outcome",
                 symbol_map={"right": "circle", "wrong": "x"},
                 hover_data={"file": True, "label": True, "predicted": True, "part": True, "x": False, "y": False,
                             "outcome": False, "confidence": ":.2f"},
                 color_continuous_scale="RdYlBu" if colour == "label doubt" else None)
fig.update_traces(marker=dict(size=6, opacity=0.8))
fig.update_layout(height=560, dragmode="lasso", margin=dict(l=10, r=10, t=10, b=10),
                  xaxis=dict(visible=False), yaxis=dict(visible=False), legend_title_text=colour)
event = st.plotly_chart(fig, on_select="rerun", selection_mode=("points", "box", "lasso"), key="explore_map")

chosen = sorted({int(p["customdata"][0]) for p in (event.selection.points if event else []) if p.get("customdata")})
if not chosen:
    st.info("Select points on the map (lasso, box, or click) to see their images here.")
    st.stop()

picked = frame.iloc[chosen]
st.subheader(f"{len(picked)} selected")
summary = picked.groupby(["label", "predicted"]).size().reset_index(name="images")
st.dataframe(summary, hide_index=True)

store = LabelStore(ws)
dataset_key = run.split().get("source", "")
classes = m["classes"]
a1, a2, a3 = st.columns([2, 1, 1])
target = a1.selectbox(f"Assign the {len(picked)} selected image(s) to", classes, key="explore_target")
if a2.button("Assign", key="explore_assign"):
    relabel(store, dataset_key, dict(zip(picked["path"], picked["label"])), target, actor=_ui.actor())
    st.toast(f"Relabeled {len(picked)} image(s) as {target}; the next training run uses it. Undo on the Label page.")
if a3.button("Exclude", key="explore_exclude"):
    relabel(store, dataset_key, dict(zip(picked["path"], picked["label"])), exclude=True, actor=_ui.actor())
    st.toast(f"Excluded {len(picked)} image(s) from training. Undo on the Label page.")

predictor = get_predictor(ws, run_id)
cols = st.columns(6)
for k, (_, item) in enumerate(picked.head(MAX_SHOWN).iterrows()):
    with cols[k % 6]:
        try:
            st.image(predictor.image(item["path"]), width="stretch")
        except ImageLoadError as exc:
            st.caption(f"unreadable: {exc}")
        st.caption(f"{item['label']} → {item['predicted']} · {item['part']}")
if len(picked) > MAX_SHOWN:
    st.caption(f"Showing {MAX_SHOWN} of the {len(picked)} selected.")
