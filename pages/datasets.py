import random

import pandas as pd
import plotly.express as px
import streamlit as st

from core.config import TrainConfig
from core.data.duplicates import describe_groups
from core.data.golden import GoldenStore
from core.data.images import ImageLoadError, load_array
from core.data.sources import DatasetError, check_data_roots, check_samples_in_data_roots, imbalance, load_dataset
from core.data.split import default_split
from core.data.zips import ImportError_, import_zip
from core.runs import life as runs
from core.workspace.store import NameTaken
from pages import _ui

st.title("Datasets")
ws = _ui.ws()

with st.expander("Add a dataset", expanded=not ws.list_datasets()):
    tab_folder, tab_zip, tab_example = st.tabs(["Folder on this machine", "Upload a zip", "Example"])
    with tab_folder:
        with st.form("add_folder"):
            path = st.text_input("Folder or CSV path", placeholder="/data/welds",
                                 help="A folder with one sub-folder per class, or with train/ val/ test/ "
                                      "folders each holding class sub-folders, or a CSV of path,label.")
            name = st.text_input("Name (optional)")
            if st.form_submit_button("Register", type="primary"):
                try:
                    check_data_roots(path, also=(ws.root / "datasets",))  # a shared studio: only where allowed
                    ds = load_dataset(path)
                    check_samples_in_data_roots(ds, also=(ws.root / "datasets",))
                    ws.register_dataset(name.strip() or ds.name, path.strip())
                    st.session_state["dataset"] = name.strip() or ds.name
                    st.success(f"Registered {ds.name}: {len(ds.samples)} images in {len(ds.classes)} classes.")
                except (DatasetError, NameTaken) as exc:
                    st.error(str(exc))
    with tab_zip:
        upload = st.file_uploader("Zip of class folders", type=["zip"],
                                  help="Extracted into the workspace. Unsafe entries are skipped.")
        if upload is not None and st.button("Import zip", type="primary"):
            try:
                result = import_zip(upload, ws.root / "datasets", name=upload.name.rsplit(".", 1)[0],
                                    taken={d["name"] for d in ws.list_datasets()})
                ds = load_dataset(str(result.path))
                ws.register_dataset(result.name, str(result.path))
                st.session_state["dataset"] = result.name
                st.success(f"Imported {result.files} images into {result.path}, registered as {result.name}.")
                if result.skipped:
                    st.warning(f"{len(result.skipped)} entries skipped.")
                    st.dataframe(pd.DataFrame(result.skipped, columns=["entry", "reason"]), hide_index=True)
            except (ImportError_, DatasetError) as exc:
                st.error(f"Import failed: {exc}")
    with tab_example:
        st.write("ELPV: 2,624 electroluminescence images of solar cells (300x300, gray), labelled functional or "
                 "defective (Deitsch et al., Solar Energy 2019).")
        if st.button("Add the ELPV example"):
            ws.register_dataset(_ui.ELPV_NAME, "elpv")
            st.session_state["dataset"] = _ui.ELPV_NAME
            st.rerun()

datasets = ws.list_datasets()
if not datasets:
    st.info("No dataset yet: add one above.")
    st.stop()

names = [d["name"] for d in datasets]
sources = {d["name"]: d["source"] for d in datasets}
current = st.session_state.get("dataset")
chosen = st.selectbox("Dataset", names, index=names.index(current) if current in names else 0)
st.session_state["dataset"] = chosen
source = sources[chosen]
st.caption(f"Source: `{source}`")

ds = _ui.load_dataset_or_error(source)
if ds is None:
    if st.button("Remove this dataset from the list"):
        ws.remove_dataset(chosen)
        st.rerun()
    st.stop()

counts = ds.class_counts()
total = sum(counts.values())
c1, c2, c3 = st.columns(3)
c1.metric("Images", f"{total:,}")
c2.metric("Classes", len(ds.classes))
c3.metric("Skipped files", len(ds.skipped), help="Files the scan found unusable; the list is at the bottom.")

