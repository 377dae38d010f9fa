import uuid

import streamlit as st

from core.config import (
    ARCHS,
    BATCH_NORMS,
    OPTIMIZERS,
    PRESETS,
    SCHEDULES,
    SPLIT_GROUPS,
    ConfigError,
    TrainConfig,
    preset_values,
)
from core.data.labels import LabelStore
from core.data.sources import DatasetError
from core.models.resnet import imagenet_weights_file, with_weights_at_hand
from core.runs import life as runs
from core.train.estimate import estimate_run
from core.train.recipe import auto_recipe
from core.workspace.store import Workspace
from pages import _ui

st.title("Train")
ws = _ui.ws()
jm = _ui.manager()

datasets = _ui.require_datasets()
names = [d["name"] for d in datasets]
sources = {d["name"]: d["source"] for d in datasets}
# Settings live as long as the browser session: Streamlit forgets a widget's value once a page without it has
# run, so every setting is kept in SETTINGS too and put back before the widgets are drawn.
SETTINGS = "train_settings"


RECIPES = ["auto", *PRESETS]


@st.cache_data(show_spinner="Choosing settings for this dataset on this machine (a few timed steps)…",
               max_entries=32)
def _auto(ws_root: str, source: str, label_version: int) -> dict:
    """The auto recipe (core/train/recipe.py), kept per dataset and label version: its timing is taken once."""
    recipe = auto_recipe(Workspace(ws_root), source)
    return {"values": recipe.config.to_dict(), "why": recipe.why, "estimate": recipe.estimate.text()}


def _auto_for(name: str) -> dict | None:
    source = sources[name]
    try:
        return _auto(str(ws.root), source, LabelStore(ws).version(source))
    except (ConfigError, DatasetError, OSError) as exc:
        st.session_state["auto_error"] = f"The auto recipe could not look at {name}: {exc}"
        return None


def _defaults(preset: str) -> dict:
    if preset == "auto":
        auto = _auto_for(st.session_state["train_dataset"])
        if auto is not None:
            return {**auto["values"], "extra": {}}
    return with_weights_at_hand(preset_values(preset if preset in PRESETS else "classic"))


def _set_widgets(values: dict) -> None:
    for key, value in values.items():
        st.session_state[f"cfg_{key}"] = value


def _apply_preset() -> None:
    _set_widgets(_defaults(st.session_state["preset"]))


def _offer_last_config() -> None:
    """The settings last used with the picked dataset, when it has been trained before."""
    cfg = runs.last_config(ws, sources[st.session_state["train_dataset"]])
    if cfg is None:
        if st.session_state.get("preset") == "auto":  # auto depends on the dataset: choose again for this one
            _apply_preset()
        return
    values = cfg.to_dict()
    weights = str(values["weights"])
    if weights not in ("imagenet", "none", "self-supervised"):
        st.session_state["weights_file"], values["weights"] = weights, "none"
    st.session_state["preset"] = cfg.extra["preset"] if cfg.extra.get("preset") in RECIPES else "classic"
    _set_widgets({k: v for k, v in values.items() if k not in ("data", "extra", "schedule_start_epoch")})


for key, value in st.session_state.get(SETTINGS, {}).items():
    st.session_state.setdefault(key, value)
if "cfg_epochs" not in st.session_state:  # the first visit in this browser session
    current = st.session_state.get("dataset")
    st.session_state["train_dataset"] = current if current in names else names[0]
    st.session_state["preset"] = "auto"
    _apply_preset()
    _offer_last_config()
for key, value in TrainConfig().to_dict().items():  # a field added since these settings were kept
    st.session_state.setdefault(f"cfg_{key}", value)
if st.session_state.get("train_dataset") not in names:
    st.session_state["train_dataset"] = names[0]

top1, top2 = st.columns([2, 1])
dataset_name = top1.selectbox("Dataset", names, key="train_dataset", on_change=_offer_last_config,
                              help="Picking a dataset you trained before offers the settings of its last run again.")
st.session_state["dataset"] = dataset_name
top2.selectbox("Recipe", RECIPES, key="preset", on_change=_apply_preset,
               help="'auto' picks image size, epochs, batch, schedule and precision for this dataset on this machine "
                    "and says why. 'classic' is the seed notebooks' recipe: Adam, lr 1e-3, 10 epochs, batch 32, "
                    "224 px, ImageNet normalization (use 'Estimate the time' to see what it costs here).")
