"""The Open Inference Protocol codec and request mapping, without a server: requests encoded by Triton's own
client library are read back exactly, answers are parsed back by it, and every malformed request is a 400
that names what to fix."""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import zlib
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import tritonclient.http as th
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from deepvit.artifact.predictions import softmax
from deepvit.service.errors import BadRequestError, PayloadTooLargeError, RequestError, UnsupportedMediaTypeError
from deepvit.service.models.io import ModelIO
from deepvit.service.oip import codec, tensors
from deepvit.service.oip.schemas import InferenceRequest
from deepvit.service.oip.tensors import (
    Decoded,
    Limits,
    WantedOutput,
    classification,
    decode_request,
    encode_answer,
    parse_request,
    read_images,
    wanted_outputs,
)
from deepvit.service.pipeline import Inputs

CROP = 8
LABELS = ("cat", "dog", "tabby:cat", "ship", "plane")
IO = ModelIO("image", "logits", crop=CROP, num_classes=len(LABELS), labels=LABELS)
MODEL = SimpleNamespace(name="tiny", version=3)  # encode_answer reads only these of a ModelVersion


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, CROP, CROP, 3), dtype=np.uint8)


def triton_body(
    inputs: list[th.InferInput], outputs: list[th.InferRequestedOutput] | None = None
) -> tuple[bytes, str | None]:
    """A request body as tritonclient sends it, and its Inference-Header-Content-Length header."""
    body, json_size = th.InferenceServerClient.generate_request_body(inputs, outputs=outputs)
    return body, None if json_size is None else str(json_size)


def read(body: bytes, header_length: str | None, max_images: int = 64) -> tuple[InferenceRequest, Inputs]:
    head, binary = codec.split_body(body, header_length)
    req = parse_request(head)
    return req, read_images(req, binary, IO, max_images)


def json_request(**inp: Any) -> bytes:
    tensor = {"name": "image", "datatype": "UINT8", "shape": [1, CROP, CROP, 3], **inp}
    return json.dumps({"inputs": [tensor]}).encode()


# -- tensors in ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_uint8_tensor_from_tritonclient_is_read_exactly(binary: bool) -> None:
    x = pixels(3)
    inp = th.InferInput("image", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x, binary_data=binary)
    body, header_length = triton_body([inp])
    assert (header_length is not None) == binary
    _, images = read(body, header_length)
    assert images.pixels is not None
    np.testing.assert_array_equal(np.stack(images.pixels), x)


@pytest.mark.parametrize("shape", [[2], [2, 1]])
def test_bytes_tensor_from_tritonclient_is_read_exactly(shape: list[int]) -> None:
    blobs = [b"\xff\xd8 not really a jpeg", b"\x00\x01\x02" * 100]
    inp = th.InferInput("image", shape, "BYTES")
    inp.set_data_from_numpy(np.array(blobs, dtype=np.object_).reshape(shape), binary_data=True)
    _, images = read(*triton_body([inp]))
    assert [b for _, b in images.encoded] == blobs


def test_bytes_tensor_in_json_is_base64() -> None:
    blobs = [b"\x89PNG\r\n\x1a\n...", b"\xff\xd8\xff"]
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [2],
                    "data": [base64.b64encode(b).decode() for b in blobs],
                }
            ]
        }
    ).encode()
    assert [b for _, b in read(body, None)[1].encoded] == blobs


def test_json_data_may_be_nested_or_flat() -> None:
    x = pixels(1)
    flat = read(json_request(data=x.reshape(-1).tolist()), None)[1].pixels
    nested = read(json_request(data=x.tolist()), None)[1].pixels
    assert flat is not None
    assert nested is not None
    np.testing.assert_array_equal(flat[0], x[0])
    np.testing.assert_array_equal(nested[0], x[0])


