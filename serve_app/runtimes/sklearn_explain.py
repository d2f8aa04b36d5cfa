"""Explanations for scikit-learn models: exact for linear models, Saabas for trees, summed back
to the model's input columns through per-column preprocessing (ColumnTransformer included).

- **Linear models** (``coef_``/``intercept_``): the margin is ``intercept + sum_j coef_j * z_j``
  with ``z`` the preprocessed input, so ``coef_j * z_j`` is column j's exact contribution. With
  a StandardScaler in front (the training mean of ``z`` is 0) this is also the Shapley value
  under feature independence.
- **Decision trees and forests** (``tree_``/``estimators_``): Saabas' path attribution. Walking
  a row down a tree from the root, every split moves the node value (mean target, or class
  probabilities) by some amount; that change is credited to the split's feature. Bias is the
  root value; bias plus the credits is exactly the leaf value, so for a forest (the average of
  its trees) contributions plus bias equal ``predict`` (regressors) or ``predict_proba``
  (classifiers). Unlike TreeSHAP it favours features split near the leaves; it is exact in
  sum and fast (one sparse product per tree).

**Preprocessing.** Contributions are computed on the estimator's own input ``z`` (say, the
ten one-hot columns of three string columns) and then summed onto the model's input column each
``z`` column was computed from: a string column's contribution is the sum of its one-hot
columns'. This is exact (bias plus contributions still equal the margin) as long as every ``z``
column comes from ONE input column, which holds for the transforms in :data:`ONE_TO_ONE`,
``SimpleImputer`` (without ``add_indicator``), ``OneHotEncoder`` (dropped and infrequent
categories included), ``TargetEncoder``, and Pipelines and ColumnTransformers of those
("passthrough" and "drop" included). Anything else (PCA, PolynomialFeatures, a
FunctionTransformer, whose outputs may mix columns; an estimator without a method) answers 400
naming it. Types are matched exactly, not by ``isinstance``: a subclass may transform otherwise.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import (MaxAbsScaler, MinMaxScaler, OneHotEncoder, OrdinalEncoder, PowerTransformer,
                                   QuantileTransformer, RobustScaler, StandardScaler, TargetEncoder)

from serve_app.runtimes.base import Explanation, UnsupportedOutput, margin_output_names

# Transforms whose output column j is computed from input column j alone: credit passes straight through.
ONE_TO_ONE = (StandardScaler, MinMaxScaler, MaxAbsScaler, RobustScaler, PowerTransformer, QuantileTransformer,
              OrdinalEncoder)


def _steps(model) -> list:
    """A model's fitted steps in order: nested Pipelines flattened, "passthrough" steps left out."""
    if type(model) is not Pipeline:
        return [model]
    return [inner for _, step in model.steps if step is not None and not _is_passthrough(step)
            for inner in _steps(step)]


def _is_passthrough(step) -> bool:
    return isinstance(step, str) and step == "passthrough"


def _split(model):
    """(preprocessing steps, final estimator) of a model or Pipeline."""
    *transforms, final = _steps(model)
    return transforms, final


def _prepared(model):
    """(preprocessing steps, final estimator, source of each estimator input column): the
    source indexes the model's input columns; UnsupportedOutput when there is no exact method."""
    transforms, final = _split(model)
    if not _is_linear(final) and _trees(final) is None:
        raise UnsupportedOutput(f"no explanation method for {type(final).__name__}: explanations exist for "
                                "linear models and tree ensembles only")
    first = transforms[0] if transforms else final
    return transforms, final, _chain_sources(transforms, first.n_features_in_, "the pipeline")


def _chain_sources(transforms, n_inputs: int, where: str) -> np.ndarray:
    """Sources through transforms applied in turn: output o of a step comes from the previous
    step's output ``step_sources[o]``, which comes from the input ``sources[step_sources[o]]``."""
    sources = np.arange(n_inputs)
    for transform in transforms:
        sources = sources[_sources(transform, len(sources), where)]
    return sources


def _sources(transform, n_inputs: int, where: str) -> np.ndarray:
    """For each output column of a fitted ``transform`` of ``n_inputs`` columns, the one input
    column it is computed from; UnsupportedOutput naming the transform when there is none."""
    kind = type(transform)
    if kind is Pipeline:
        return _chain_sources(_steps(transform), n_inputs, where)
    if kind is ColumnTransformer:
        return _column_transformer_sources(transform, where)
    if kind in ONE_TO_ONE:
        return np.arange(n_inputs)
    if kind is SimpleImputer and not transform.add_indicator:
        return _kept_columns(transform)
    if kind is OneHotEncoder:
        return np.repeat(np.arange(n_inputs), _one_hot_widths(transform, where))
    if kind is TargetEncoder:  # one column per input, or one per class and input (multiclass)
        width = len(transform.classes_) if transform.target_type_ == "multiclass" else 1
        return np.repeat(np.arange(n_inputs), width)
    name = "SimpleImputer(add_indicator=True)" if kind is SimpleImputer else kind.__name__
    raise UnsupportedOutput(
        f"no exact explanation through {name} ({where}): its output columns are not each computed from "
        "one input column, so contributions cannot be summed back to the model's features; explanations "
        "exist after per-column transforms (scalers, SimpleImputer, OneHotEncoder, OrdinalEncoder, "
        "TargetEncoder) and ColumnTransformers of them")


