"""XGBoost models in XGBoost's own UBJSON format (no pickle).

The artifact is a ``Booster``; predictions go through ``inplace_predict``, which skips the
DMatrix construction and is the fastest path for small online batches. Class labels come
from the metadata (XGBoost's native format stores no label encoder), so the booster's class
indices map to ``metadata.classes``. XGBoost treats NaN as a missing value, so this runtime
accepts JSON ``null`` inputs.
"""

from __future__ import annotations

import numpy as np
import xgboost as xgb

from serve_app.metadata import ModelMetadata, labels_from_probabilities
from serve_app.runtimes.base import (ArtifactError, Explanation, ModelRuntime, client_values, margin_output_names,
                                    register_runtime)


@register_runtime
class XGBoostRuntime(ModelRuntime):
    framework = "xgboost"
    artifact_name = "model.ubj"
    accepts_missing = True

    def __init__(self, booster: xgb.Booster, metadata: ModelMetadata):
        super().__init__(booster, metadata)
        booster.set_param({"nthread": 1})  # one replica, one core; scale with replicas
        self.classes = np.asarray(metadata.classes) if metadata.classes is not None else None

    @classmethod
    def serialize(cls, model) -> bytes:
        booster = model.get_booster() if hasattr(model, "get_booster") else model
        return bytes(booster.save_raw(raw_format="ubj"))

    @classmethod
    def check(cls, artifact: bytes, metadata: ModelMetadata) -> None:
        if not artifact:  # libxgboost aborts the process on empty input instead of raising
            raise ArtifactError(f"{metadata.name}: the XGBoost artifact is empty")

    @classmethod
    def load(cls, artifact: bytes, metadata: ModelMetadata) -> "XGBoostRuntime":
        cls.check(artifact, metadata)
        booster = xgb.Booster()
        try:
            booster.load_model(bytearray(artifact))
        except (xgb.core.XGBoostError, UnicodeDecodeError, ValueError) as exc:
            raise ArtifactError(f"{metadata.name}: not a readable XGBoost model: {exc}") from exc
        return cls(booster, metadata)

    def _raw(self, X) -> np.ndarray:
        with client_values(self.meta):
            return self.model.inplace_predict(X, validate_features=False)

    def predict(self, X) -> np.ndarray:
        if not self.meta.is_classifier:
            return self._raw(X)
        return labels_from_probabilities(self.classes, self.predict_proba(X))

    def predict_proba(self, X) -> np.ndarray:
        if not self.meta.is_classifier:
            return super().predict_proba(X)
        raw = self._raw(X)
        if raw.ndim == 1:  # binary:logistic gives P(class 1) only
            return np.column_stack([1.0 - raw, raw])
        return raw

    def margin(self, X) -> np.ndarray:
        with client_values(self.meta):
            raw = self.model.inplace_predict(X, predict_type="margin", validate_features=False)
        return raw.reshape(len(X), -1)

    def explain(self, X) -> Explanation:
        """XGBoost's own TreeSHAP (``pred_contribs``): exact Shapley values of the trees, one per
        original column (a native categorical column gets one contribution, not one per value)."""
        with client_values(self.meta):
            contribs = self.model.predict(xgb.DMatrix(X, missing=np.nan, enable_categorical=self.meta.is_tabular),
                                          pred_contribs=True, validate_features=False)
        contribs = contribs.reshape(len(X), -1, X.shape[1] + 1)  # (rows, outputs, features + bias)
        return Explanation(contributions=contribs[:, :, :-1], bias=contribs[:, :, -1],
                           outputs=margin_output_names(self.classes, contribs.shape[1]),
                           margin_kind="log_odds" if self.meta.is_classifier else "value",
                           method="tree_shap")