def test_bytes_serialization_matches_tritonclient() -> None:
    items = [b"", b"a", b"score:1:label", bytes(range(256))]
    ours = codec.serialize_bytes_tensor(items)
    assert ours == serialize_byte_tensor(np.array(items, dtype=np.object_)).item()
    assert codec.deserialize_bytes_tensor(ours) == items
    assert list(deserialize_bytes_tensor(ours)) == items


@pytest.mark.parametrize("buf", [b"\x05\x00\x00\x00abc", b"\x01\x00\x00\x00a\x02\x00"], ids=["short", "stray"])
def test_truncated_bytes_tensor_is_400(buf: bytes) -> None:
    with pytest.raises(BadRequestError, match="BYTES input"):
        codec.deserialize_bytes_tensor(buf, "image")


def _bad(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


_ONE = {"name": "image", "datatype": "UINT8", "shape": [1, CROP, CROP, 3], "data": [0] * (CROP * CROP * 3)}

BAD_REQUESTS: dict[str, tuple[bytes, str | None, str]] = {
    "not json": (b"{nope", None, "not valid"),
    "no inputs": (_bad({"inputs": []}), None, "not valid"),
    "negative dimension": (_bad({"inputs": [{**_ONE, "shape": [-1, CROP, CROP, 3]}]}), None, "not valid"),
    "input name": (_bad({"inputs": [{**_ONE, "name": "pixels"}]}), None, "unknown input 'pixels'"),
    "two inputs": (_bad({"inputs": [_ONE, {**_ONE, "name": "x"}]}), None, "one input"),
    "datatype": (_bad({"inputs": [{**_ONE, "datatype": "FP32"}]}), None, "is FP32"),
    "unknown datatype": (_bad({"inputs": [{**_ONE, "datatype": "COMPLEX"}]}), None, "is COMPLEX"),
    "shape": (_bad({"inputs": [{**_ONE, "shape": [1, 3, CROP, CROP]}]}), None, "has shape"),
    "channels first": (_bad({"inputs": [{**_ONE, "shape": [1, CROP, CROP]}]}), None, "has shape"),
    "empty batch": (_bad({"inputs": [{**_ONE, "shape": [0, CROP, CROP, 3], "data": []}]}), None, "batch size 0"),
    "bytes shape": (_bad({"inputs": [{**_ONE, "datatype": "BYTES", "shape": [1, 2]}]}), None, "has shape"),
    "element count": (_bad({"inputs": [{**_ONE, "data": [0, 1, 2]}]}), None, "needs"),
    "out of range": (_bad({"inputs": [{**_ONE, "data": [256] * (CROP * CROP * 3)}]}), None, "range"),
    "floats": (_bad({"inputs": [{**_ONE, "data": [0.5] * (CROP * CROP * 3)}]}), None, "not UINT8"),
    "strings": (_bad({"inputs": [{**_ONE, "data": ["a"] * (CROP * CROP * 3)}]}), None, "not UINT8"),
    "ragged": (_bad({"inputs": [{**_ONE, "data": [[1, 2], [3]]}]}), None, "ragged"),
    "no data": (_bad({"inputs": [{k: v for k, v in _ONE.items() if k != "data"}]}), None, "neither data"),
    "bad base64": (
        _bad({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}),
        None,
        "base64",
    ),
    "shared memory": (
        _bad({"inputs": [{**_ONE, "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 1}}]}),
        None,
        "shared memory",
    ),
    "binary size is a string": (
        _bad({"inputs": [{**_ONE, "parameters": {"binary_data_size": "12"}}]}),
        None,
        "must be an integer",
    ),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_malformed_requests_are_400_with_a_reason(case: str) -> None:
    body, header_length, words = BAD_REQUESTS[case]
    with pytest.raises(BadRequestError, match=words):
        read(body, header_length)


def test_binary_data_must_add_up() -> None:
    x = pixels(1)
    inp = th.InferInput("image", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x, binary_data=True)
    body, header_length = triton_body([inp])
    assert header_length is not None
    with pytest.raises(BadRequestError, match="only"):
        read(body[:-1], header_length)  # a byte short
    with pytest.raises(BadRequestError, match="no input claims"):
        read(body + b"\x00", header_length)  # a byte too many
    with pytest.raises(BadRequestError, match="Inference-Header-Content-Length"):
        read(body, str(len(body) + 1))
    with pytest.raises(BadRequestError, match="Inference-Header-Content-Length"):
        read(body, "twelve")
    with pytest.raises(BadRequestError, match="Inference-Header-Content-Length is 0"):
        read(body, "0")


def test_too_many_images_is_413() -> None:
    x = pixels(5)
    inp = th.InferInput("image", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x, binary_data=True)
    with pytest.raises(PayloadTooLargeError, match="limit is 4"):
        read(*triton_body([inp]), max_images=4)


# -- outputs ------------------------------------------------------------------------------------------
def _outputs(outputs: list[dict[str, Any]] | None, **params: Any) -> list[WantedOutput]:
    req = InferenceRequest.model_validate({"inputs": [_ONE], "outputs": outputs, "parameters": params})
    return wanted_outputs(req, IO)


def test_wanted_outputs() -> None:
    assert _outputs(None) == [WantedOutput("logits", 0, False)]
    assert _outputs(None, binary_data_output=True) == [WantedOutput("logits", 0, True)]
    assert _outputs([{"name": "logits", "parameters": {"classification": 2}}], binary_data_output=True) == [
        WantedOutput("logits", 2, True)
    ]
    assert _outputs([{"name": "logits", "parameters": {"binary_data": False}}], binary_data_output=True) == [
        WantedOutput("logits", 0, False)
    ]


@pytest.mark.parametrize(
    ("outputs", "words"),
    [
        ([{"name": "probs"}], "unknown output 'probs'"),
        ([{"name": "logits"}, {"name": "logits"}], "twice"),
        ([{"name": "logits", "parameters": {"classification": 6}}], "between 1 and the 5"),
        ([{"name": "logits", "parameters": {"classification": -1}}], "between 1 and the 5"),
        ([{"name": "logits", "parameters": {"classification": True}}], "must be an integer"),
        ([{"name": "logits", "parameters": {"binary_data": 1}}], "must be a boolean"),
    ],
)
def test_bad_outputs_are_400(outputs: list[dict[str, Any]], words: str) -> None:
    with pytest.raises(BadRequestError, match=words):
        _outputs(outputs)


# -- answers out --------------------------------------------------------------------------------------
def _answer(outputs: list[WantedOutput], logits: np.ndarray, request_id: str | None = None) -> th.InferResult:
    req = InferenceRequest.model_validate({"id": request_id, "inputs": [_ONE]})
    body, headers = encode_answer(req, MODEL, IO, logits, outputs)  # type: ignore[arg-type]
    length = headers.get(codec.HEADER_LENGTH)
    assert headers["content-type"] == ("application/octet-stream" if length else "application/json")
    return th.InferResult.from_response_body(body, header_length=None if length is None else int(length))


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_logits_answer_is_read_back_exactly_by_tritonclient(binary: bool) -> None:
    logits = np.random.default_rng(1).normal(size=(4, 5)).astype(np.float32)
    result = _answer([WantedOutput("logits", 0, binary)], logits, request_id="r-1")
    got = result.as_numpy("logits")
    assert got is not None
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, logits)  # JSON floats round-trip float32 exactly too
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == ("tiny", "3", "r-1")


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_classification_answer_is_score_index_label(binary: bool) -> None:
    logits = np.array([[0.0, 3.0, 1.0, 2.0, -1.0], [5.0, 0.0, 6.0, 0.0, 0.0]], dtype=np.float32)
    got = _answer([WantedOutput("logits", 3, binary)], logits).as_numpy("logits")
    assert got is not None
    assert got.shape == (2, 3)
    rows = [[(s.decode() if isinstance(s, bytes) else s).split(":", 2) for s in row] for row in got]
    assert [[int(i) for _, i, _ in row] for row in rows] == [[1, 3, 2], [2, 0, 1]]
    assert [label for _, _, label in rows[1]] == ["tabby:cat", "cat", "dog"]  # a label may hold ':'
    for r, row in enumerate(rows):
        for score, index, _ in row:
            assert float(score) == logits[r, int(index)]  # the raw output value, as Triton


def test_classification_ties_keep_class_order() -> None:
    assert classification(np.zeros((1, 5), np.float32), 2, LABELS) == [b"0.0:0:cat", b"0.0:1:dog"]
    assert classification(np.zeros((1, 5), np.float32), 2, LABELS, probability=True) == [b"0.2:0:cat", b"0.2:1:dog"]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_classification_score_is_the_exact_logit_or_on_request_the_probability(binary: bool) -> None:
    """As Triton: the raw output value, every digit of it (it reads back as the same float32)."""
    logits = np.random.default_rng(5).normal(size=(3, 5)).astype(np.float32)
    for probability, want in ((False, logits.astype(np.float64)), (True, softmax(logits))):
        got = _answer([WantedOutput("logits", 5, binary, probability)], logits).as_numpy("logits")
        assert got is not None
        for r, row in enumerate(got):
            for s in row:
                score, index, _ = (s.decode() if isinstance(s, bytes) else s).split(":", 2)
                assert float(score) == want[r, int(index)]
    asked = [{"name": "logits", "parameters": {"classification": 2, "classification_score": "probability"}}]
    assert _outputs(asked) == [WantedOutput("logits", 2, False, True)]
    with pytest.raises(BadRequestError, match="classification_score"):
        _outputs([{"name": "logits", "parameters": {"classification": 2, "classification_score": "odds"}}])


def test_classification_and_logits_together() -> None:
    logits = np.random.default_rng(2).normal(size=(2, 5)).astype(np.float32)
    req = InferenceRequest.model_validate({"inputs": [_ONE]})
    outputs = [WantedOutput("logits", 2, True)]
    body, headers = encode_answer(req, MODEL, IO, logits, outputs)  # type: ignore[arg-type]
    header = json.loads(body[: int(headers[codec.HEADER_LENGTH])])
    assert header["outputs"][0]["datatype"] == "BYTES"
    assert header["outputs"][0]["shape"] == [2, 2]


# -- request bodies -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("encoding", "pack"),
    [("gzip", gzip.compress), ("deflate", zlib.compress), (None, lambda b: b), ("identity", lambda b: b)],
)
def test_compressed_bodies_are_accepted(encoding: str | None, pack: Any) -> None:
    assert codec.decompress(pack(b'{"inputs": []}'), encoding, 1000) == b'{"inputs": []}'


def test_compressed_bodies_are_bounded() -> None:
    with pytest.raises(PayloadTooLargeError):
        codec.decompress(gzip.compress(b"\0" * 100_000), "gzip", 10_000)  # a bomb: 100 kB from ~100 bytes
    with pytest.raises(BadRequestError, match="truncated"):
        codec.decompress(gzip.compress(b"x" * 1000)[:-10], "gzip", 10_000)
    with pytest.raises(BadRequestError, match="decompressed"):
        codec.decompress(b"plain", "gzip", 10_000)
    with pytest.raises(UnsupportedMediaTypeError):
        codec.decompress(b"x", "br", 10_000)


def test_data_after_the_compressed_stream_is_400() -> None:
    with pytest.raises(BadRequestError, match="follow the end"):
        codec.decompress(gzip.compress(b'{"a": 1}') + gzip.compress(b"more"), "gzip", 10_000)
    with pytest.raises(BadRequestError, match="follow the end"):
        codec.decompress(zlib.compress(b'{"a": 1}') + b"junk", "deflate", 10_000)


def test_a_bytes_tensor_stops_at_the_count_its_shape_declares() -> None:
    buf = codec.serialize_bytes_tensor([b"x"] * 1000)
    with pytest.raises(BadRequestError, match="more than the 2 elements"):
        codec.deserialize_bytes_tensor(buf, "image", expected=2)
    assert codec.deserialize_bytes_tensor(buf, "image", expected=1000) == [b"x"] * 1000
    with pytest.raises(BadRequestError, match="has 3 elements"):  # counted before any is base64-decoded
        codec.decode_tensor("image", "BYTES", [2], ["%%%", "%%%", "%%%"], None, json_bytes="base64")


LIMITS = Limits(max_body_bytes=1_000_000, max_json_body_bytes=10_000, max_images=4)


def _decode(body: bytes, encoding: str | None = None, header_length: str | None = None) -> Decoded:
    return decode_request(body, encoding, header_length, IO, LIMITS)


def test_decode_request_reads_json_and_binary_bodies() -> None:
    x = pixels(2)
    for binary in (False, True):
        body, header_length = triton_body([_uint8(x, binary)])
        decoded = _decode(gzip.compress(body), "gzip", header_length)
        assert decoded.inputs.count == 2
        np.testing.assert_array_equal(np.stack(decoded.inputs.pixels or []), x)
        assert [(o.name, o.classification) for o in decoded.outputs] == [("logits", 0)]


def test_a_json_request_is_held_to_the_json_limit_even_compressed() -> None:
    """A bomb: a few kB of gzip that grow to MB of JSON are refused while decompressing (413)."""
    big = json_request(data=[0] * 200_000)  # JSON tensors beyond the JSON limit, under the body limit
    with pytest.raises(PayloadTooLargeError, match="10,000"):
        _decode(gzip.compress(big), "gzip")
    with pytest.raises(PayloadTooLargeError, match="10,000"):
        _decode(big)
    x = pixels(4)  # the same pixels as binary tensors: the body limit applies, not the JSON one
    body, header_length = triton_body([_uint8(x, True)])
    small_json = Limits(max_body_bytes=1_000_000, max_json_body_bytes=400, max_images=4)
    assert len(body) > small_json.max_json_body_bytes
    assert decode_request(body, None, header_length, IO, small_json).inputs.count == 4
    with pytest.raises(PayloadTooLargeError, match="400 limit"):
        decode_request(triton_body([_uint8(x, False)])[0], None, None, IO, small_json)


def test_a_declared_batch_over_the_limit_is_refused_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(head: bytes) -> InferenceRequest:
        raise AssertionError("parsed")

    monkeypatch.setattr(tensors, "parse_request", never)
    for n in ("5", "1000000", "9" * 5000):
        body = f'{{"inputs": [{{"name": "image", "datatype": "UINT8", "shape": [{n}, 8, 8, 3], "data": [0]}}]}}'
        with pytest.raises(PayloadTooLargeError, match="limit is 4"):
            _decode(body.encode())


def test_a_flat_list_of_the_wrong_length_is_refused_before_numpy_copies_it() -> None:
    with pytest.raises(BadRequestError, match="needs"):
        codec.decode_tensor("image", "UINT8", [1, 2], [0] * 1_000_000, None)


def _uint8(x: np.ndarray, binary: bool) -> th.InferInput:
    inp = th.InferInput("image", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


def test_every_refusal_is_a_request_error() -> None:
    """Nothing a caller sends can make the codec raise anything but a 4xx of the service's error tree."""
    rng = np.random.default_rng(3)
    for _ in range(300):
        body = bytes(rng.integers(0, 256, rng.integers(0, 64), dtype=np.uint8))
        for header_length in (None, str(rng.integers(0, 70))):
            with contextlib.suppress(RequestError):
                read(body, header_length)