auto_error = st.session_state.pop("auto_error", None)
if auto_error:
    st.warning(f"{auto_error}. The classic settings are shown instead.")
elif st.session_state["preset"] == "auto":
    auto = _auto_for(dataset_name)
    if auto is not None:
        changed = [k for k, v in auto["values"].items()
                   if k not in ("data", "extra") and st.session_state.get(f"cfg_{k}", v) != v]
        when = (auto["estimate"] if not changed else
                f"you changed {', '.join(changed)}: 'Estimate the time' times your settings")
        st.info(f"**Auto**: {when}. Why: {auto['why']}.", icon=":material/auto_awesome:")

with st.container(border=True):
    c1, c2, c3, c4 = st.columns(4)
    c1.selectbox("Architecture", ARCHS, key="cfg_arch",
                 help="resnet18 is fast and strong on small sets; resnet18-custom is the hand-built ResNet18.")
    weights_options = ["imagenet", "none", "self-supervised"]
    if st.session_state.get("cfg_weights") not in weights_options:
        weights_options.append(st.session_state["cfg_weights"])
    c2.selectbox("Start from", weights_options, key="cfg_weights",
                 format_func=lambda w: {"imagenet": "ImageNet weights", "none": "scratch (random)",
                                        "self-supervised": "my images (self-supervised)"}.get(w, w),
                 help="ImageNet weights learn much faster on small sets, but need a download once. 'My images' "
                      "first trains the network on your training and unlabeled images without their labels "
                      "(SimCLR), then fine-tunes as usual: for images nothing like ImageNet, where its weights "
                      "cannot be had.")
    c3.number_input("Epochs", 1, 1000, key="cfg_epochs", help="Passes over the training images.")
    c4.number_input("Image size (px)", 16, 1024, step=16, key="cfg_image_size",
                    help="Images are resized to this square. Smaller trains faster.")
    c1.number_input("Batch size", 1, 1024, key="cfg_batch_size", help="Images per step (seeds: 32 to 100).")
    c2.number_input("Learning rate", 1e-6, 1.0, format="%.5f", key="cfg_lr", help="Adam's classic 1e-3 is a good start.")
    c3.text_input("Local weights file (optional)", key="weights_file",
                  help="A .pth state_dict (e.g. torchvision's resnet18-f37072fd.pth) to start from instead.")
    if st.session_state["cfg_weights"] == "self-supervised":
        c1.number_input("Self-supervised epochs", 1, 1000, key="cfg_ssl_epochs",
                        help="Passes over your images before fine-tuning, two views of each; the estimate includes "
                             "them.")
        c2.number_input("Pretraining size (px)", 32, 1024, step=16, key="cfg_ssl_image_size",
                        help="Smaller pretrains faster; the backbone then fine-tunes at the image size.")
        # What it was measured to give (bench/RESULTS.md, "Few labels, many unlabeled images").
        st.caption("Worth it when nearly all of your images have no label yet (put them in an `unlabeled/` folder): "
                   "on the ELPV cells with a tenth of them labelled it gained 1.1 points of accuracy and 7 of defect "
                   "recall in the same 10 minutes; with a quarter labelled it gained nothing (-0.2), with every cell "
                   "labelled it lost 1.0 point.")
    with st.expander("Advanced options"):
        a1, a2, a3 = st.columns(3)
        a1.selectbox("Optimizer", OPTIMIZERS, key="cfg_optimizer", help="adam (seeds), adamw, or sgd with momentum.")
        a1.selectbox("LR schedule", SCHEDULES, key="cfg_schedule", help="cosine decays smoothly to 0 by the last epoch.")
        a1.number_input("Weight decay", 0.0, 1.0, format="%.5f", key="cfg_weight_decay", help="L2 regularisation.")
        a1.slider("Dropout before the last layer", 0.0, 0.9, key="cfg_dropout")
        a1.slider("Label smoothing", 0.0, 0.5, key="cfg_label_smoothing",
                  help="Softens targets; helps when some labels are doubtful.")
        a2.checkbox("Class-weighted loss", key="cfg_class_weights", help="For imbalanced sets.")
        a2.checkbox("Classes are ordered grades", key="cfg_ordinal",
                    help="For grades such as OK < minor < major < critical, in the order of the class names (name "
                         "the folders 1_ok, 2_minor, ... so that they sort that way): the loss also charges for how "
                         "many grades off a prediction is. The Evaluate page then shows the mean grade error.")
        a2.checkbox("Freeze backbone (train the last layer only)", key="cfg_freeze_backbone")
        a2.number_input("Early stopping patience (0: off)", 0, 100, key="cfg_early_stop_patience",
                        help="Stop after this many epochs without a better validation accuracy. With progressive "
                             "resizing the count starts at the first full-size epoch: the smaller-image epochs "
                             "before it validate low.")
        a2.selectbox("Normalization", ["imagenet", "dataset"], key="cfg_normalization",
                     help="ImageNet mean/std, or mean/std computed on the training split.")
        a2.number_input("Seed", 0, 2**31 - 1, key="cfg_seed")
        a2.checkbox("Test-time augmentation", key="cfg_tta",
                    help="Evaluation and predictions average the model's answers over several views of each image.")
        a2.checkbox("Average the weights (EMA)", key="cfg_ema",
                    help="Keeps a moving average of the weights beside them and validates both every epoch; the "
                         "best checkpoint holds whichever validated better. Costs a second validation pass.")
        a2.number_input("Averaging half-life (epochs)", 0.1, 100.0, step=0.5, key="cfg_ema_half_life",
                        help="A step's weights count half in the average this many epochs later.")
        a2.selectbox("Split: keep together", SPLIT_GROUPS, key="cfg_split_groups",
                     help="duplicates: near-duplicate images (perceptual hash within the distance below) go to one "
                          "part together, so that no image is tested on its twin (the Datasets page lists them). "
                          "origin: the images of one module, batch or day go to one part (a CSV's group column, "
                          "or the sub-folder inside each class folder).")
        a2.number_input("Near-duplicate distance (bits of 64)", 0, 64, step=2, key="cfg_duplicate_distance")
        a3.checkbox("Horizontal flip", key="cfg_hflip")
        a3.checkbox("Vertical flip", key="cfg_vflip")
        a3.checkbox("Random 90° rotations", key="cfg_rot90", help="For parts with no natural orientation.")
        a3.slider("Rotation (degrees)", 0.0, 180.0, key="cfg_rotation")
        a3.slider("Random crop: min area kept", 0.05, 1.0, key="cfg_crop_scale_min", help="1.0: no cropping.")
        a3.slider("Color jitter", 0.0, 1.0, key="cfg_color_jitter")
        a3.slider("Progressive resizing: first epochs at", 0.25, 1.0, key="cfg_progressive_start",
                  help="Early epochs train on images shrunk to this fraction of the size, growing to the full size by "
                       "3/4 of the epochs; validation and test always use the full size. 1.0: off.")
        a3.selectbox("Mixed precision", ["auto", "bf16", "fp16", "off"], key="cfg_amp")
        a3.number_input("Devices", 1, 64, key="cfg_devices",
                        help="Processes training together: one per GPU (on a CPU, each gets a share of the cores). "
                             "Each batch is split across them, so batch size, learning rate and schedule mean the "
                             "same as on one device, and N GPUs take the same steps up to N times as fast. On a CPU, "
                             "one process using every core is usually as fast (bench/ddp_scaling.py).")
        a3.selectbox("Batch norm across devices", BATCH_NORMS, key="cfg_batch_norm",
                     help="auto: statistics over the whole batch on GPUs (SyncBatchNorm), each device's own share on "
                          "CPUs; frozen: running statistics kept as they are (small batches per device).")
    queue_ok = st.checkbox("Queue after the running job if one is running", key="queue_ok")
    b1, b2 = st.columns([1, 5])
    start = b1.button("Start training", type="primary")
    estimate = b2.button("Estimate the time", help="Times a few training steps at these settings on this machine "
                                                   "(seconds); nothing is trained.")
