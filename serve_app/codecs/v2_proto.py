"""Open Inference Protocol over gRPC: ``ModelInferRequest``/``ModelInferResponse`` messages to
and from the V2 request and response objects the REST codec works on.

A request becomes exactly the object a JSON or binary REST body becomes (typed arrays in place
of ``data`` lists), so :func:`serve_app.codecs.v2.decode_request` applies the same rules to
every transport. Tensor data comes either as typed ``contents`` (``fp64_contents``,
``bytes_contents``, ...: the field that matches the tensor's datatype, nothing else) or, for
every input at once, as ``raw_input_contents`` (little-endian bytes; BYTES elements each a
4-byte length and UTF-8 bytes, as in the REST binary extension): what ``tritonclient.grpc``
sends by default. An answer uses ``raw_output_contents`` when the request used raw inputs
(tritonclient reads numbers only from there), typed ``contents`` otherwise.

Neither form can say "missing" for a BYTES element: strings are never null over gRPC (send
such rows over REST JSON, where ``null`` is missing); a float NaN is a missing number.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from serve_app.codecs.binary import read_strings, write_strings
from serve_app.codecs.v2 import BYTES, DATATYPES
from serve_app.errors import BadInput

# Which typed ``InferTensorContents`` field carries a datatype (FP16 only travels raw).
CONTENTS_FIELD = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
                  "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
                  "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
                  "FP32": "fp32_contents", "FP64": "fp64_contents", BYTES: "bytes_contents"}
_FIELDS = sorted(set(CONTENTS_FIELD.values()))
# The numpy type of each typed field's elements, as the protocol declares them.
_FIELD_DTYPES = {"bool_contents": np.bool_, "int_contents": np.int32, "int64_contents": np.int64,
                 "uint_contents": np.uint32, "uint64_contents": np.uint64, "fp32_contents": np.float32,
                 "fp64_contents": np.float64}


def parameter_value(parameter: Any) -> Any:
    """An ``InferParameter``'s value (its oneof), or None when none is set."""
    which = parameter.WhichOneof("parameter_choice")
    return None if which is None else getattr(parameter, which)


def parameters_dict(parameters: Any) -> dict[str, Any]:
    return {key: parameter_value(value) for key, value in parameters.items()}


def decode_request(message: Any) -> dict[str, Any]:
    """The V2 request object a ``ModelInferRequest`` stands for."""
    raw = list(message.raw_input_contents)
    if raw and len(raw) != len(message.inputs):
        raise BadInput(f"raw_input_contents has {len(raw)} entries for {len(message.inputs)} inputs; send one "
                       "per input, in order (or typed contents for every input)", "malformed_binary")
    inputs = []
    for index, tensor in enumerate(message.inputs):
        where = f"inputs[{index}] ({tensor.name})"
        if raw and tensor.HasField("contents"):
            raise BadInput(f"{where} has contents beside raw_input_contents; send one of them", "invalid_request")
        data = _raw_data(raw[index], tensor.datatype, where) if raw else _typed_data(tensor, where)
        entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape), "data": data}
        if tensor.parameters:
            entry["parameters"] = parameters_dict(tensor.parameters)
        inputs.append(entry)
    request: dict[str, Any] = {"inputs": inputs}
    if message.outputs:
        request["outputs"] = [{"name": o.name, **({"parameters": parameters_dict(o.parameters)} if o.parameters
                                                  else {})} for o in message.outputs]
    if message.id:
        request["id"] = message.id
    if message.parameters:
        request["parameters"] = parameters_dict(message.parameters)
    return request


