"""Explanations for scikit-learn models: exact for linear models, Saabas for trees.

- **Linear models** (``coef_``/``intercept_``, optionally after per-feature scalers in a
  Pipeline): the margin is ``intercept + sum_j coef_j * z_j`` with ``z`` the scaled input, so
  ``coef_j * z_j`` is feature j's exact contribution. With a StandardScaler in front (the
  training mean of ``z`` is 0) this is also the Shapley value under feature independence.
- **Decision trees and forests** (``tree_``/``estimators_``): Saabas' path attribution. Walking
  a row down a tree from the root, every split moves the node value (mean target, or class
  probabilities) by some amount; that change is credited to the split's feature. Bias is the
  root value; bias plus the credits is exactly the leaf value, so for a forest (the average of
  its trees) contributions plus bias equal ``predict`` (regressors) or ``predict_proba``
  (classifiers). Unlike TreeSHAP it favours features split near the leaves; it is exact in
  sum and fast (one sparse product per tree).

Anything else (other estimators, transforms that mix features) has no explanation: 400.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MaxAbsScaler, MinMaxScaler, RobustScaler, StandardScaler

from serve_app.runtimes.base import Explanation, UnsupportedOutput, margin_output_names

# Transforms whose output column j depends on input column j only: credit passes through them.
PER_FEATURE_TRANSFORMS = (StandardScaler, MinMaxScaler, MaxAbsScaler, RobustScaler)


def _split(model):
    """(per-feature transforms, final estimator) of a model or Pipeline; None if not explainable."""
    steps = [s for _, s in model.steps if s not in (None, "passthrough")] if isinstance(model, Pipeline) else [model]
    *transforms, final = steps
    if not all(isinstance(t, PER_FEATURE_TRANSFORMS) for t in transforms):
        return None, None
    return transforms, final


def _transform(transforms, X: np.ndarray) -> np.ndarray:
    for t in transforms:
        X = t.transform(X)
    return X


def _is_linear(estimator) -> bool:
    return hasattr(estimator, "coef_") and hasattr(estimator, "intercept_")


def _trees(estimator) -> list | None:
    if hasattr(estimator, "tree_"):
        return [estimator]
    members = getattr(estimator, "estimators_", None)
    if isinstance(members, list) and members and all(hasattr(m, "tree_") for m in members):
        return members
    return None


def outputs_for(model, classes) -> list[str]:
    """Linear models have one margin column per coefficient row; trees one per class."""
    _, final = _split(model)
    columns = np.atleast_2d(final.coef_).shape[0] if _is_linear(final) else len(classes or ())
    return margin_output_names(classes, columns)


def margin(model, X: np.ndarray, is_classifier: bool) -> np.ndarray:
    transforms, final = _split(model)
    if final is None or (not _is_linear(final) and _trees(final) is None):
        raise UnsupportedOutput("explanations exist for linear models and tree ensembles only")
    if _is_linear(final):
        Z = _transform(transforms, X)
        out = final.decision_function(Z) if is_classifier else final.predict(Z)
    else:
        out = model.predict_proba(X) if is_classifier else model.predict(X)
    return np.asarray(out, dtype=np.float64).reshape(len(X), -1)


def explain(model, X: np.ndarray, classes, is_classifier: bool) -> Explanation:
    transforms, final = _split(model)
    if final is None:
        raise UnsupportedOutput("explanations need per-feature preprocessing (scalers) before the estimator")
    outputs = outputs_for(model, classes)
    if _is_linear(final):
        Z = _transform(transforms, X)
        coef = np.atleast_2d(final.coef_)                          # (outputs, features)
        contributions = Z[:, None, :] * coef[None, :, :]
        bias = np.broadcast_to(np.atleast_1d(final.intercept_), (len(X), coef.shape[0])).copy()
        return Explanation(contributions, bias, outputs, "log_odds" if is_classifier else "value",
                           "linear_exact")
    trees = _trees(final)
    if trees is None:
        raise UnsupportedOutput(f"no explanation method for {type(final).__name__}")
    Z = _transform(transforms, X)
    contributions = np.zeros((len(X), len(outputs), X.shape[1]))
    bias = np.zeros((len(X), len(outputs)))
    for tree in trees:
        c, b = _saabas(tree.tree_, Z, is_classifier)
        contributions += c
        bias += b
    return Explanation(contributions / len(trees), bias / len(trees), outputs,
                       "probability" if is_classifier else "value", "saabas")


def _saabas(tree, X: np.ndarray, is_classifier: bool) -> tuple[np.ndarray, np.ndarray]:
    """One tree's path attributions: (rows, outputs, features) and the root value per row."""
    values = tree.value[:, 0, :].astype(np.float64)        # (nodes, classes or 1): single-output trees
    if is_classifier:
        values = values / values.sum(axis=1, keepdims=True)
    parent = np.full(tree.node_count, -1)
    for side in (tree.children_left, tree.children_right):
        inner = side >= 0
        parent[side[inner]] = np.nonzero(inner)[0]
    has_parent = parent >= 0
    nodes = np.nonzero(has_parent)[0]
    delta = values[nodes] - values[parent[nodes]]           # change made by the split above the node
    feature = tree.feature[parent[nodes]]                   # the split's feature
    path = sparse.csr_matrix(tree.decision_path(np.ascontiguousarray(X, dtype=np.float32)))
    path = path[:, nodes]                                   # (rows, non-root nodes)
    n_features = X.shape[1]
    contributions = np.empty((len(X), values.shape[1], n_features))
    for k in range(values.shape[1]):
        credit = sparse.csr_matrix((delta[:, k], (np.arange(len(nodes)), feature)),
                                   shape=(len(nodes), n_features))
        contributions[:, k, :] = (path @ credit).toarray()
    bias = np.broadcast_to(values[0], (len(X), values.shape[1]))
    return contributions, bias
