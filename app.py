"""The studio: `streamlit run app.py`. Pages are listed in pages/_nav.py, each a short script in pages/."""
import streamlit as st

from pages import _nav

st.set_page_config(page_title="Image classifier studio", page_icon="🔬", layout="wide")
_nav.end_legacy_mode()
page = _nav.navigation()

from pages import _ui  # noqa: E402  (after the navigation: a first run in legacy mode ends above)

_ui.css()
_ui.login_gate()  # a shared studio ([auth] in secrets.toml): nothing below for a visitor who has not signed in
_ui.sidebar()
try:
    page.run()
finally:  # also after a page that ended early with st.stop() (Datasets on an empty workspace: the device was
    _ui.detect_device()  # never detected, and the sidebar said "detecting…" for ever)
