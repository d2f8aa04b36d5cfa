"""The outputs a request can ask of a model, and which of them a model has.

``predict`` (labels or values) and ``predict_proba`` (classifiers) go through the batching
queue; the explanation outputs (per-feature contributions to the model's margin and its
bias, see :class:`serve_app.runtimes.base.Explanation`) are heavier and run on their own.
"""

from __future__ import annotations

from typing import Sequence

from serve_app.errors import BadInput

EXPLANATION_OUTPUTS = ("contributions", "bias")
OUTPUTS = ("predict", "predict_proba", *EXPLANATION_OUTPUTS)


def check_outputs(requested: Sequence[str], is_classifier: bool) -> tuple[str, ...]:
    """The requested output names, each once, or a 400 naming the ones the model lacks."""
    bad = [o for o in requested if o not in OUTPUTS]
    if bad:
        raise BadInput(f"unknown output(s) {bad}; available: {list(OUTPUTS)}", "unknown_output")
    if "predict_proba" in requested and not is_classifier:
        raise BadInput("predict_proba is only available for classification models", "unknown_output")
    return tuple(dict.fromkeys(requested))


def wants_explanation(outputs: Sequence[str]) -> bool:
    return any(o in EXPLANATION_OUTPUTS for o in outputs)
