import streamlit as st

from pages import _ui

st.title("Image classifier studio")
st.write("Train a ResNet on your own pictures, see where it goes wrong, and use it on new images. "
         "Everything runs on this machine; training goes on in the background while you look around.")

ws = _ui.ws()
runs = ws.list_runs()
datasets = ws.list_datasets()

steps = [
    ("pages/datasets.py", "1 · Datasets", f"{len(datasets)} registered. Point at a folder with one sub-folder "
     "per class, upload a zip, or use the solar-cell example."),
    ("pages/train.py", "2 · Train", "Pick a dataset and start; defaults follow proven recipes. Watch the curves live."),
    ("pages/evaluate.py", "3 · Evaluate", "Accuracy, per-class scores, the confusion matrix, and the misclassified "
     "images with Grad-CAM heatmaps."),
    ("pages/predict.py", "4 · Predict", "Drop in new images and get the model's answer with a heatmap."),
    ("pages/label.py", "5 · Label", "Fix wrong labels, label new images, and find likely label errors."),
    ("pages/runs.py", "Runs", f"{len(runs)} so far: compare, resume or delete them."),
]
cols = st.columns(len(steps))
for col, (target, label, text) in zip(cols, steps):
    with col, st.container(border=True):
        st.page_link(target, label=label)
        st.caption(text)

if runs:
    latest = runs[0]
    st.subheader("Latest run")
    st.write(_ui.run_label(latest))
