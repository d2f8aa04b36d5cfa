"""The model runtime interface: one small class per framework.

A runtime turns verified artifact bytes into something that answers ``predict`` and
``predict_proba`` on a 2-D float array, or on a pandas DataFrame for models fitted on one
(:meth:`ModelRuntime.prepare` gives it the training dtypes). Everything protocol-shaped (JSON, V1/V2 tensors)
stays in :mod:`serve_app.codecs`; everything transport-shaped stays in :mod:`serve_app.app`.
Runtimes register themselves by framework name, so the serving path looks a runtime up
once at load time and never branches on the framework per request.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from serve_app.errors import BadInput, ReloadFailed
from serve_app.metadata import ModelMetadata

RUNTIMES: dict[str, type["ModelRuntime"]] = {}


class ArtifactError(ReloadFailed):
    """An artifact that must not or cannot be loaded (untrusted types, bad format): for a
    client, the store holds a model this server refuses (409), never a server fault."""


class UnsupportedOutput(BadInput):
    """The model cannot produce the requested output (e.g. probabilities of a regressor, an
    explanation of a model family without a method): the client asked for it, so a 400."""

    reason = "unknown_output"


@dataclass(frozen=True)
class Explanation:
    """Per-feature contributions to a model's raw output ("margin"), row by row.

    For every row and output, ``bias + contributions.sum(features)`` equals the model's margin
    for that output: the log-odds (XGBoost, linear classifiers), the predicted value
    (regressors), or the class probability (scikit-learn tree ensembles, whose trees vote
    probabilities). ``outputs`` names the margin columns.
    """

    contributions: np.ndarray  # (rows, outputs, features)
    bias: np.ndarray           # (rows, outputs)
    outputs: list[str]
    margin_kind: str           # "log_odds", "value" or "probability"
    method: str                # "tree_shap", "linear_exact" or "saabas"


def margin_output_names(classes, columns: int) -> list[str]:
    """Names of a model's margin columns: ``value`` for a regressor; for a classifier one per
    class, or only the positive class when a binary model has one margin column."""
    if classes is None:
        return ["value"]
    return [str(classes[-1])] if columns == 1 else [str(c) for c in classes]


def register_runtime(cls: type["ModelRuntime"]) -> type["ModelRuntime"]:
    RUNTIMES[cls.framework] = cls
    return cls


def runtime_for(framework: str) -> type["ModelRuntime"]:
    try:
        return RUNTIMES[framework]
    except KeyError:
        raise ArtifactError(
            f"no runtime for framework {framework!r}; known: {sorted(RUNTIMES)}"
        ) from None


class ModelRuntime(ABC):
    framework: ClassVar[str]
    artifact_name: ClassVar[str]
    # Whether NaN (JSON null) is a legal "missing value" for this model's inputs.
    accepts_missing: ClassVar[bool] = False

    def __init__(self, model: Any, metadata: ModelMetadata):
        self.model = model
        self.meta = metadata
        self._categories = {f.name: f.categories for f in metadata.features if f.dtype == "category"}

    def prepare(self, data):
        """What the model predicts on, from a ``ModelInput``'s ``data``: a matrix as it is;
        typed columns as one DataFrame, category columns in the training categories (the codes
        the model was fitted with; a value outside them, where allowed, is missing)."""
        if isinstance(data, np.ndarray):
            return data
        import pandas as pd  # only mixed-type models pay for pandas

        categories = self._categories
        # Text stays Python strings: pandas 3 would infer its Arrow-backed ``str`` (4.5 ms per 65k
        # rows), which scikit-learn's encoders turn back into objects (12 % of a scoring actor).
        return pd.DataFrame({name: pd.Categorical(values, categories=categories[name]) if name in categories
                             else pd.Series(values, dtype=object, copy=False) if values.dtype == object
                             else values for name, values in data.items()})

    @classmethod
    @abstractmethod
    def serialize(cls, model: Any) -> bytes:
        """The artifact bytes for a fitted model (used by training)."""

    @classmethod
    def check(cls, artifact: bytes, metadata: ModelMetadata) -> None:
        """ArtifactError if :meth:`load` would refuse these bytes on the server's policy,
        decided without deserialising them (nothing in them runs)."""

    @classmethod
    @abstractmethod
    def load(cls, artifact: bytes, metadata: ModelMetadata) -> "ModelRuntime":
        """A runtime from artifact bytes whose sha256 the store already verified."""

    @abstractmethod
    def predict(self, X) -> np.ndarray:
        """Class labels (classifiers) or values (regressors), one per row."""

    def predict_proba(self, X) -> np.ndarray:
        """Per-class probabilities, columns ordered as ``metadata.classes``."""
        raise UnsupportedOutput(
            f"model {self.meta.name!r} is a {self.meta.task} model and has no probabilities"
        )

    def explain(self, X) -> Explanation:
        """Per-feature contributions (see :class:`Explanation`)."""
        raise UnsupportedOutput(f"model {self.meta.name!r} has no explanation method")

    def margin(self, X) -> np.ndarray:
        """The raw output :meth:`explain` decomposes, shaped (rows, outputs)."""
        raise UnsupportedOutput(f"model {self.meta.name!r} has no explanation method")

    def metadata(self) -> dict[str, Any]:
        return self.meta.to_dict()


@contextmanager
def client_values(metadata: ModelMetadata):
    """The input passed the schema's checks, so a model that raises on it raises on the
    client's values: a 400 with the model's own message, not a server error.

    - Each step of a pipeline re-validates its input, so a finite but huge value that a scaler
      turns into inf fails the next step's check: ``non_finite``.
    - A user's pipeline refusing values its author did not foresee (an encoder with
      ``handle_unknown="error"``, a custom check): ``rejected_by_model``, with its message.
    """
    try:
        yield
    except BadInput:
        raise
    except (ValueError, TypeError, KeyError) as exc:
        message = str(exc)
        if "contains infinity" in message or ("contains NaN" in message and not metadata.is_tabular):
            raise BadInput(f"{metadata.name}: input values too large for this model: they overflow to "
                           "infinity or NaN inside it", "non_finite") from None
        raise BadInput(f"{metadata.name}: the model refused these values: {type(exc).__name__}: {message}",
                       "rejected_by_model") from None

