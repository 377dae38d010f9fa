"""The Evaluate page's "Calibration" and "Decide" sections: the arithmetic is core/decide/'s; this draws it."""
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.decide.rule import DecisionError, Rule, cost_matrix
from core.decide.stored import clear_rule, decide_run, load_rule, load_scores, save_rule
from core.infer.evaluate import evaluate_run, write_decisions

BAND_MODES = ["no review band", "reach a target accuracy", "within a review budget"]


def reliability_figure(cal: dict):
    """Accuracy against confidence per bin, before and after the temperature; the diagonal is perfect calibration."""
    fig = go.Figure()
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="gray"), name="perfect")
    for name, key in (("before", "reliability_before"), ("after", "reliability_after")):
        bins = [b for b in cal[key] if b["n"]]
        fig.add_scatter(x=[b["confidence"] for b in bins], y=[b["accuracy"] for b in bins], mode="lines+markers",
                        name=f"{name} (ECE {cal['ece_' + name]:.3f})", text=[f"{b['n']} images" for b in bins],
                        hovertemplate="confidence %{x:.2f}<br>accuracy %{y:.2f}<br>%{text}<extra></extra>")
    fig.update_layout(height=320, margin=dict(l=10, r=10, t=30, b=10), title="Reliability",
                      xaxis_title="confidence", yaxis_title="accuracy", legend=dict(orientation="h", y=-0.3))
    fig.update_xaxes(range=[0, 1.02])
    fig.update_yaxes(range=[0, 1.02])
    return fig


def coverage_figure(result: dict):
    """Accuracy of the automatic decisions against the share of images decided automatically, on both parts, with
    the chosen band marked."""
    fig = go.Figure()
    for part, dash in (("val", "dot"), ("test", "solid")):
        pts = result["curves"][part]
        fig.add_scatter(x=[p["coverage"] for p in pts], y=[p["accuracy"] for p in pts], mode="lines",
                        line=dict(dash=dash), name="validation" if part == "val" else result["part"])
    if result["band"] is not None and result["coverage"] is not None and result["band_accuracy"] is not None:
        fig.add_scatter(x=[result["coverage"]], y=[result["band_accuracy"]], mode="markers",
                        marker=dict(size=12, symbol="x"), name=f"chosen band ({result['part']})")
    fig.update_layout(height=320, margin=dict(l=10, r=10, t=30, b=10), title="Coverage and accuracy",
                      xaxis_title="share decided automatically", yaxis_title="accuracy of those",
                      legend=dict(orientation="h", y=-0.3))
    fig.update_xaxes(tickformat=".0%", range=[0, 1.02])
    fig.update_yaxes(tickformat=".0%")
    return fig


def calibration_section(ws, run) -> dict | None:
    st.subheader("Calibration")
    cal = run.calibration()
    if cal is None:
        st.info("This run was evaluated before the studio calibrated its probabilities.")
        if st.button("Calibrate now (evaluates again)", key="calibrate"):
            with st.spinner("Evaluating and calibrating…"):
                evaluate_run(ws, run)
            st.rerun()
        return None
    c1, c2, c3 = st.columns(3)
    c1.metric("Temperature", f"{cal['temperature']:.2f}", help="Fitted on the validation part: probabilities are "
              "softmax(log p / T). Above 1 the model was over-confident, below 1 under-confident.")
    c2.metric(f"Calibration error ({cal['evaluated_on']})", f"{cal['ece_after']:.3f}",
              delta=f"{cal['ece_after'] - cal['ece_before']:+.3f} from {cal['ece_before']:.3f}", delta_color="inverse",
              help="Expected calibration error: how far, on average, the confidence is from the share actually "
                   "right (15 confidence bins). 0 is perfect.")
    c3.metric("Log-loss", f"{cal['nll_after']:.3f}", delta=f"{cal['nll_after'] - cal['nll_before']:+.3f}",
              delta_color="inverse")
    if cal.get("note"):
        st.caption(cal["note"])
    st.plotly_chart(reliability_figure(cal), key="reliability")
    return cal