st.session_state[SETTINGS] = {k: v for k, v in st.session_state.items()
                              if k.startswith("cfg_") or k in ("preset", "weights_file", "queue_ok", "train_dataset")}

if st.session_state.get("cfg_weights") == "imagenet" and not imagenet_weights_file(
        st.session_state["cfg_arch"]).exists():
    st.caption(f"ImageNet weights are not in the cache ({imagenet_weights_file(st.session_state['cfg_arch'])}); "
               "they are downloaded at start, which needs internet.")

if "request_id" not in st.session_state:
    st.session_state["request_id"] = uuid.uuid4().hex

def _config() -> TrainConfig:
    values = {k[4:]: v for k, v in st.session_state.items() if k.startswith("cfg_")}
    values["data"] = sources[dataset_name]
    if st.session_state.get("weights_file", "").strip():
        values["weights"] = st.session_state["weights_file"].strip()
    values["extra"] = {"preset": st.session_state["preset"], "dataset_name": dataset_name}
    return TrainConfig.from_dict(values)


if estimate:
    if jm.active() is not None:
        st.warning("A job is training: timing steps now would measure a shared CPU. Estimate when it ends.")
    else:
        try:
            with st.spinner("Timing a few training steps…"):
                cfg = _config().validate()
                st.session_state["estimate"] = (cfg.to_dict(), estimate_run(ws, cfg).text())
        except (ConfigError, DatasetError) as exc:
            st.error(f"Cannot estimate: {exc}")
