"""Placeholder until the studio pages land: the engine works from `python -m core`."""
import streamlit as st

st.title("Image classifier studio")
st.info("The studio is being built. Meanwhile train from the command line: "
        "`python -m core train --data elpv --weights none --image-size 128 --epochs 2`")
