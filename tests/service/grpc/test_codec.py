"""``ModelInferRequest`` to the pipeline's images and back: where the data may be (raw or typed contents), what
is refused, and the answer's raw outputs. Messages built as the protocol's clients build them."""

from __future__ import annotations

import numpy as np
import pytest

from deepvit.service.errors import BadRequestError, PayloadTooLargeError
from deepvit.service.grpc.codec import decode_request, parameters
from deepvit.service.grpc.proto import grpc_service_pb2 as pb
from deepvit.service.models.io import ModelIO
from deepvit.service.oip.codec import serialize_bytes_tensor

IO = ModelIO("image", "logits", crop=4, num_classes=3, labels=("a", "b", "c"))


def request(datatype: str = "UINT8", shape: tuple[int, ...] = (2, 4, 4, 3), **kw: object) -> pb.ModelInferRequest:
    inp = pb.ModelInferRequest.InferInputTensor(name="image", datatype=datatype, shape=list(shape))
    return pb.ModelInferRequest(model_name="m", inputs=[inp], **kw)  # type: ignore[arg-type]


def pixels(n: int = 2) -> np.ndarray:
    return np.arange(n * 4 * 4 * 3, dtype=np.uint8).reshape(n, 4, 4, 3)


def test_raw_and_typed_contents_give_the_same_pixels() -> None:
    x = pixels()
    raw = decode_request(request(raw_input_contents=[x.tobytes()]), IO, 64)
    typed_msg = request()
    typed_msg.inputs[0].contents.uint_contents.extend(x.reshape(-1).tolist())
    typed = decode_request(typed_msg, IO, 64)
    assert raw.inputs.pixels is not None
    assert typed.inputs.pixels is not None
    np.testing.assert_array_equal(np.stack(raw.inputs.pixels), x)
    np.testing.assert_array_equal(np.stack(typed.inputs.pixels), x)
    assert raw.outputs[0].name == "logits"
    assert raw.outputs[0].classification == 0


def test_encoded_images_raw_or_typed() -> None:
    blobs = [b"\xff\xd8 one", b"\x89PNG two"]
    raw = decode_request(request("BYTES", (2,), raw_input_contents=[serialize_bytes_tensor(blobs)]), IO, 64)
    typed_msg = request("BYTES", (2, 1))
    typed_msg.inputs[0].contents.bytes_contents.extend(blobs)
    assert [b for _, b in raw.inputs.encoded] == blobs
    assert [b for _, b in decode_request(typed_msg, IO, 64).inputs.encoded] == blobs
    assert [n for n, _ in raw.inputs.encoded] == ["image[0]", "image[1]"]  # what errors call them


def test_the_classification_parameter_as_tritonclient_sends_it() -> None:
    msg = request(raw_input_contents=[pixels().tobytes()])
    out = msg.outputs.add(name="logits")
    out.parameters["classification"].int64_param = 2
    out.parameters["classification_score"].string_param = "probability"
    assert parameters(out.parameters) == {"classification": 2, "classification_score": "probability"}
    (wanted,) = decode_request(msg, IO, 64).outputs
    assert (wanted.classification, wanted.probability) == (2, True)


@pytest.mark.parametrize(
    ("build", "words"),
    [
        (lambda: request(), "has no data"),
        (lambda: request(raw_input_contents=[b"12"]), "bytes of binary data"),
        (lambda: request(raw_input_contents=[pixels().tobytes(), b""]), "2 raw_input_contents for 1 input"),
        (lambda: request(shape=(2, 8, 8, 3), raw_input_contents=[b""]), "the model takes UINT8 [-1, 4, 4, 3]"),
        (lambda: request("FP32", raw_input_contents=[b""]), "is FP32"),
        (lambda: pb.ModelInferRequest(model_name="m"), "inputs"),
    ],
    ids=["no-data", "short-raw", "raw-count", "shape", "datatype", "no-input"],
)
def test_bad_messages_say_what_is_wrong(build: object, words: str) -> None:
    with pytest.raises(BadRequestError) as err:
        decode_request(build(), IO, 64)  # type: ignore[operator]
    assert words in err.value.message


def test_typed_contents_are_checked() -> None:
    both = request(raw_input_contents=[pixels().tobytes()])
    both.inputs[0].contents.uint_contents.extend(pixels().reshape(-1).tolist())
    with pytest.raises(BadRequestError, match="both contents and raw_input_contents"):
        decode_request(both, IO, 64)
    short = request()
    short.inputs[0].contents.uint_contents.extend([1, 2, 3])
    with pytest.raises(BadRequestError, match=r"3 elements in contents.uint_contents; UINT8 \[2, 4, 4, 3\] needs 96"):
        decode_request(short, IO, 64)
    wide = request(shape=(1, 4, 4, 3))
    wide.inputs[0].contents.uint_contents.extend([256] * 48)
    with pytest.raises(BadRequestError, match="over 255"):
        decode_request(wide, IO, 64)


def test_too_many_images_before_the_data_is_read() -> None:
    with pytest.raises(PayloadTooLargeError, match="65 images in one request; the limit is 64"):
        decode_request(request(shape=(65, 4, 4, 3)), IO, 64)
