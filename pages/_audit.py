"""The Evaluate page's "Where the model looks" section: the Grad-CAM audit of core/explain/cam_audit.py, drawn."""
import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image, ImageDraw

from core.data.images import ImageLoadError
from core.explain.cam_audit import CamAudits, Region, load_cam_audit, save_region, saved_region

REGION_KINDS = ["each image's foreground (automatic)", "a rectangle for this dataset"]


@st.cache_resource(show_spinner=False)
def _audits(root: str) -> CamAudits:
    from core.workspace.store import Workspace
    return CamAudits(Workspace(root))


def audits(ws) -> CamAudits:
    """The one set of background audits of this process, shared by every session."""
    return _audits(str(ws.root))


def with_region(rgb: np.ndarray, region: Region) -> Image.Image:
    """The picture with the region's outline drawn on it (the foreground's rectangle when automatic)."""
    im = Image.fromarray(rgb).convert("RGB")
    ys, xs = np.nonzero(region.mask(rgb))
    if len(ys):
        ImageDraw.Draw(im).rectangle([int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())],
                                     outline=(0, 255, 0), width=max(1, rgb.shape[0] // 100))
    return im


def cam_audit_section(ws, run, predictor) -> None:
    st.subheader("Where the model looks")
    st.caption("A Grad-CAM audit of every test image: the share of the model's attention (for the class it "
               "predicts) that falls outside the region where the evidence should be. A class whose images are "
               "mostly looked at elsewhere may be told by a sticker, a ruler or the background, which accuracy does "
               "not show. Classes told by what they lack (no defect) have diffuse maps: read the classes whose "
               "evidence is a thing in the picture.")
    source = run.config().data
    region = _region_input(saved_region(ws, source))
    if region is None:
        return
    sample = (run.split().get("test") or [])[:3]
    if sample:
        cols = st.columns(len(sample) + 1)
        for col, row in zip(cols, sample):
            try:
                col.image(with_region(predictor.image(row[0]), region), width="stretch")
            except ImageLoadError:
                pass
        cols[-1].caption(f"The region: {region.describe()}.")

    jobs = audits(ws)
    b1, b2 = st.columns([1, 2])
    if b1.button("Run the audit", key="audit_start", type="primary"):
        save_region(ws, source, region)  # the dataset's region from now on (the CLI's default too)
        if not jobs.start(run.id, region):
            st.info("An audit of this run is already running.")
    b2.caption("It runs in the background; the region is kept for this dataset.")
    _audit_progress(jobs, run.id)
    result = load_cam_audit(run)
    if result is not None:
        _audit_result(result, predictor)


def _region_input(saved: Region | None) -> Region | None:
    """The region the user draws (each image's foreground, or a rectangle); None while the rectangle is empty."""
    kind = st.radio("Region of interest", REGION_KINDS, index=1 if saved and saved.box else 0, horizontal=True,
                    key="audit_region_kind")
    if kind == REGION_KINDS[0]:
        return Region(None)
    x0, y0, x1, y1 = saved.box if saved and saved.box else (0.1, 0.1, 0.9, 0.9)
    c1, c2 = st.columns(2)
    xs = c1.slider("Left to right (% of the width)", 0, 100, (round(x0 * 100), round(x1 * 100)), key="audit_x")
    ys = c2.slider("Top to bottom (% of the height)", 0, 100, (round(y0 * 100), round(y1 * 100)), key="audit_y")
    if xs[0] >= xs[1] or ys[0] >= ys[1]:
        st.warning("The rectangle needs a width and a height.")
        return None
    return Region((xs[0] / 100, ys[0] / 100, xs[1] / 100, ys[1] / 100))


def _audit_result(result: dict, predictor) -> None:
    st.caption(f"Last audit: {result['n']} {result['part']} images against {result['region_text']}, "
               f"{result['seconds']:.0f} s.")
    table = pd.DataFrame([{"class": c["class"], "images": c["images"], "attention outside (mean)": c["mean_outside"],
                           f"mostly outside (> {result['threshold']:.0%})": c["mostly_outside"]}
                          for c in result["per_class"]])
    st.dataframe(table, hide_index=True, column_config={
        "attention outside (mean)": st.column_config.ProgressColumn(format="percent", min_value=0, max_value=1)})
    flagged = result["flagged"]
    st.markdown(f"**{len(flagged)} images where the model looked mostly outside the region**"
                + (" (the 8 worst below)" if len(flagged) > 8 else ""))
    cols = st.columns(4)
    for k, item in enumerate(flagged[:8]):
        with cols[k % 4], st.container(border=True):
            try:
                out = predictor.explain(item["path"], target=item["predicted"])
                st.image(out["overlay"], width="stretch")
            except ImageLoadError as exc:
                st.warning(f"cannot open: {exc}")
            st.caption(f"{item['outside']:.0%} outside · {item['label']} → {item['predicted']} · "
                       f"{item['path'].rsplit('/', 1)[-1]}")


@st.fragment(run_every=1.0)
def _audit_progress(jobs: CamAudits, run_id: str) -> None:
    state = jobs.status(run_id)
    if state["status"] == "running":
        total = max(state["total"], 1)
        st.progress(state["done"] / total, text=f"Grad-CAM {state['done']} of {state['total'] or '…'} images")
    elif state["status"] == "failed":
        st.error(f"The audit failed: {state['error']}")
    elif state["status"] == "done" and st.session_state.get("audit_shown") != state.get("done"):
        st.session_state["audit_shown"] = state.get("done")
        st.rerun()  # the whole page, to show the new result