def _cost_inputs(classes: list[str], saved: Rule | None, ordinal: bool) -> dict:
    inputs = saved.inputs if saved else {}
    if len(classes) == 2:
        c1, c2, c3 = st.columns(3)
        default = inputs.get("positive") or classes[1]
        positive = c1.selectbox("Positive class (what must not be missed)", classes, index=classes.index(default)
                                if default in classes else 1, key="decide_positive")
        miss = c2.number_input(f"Cost of a missed {positive}", 0.0, 1e6, float(inputs.get("cost_miss", 10.0)),
                               key="decide_cost_miss")
        fa = c3.number_input("Cost of a false alarm", 0.0, 1e6, float(inputs.get("cost_false_alarm", 1.0)),
                             key="decide_cost_fa")
        return {"positive": positive, "cost_miss": miss, "cost_false_alarm": fa}
    st.caption("Cost of each mistake: rows are the true class, columns the decided class."
               + (" The classes are ordered grades: a mistake costs the grades it is off by." if ordinal else ""))
    default = inputs.get("cost") or cost_matrix(classes, ordinal=ordinal).tolist()
    frame = st.data_editor(pd.DataFrame(default, index=classes, columns=classes), key="decide_cost_matrix")
    return {"cost": np.asarray(frame.values, dtype=float).tolist()}


def decide_section(ws, run) -> None:
    st.subheader("Decide")
    st.caption("Turn probabilities into a rule: which images pass, which fail, which go to a person, at the least "
               "cost. The rule is chosen on the validation part and scored on the test part, which it never saw.")
    try:
        scores = load_scores(run)
    except DecisionError as exc:
        st.info(str(exc))
        return
    saved = load_rule(run)
    inputs = _cost_inputs(scores.classes, saved, run.config().ordinal)
    mode = _band_inputs(saved, inputs)
    try:
        result = decide_run(run, save=False, **inputs)
    except DecisionError as exc:
        st.error(str(exc))
        return
    rule, on, part = Rule.from_dict(result["rule"]), result["test"], result["part"]
    if rule.threshold is not None:
        st.markdown(f"**Threshold**: {rule.positive} when p({rule.positive}) ≥ **{rule.threshold:.3f}** "
                    f"(argmax would use 0.5)")
    table = pd.DataFrame([{"rule": name, **{k: on[key][k] for k in ("cost", "accuracy", "precision", "recall")}}
                          for name, key in (("this rule", "rule"), ("argmax", "argmax"))])
    st.dataframe(table, hide_index=True, column_config={
        k: st.column_config.NumberColumn(format="%.3f") for k in ("accuracy", "precision", "recall")})
    st.caption(f"On the {part} part ({on['n']} images), every image decided by the rule, none reviewed. "
               + ("Precision and recall are the positive class's." if rule.binary else
                  "Precision and recall are means over the classes."))
    if mode != BAND_MODES[0]:
        _band_report(result, rule, inputs.get("target_accuracy"))
    m1, m2 = st.columns(2)
    cm = np.array(on["rule"]["confusion_matrix"])
    fig = go.Figure(go.Heatmap(z=cm, x=scores.classes, y=scores.classes, colorscale="Blues", text=cm,
                               texttemplate="%{text}", showscale=False))
    fig.update_layout(title=f"Confusion matrix at the rule ({part})", xaxis_title="decided", yaxis_title="true",
                      yaxis_autorange="reversed", height=320, margin=dict(l=10, r=10, t=30, b=10))
    m1.plotly_chart(fig, key="decide_cm")
    m2.plotly_chart(coverage_figure(result), key="decide_coverage")
    _save_controls(run, rule, saved)


def _band_inputs(saved: Rule | None, inputs: dict) -> str:
    """The review band the user asks for, put into `inputs`; returns the chosen mode."""
    b1, b2 = st.columns([2, 1])
    saved_mode = (1 if saved and saved.target_accuracy is not None else
                  2 if saved and saved.review_budget is not None else 0)
    mode = b1.radio("Send to a person", BAND_MODES, index=saved_mode, horizontal=True, key="decide_band_mode")
    if mode == BAND_MODES[1]:
        inputs["target_accuracy"] = b2.number_input("Target accuracy", 0.5, 1.0, saved.target_accuracy if saved and
                                                    saved.target_accuracy else 0.95, 0.01, key="decide_target")
    elif mode == BAND_MODES[2]:
        inputs["review_budget"] = b2.number_input("Largest share reviewed", 0.0, 0.99, saved.review_budget if saved and
                                                  saved.review_budget is not None else 0.10, 0.01, key="decide_budget")
    return mode


