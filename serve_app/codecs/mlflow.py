"""MLflow's scoring protocol (``mlflow models serve``'s ``POST /invocations``), so a client
written for MLflow works unchanged.

Request bodies, ``Content-Type: application/json``, with exactly one of:

- ``dataframe_split``: ``{"columns": [...], "data": [[...], ...]}`` (``index`` ignored);
  without ``columns`` the rows are in the schema's feature order;
- ``dataframe_records``: ``[{"column": value, ...}, ...]``;
- ``instances`` or ``inputs``: rows (lists in feature order, or records), or one object of
  columns ``{"column": [values], ...}``;

and optionally ``params`` (``{"output": "predict_proba", "labels": true}``, as V1's
``parameters``). ``Content-Type: text/csv``: a header row naming the columns, then one row per
line; string columns are read as text, empty cells are missing values.

Response: ``{"predictions": [...]}``, as MLflow answers.
"""

from __future__ import annotations

import io
from typing import Any

import orjson

from serve_app.codecs import tables
from serve_app.codecs.tensors import DecodedRequest
from serve_app.codecs.v1 import answer_options, predictions
from serve_app.errors import BadInput, UnsupportedMediaType
from serve_app.metadata import ModelMetadata
from serve_app.serving.interface import Answer

CSV_MEDIA_TYPE = "text/csv"
FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")


def decode_request(body: bytes, media_type: str, meta: ModelMetadata, accepts_missing: bool) -> DecodedRequest:
    if media_type == CSV_MEDIA_TYPE:
        return DecodedRequest(csv_input(body, meta, accepts_missing), ("predict",))
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise UnsupportedMediaType(f"content type {media_type!r} is not supported; send application/json "
                                   f"or {CSV_MEDIA_TYPE}")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadInput(f"malformed JSON: {exc}", "malformed_json") from None
    if not isinstance(document, dict):
        raise BadInput(f"the body must be a JSON object with one of {list(FORMATS)}")
    given = [key for key in FORMATS if key in document]
    if len(given) != 1:
        raise BadInput(f"the body must have exactly one of {list(FORMATS)}, got "
                       f"{given or sorted(document)}")
    (key,) = given
    output, by_label = answer_options(document.get("params"), meta)
    inputs = _inputs(key, document[key], meta, accepts_missing)
    return DecodedRequest(inputs, (output,), classes=meta.classes if by_label else None)


def _inputs(key: str, value: Any, meta: ModelMetadata, accepts_missing: bool):
    what = f'"{key}"'
    if key == "dataframe_split":
        if not isinstance(value, dict) or not isinstance(value.get("data"), list):
            raise BadInput(f'{what} must be an object with "columns" and "data" (a list of rows)')
        rows, columns = value["data"], value.get("columns")
        if columns is None:
            return tables.from_rows(_some(rows, what), meta, accepts_missing, what)
        if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
            raise BadInput(f'{what}: "columns" must be a list of column names')
        if len(set(columns)) != len(columns):
            raise BadInput(f'{what}: "columns" names a column twice')
        tables.check_names(columns, meta.feature_names, what)
        for index, row in enumerate(_some(rows, what)):
            if not isinstance(row, list) or len(row) != len(columns):
                raise BadInput(f'{what}: row {index} must be a list of {len(columns)} values', "wrong_shape")
        return tables.from_columns({c: [row[j] for row in rows] for j, c in enumerate(columns)},
                                   meta, accepts_missing, what)
    if key == "dataframe_records":
        return tables.from_records(_some(value, what), meta, accepts_missing, what)
    if isinstance(value, dict):  # columns
        return tables.from_columns(value, meta, accepts_missing, what)
    rows = _some(value, what)
    if isinstance(rows[0], dict):
        return tables.from_records(rows, meta, accepts_missing, what)
    return tables.from_rows(rows, meta, accepts_missing, what)


def _some(rows: Any, what: str) -> list:
    if not isinstance(rows, list):
        raise BadInput(f"{what} must be a list of rows")
    if not rows:
        raise BadInput(f"{what} is empty: send at least one row", "wrong_shape")
    return rows


def csv_input(body: bytes, meta: ModelMetadata, accepts_missing: bool):
    """A CSV body's rows: pandas parses, the schema decides which columns stay text."""
    import pandas as pd  # only CSV bodies (and mixed-type models) pay for pandas

    text_columns = {f.name: str for f in meta.features if f.is_textual}
    try:
        frame = pd.read_csv(io.BytesIO(body), dtype=text_columns, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise BadInput("the CSV body is empty: send a header row and at least one row", "wrong_shape") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise BadInput(f"malformed CSV: {str(exc).strip()}", "malformed_csv") from None
    if len(set(frame.columns)) != len(frame.columns):
        raise BadInput("the CSV header names a column twice", "malformed_csv")
    columns = {str(name): frame[name].to_numpy(dtype=object if name in text_columns else None)
               for name in frame.columns}
    return tables.from_columns(columns, meta, accepts_missing, "CSV")


def encode_response(answer: Answer, request: DecodedRequest) -> dict[str, Any]:
    return {"predictions": predictions(answer, request)}