def _typed_data(tensor: Any, where: str) -> np.ndarray:
    datatype = tensor.datatype
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        if datatype in DATATYPES:  # FP16: no typed field in the protocol
            raise BadInput(f"{where}: {datatype} data travels only in raw_input_contents", "wrong_type")
        raise BadInput(f"{where}: unsupported datatype {datatype!r}; use one of {sorted([*DATATYPES, BYTES])}",
                       "wrong_type")
    contents = tensor.contents
    others = [f for f in _FIELDS if f != field and len(getattr(contents, f))]
    if others:
        raise BadInput(f"{where}: datatype {datatype} travels in contents.{field}, got {others}", "wrong_type")
    values = getattr(contents, field)
    if datatype == BYTES:
        strings = np.empty(len(values), dtype=object)
        try:
            strings[:] = [bytes(v).decode("utf-8") for v in values]
        except UnicodeDecodeError:
            raise BadInput(f"{where}: a BYTES element is not UTF-8 text", "malformed_binary") from None
        return strings
    array = np.array(values, dtype=_FIELD_DTYPES[field])
    target = np.dtype(DATATYPES[datatype][0])
    if target.kind in "iu" and array.size and target.itemsize < array.dtype.itemsize:
        limits = np.iinfo(target)  # INT8/16 and UINT8/16 share the 32-bit fields
        if array.min() < limits.min or array.max() > limits.max:
            raise BadInput(f"{where}: values out of range for {datatype}", "wrong_type")
    return array.astype(target, copy=False)


def _raw_data(raw: bytes, datatype: str, where: str) -> np.ndarray:
    if datatype == BYTES:
        return read_strings(memoryview(raw), where)
    if datatype not in DATATYPES:
        raise BadInput(f"{where}: unsupported datatype {datatype!r}; use one of {sorted([*DATATYPES, BYTES])}",
                       "wrong_type")
    dtype = np.dtype(DATATYPES[datatype][0]).newbyteorder("<")
    if len(raw) % dtype.itemsize:
        raise BadInput(f"{where}: {len(raw)} raw bytes are not a whole number of {datatype} values "
                       f"({dtype.itemsize} bytes each)", "wrong_shape")
    return np.frombuffer(raw, dtype=dtype)


def encode_response(response: dict[str, Any], message_type: Any, raw: bool) -> Any:
    """A ``ModelInferResponse`` for the REST codec's V2 response object; ``raw``: outputs in
    ``raw_output_contents`` rather than typed contents."""
    message = message_type(model_name=response["model_name"], model_version=response["model_version"] or "",
                           id=response.get("id") or "")
    for key, value in (response.get("parameters") or {}).items():  # explanations: JSON strings
        message.parameters[key].string_param = value if isinstance(value, str) else json.dumps(value)
    for output in response["outputs"]:
        tensor = message.outputs.add(name=output["name"], datatype=output["datatype"], shape=output["shape"])
        data = np.asarray(output["data"], dtype=object if output["datatype"] == BYTES else None)
        if raw:
            if output["datatype"] == BYTES:
                message.raw_output_contents.append(write_strings(data))
            else:
                dtype = np.dtype(DATATYPES[output["datatype"]][0]).newbyteorder("<")
                message.raw_output_contents.append(np.ascontiguousarray(data, dtype=dtype).tobytes())
        elif output["datatype"] == BYTES:
            tensor.contents.bytes_contents.extend(str(v).encode("utf-8") for v in data.reshape(-1).tolist())
        else:
            getattr(tensor.contents, CONTENTS_FIELD[output["datatype"]]).extend(data.reshape(-1).tolist())
    return message


def model_metadata(metadata: dict[str, Any], message_type: Any) -> Any:
    """A ``ModelMetadataResponse`` for the REST codec's V2 model metadata. Tensors' parameters
    (a column's dtype, categories, nullability; the classes) and the model's (content type, the
    stored example), which the message has no fields for, go into ``properties`` as JSON:
    ``inputs.<name>``, ``outputs.<name>`` and one key per model parameter."""
    message = message_type(name=metadata["name"], versions=metadata["versions"], platform=metadata["platform"])
    for kind in ("inputs", "outputs"):
        for tensor in metadata[kind]:
            getattr(message, kind).add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
            if tensor.get("parameters"):
                message.properties[f"{kind}.{tensor['name']}"] = json.dumps(tensor["parameters"])
    for key, value in (metadata.get("parameters") or {}).items():
        message.properties[key] = json.dumps(value)
    return message
