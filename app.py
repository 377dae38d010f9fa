"""The studio: `streamlit run app.py`. Pages are listed here (st.navigation), each a short script in pages/."""
import streamlit as st

from pages import _ui

st.set_page_config(page_title="Image classifier studio", page_icon="🔬", layout="wide")

PAGES = [
    st.Page("pages/home.py", title="Start", icon=":material/home:", default=True),
    st.Page("pages/datasets.py", title="Datasets", icon=":material/photo_library:"),
    st.Page("pages/train.py", title="Train", icon=":material/model_training:"),
    st.Page("pages/evaluate.py", title="Evaluate", icon=":material/fact_check:"),
    st.Page("pages/predict.py", title="Predict", icon=":material/image_search:"),
    st.Page("pages/label.py", title="Label", icon=":material/label:"),
    st.Page("pages/runs.py", title="Runs", icon=":material/history:"),
]

page = st.navigation(PAGES)
_ui.css()
_ui.sidebar()
page.run()
