"""An Open Inference Protocol request mapped onto a served DeepViT version, and its answer.

The model has one input, the artifact's ``UINT8 [N, crop, crop, 3]`` RGB tensor, and one output, the logits
``FP32 [N, classes]``. The input also takes ``BYTES [N]`` (or ``[N, 1]``): encoded images (JPEG, PNG, ...),
decoded and preprocessed exactly as ``/classify`` does, so that a client without the artifact's preprocessing
can still call it; in JSON each such element is base64. An output asked for with the parameter
``classification: k`` is answered as ``BYTES [N, k]`` strings ``"score:index:label"``: the top k classes by
softmax probability (the score ``/classify`` reports; Triton would put the raw output value there), highest
first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from ..errors import BadRequestError, PayloadTooLargeError
from ..postprocess import top_k
from ..repository import ModelVersion
from .codec import BinaryData, decode_tensor, encode_response, encode_tensor
from .schemas import InferenceRequest, ModelMetadata, Parameters, RequestInput, TensorMetadata

PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ["binary_tensor_data", "classification", "model_repository"]


@dataclass(frozen=True)
class ModelIO:
    input_name: str
    output_name: str
    crop: int
    num_classes: int
    labels: tuple[str, ...]

    @classmethod
    def of(cls, mv: ModelVersion) -> ModelIO:
        rt = mv.runtime
        return cls(
            rt.input_name,
            str(rt.session.get_outputs()[0].name),
            rt.meta.preprocess.crop_size,
            rt.meta.num_classes,
            rt.meta.labels,
        )

    @property
    def input_shape(self) -> list[int]:
        return [-1, self.crop, self.crop, 3]


@dataclass(frozen=True)
class Images:
    """What the request's input holds: pixels ready for the batcher, or encoded images to preprocess."""

    pixels: list[np.ndarray] | None = None  # N arrays (crop, crop, 3) uint8
    encoded: list[bytes] | None = None


@dataclass(frozen=True)
class WantedOutput:
    name: str
    classification: int  # top-k as "score:index:label"; 0: the logits themselves
    binary: bool


def parse_request(head: bytes) -> InferenceRequest:
    try:
        return InferenceRequest.model_validate_json(head)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise BadRequestError(f"the inference request is not valid: {problems}") from None


def _param(params: Parameters, key: str, kind: type[bool] | type[int], where: str) -> Any:
    value = params.get(key)
    # bool is an int in Python; the protocol keeps them apart.
    if value is not None and (type(value) is not kind):
        raise BadRequestError(f"{where}: parameter {key!r} must be {'a boolean' if kind is bool else 'an integer'}")
    return value


def read_images(req: InferenceRequest, binary: bytes, io: ModelIO, max_images: int) -> Images:
    """The request's one input, checked against the model: name, datatype, shape, data."""
    if len(req.inputs) != 1:
        names = ", ".join(repr(i.name) for i in req.inputs)
        raise BadRequestError(f"the model takes one input, {io.input_name!r}; the request has {names}")
    inp = req.inputs[0]
    if inp.name != io.input_name:
        raise BadRequestError(f"unknown input {inp.name!r}; the model's input is {io.input_name!r}")
    where = f"input {inp.name!r}"
    if any(k.startswith("shared_memory") for k in inp.parameters):
        raise BadRequestError(f"{where}: shared memory is not supported; send the data in the request")
    n = _check_shape(inp, io)
    if n > max_images:
        raise PayloadTooLargeError(f"{n} images in one request; the limit is {max_images}")
    data = BinaryData(binary)
    size = _param(inp.parameters, "binary_data_size", int, where)
    if size is not None and size < 0:
        raise BadRequestError(f"{where}: binary_data_size {size} is negative")
    chunk = data.take(size, inp.name) if size is not None else None
    data.finish()
    tensor = decode_tensor(inp.name, inp.datatype, inp.shape, inp.data, chunk, json_bytes="base64")
    if isinstance(tensor, list):
        return Images(encoded=tensor)
    return Images(pixels=list(tensor))


