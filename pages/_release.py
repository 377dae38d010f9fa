"""The Runs page's release panel and Releases section: the gate's verdict with its regression gallery, and the
releases made so far (core/deploy/release.py does the work)."""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import streamlit as st

from core.data.golden import GoldenError, GoldenStore, carve_from_test
from core.deploy.release import GateRefused, ReleaseError, ledger, list_releases, make_release
from core.infer.evaluate import score_golden
from pages import _ui


def golden_panel(ws, rid: str) -> bool:
    """When the run's dataset has no golden set: offer to carve one from this run's test part. Returns whether the
    dataset has one (now)."""
    source = ws.run(rid).split().get("source", "")
    store = GoldenStore(ws)
    if store.images(source):
        info = store.describe(source)
        st.caption(f"Golden set: {info['n']} images (" + ", ".join(f"{k} {v}" for k, v in info["counts"].items())
                   + f"), version {info['version']}; every run of this dataset is scored on it.")
        return True
    st.info("This dataset has no golden set yet: images with frozen labels that every later run is scored on and "
            "none trains on. Releases are gated on it.")
    share = st.slider("Share of each class's test images", 0.1, 1.0, 0.5, 0.1, key=f"golden_share_{rid}")
    if st.button("Make the golden set from this run's test part", key=f"golden_make_{rid}"):
        try:
            store.create(source, carve_from_test(ws.run(rid).split(), share),
                         f"{share:g} of run {rid}'s test part, stratified (Runs page)", _ui.actor())
            score_golden(ws, ws.run(rid))
            st.rerun()
        except GoldenError as exc:
            st.error(str(exc))
    return False


def release_panel(ws, rid: str) -> None:
    with st.expander("Release this run"):
        if not golden_panel(ws, rid):
            return
        st.caption("A release is an immutable, numbered copy of the run's model (ONNX with its card), its decision rule "
                   "and its golden-set report. It is made only if the gate finds it no worse than the current "
                   "release on the dataset's golden set: McNemar's exact test on the paired decisions, each class's "
                   "recall, and the decision rule's cost.")
        c1, c2 = st.columns(2)
        tolerance = c1.number_input("Largest recall drop allowed (points)", 0.0, 100.0, 2.0, 0.5, key=f"rel_tol_{rid}")
        name = c2.text_input("Name (optional)", key=f"rel_name_{rid}", placeholder="DATASET-vN")
        force = st.checkbox("Release even if the gate refuses", key=f"rel_force_{rid}")
        reason = st.text_input("Why (recorded in the ledger)", key=f"rel_reason_{rid}", disabled=not force)
        if st.button("Release", key=f"release_{rid}", type="primary"):
            try:
                with st.spinner("Scoring on the golden set, gating, exporting…"):
                    made = make_release(ws, rid, name.strip() or None, _ui.actor(), force, reason, tolerance / 100)
                st.session_state[f"rel_out_{rid}"] = {"made": made, "gate": made["manifest"]["gate"]}
            except GateRefused as exc:
                st.session_state[f"rel_out_{rid}"] = {"error": str(exc), "gate": exc.report}
            except ReleaseError as exc:
                st.session_state[f"rel_out_{rid}"] = {"error": str(exc), "gate": None}
        out = st.session_state.get(f"rel_out_{rid}")
        if out:
            if "made" in out:
                st.success(f"Released **{out['made']['name']}** (version {out['made']['version']}) at "
                           f"`{out['made']['dir']}`.")
            else:
                st.error(out["error"])
            if out["gate"]:
                gate_report(out["gate"])


def gate_report(g: dict) -> None:
    if g.get("first"):
        st.info(f"Gate: {g['first']}.")
        return
    if "current_accuracy" not in g:
        return
    a, b, c = st.columns(3)
    a.metric("Golden accuracy", f"{g['candidate_accuracy']:.1%}",
             f"{(g['candidate_accuracy'] - g['current_accuracy']) * 100:+.1f} pts vs {g['current']['name']}")
    b.metric("Regressions / fixes", f"{len(g['regressions'])} / {len(g['fixes'])}", help="Golden images only the "
             "current release decides right / only the candidate does")
    c.metric("McNemar p (worse)", f"{g['mcnemar_p']:.3f}")
    st.dataframe(pd.DataFrame([{"class": r["class"], "golden images": r["support"],
                                "current recall": r["current_recall"], "candidate recall": r["candidate_recall"]}
                               for r in g["per_class"]]), hide_index=True)
    st.caption(f"Cost per golden image: {g['cost']['current']:.4f} → {g['cost']['candidate']:.4f} "
               f"(priced with the {g['cost']['priced_with']}).")
    for kind, title in (("regressions", "Regressions: the current release right, the candidate wrong"),
                        ("fixes", "Fixes: the candidate right, the current release wrong")):
        items = g.get("gallery", {}).get(kind, [])
        if not items:
            continue
        st.markdown(f"**{title}** ({len(items)}): the image, the current release's heatmap, the candidate's")
        cols = st.columns(3)
        for i, item in enumerate(items[:24]):
            caption = f"{Path(item['path']).name}: true {item['true']}, {item['current']} → {item['candidate']}"
            if item.get("png") and Path(item["png"]).exists():
                cols[i % 3].image(item["png"], caption=caption)
            else:
                cols[i % 3].caption(caption)


def releases_section(ws) -> None:
    rows = list_releases(ws)
    st.subheader("Releases")
    if not rows:
        st.caption("No release yet: select a finished, evaluated run and release it (a dataset needs a golden set "
                   "first: `python -m core golden --data SOURCE --from-test RUN_ID`).")
        return
    st.dataframe(pd.DataFrame([{
        "release": r["name"], "version": r["version"], "dataset": (r["manifest"] or {}).get("dataset_name", ""),
        "run": r["run_id"], "golden acc": ((r["manifest"] or {}).get("golden") or {}).get("accuracy"),
        "when": time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"])), "by": r["actor"] or "",
        "forced because": r["forced_reason"] or ""} for r in rows]), hide_index=True,
        column_config={"golden acc": st.column_config.NumberColumn(format="percent")})
    with st.expander("Ledger: every release attempt"):
        st.dataframe(pd.DataFrame([{
            "when": time.strftime("%Y-%m-%d %H:%M", time.localtime(e["at"])), "run": e["run_id"],
            "outcome": e["outcome"], "release": e["release"] or "", "by": e["actor"] or "",
            "why": e["reason"] or "; ".join(e["report"].get("reasons", []))} for e in ledger(ws)]), hide_index=True)