frame = pd.DataFrame({"class": list(counts), "images": list(counts.values())})
fig = px.bar(frame, x="class", y="images", text="images", title="Images per class")
ratio = imbalance(counts)
if ratio:
    st.warning(f"Imbalanced: the largest class has {ratio:.1f}x the images of the smallest. "
               "Consider class-weighted loss on the Train page.")
fig.update_layout(height=320, margin=dict(l=10, r=10, t=40, b=10))
st.plotly_chart(fig, key="class_counts")

split = None
try:
    split, given = default_split(ds)
    golden = GoldenStore(ws).describe(ds.source)
    st.caption(f"Split ({given}): train {len(split['train'])}, validation {len(split['val'])}, "
               f"test {len(split['test'])}" + (f"; a new run leaves out the golden set's {golden['n']} images "
                                                f"(version {golden['version']}), which every run is scored on"
                                                if golden["n"] else ""))
except DatasetError as exc:
    st.warning(str(exc))

st.subheader("Samples")
per_class = st.slider("Images per class", 4, 16, 8, step=4)
rng = random.Random(0)
for label, cls in enumerate(ds.classes):
    paths = [s.path for s in ds.samples if s.label == label]
    if not paths:
        continue
    shown = rng.sample(paths, min(per_class, len(paths)))
    st.markdown(f"**{cls}** · {counts[cls]} images")
    cols = st.columns(8)
    for i, path in enumerate(shown):
        try:
            cols[i % 8].image(load_array(path, (128, 128)), caption=path.rsplit("/", 1)[-1][:24])
        except ImageLoadError as exc:
            cols[i % 8].caption(f"unreadable: {exc}")

st.subheader("Near-duplicates")
distance = st.slider("Near-duplicate distance (differing bits of a 64-bit perceptual hash)", 0, 16,
                     TrainConfig.duplicate_distance, step=2, key="dup_distance",
                     help="0: the same picture (also re-saved or resized); higher finds looser look-alikes, and "
                          "unrelated images start to chain into one group.")
duplicates = _ui.duplicate_groups(source, distance) if total <= 20_000 else []
if total > 20_000:
    st.caption("Near-duplicates are looked for in sets up to 20,000 images here; use `python -m core duplicates RUN_ID`.")
elif duplicates:
    part_of = {i: p for p, idx in split.items() for i in idx} if split else {}
    groups = describe_groups(duplicates, [s.path for s in ds.samples], [ds.classes[s.label] for s in ds.samples],
                             [part_of.get(i, "?") for i in range(len(ds.samples))])
    rows = [{"images": len(g["members"]), "classes": ", ".join(sorted({m["label"] for m in g["members"]})),
             "parts": ", ".join(g["parts"]), "files": " | ".join(m["path"] for m in g["members"])} for g in groups]
    leaking = sum(g["straddles"] for g in groups)
    st.warning(f"{len(duplicates)} groups of near-duplicate images ({sum(map(len, duplicates))} images); "
               f"{leaking} of them straddle the default split: an image tested on its twin makes the test score "
               "look better than it is. On the Train page, *Split: keep together* = duplicates keeps each group "
               "in one part.")
    with st.expander("Near-duplicate groups"):
        st.dataframe(pd.DataFrame(rows), hide_index=True)
else:
    st.caption(f"No near-duplicates within {distance} bits.")

# Files the scan skipped, and those only training found unusable (a good header over broken pixels).
last = runs.last_run(ws, source)
scanned = {p for p, _ in ds.skipped}
skipped = ds.skipped + [s for s in (last.skipped() if last else []) if s[0] not in scanned]
if skipped:
    st.subheader(f"Skipped files ({len(skipped)})")
    st.caption("Left out of training, each with the reason." + (f" Includes what run {last.id} could not decode."
                                                                 if len(skipped) > len(ds.skipped) else ""))
    st.dataframe(pd.DataFrame(runs.skipped_files(skipped)), hide_index=True, key="skipped_table")
