"""An Open Inference Protocol request mapped onto a served DeepViT version, and its answer.

The model has one input, the artifact's ``UINT8 [N, crop, crop, 3]`` RGB tensor, and one output, the logits
``FP32 [N, classes]``. The input also takes ``BYTES [N]`` (or ``[N, 1]``): encoded images (JPEG, PNG, ...),
decoded and preprocessed exactly as ``/classify`` does, so that a client without the artifact's preprocessing
can still call it; in JSON each such element is base64. An output asked for with the parameter
``classification: k`` is answered as ``BYTES [N, k]`` strings ``"score:index:label"``: the top k classes,
highest first, the score being the raw output value (the logit, as Triton does) written with every digit it
has; with the output parameter ``classification_score: "probability"`` it is the softmax probability that
``/classify`` reports instead. An artifact exported with ``--explain`` has a second output, ``attention``
``FP32 [N, grid * grid]`` (what ``/explain`` serves); a request names it among its outputs to have it.

``decode_request`` does everything from the raw body to the images (decompressing, parsing, decoding) and
blocks: the endpoint runs it in the decode pool, a few at a time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from deepvit.artifact import ATTENTION_NAME
from deepvit.artifact.pixels import FORMATS_TEXT
from deepvit.artifact.predictions import softmax

from ..errors import BadRequestError, ConflictError, InferenceError, PayloadTooLargeError
from ..models.io import ModelIO
from ..models.manager import ModelVersion
from ..pipeline import Inputs
from .codec import BinaryData, decode_tensor, decompress, encode_response, encode_tensor, split_body
from .schemas import InferenceRequest, ModelMetadata, Parameters, RequestInput, TensorMetadata

PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ["binary_tensor_data", "classification", "model_repository"]


@dataclass(frozen=True)
class WantedOutput:
    name: str
    classification: int  # top-k as "score:index:label"; 0: the logits themselves
    binary: bool
    probability: bool = False  # the classification's score: softmax probability rather than the logit


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int  # decompressed, binary tensor data included
    max_json_body_bytes: int  # decompressed JSON (where JSON tensors are): parsing it costs many times its size
    max_images: int


@dataclass(frozen=True)
class Decoded:
    request: InferenceRequest
    outputs: list[WantedOutput]
    inputs: Inputs  # what the pipeline runs


def tensor_inputs(name: str, tensor: np.ndarray | list[bytes]) -> Inputs:
    """The input tensor as the pipeline's inputs: encoded images (named ``input[i]`` in errors) or pixels."""
    if isinstance(tensor, list):
        return Inputs(encoded=[(f"{name}[{i}]", b) for i, b in enumerate(tensor)])
    return Inputs(pixels=list(tensor))


_SHAPE_KEY = re.compile(rb'"shape"\s*:\s*\[\s*([0-9]+)')


def _precheck_batch(head: bytes, max_images: int) -> None:
    """A 413 for a declared batch over the limit before the JSON (data and all) is parsed, when the header
    declares one shape only (anything less plain is left to the parser)."""
    found = _SHAPE_KEY.findall(head)
    if len(found) == 1 and (len(found[0]) > 18 or int(found[0]) > max_images):
        n = found[0].decode() if len(found[0]) <= 18 else f"{found[0][:18].decode()}..."
        raise PayloadTooLargeError(f"{n} images in one request; the limit is {max_images}")


def decode_request(
    body: bytes, content_encoding: str | None, header_length: str | None, io: ModelIO, limits: Limits
) -> Decoded:
    """The raw body to a checked request: decompressed, parsed, its input decoded. Blocking (CPU and memory
    in proportion to the body): run it off the event loop. Without binary tensors the whole body is JSON,
    held to the smaller ``max_json_body_bytes``; a declared batch over the limit is refused before parsing."""
    json_only = header_length is None
    body = decompress(body, content_encoding, limits.max_json_body_bytes if json_only else limits.max_body_bytes)
    head, binary = split_body(body, header_length)
    if len(head) > limits.max_json_body_bytes:
        raise PayloadTooLargeError(
            f"the request's JSON is {len(head):,} bytes, over the {limits.max_json_body_bytes:,} limit; "
            "send large tensors as binary data (the binary tensor data extension)"
        )
    _precheck_batch(head, limits.max_images)
    req = parse_request(head)
    outputs = wanted_outputs(req, io)
    images = read_images(req, binary, io, limits.max_images)
    return Decoded(req, outputs, images)


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


def the_input(req: InferenceRequest, io: ModelIO, max_images: int) -> RequestInput:
    """The request's one input, checked against the model (name, datatype, shape, batch size) before its
    data is looked at: both protocols' front ends call this."""
    if len(req.inputs) != 1:
        names = ", ".join(repr(i.name) for i in req.inputs)
        raise BadRequestError(f"the model takes one input, {io.input_name!r}; the request has {names}")
    inp = req.inputs[0]
    if inp.name != io.input_name:
        raise BadRequestError(f"unknown input {inp.name!r}; the model's input is {io.input_name!r}")
    if any(k.startswith("shared_memory") for k in inp.parameters):
        raise BadRequestError(f"input {inp.name!r}: shared memory is not supported; send the data in the request")
    n = _check_shape(inp, io)
    if n > max_images:
        raise PayloadTooLargeError(f"{n} images in one request; the limit is {max_images}")
    return inp


