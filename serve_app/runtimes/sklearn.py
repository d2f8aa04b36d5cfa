"""scikit-learn estimators and pipelines, stored with skops (never pickle/joblib).

skops refuses to instantiate any type it does not trust. Its defaults trust the scikit-learn
estimators and plain numpy/scipy containers; on top of those we trust exactly the types in
``TRUSTED_TYPES`` (the internal tree structures of tree ensembles), plus what an operator
names in ``SERVE_APP_SKOPS_TRUSTED_TYPES`` (comma-separated, fully qualified). Anything else
in an artifact refuses to load and the error names the offending types.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import skops.io as sio

from serve_app.metadata import ModelMetadata
from serve_app.runtimes import sklearn_explain
from serve_app.runtimes.base import ArtifactError, Explanation, ModelRuntime, client_values, register_runtime

TRUSTED_TYPES = frozenset(
    {
        "sklearn.tree._tree.Tree",
        "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
        "sklearn._loss.link.Interval",
        "sklearn._loss.link.IdentityLink",
        "sklearn._loss.link.LogitLink",
        "sklearn._loss.link.MultinomialLogit",
        "sklearn._loss.loss.HalfSquaredError",
        "sklearn._loss.loss.HalfBinomialLoss",
        "sklearn._loss.loss.HalfMultinomialLoss",
        # What pipelines of mixed-type tables hold (audited: data, no code of their own):
        "numpy.dtype",                     # a column's dtype, kept by encoders and imputers
        "builtins.object",                 # the `object` dtype a column selector matches
        "sklearn.compose._column_transformer.make_column_selector",  # a name pattern and dtypes
        # HistGradientBoosting with categorical_features="from_dtype" keeps a partial of
        # check_array; skops still checks the function inside any partial on its own.
        "functools.partial",
        "sklearn.utils.validation.check_array",
    }
)


# A pipeline fitted on an all-numeric DataFrame is served the float matrix (the fast path) once
# publish() has checked it answers the same; the request's columns were checked by name, so
# scikit-learn's per-call warning about the matrix having no feature names says nothing.
warnings.filterwarnings("ignore", message="X does not have valid feature names", category=UserWarning)


def trusted_types() -> frozenset[str]:
    extra = os.environ.get("SERVE_APP_SKOPS_TRUSTED_TYPES", "")
    return TRUSTED_TYPES | {t.strip() for t in extra.split(",") if t.strip()}


@register_runtime
class SklearnRuntime(ModelRuntime):
    framework = "sklearn"
    artifact_name = "model.skops"

    @classmethod
    def serialize(cls, model) -> bytes:
        return sio.dumps(model)

    @classmethod
    def check(cls, artifact: bytes, metadata: ModelMetadata) -> None:
        cls._untrusted(artifact, metadata)

    @classmethod
    def _untrusted(cls, artifact: bytes, metadata: ModelMetadata) -> list[str]:
        """The artifact's types outside skops' defaults, all of them trusted by this server's
        configuration (``trusted_types()``: nothing stored with the model widens it), else
        ArtifactError naming the others."""
        try:
            untrusted = set(sio.get_untrusted_types(data=artifact))
        except Exception as exc:  # not a skops file at all
            raise ArtifactError(f"{metadata.name}: not a readable skops artifact: {exc}") from exc
        refused = sorted(untrusted - trusted_types())
        if refused:
            raise ArtifactError(
                f"{metadata.name}/{metadata.version}: artifact contains untrusted types "
                f"{refused}; refusing to load (extend SERVE_APP_SKOPS_TRUSTED_TYPES only "
                "for types you have audited)"
            )
        return sorted(untrusted)

    @classmethod
    def load(cls, artifact: bytes, metadata: ModelMetadata) -> "SklearnRuntime":
        trusted = cls._untrusted(artifact, metadata)
        try:
            model = sio.loads(artifact, trusted=trusted)
        except Exception as exc:  # its types are trusted, its content is not a model skops can build
            raise ArtifactError(f"{metadata.name}/{metadata.version}: the skops artifact cannot be loaded: "
                                f"{type(exc).__name__}: {exc}") from exc
        return cls(model, metadata)

    def predict(self, X) -> np.ndarray:
        with client_values(self.meta):
            return self.model.predict(X)

    def predict_proba(self, X) -> np.ndarray:
        if not hasattr(self.model, "predict_proba"):
            return super().predict_proba(X)
        with client_values(self.meta):
            return self.model.predict_proba(X)

    def margin(self, X) -> np.ndarray:
        with client_values(self.meta):
            return sklearn_explain.margin(self.model, X, self.meta.is_classifier)

    def explain(self, X) -> Explanation:
        """Exact for linear models, Saabas for trees (see serve_app.runtimes.sklearn_explain)."""
        with client_values(self.meta):
            return sklearn_explain.explain(self.model, X, self.meta.classes, self.meta.is_classifier)
