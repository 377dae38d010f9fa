"""Deciding with a model: arithmetic on probability rows (numpy only: the ONNX predictor uses it too).

    calibration.py  one temperature fitted on validation; reliability and ECE
    rule.py         a cost-based rule and a "send to a person" band, and its report on a part
    stored.py       a run's stored scores, temperature and rule
    gate.py         the release gate: McNemar on paired decisions, per-class recall, the rule's cost
"""