def _band_report(result: dict, rule: Rule, target: float | None) -> None:
    band, on, part = result["band"], result["test"], result["part"]
    if band is None:
        st.warning("No band reaches this target on the validation part, even sending all but one image to a "
                   "person: lower the target or improve the model.")
    elif band["none_needed"]:
        st.markdown(f"**Review band**: none needed: the validation part reaches it with every image decided "
                    f"automatically. On {part}: {on['band_accuracy']:.1%} accuracy.")
    elif on["band_accuracy"] is None:
        st.warning(f"This band sends every {part} image to a person.")
    else:
        where = (f"p({rule.positive}) in [{band['p_low']:.3f}, {band['p_high']:.3f})" if "p_low" in band
                 else f"confidence below {band['min_confidence']:.3f}")
        st.markdown(f"**Review band**: {where} goes to a person. On {part}: **{on['coverage']:.1%}** decided "
                    f"automatically, at **{on['band_accuracy']:.1%}** accuracy; {on['reviewed']} images reviewed.")
    low_high = result["val_band_interval"]
    if band is not None and low_high and target and low_high[0] < target:
        val = result["val"]
        st.warning(f"The band was chosen on {val['n'] - val['reviewed']} validation images decided "
                   f"automatically, at {val['band_accuracy']:.1%}; with so few, the same band's accuracy on new "
                   f"images may lie anywhere in {low_high[0]:.1%}-{low_high[1]:.1%} (95% interval), below the "
                   f"target of {target:.0%} at times. More validation images narrow it.")


def _save_controls(run, rule: Rule, saved: Rule | None) -> None:
    s1, s2 = st.columns([1, 3])
    if s1.button("Save this rule", type="primary", key="decide_save"):
        save_rule(run, rule)  # the rule shown above, not chosen again
        write_decisions(run)
        st.toast("Saved: Predict, the CLI, exports and the predictions CSV now say pass / fail / review.")
        st.rerun()
    if saved is not None:
        s2.caption("A rule is saved with this run: predictions say " +
                   ("pass / fail / review." if saved.binary else "the rule's class or review."))
        if s2.button("Remove the saved rule", key="decide_clear"):
            clear_rule(run)
            write_decisions(run)
            st.rerun()


def learning_curve_figure(lc: dict):
    """Per class: the measured error against its training images (log-log), the fitted power law and its reach to
    twice today's images."""
    from core.studies.learning_curve import power_law_at
    fig = go.Figure()
    for c, fit in lc["fits"].items():
        n = [p["per_class"][c]["n_train"] for p in lc["points"]]
        err = [p["per_class"][c]["error"] for p in lc["points"]]
        fig.add_scatter(x=n, y=err, mode="markers", name=f"{c} (measured)")
        if fit:
            xs = np.geomspace(min(n), 2 * max(n), 30)
            mid = [power_law_at(fit, x) for x in xs]
            fig.add_scatter(x=xs, y=[m[0] for m in mid], mode="lines", name=f"{c}: fit, exponent {fit['b']:.2f}",
                            line=dict(dash="dash"))
            fig.add_scatter(x=np.concatenate([xs, xs[::-1]]), y=[m[2] for m in mid] + [m[1] for m in mid[::-1]],
                            fill="toself", opacity=0.15, line=dict(width=0), name=f"{c}: 90% interval",
                            hoverinfo="skip")
    fig.update_layout(height=360, margin=dict(l=10, r=10, t=30, b=10), title=f"Error on the {lc['held_out']} part",
                      xaxis_title="training images of the class", yaxis_title="error", xaxis_type="log",
                      yaxis_type="log", legend=dict(orientation="h", y=-0.3))
    return fig


def learning_curve_section(ws, run, jm) -> None:
    from core.studies.learning_curve import FRACTIONS, latest_for, read_learning_curve
    st.subheader("How many more images")
    st.caption("A learning curve trains this run's recipe on " + ", ".join(f"{f:.0%}" for f in FRACTIONS) +
               " of its training images (same validation part), fits a power law per class to the error, and says "
               "what more images of each class would buy. It runs as a background job.")
    done = latest_for(ws, run.id)
    if done is not None:
        lc = read_learning_curve(done)
        for line in lc["advice"]:
            st.markdown(f"- {line}")
        st.plotly_chart(learning_curve_figure(lc), key="learning_curve")
        st.caption(f"From learning-curve run {done.id}.")
    c1, c2 = st.columns([1, 2])
    epochs = c1.number_input("Epochs per fraction (a budget)", 1, 500, run.config().epochs, key="lc_epochs",
                             help="Fewer epochs than the run's keep the job short on a CPU; each fraction then "
                                  "trains less than the run did, so the curve is pessimistic.")
    if c2.button("Start learning curve", key="lc_start"):
        if jm.active() is not None:
            st.warning("A job is running; start this when it ends.")
        else:
            try:
                rid = jm.submit_learning_curve(run.id, int(epochs))
                st.session_state["train_run"] = rid
                st.success(f"Learning curve {rid} started; follow it on the Train page.")
            except Exception as exc:  # config problems: said, not raised
                st.error(str(exc))
