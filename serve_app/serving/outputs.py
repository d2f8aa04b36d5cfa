"""The outputs a request can ask of a model, and which of them a model has.

``predict`` (labels or values) and ``predict_proba`` (classifiers) go through the batching
queue; the explanation outputs (per-feature contributions to the model's margin and its
bias, see :class:`serve_app.runtimes.base.Explanation`) are heavier and run on their own.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from serve_app.errors import BadInput
from serve_app.metadata import labels_from_probabilities

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


def predictions(runtime, data: Any, outputs: Sequence[str]) -> dict[str, np.ndarray]:
    """``predict`` and ``predict_proba`` of validated rows (a :class:`ModelInput`'s data), as
    serving and batch scoring both compute them: labels from the probabilities when both are
    asked (one model call), a regressor's values as float64."""
    X, results = runtime.prepare(data), {}
    is_classifier = runtime.meta.is_classifier
    if "predict_proba" in outputs and is_classifier:
        results["predict_proba"] = np.asarray(runtime.predict_proba(X), dtype=np.float64)
        if "predict" in outputs:
            results["predict"] = labels_from_probabilities(runtime.meta.classes, results["predict_proba"])
    elif "predict" in outputs:
        predicted = np.asarray(runtime.predict(X))
        results["predict"] = predicted if is_classifier else predicted.astype(np.float64)
    return results
