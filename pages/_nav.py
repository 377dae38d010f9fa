"""The studio's pages, listed once, for app.py's navigation and its sidebar links.

Streamlit runs a folder named pages/ in its legacy mode (each page alone, listed by file name) until
st.navigation is called once in the process; until then a first visit straight to /train would run that page
without app.py. `end_legacy_mode` calls st.navigation (the public way to end that mode) and reruns, once per
process; the auto-discovered list itself is never drawn, because the config turns the built-in list off
(client.showSidebarNavigation = false) and app.py draws the links. This module holds only that state, so it
stays imported when the rerun interrupts the import of the page that called it.
"""
import streamlit as st

_legacy_mode_ended = False


def pages() -> list:
    return [
        st.Page("pages/home.py", title="Start", icon=":material/home:", default=True),
        st.Page("pages/datasets.py", title="Datasets", icon=":material/photo_library:"),
        st.Page("pages/train.py", title="Train", icon=":material/model_training:"),
        st.Page("pages/evaluate.py", title="Evaluate", icon=":material/fact_check:"),
        st.Page("pages/explore.py", title="Explore", icon=":material/scatter_plot:"),
        st.Page("pages/predict.py", title="Predict", icon=":material/image_search:"),
        st.Page("pages/label.py", title="Label", icon=":material/label:"),
        st.Page("pages/runs.py", title="Runs", icon=":material/history:"),
    ]


def end_legacy_mode() -> None:
    global _legacy_mode_ended
    if _legacy_mode_ended or not st.runtime.exists():
        return
    _legacy_mode_ended = True
    st.navigation(pages(), position="hidden")
    st.rerun()


def navigation():
    """app.py's navigation; returns the page to run."""
    global _legacy_mode_ended
    _legacy_mode_ended = True
    listed = pages()
    page = st.navigation(listed, position="hidden")
    with st.sidebar:
        for p in listed:
            st.page_link(p)
    return page
