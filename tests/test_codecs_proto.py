"""The gRPC codec without a server: a ModelInferRequest becomes exactly the request object the
REST codec decodes (raw and typed contents alike), refusals name the tensor, and answers come
back in the form the request used."""

from __future__ import annotations

import numpy as np
import pytest

from serve_app.codecs import v2, v2_proto
from serve_app.errors import BadInput
from serve_app.grpc import open_inference_grpc_pb2 as pb
from serve_app.serving.interface import Answer
from serve_app.store import ModelStore
from serve_app.tools.train import train_model

ROW = [5.1, 3.5, 1.4, 0.2]


@pytest.fixture(scope="module")
def iris(tmp_path_factory):
    store = ModelStore(str(tmp_path_factory.mktemp("store")))
    train_model("iris", store, version="1")
    return store.read_metadata("iris")


def request(datatype="FP64", shape=(1, 4), raw=None, **contents) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="iris", id="r1")
    tensor = message.inputs.add(name="input-0", datatype=datatype, shape=list(shape))
    for field, values in contents.items():
        getattr(tensor.contents, field).extend(values)
    if raw is not None:
        message.raw_input_contents.append(raw)
    return message


@pytest.mark.parametrize("datatype, field, dtype", [("FP64", "fp64_contents", "<f8"), ("FP32", "fp32_contents", "<f4"),
                                                    ("INT64", "int64_contents", "<i8"), ("INT32", "int_contents", "<i4")])
def test_raw_and_typed_contents_decode_to_the_same_rows(iris, datatype, field, dtype):
    values = [5, 3, 1, 0] if datatype.startswith("INT") else ROW
    typed = v2.decode_request(v2_proto.decode_request(request(datatype, **{field: values})), iris, False)
    raw = v2.decode_request(v2_proto.decode_request(request(datatype, raw=np.array(values, dtype).tobytes())), iris,
                            False)
    np.testing.assert_array_equal(typed.inputs.matrix, raw.inputs.matrix)
    np.testing.assert_allclose(typed.inputs.matrix[0], np.array(values, dtype), rtol=1e-7)
    assert typed.request_id == "r1"


@pytest.mark.parametrize("message, reason, fragment", [
    (request(int64_contents=[1, 2, 3, 4]), "wrong_type", "fp64_contents"),
    (request("FP16", fp32_contents=ROW), "wrong_type", "raw_input_contents"),
    (request("INT8", int_contents=[1, 2, 300, 4]), "wrong_type", "out of range for INT8"),
    (request(raw=b"\x00" * 12), "wrong_shape", "12 raw bytes"),
    (request("BYTES", shape=(1,), bytes_contents=[b"\xff"]), "malformed_binary", "UTF-8"),
    (request("FP8", raw=b"\x00" * 4), "wrong_type", "FP8"),
], ids=["wrong field", "FP16 typed", "INT8 out of range", "raw not whole values", "BYTES not UTF-8", "FP8"])
def test_refusals_name_the_tensor_and_the_problem(message, reason, fragment):
    with pytest.raises(BadInput) as caught:
        v2_proto.decode_request(message)
    assert caught.value.reason == reason and fragment in caught.value.message


def test_raw_contents_for_some_inputs_only_or_beside_contents_are_refused():
    two = request(raw=np.array(ROW, "<f8").tobytes())
    two.inputs.add(name="input-1", datatype="FP64", shape=[1, 4])
    with pytest.raises(BadInput, match="one per input"):
        v2_proto.decode_request(two)
    both = request(raw=np.array(ROW, "<f8").tobytes(), fp64_contents=ROW)
    with pytest.raises(BadInput, match="beside raw_input_contents"):
        v2_proto.decode_request(both)


def test_parameters_and_outputs_carry_over():
    message = request(fp64_contents=ROW)
    message.parameters["content_type"].string_param = "np"
    output = message.outputs.add(name="predict_proba")
    output.parameters["binary_data"].bool_param = True
    body = v2_proto.decode_request(message)
    assert body["parameters"] == {"content_type": "np"}
    assert body["outputs"] == [{"name": "predict_proba", "parameters": {"binary_data": True}}]


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_answers_use_the_requests_form(iris, raw):
    decoded = v2.decode_request(v2_proto.decode_request(request(fp64_contents=ROW)), iris, False)
    decoded = type(decoded)(decoded.inputs, ("predict", "predict_proba"), decoded.request_id)
    answer = Answer({"predict": np.array([0]), "predict_proba": np.array([[0.9, 0.05, 0.05]])}, "1")
    response = v2_proto.encode_response(v2.encode_response("iris", answer, decoded), pb.ModelInferResponse, raw)
    assert (response.model_name, response.model_version, response.id) == ("iris", "1", "r1")
    predict, proba = response.outputs
    assert (predict.datatype, list(predict.shape), list(proba.shape)) == ("INT64", [1], [1, 3])
    if raw:
        assert np.frombuffer(response.raw_output_contents[1], "<f8").tolist() == [0.9, 0.05, 0.05]
        assert not proba.HasField("contents")
    else:
        assert list(proba.contents.fp64_contents) == [0.9, 0.05, 0.05] and not response.raw_output_contents


def test_string_labels_travel_as_bytes(iris):
    decoded = v2.decode_request(v2_proto.decode_request(request(fp64_contents=ROW)), iris, False)
    labels = np.array(["stay"], dtype=object)
    for raw in (True, False):
        response = v2_proto.encode_response(
            v2.encode_response("iris", Answer({"predict": labels}, "1"), decoded), pb.ModelInferResponse, raw)
        assert response.outputs[0].datatype == "BYTES"
        if raw:
            assert response.raw_output_contents[0] == b"\x04\x00\x00\x00stay"
        else:
            assert list(response.outputs[0].contents.bytes_contents) == [b"stay"]