def read_images(req: InferenceRequest, binary: bytes, io: ModelIO, max_images: int) -> Inputs:
    """The request's one input, checked against the model: name, datatype, shape, data."""
    inp = the_input(req, io, max_images)
    where = f"input {inp.name!r}"
    data = BinaryData(binary)
    size = _param(inp.parameters, "binary_data_size", int, where)
    if size is not None and size < 0:
        raise BadRequestError(f"{where}: binary_data_size {size} is negative")
    chunk = data.take(size, inp.name) if size is not None else None
    data.finish()
    tensor = decode_tensor(inp.name, inp.datatype, inp.shape, inp.data, chunk, json_bytes="base64")
    return tensor_inputs(inp.name, tensor)


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
        if o.name == ATTENTION_NAME and not io.attention_cells:
            raise ConflictError(
                f"this model version has no {ATTENTION_NAME!r} output: it was exported without it; re-export it "
                "with deepvit export --explain (the same arguments plus --explain)"
            )
        if o.name not in io.output_names:
            names = " and ".join(repr(n) for n in io.output_names)
            are = "outputs are" if len(io.output_names) > 1 else "output is"
            raise BadRequestError(f"unknown output {o.name!r}; the model's {are} {names}")
        if any(k.startswith("shared_memory") for k in o.parameters):
            raise BadRequestError(f"{where}: shared memory is not supported")
        k = _param(o.parameters, "classification", int, where) or 0
        if k and o.name == ATTENTION_NAME:
            raise BadRequestError(f"{where}: classification applies to {io.output_name!r}, not to the attention map")
        if not 0 <= k <= io.num_classes:
            raise BadRequestError(f"{where}: classification {k} must be between 1 and the {io.num_classes} classes")
        binary = _param(o.parameters, "binary_data", bool, where)
        score = o.parameters.get("classification_score", "logit")
        if score not in ("logit", "probability"):
            raise BadRequestError(f"{where}: classification_score must be 'logit' or 'probability'")
        out.append(WantedOutput(o.name, k, binary_default if binary is None else binary, score == "probability"))
    if len({o.name for o in out}) != len(out):
        raise BadRequestError("an output is asked for twice; name each output once")
    return out


def classification(logits: np.ndarray, k: int, labels: tuple[str, ...], probability: bool = False) -> list[bytes]:
    """Row-major ``[N, k]`` elements ``"score:index:label"``, highest first (ties in class order), the score
    being the raw logit (or the softmax probability), written so that it reads back exactly."""
    scores = softmax(logits) if probability else np.asarray(logits)
    out = []
    for row in scores:
        for i in np.argsort(-row, kind="stable")[:k]:
            out.append(f"{float(row[i])!r}:{int(i)}:{labels[i]}".encode())
    return out


@dataclass(frozen=True)
class OutputTensor:
    """One answered output, before a protocol encodes it: FP32 values, or BYTES elements."""

    name: str
    datatype: str
    shape: list[int]
    values: np.ndarray | list[bytes]
    binary: bool


def output_tensors(
    mv: ModelVersion, io: ModelIO, logits: np.ndarray, outputs: list[WantedOutput], attention: np.ndarray | None
) -> list[OutputTensor]:
    """The outputs a request asked for, from the answer (REST and gRPC encode these): the logits, their top k
    as classification strings, or the attention (N, grid²)."""
    n = len(logits)
    out = []
    for o in outputs:
        if o.name == ATTENTION_NAME:
            if attention is None:  # the version that answered was replaced by one without it meanwhile
                raise InferenceError(f"model {mv.name} version {mv.version} gave no {ATTENTION_NAME!r} output")
            out.append(OutputTensor(o.name, "FP32", [n, io.attention_cells], attention, o.binary))
        elif o.classification:
            strings = classification(logits, o.classification, io.labels, o.probability)
            out.append(OutputTensor(o.name, "BYTES", [n, o.classification], strings, o.binary))
        else:
            out.append(OutputTensor(o.name, "FP32", [n, io.num_classes], logits, o.binary))
    return out


def encode_answer(
    req: InferenceRequest,
    mv: ModelVersion,
    io: ModelIO,
    logits: np.ndarray,
    outputs: list[WantedOutput],
    attention: np.ndarray | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The inference response: (body, headers). ``attention`` (N, grid²) when an output asks for it."""
    described: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for t in output_tensors(mv, io, logits, outputs, attention):
        desc, raw = encode_tensor(t.name, t.datatype, t.shape, t.values, binary=t.binary)
        described.append(desc)
        chunks.append(raw)
    header: dict[str, Any] = {"model_name": mv.name, "model_version": str(mv.version)}
    if req.id is not None:
        header["id"] = req.id
    header["outputs"] = described
    return encode_response(header, chunks)


def model_metadata(mv: ModelVersion, versions: list[int]) -> ModelMetadata:
    io = mv.io
    meta = mv.runtime.meta
    return ModelMetadata(
        name=mv.name,
        versions=[str(v) for v in versions],
        platform=PLATFORM,
        inputs=[TensorMetadata(name=io.input_name, datatype="UINT8", shape=io.input_shape)],
        outputs=[TensorMetadata(name=io.output_name, datatype="FP32", shape=[-1, io.num_classes])]
        + (
            [TensorMetadata(name=ATTENTION_NAME, datatype="FP32", shape=[-1, io.attention_cells])]
            if io.attention_cells
            else []
        ),
        parameters={
            "version": str(mv.version),
            "encoded_image_input": f"{io.input_name!r} also takes BYTES [-1]: encoded images ({FORMATS_TEXT}), "
            "preprocessed by the server as /classify does; base64 in JSON",
            "classification": "output parameter classification: k answers BYTES [-1, k] 'score:index:label', "
            "score being the logit (classification_score: 'probability' for the softmax probability)",
            "num_classes": meta.num_classes,
            "weights": meta.weights,
            "untrained": meta.untrained,
            "precision": meta.precision,
            "provider": mv.runtime.provider,
            **{
                f"preprocessing_{key}": ",".join(map(str, value)) if isinstance(value, list) else value
                for key, value in meta.to_public_dict()["preprocessing"].items()
            },
        },
    )