shown_estimate = st.session_state.get("estimate")
if shown_estimate and shown_estimate[0] == _config().to_dict():  # only while the settings are the ones timed
    st.info(f"Estimated time: {shown_estimate[1]}.")

if start:
    cfg = _config()
    busy = jm.active()
    if busy is not None and not queue_ok:
        st.warning(f"Run {busy.run_id} is {busy.status}; one job trains at a time. Tick 'Queue after the running "
                   "job' to start yours when it ends, or stop it first.")
    else:
        try:
            with st.spinner("Checking the dataset and preparing the split…"):
                run_id = jm.submit(cfg, request_id=st.session_state["request_id"])
            st.session_state["request_id"] = uuid.uuid4().hex  # the next click is a new request
            st.session_state["train_run"] = run_id
            st.toast(f"Started run {run_id}")
        except (ConfigError, DatasetError) as exc:
            st.error(f"Cannot start: {exc}")


def _shown_run() -> str | None:
    active = jm.active()
    if active is not None:
        return active.run_id
    if st.session_state.get("train_run"):
        return st.session_state["train_run"]
    latest = ws.list_runs()
    return latest[0]["id"] if latest else None


@st.fragment(run_every=1.0)
def live_view() -> None:
    run_id = _shown_run()
    if run_id is None:
        st.caption("No run yet.")
        return
    snap = jm.snapshot(run_id)
    if snap is None:
        return
    st.subheader(f"Run {run_id} {_ui.STATUS_ICON.get(snap.status, '')} {snap.status}")
    st.progress(snap.progress, text=_ui.job_progress_text(snap))
    if snap.active:
        if st.button("Stop", key=f"stop_{run_id}",
                     help="Stops within one batch; the best checkpoint is kept. A training that does not answer "
                          "within 60 s is terminated, and killed 15 s after that."):
            jm.stop(run_id)
            st.rerun(scope="fragment")
    if snap.error:
        st.error(snap.error)
    c1, c2 = st.columns(2)
    full = _ui.image_side(ws.run(run_id))
    c1.plotly_chart(_ui.curves_figure(snap.history, "loss", "Loss", full_size=full), key=f"loss_{run_id}")
    c2.plotly_chart(_ui.curves_figure(snap.history, "acc", "Accuracy", full_size=full), key=f"acc_{run_id}")
    if snap.status in ("done", "stopped") and ws.run(run_id).eval_path.exists():
        st.success(f"Finished{' (stopped)' if snap.status == 'stopped' else ''}: test accuracy "
                   f"{snap.test_acc if snap.test_acc is not None else ws.run_row(run_id)['test_acc']:.1%}.")
        st.page_link("pages/evaluate.py", label="Open its evaluation", icon=":material/fact_check:",
                     query_params={"run": run_id})
    with st.expander("Log", expanded=snap.status == "failed"):
        st.code("\n".join(snap.log[-40:]) or "(empty)", language=None)


live_view()
