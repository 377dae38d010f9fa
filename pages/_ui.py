"""What every page shares: the workspace, the job manager, the sidebar, and chart builders.

Only presentation lives here; all logic is in `core`. (This file is not a page: pages/_nav.py lists them.)
Nothing here imports torch: the Start page paints before it is loaded (see device_text).
"""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import streamlit as st

from core.data.images import ImageLoadError
from core.data.sources import DatasetError, load_dataset
from core.jobs.queue import JobManager
from core.workspace.store import Workspace, default_workspace
from pages import _nav

_nav.end_legacy_mode()  # a page visited first after the server starts: rerun it through app.py

ASSETS = Path(__file__).resolve().parents[1] / "assets"
ELPV_NAME = "ELPV solar cells (example)"
STATUS_ICON = {"queued": "⏳", "running": "🏃", "stopping": "✋", "stopped": "⏹️", "done": "✅",
               "failed": "❌", "interrupted": "⚠️"}


def workspace_root() -> str:
    return str(default_workspace().resolve())


@st.cache_resource(show_spinner=False)
def _manager(root: str) -> JobManager:
    ws = Workspace(root)
    if example_wanted():
        try:  # the example dataset is ready from the first start
            import elpv_dataset  # noqa: F401
            if not any(d["source"] == "elpv" for d in ws.list_datasets()):
                ws.register_dataset(ELPV_NAME, "elpv")
        except ImportError:
            pass
    return JobManager(ws)


def example_wanted() -> bool:
    """STUDIO_EXAMPLE=0 starts a studio without the example dataset (a team's own studio; the test suite, whose
    every page would otherwise scan and time ELPV's 2,624 images first). It stays one click away on Datasets."""
    return os.environ.get("STUDIO_EXAMPLE", "1").strip() != "0"


def manager() -> JobManager:
    """The one job manager of this process, shared by every page and browser tab."""
    return _manager(workspace_root())


def ws() -> Workspace:
    return manager().ws


_device: dict = {}


def _detect_device() -> None:
    from core.models.device import describe_device  # imports torch: about 2 s, off the page's thread
    _device["text"] = describe_device()


def precompile() -> None:
    """Compile the engine and the pages to bytecode now, on the page's thread. CPython 3.11 can fail a page with
    "SystemError: AST constructor recursion depth mismatch" when one thread parses source (Streamlit reading a page
    script) while another compiles (a background import of a module without its .pyc: the device detection, a job
    or audit thread). Seen in CI on a fresh clone; with the bytecode written, imports compile nothing."""
    import compileall
    root = Path(__file__).resolve().parents[1]
    for folder, depth in (("core", 1), ("pages", 0)):  # core's packages are one level down
        compileall.compile_dir(str(root / folder), quiet=2, maxlevels=depth)


def detect_device() -> None:
    """Start finding the device once per process, in the background; app.py calls this after the page has been
    drawn, so the import of torch does not hold the first page up."""
    if "thread" not in _device:
        precompile()
        _device["thread"] = threading.Thread(target=_detect_device, name="detect-device", daemon=True)
        _device["thread"].start()


def device_text() -> str:
    """The device line; "detecting…" until torch has loaded (the sidebar polls every 2 s)."""
    if "text" not in _device and "torch" in sys.modules:  # a page already loaded torch: no wait
        _detect_device()
    return _device.get("text", "detecting…")


@st.cache_data(show_spinner="Reading the dataset…", ttl=30, max_entries=8)
def dataset_info(source: str):
    """The dataset (cached for 30 s so pages stay fast and still notice new files)."""
    return load_dataset(source)


@st.cache_data(show_spinner="Looking for near-duplicate images…", ttl=60, max_entries=8)
def duplicate_groups(source: str, distance: int) -> list[list[int]]:
    """Near-duplicate groups (sample indices of the dataset) by perceptual hash."""
    from core.data.duplicates import dataset_duplicate_groups
    return dataset_duplicate_groups(dataset_info(source), distance, ws().cache_dir)


def load_dataset_or_error(source: str):
    try:
        return dataset_info(source)
    except DatasetError as exc:
        st.error(str(exc))
        return None


def css() -> None:
    style = ASSETS / "style.css"
    if style.exists():
        st.html(f"<style>{style.read_text()}</style>")