def _check_shape(inp: RequestInput, io: ModelIO) -> int:
    """The batch size the input's datatype and shape give, or a 400 that says what the model takes."""
    takes = f"UINT8 {io.input_shape} (RGB pixels) or BYTES [-1] (encoded images)"
    if inp.datatype == "UINT8":
        ok = len(inp.shape) == 4 and inp.shape[1:] == io.input_shape[1:]
    elif inp.datatype == "BYTES":
        ok = len(inp.shape) >= 1 and all(d == 1 for d in inp.shape[1:])
    else:
        raise BadRequestError(f"input {inp.name!r} is {inp.datatype}; the model takes {takes}")
    if not ok:
        raise BadRequestError(f"input {inp.name!r} has shape {inp.shape} as {inp.datatype}; the model takes {takes}")
    if inp.shape[0] < 1:
        raise BadRequestError(f"input {inp.name!r} holds no image (batch size 0)")
    return inp.shape[0]


def wanted_outputs(req: InferenceRequest, io: ModelIO) -> list[WantedOutput]:
    binary_default = bool(_param(req.parameters, "binary_data_output", bool, "the request"))
    if req.outputs is None:
        return [WantedOutput(io.output_name, 0, binary_default)]
    out: list[WantedOutput] = []
    for o in req.outputs:
        where = f"output {o.name!r}"
        if o.name != io.output_name:
            raise BadRequestError(f"unknown output {o.name!r}; the model's output is {io.output_name!r}")
        if any(k.startswith("shared_memory") for k in o.parameters):
            raise BadRequestError(f"{where}: shared memory is not supported")
        k = _param(o.parameters, "classification", int, where) or 0
        if not 0 <= k <= io.num_classes:
            raise BadRequestError(f"{where}: classification {k} must be between 1 and the {io.num_classes} classes")
        binary = _param(o.parameters, "binary_data", bool, where)
        out.append(WantedOutput(o.name, k, binary_default if binary is None else binary))
    if len({o.name for o in out}) != len(out):
        raise BadRequestError(f"output {io.output_name!r} is asked for twice")
    return out


def classification(logits: np.ndarray, k: int, labels: tuple[str, ...]) -> list[bytes]:
    """Row-major ``[N, k]`` elements ``"score:index:label"``, the score being the softmax probability."""
    return [f"{s['score']:.6g}:{s['class_id']}:{s['label']}".encode() for row in logits for s in top_k(row, k, labels)]


def encode_answer(
    req: InferenceRequest, mv: ModelVersion, io: ModelIO, logits: np.ndarray, outputs: list[WantedOutput]
) -> tuple[bytes, dict[str, str]]:
    """The inference response: (body, headers)."""
    described: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    n = len(logits)
    for o in outputs:
        if o.classification:
            strings = classification(logits, o.classification, io.labels)
            desc, raw = encode_tensor(o.name, "BYTES", [n, o.classification], strings, binary=o.binary)
        else:
            desc, raw = encode_tensor(o.name, "FP32", [n, io.num_classes], logits, binary=o.binary)
        described.append(desc)
        chunks.append(raw)
    header: dict[str, Any] = {"model_name": mv.name, "model_version": str(mv.version)}
    if req.id is not None:
        header["id"] = req.id
    header["outputs"] = described
    return encode_response(header, chunks)


def model_metadata(mv: ModelVersion, versions: list[int]) -> ModelMetadata:
    io = ModelIO.of(mv)
    meta = mv.runtime.meta
    return ModelMetadata(
        name=mv.name,
        versions=[str(v) for v in versions],
        platform=PLATFORM,
        inputs=[TensorMetadata(name=io.input_name, datatype="UINT8", shape=io.input_shape)],
        outputs=[TensorMetadata(name=io.output_name, datatype="FP32", shape=[-1, io.num_classes])],
        parameters={
            "version": str(mv.version),
            "encoded_image_input": f"{io.input_name!r} also takes BYTES [-1]: encoded images (JPEG, PNG, WebP, "
            "GIF, BMP, TIFF), preprocessed by the server as /classify does; base64 in JSON",
            "classification": "output parameter classification: k answers BYTES [-1, k] 'score:index:label', "
            "score being the softmax probability",
            "num_classes": meta.num_classes,
            "weights": meta.weights,
            "untrained": meta.untrained,
            "precision": meta.precision,
            "provider": mv.runtime.provider,
            "preprocessing": meta.to_public_dict()["preprocessing"],
        },
    )