def _column_transformer_sources(ct: ColumnTransformer, where: str) -> np.ndarray:
    """Each transformer's outputs sit at ``output_indices_[name]`` and come from the input
    columns it was fitted on. A "passthrough" is identity (the fitted copy is a FunctionTransformer,
    hence the lookup of what the user gave)."""
    # The input columns each transformer was fitted on, column selectors resolved: scikit-learn
    # keeps them only in this private attribute (its own get_feature_names_out reads it).
    fitted_on = getattr(ct, "_transformer_to_input_indices", None)
    if fitted_on is None:
        raise UnsupportedOutput(f"no explanation through ColumnTransformer ({where}) with this scikit-learn "
                                "version: it does not record the columns each transformer was fitted on")
    given = {name: transformer for name, transformer, _ in ct.transformers} | {"remainder": ct.remainder}
    width = max((s.stop for s in ct.output_indices_.values()), default=0)
    sources = np.full(width, -1)
    for name, fitted, _ in ct.transformers_:
        out = ct.output_indices_.get(name, slice(0, 0))
        if out.stop == out.start:  # "drop", or no column selected
            continue
        columns = np.asarray(fitted_on[name], dtype=np.intp)
        inner = (np.arange(len(columns)) if _is_passthrough(given.get(name))
                 else _sources(fitted, len(columns), f"{where}, ColumnTransformer's {name!r}"))
        sources[out] = columns[inner]
    if (sources < 0).any():  # a layout this code does not know: refuse rather than guess
        raise UnsupportedOutput(f"no explanation through ColumnTransformer ({where}): some of its output columns "
                                "have no known input column")
    return sources


def _kept_columns(imputer: SimpleImputer) -> np.ndarray:
    """A SimpleImputer drops the columns that were all missing in training (unless told to keep
    them); its output names, which are its input names, say which stayed."""
    names = getattr(imputer, "feature_names_in_", None)
    if names is None:
        names = [f"x{i}" for i in range(imputer.n_features_in_)]  # get_feature_names_out's defaults
    position = {name: i for i, name in enumerate(names)}
    return np.array([position[name] for name in imputer.get_feature_names_out()], dtype=np.intp)


def _one_hot_widths(encoder: OneHotEncoder, where: str) -> list[int]:
    """Output columns per input column, in order: one per category, the infrequent categories
    (``min_frequency``/``max_categories``) sharing one, less the dropped category (``drop``)."""
    infrequent = getattr(encoder, "infrequent_categories_", None)  # absent unless enabled
    dropped = encoder.drop_idx_
    widths = []
    for j, categories in enumerate(encoder.categories_):
        width = len(categories)
        if infrequent is not None and infrequent[j] is not None:
            width -= len(infrequent[j]) - 1
        if dropped is not None and dropped[j] is not None:
            width -= 1
        widths.append(width)
    if sum(widths) != len(encoder.get_feature_names_out()):  # a layout this code does not know
        raise UnsupportedOutput(f"no explanation through OneHotEncoder ({where}): unexpected output layout")
    return widths


def _transform(transforms, X):
    for t in transforms:
        X = t.transform(X)
    return X


def _dense(Z) -> np.ndarray:
    """The estimator's input as a float matrix: a ColumnTransformer may give a sparse matrix (one-hot
    columns) or a DataFrame (``set_output``), a model without preprocessing gets the DataFrame itself."""
    return Z.toarray() if sparse.issparse(Z) else np.asarray(Z, dtype=np.float64)


def _to_input_columns(contributions: np.ndarray, sources: np.ndarray, model, X) -> np.ndarray:
    """Contributions per estimator input column (last axis) summed onto the input column of ``X``
    each was computed from: one 0/1 matrix product, each row of the matrix holding one 1, so the
    sum over columns (hence bias + contributions = margin) is unchanged."""
    names, columns = getattr(model, "feature_names_in_", None), getattr(X, "columns", None)
    if names is not None and columns is not None and list(columns) != list(names):
        position = {column: i for i, column in enumerate(columns)}  # a frame in another column order
        sources = np.array([position[name] for name in names], dtype=np.intp)[sources]
    n_columns = X.shape[1]
    if len(sources) == n_columns and (sources == np.arange(n_columns)).all():
        return contributions
    mapping = np.zeros((len(sources), n_columns))
    mapping[np.arange(len(sources)), sources] = 1.0
    return contributions @ mapping


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


def margin(model, X, is_classifier: bool) -> np.ndarray:
    """The raw output :func:`explain` decomposes, shaped (rows, outputs)."""
    transforms, final, _ = _prepared(model)
    if _is_linear(final):
        Z = _transform(transforms, X)
        out = final.decision_function(Z) if is_classifier else final.predict(Z)
    else:
        out = model.predict_proba(X) if is_classifier else model.predict(X)
    return np.asarray(out, dtype=np.float64).reshape(len(X), -1)


def explain(model, X, classes, is_classifier: bool) -> Explanation:
    """Contributions (rows, outputs, columns of ``X``) to :func:`margin`; ``X`` is a matrix or a DataFrame."""
    transforms, final, sources = _prepared(model)
    outputs = outputs_for(model, classes)
    Z = _dense(_transform(transforms, X))
    if _is_linear(final):
        coef = np.atleast_2d(final.coef_)                          # (outputs, estimator inputs)
        contributions = Z[:, None, :] * coef[None, :, :]
        bias = np.broadcast_to(np.atleast_1d(final.intercept_), (len(X), coef.shape[0])).copy()
        return Explanation(_to_input_columns(contributions, sources, model, X), bias, outputs,
                           "log_odds" if is_classifier else "value", "linear_exact")
    trees = _trees(final)
    contributions = np.zeros((len(X), len(outputs), Z.shape[1]))
    bias = np.zeros((len(X), len(outputs)))
    for tree in trees:
        c, b = _saabas(tree.tree_, Z, is_classifier)
        contributions += c
        bias += b
    return Explanation(_to_input_columns(contributions / len(trees), sources, model, X), bias / len(trees),
                       outputs, "probability" if is_classifier else "value", "saabas")


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