def sidebar() -> None:
    with st.sidebar:
        logo = ASSETS / "logo.svg"
        if logo.exists():
            st.logo(str(logo))
        st.caption(f"Workspace: `{workspace_root()}`")
        if login_configured() and st.user.is_logged_in:
            st.caption(f"Signed in as {actor()}")
            if st.button("Sign out", key="sign_out"):
                st.logout()
        _sidebar_status()


# --- who is at the keyboard ------------------------------------------------------------------------------------------
def login_configured() -> bool:
    """Whether the administrator configured Streamlit's login (an [auth] section in .streamlit/secrets.toml): then
    every page needs a signed-in user. On localhost without one, nothing changes."""
    try:
        return "auth" in st.secrets
    except (FileNotFoundError, OSError):
        return False


def login_gate() -> None:
    """With login configured, a visitor who has not signed in sees only the sign-in buttons (one per provider)."""
    if not login_configured() or st.user.is_logged_in:
        return
    st.title("Image classifier studio")
    st.info("This studio is shared: sign in to see its datasets and runs.")
    auth = st.secrets["auth"]
    providers = [name for name in auth if hasattr(auth[name], "keys")]  # [auth.google], [auth.microsoft]...
    for name in providers or [None]:
        if st.button(f"Sign in with {name}" if name else "Sign in", key=f"sign_in_{name}"):
            st.login(name) if name else st.login()
    st.stop()


def actor() -> str | None:
    """Who makes a change: the signed-in user (email, else name) of a shared studio, recorded with each label change
    and the one whose changes their Undo undoes. None on a studio without login: one person at this machine."""
    if login_configured() and st.user.is_logged_in:
        return str(st.user.get("email") or st.user.get("name") or st.user.get("sub") or "signed-in user")
    return None


@st.fragment(run_every=2)
def _sidebar_status() -> None:
    st.caption(f"Device: {device_text()}")
    snap = manager().active()
    if snap is None:
        st.caption("No training job running.")
        return
    st.markdown(f"**Job {snap.run_id}** {STATUS_ICON.get(snap.status, '')} {snap.status}")
    st.progress(snap.progress, text=job_progress_text(snap))


def job_progress_text(snap) -> str:
    if snap.status == "queued":
        return "queued: waits for the running job"
    if snap.stage and snap.stage not in ("training",) and snap.stage_total:
        return f"{snap.stage} {snap.stage_done}/{snap.stage_total}"
    if snap.stage and snap.stage != "training":
        return snap.stage
    parts = [f"epoch {snap.epoch}/{snap.epochs}"]
    if snap.batches:
        parts.append(f"batch {snap.batch}/{snap.batches}")
    if snap.images_per_s:
        parts.append(f"{snap.images_per_s:.0f} img/s")
    if snap.eta_s:
        parts.append(f"ETA {format_seconds(snap.eta_s)}")
    return " · ".join(parts)


