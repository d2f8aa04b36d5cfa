"""Binary request bodies for V2 infer: numpy reads the numbers where they lie, no JSON to parse.

Two formats (docs/protocols.md), both for ``POST /v2/models/{name}/infer``:

- ``Content-Type: application/x-npy``: the body is one ``.npy`` file (``numpy.save``), a
  numeric ``[N, F]`` array (``[F]`` is one row), any byte order, C or Fortran order. Outputs
  come from the ``outputs`` query parameter (``?outputs=predict,predict_proba``).
- The V2 binary tensor extension (KServe / Triton; what ``tritonclient`` sends by default):
  header ``Inference-Header-Content-Length: L``; the body's first L bytes are the JSON request,
  in which an input replaces ``data`` with ``"parameters": {"binary_data_size": n}``, and its
  n raw little-endian bytes follow, inputs in order (a BYTES input's elements each a 4-byte
  little-endian length and its UTF-8 bytes). Outputs asked for with
  ``"parameters": {"binary_data": true}`` (or the request's ``binary_data_output: true``) come
  back the same way (see :func:`encode_response`).

Both become the JSON request object with arrays (views of the body, no copy) in place of
``data`` lists, so :func:`serve_app.codecs.v2.decode_request` applies exactly the JSON path's
rules to them. Object dtypes are refused before numpy could unpickle anything.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import orjson

from serve_app.codecs.v2 import BYTES, DATATYPES, datatype_of
from serve_app.errors import BadInput

NPY_MEDIA_TYPE = "application/x-npy"
HEADER_LENGTH = "inference-header-content-length"  # request and response header
# The .npy header is a short dict literal; numpy itself caps what it parses at 10,000 bytes.
MAX_NPY_HEADER = 10_000
_NPY_KINDS = "biuf"  # bool, int, uint, float; never objects (pickles), strings or structs


def is_binary(content_type: str, header_length: str | None) -> bool:
    """Whether a request body is one of the binary formats rather than plain JSON."""
    return content_type == NPY_MEDIA_TYPE or header_length is not None


def decode_body(body: bytes, content_type: str, header_length: str | None,
                outputs: str | None = None) -> dict[str, Any]:
    """The V2 request object a binary body stands for (see the module docstring)."""
    if header_length is not None:
        return extension_request(body, header_length)
    return npy_request(body, outputs)


# -- application/x-npy ---------------------------------------------------------------------
def read_npy(body: bytes) -> np.ndarray:
    """The array of a ``.npy`` body, as a read-only view of ``body``."""
    buffer = io.BytesIO(body)  # shares body's memory until written to (never)
    try:
        version = np.lib.format.read_magic(buffer)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}; use 1.0 or 2.0")
        shape, fortran_order, dtype = read_header(buffer, max_header_size=MAX_NPY_HEADER)
    except (ValueError, SyntaxError, TypeError, EOFError) as exc:
        raise BadInput(f"body is not a readable .npy array: {exc}", "malformed_binary") from None
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in _NPY_KINDS:
        raise BadInput(f".npy dtype {dtype.str!r} is not numeric; send bool, integers or floats", "wrong_type")
    count = math.prod(shape)
    offset = buffer.tell()
    if len(body) - offset != count * dtype.itemsize:
        raise BadInput(f".npy header declares shape {list(shape)} of {dtype.str} ({count * dtype.itemsize} "
                       f"bytes) but {len(body) - offset} bytes follow it", "malformed_binary")
    array = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
    try:
        array = array.reshape(shape, order="F" if fortran_order else "C")
    except ValueError:
        raise BadInput(f".npy shape {list(shape)} is not a usable tensor shape", "wrong_shape") from None
    if not dtype.isnative:  # big-endian data: one conversion, so V2 datatypes apply
        array = array.astype(dtype.newbyteorder("="))
    return array


def npy_request(body: bytes, outputs: str | None) -> dict[str, Any]:
    array = read_npy(body)
    request: dict[str, Any] = {"inputs": [{"name": "input-0", "shape": list(array.shape),
                                           "datatype": datatype_of(array), "data": array}]}
    if outputs:
        request["outputs"] = [{"name": name.strip()} for name in outputs.split(",") if name.strip()]
    return request


# -- V2 binary tensor extension ---------------------------------------------------------------
def extension_request(body: bytes, header_length: str) -> dict[str, Any]:
    if not header_length.strip().isdigit():
        raise BadInput(f"Inference-Header-Content-Length must be a byte count, got {header_length!r}",
                       "malformed_binary")
    json_length = int(header_length)
    if json_length > len(body):
        raise BadInput(f"Inference-Header-Content-Length is {json_length} but the body has {len(body)} bytes",
                       "malformed_binary")
    try:
        request = orjson.loads(memoryview(body)[:json_length])
    except orjson.JSONDecodeError as exc:
        raise BadInput(f"malformed JSON header: {exc}", "malformed_json") from None
    offset = json_length
    inputs = request.get("inputs") if isinstance(request, dict) else None
    for index, tensor in enumerate(inputs if isinstance(inputs, list) else ()):
        parameters = tensor.get("parameters") if isinstance(tensor, dict) else None
        if not isinstance(parameters, dict) or "binary_data_size" not in parameters:
            continue  # a JSON tensor beside binary ones: v2 decodes it as usual
        inputs[index] = {**tensor, "data": _binary_tensor(body, offset, tensor, index)}
        offset += parameters["binary_data_size"]
    if offset != len(body):
        raise BadInput(f"{len(body) - offset} bytes follow the last binary tensor; binary_data_size "
                       "values must add up to the body after the JSON header", "malformed_binary")
    return request


def _binary_tensor(body: bytes, offset: int, tensor: dict, index: int) -> np.ndarray:
    """One input's raw bytes as a flat array of its datatype (a view of ``body``)."""
    where = f"inputs[{index}]"
    size = tensor["parameters"]["binary_data_size"]
    if type(size) is not int or size < 0:
        raise BadInput(f"{where}: binary_data_size must be a non-negative integer", "malformed_binary")
    if "data" in tensor:
        raise BadInput(f"{where} has both data and binary_data_size; send one", "invalid_request")
    datatype = tensor.get("datatype")
    if datatype == BYTES:
        if offset + size > len(body):
            raise BadInput(f"{where}: binary_data_size {size} runs past the end of the body "
                           f"({len(body) - offset} bytes left)", "malformed_binary")
        return read_strings(memoryview(body)[offset:offset + size], where)
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise BadInput(f"{where}: unsupported datatype {datatype!r} for binary data; use one of "
                       f"{sorted([*DATATYPES, BYTES])}", "wrong_type")
    dtype = np.dtype(DATATYPES[datatype][0]).newbyteorder("<")
    if size % dtype.itemsize:
        raise BadInput(f"{where}: binary_data_size {size} is not a whole number of {datatype} values "
                       f"({dtype.itemsize} bytes each)", "wrong_shape")
    if offset + size > len(body):
        raise BadInput(f"{where}: binary_data_size {size} runs past the end of the body "
                       f"({len(body) - offset} bytes left)", "malformed_binary")
    return np.frombuffer(body, dtype=dtype, count=size // dtype.itemsize, offset=offset)


def read_strings(raw: memoryview, where: str) -> np.ndarray:
    """BYTES elements of the binary extension: each a 4-byte little-endian length and that
    many bytes of UTF-8 text."""
    values, offset, end = [], 0, len(raw)
    while offset < end:
        if offset + 4 > end:
            raise BadInput(f"{where}: a BYTES element's 4-byte length is cut off", "malformed_binary")
        length = int.from_bytes(raw[offset:offset + 4], "little")
        offset += 4
        if offset + length > end:
            raise BadInput(f"{where}: a BYTES element of {length} bytes runs past its tensor's data",
                           "malformed_binary")
        try:
            values.append(str(raw[offset:offset + length], "utf-8"))
        except UnicodeDecodeError:
            raise BadInput(f"{where}: BYTES element {len(values)} is not UTF-8 text", "malformed_binary") from None
        offset += length
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def write_strings(values: np.ndarray) -> bytes:
    """The binary extension's BYTES encoding of string values."""
    parts = []
    for value in values.reshape(-1).tolist():
        encoded = str(value).encode("utf-8")
        parts.append(len(encoded).to_bytes(4, "little"))
        parts.append(encoded)
    return b"".join(parts)


def binary_outputs(request: dict[str, Any]) -> set[str]:
    """Names of the outputs the client asked to get back as binary data."""
    parameters = request.get("parameters")
    everything = isinstance(parameters, dict) and parameters.get("binary_data_output") is True
    wanted = set()
    for output in request.get("outputs") or ():
        if isinstance(output, dict):
            own = output.get("parameters")
            own = own.get("binary_data") if isinstance(own, dict) else None
            if own is True or (own is None and everything):
                wanted.add(output.get("name"))
    if everything and not request.get("outputs"):
        wanted.add("predict")  # the default output
    return wanted


def encode_response(response: dict[str, Any], binary: set[str]) -> tuple[bytes, int]:
    """A V2 response with the ``binary`` outputs moved behind the JSON, as raw little-endian
    bytes (string labels as length-prefixed BYTES elements): the body and the JSON part's
    length (the ``Inference-Header-Content-Length``)."""
    chunks = []
    for output in response["outputs"]:
        data = output["data"]
        if output["name"] not in binary:
            continue
        if output["datatype"] == BYTES:
            raw = write_strings(np.asarray(data, dtype=object))
            chunks.append(raw)
            output["parameters"] = {"binary_data_size": len(raw)}
            del output["data"]
        elif isinstance(data, np.ndarray):
            raw = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<"))
            chunks.append(memoryview(raw).cast("B"))
            output["parameters"] = {"binary_data_size": raw.nbytes}
            del output["data"]
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    return b"".join([header, *chunks]), len(header)