def format_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {(s % 3600) // 60:02d}m"


def require(items, message: str, page: str, label: str, icon: str):
    """Stop the page with a pointer to where the missing thing is made, when `items` is empty."""
    if not items:
        st.info(message)
        st.page_link(page, label=label, icon=icon)
        st.stop()
    return items


def require_datasets() -> list[dict]:
    return require(ws().list_datasets(), "Add a dataset first.", "pages/datasets.py", "Go to Datasets",
                   ":material/photo_library:")


def require_trained_runs() -> list[dict]:
    """Runs with a best checkpoint (something to evaluate or predict with)."""
    rows = [r for r in run_choices() if ws().run(r["id"]).best_path.exists()]
    return require(rows, "No trained run yet: train one first.", "pages/train.py", "Go to Train",
                   ":material/model_training:")


def run_choices(with_eval: bool = False) -> list[dict]:
    rows = ws().list_runs()
    if with_eval:
        rows = [r for r in rows if (ws().runs_dir / r["id"] / "eval.json").exists()]
    return rows


def run_label(row: dict) -> str:
    acc = f", test {row['test_acc']:.1%}" if row.get("test_acc") is not None else ""
    return f"{row['id']} · {row['dataset']} · {row['arch']} · {row['status']}{acc}"


def pick_run(label: str, rows: list[dict], key: str) -> str | None:
    """A run selector, defaulting to the run named in ?run= or the latest."""
    if not rows:
        return None
    ids = [r["id"] for r in rows]
    wanted = st.query_params.get("run")
    index = ids.index(wanted) if wanted in ids else 0
    by_id = {r["id"]: r for r in rows}
    chosen = st.selectbox(label, ids, index=index, format_func=lambda i: run_label(by_id[i]), key=key)
    return chosen


def image_side(run) -> int:
    """The run's image side for curves_figure; 0 (nothing shaded) when its config cannot be read."""
    try:
        return run.config().input_hw[0]
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def curves_figure(history: list[dict], metric: str, title: str, runs: dict[str, list[dict]] | None = None,
                  full_size: int = 0):
    """Train vs val curves of one metric ("loss" or "acc"); or val curves of several runs. `full_size`: the run's
    image side; the epochs that trained below it (progressive resizing) are shaded and said to validate low."""
    import plotly.graph_objects as go
    fig = go.Figure()
    if runs:
        for name, hist in runs.items():
            if hist:
                fig.add_scatter(x=[h["epoch"] for h in hist], y=[h[f"val_{metric}"] for h in hist],
                                mode="lines+markers", name=name)
    else:
        if history:
            ep = [h["epoch"] for h in history]
            fig.add_scatter(x=ep, y=[h[f"train_{metric}"] for h in history], mode="lines+markers", name="train")
            fig.add_scatter(x=ep, y=[h[f"val_{metric}"] for h in history], mode="lines+markers", name="validation")
            averaged = [h for h in history if f"avg_val_{metric}" in h]
            if averaged:  # weight averaging (EMA or SWA) on: the averaged weights' validation too
                fig.add_scatter(x=[h["epoch"] for h in averaged], y=[h[f"avg_val_{metric}"] for h in averaged],
                                mode="lines+markers", name="validation, averaged weights", line=dict(dash="dot"))
    small = [h["epoch"] for h in history if 0 < h.get("train_size", full_size) < full_size]
    if small and not runs:
        # Validation always scores the full size, which these epochs' weights and batch-norm statistics have not
        # seen yet: on ELPV it read 31-77% there where the same weights scored 62-80% at their own size
        # (bench/RESULTS.md, "Progressive resizing and the validation curve"). Said, so nobody stops a good run.
        fig.add_vrect(x0=min(small) - 0.5, x1=max(small) + 0.5, fillcolor="grey", opacity=0.12, line_width=0)
        fig.add_annotation(text=f"smaller images (progressive resizing):<br>validation at {full_size} px reads low",
                           x=(min(small) + max(small)) / 2, y=1, yref="paper", yanchor="top", showarrow=False,
                           font=dict(size=10))
    fig.update_layout(title=title, height=300, margin=dict(l=10, r=10, t=40, b=10),
                      xaxis_title="epoch", legend=dict(orientation="h", y=-0.25))
    epochs = max([len(h) for h in (runs or {}).values()] + [len(history)])
    # Epochs are whole numbers: ticks on integers only, about ten of them at most.
    fig.update_xaxes(tick0=1, dtick=max(1, -(-epochs // 10)), range=[0.5, max(epochs, 1) + 0.5])
    if metric == "acc":
        fig.update_yaxes(tickformat=".0%", range=[0, 1.02])  # accuracy is a fraction: never a 0-400% axis
    else:
        fig.update_yaxes(rangemode="tozero")
    if not epochs:
        fig.add_annotation(text="waiting for the first epoch to finish", showarrow=False, x=0.5, y=0.5,
                           xref="paper", yref="paper")
    return fig


def nearest_training_row(evidence: dict, image) -> None:
    """The training images a prediction is most alike (thumbnails with their labels), and the warning when the
    image is unlike anything in training (core/explain/features.py)."""
    if evidence.get("unlike"):
        st.warning(f"Unlike anything in training: the model places it farther from every training image "
                   f"({evidence['distance']:.2f}) than 95% of the validation images. Treat the prediction with "
                   "care.", icon="⚠️")
    cols = st.columns(max(1, len(evidence["neighbours"])))
    for col, n in zip(cols, evidence["neighbours"]):
        try:
            col.image(image(n["path"]), width="stretch")
        except ImageLoadError as exc:  # a training file moved or deleted since: say so, keep the rest
            col.caption(f"unreadable: {exc}")
        col.caption(f"{n['label']} · {n['similarity']:.2f}")
