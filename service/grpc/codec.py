"""``ModelInferRequest`` onto the pipeline and the answer back into a ``ModelInferResponse``.

The request is read as the REST front end reads its JSON (``deepvit.service.oip.tensors``): the same input
and output checks, the same classification extension, the same encoded images as ``BYTES``. What differs is
where the data is: ``raw_input_contents`` (one entry per input, in the order of ``inputs``; numbers
little-endian, ``BYTES`` elements each prefixed by a 4-byte little-endian length, as Triton's clients write
them) or an input's typed ``contents`` (``uint_contents`` for ``UINT8``, ``bytes_contents`` for ``BYTES``).
Answers are ``raw_output_contents``, as Triton answers: the logits ``FP32 [N, classes]`` or, for an output
asked for with ``classification: k``, ``BYTES [N, k]`` strings ``"score:index:label"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from google.protobuf.message import Message
from pydantic import ValidationError

from ..errors import BadRequestError
from ..models.io import ModelIO
from ..models.manager import ModelVersion
from ..oip.codec import decode_tensor, element_count, serialize_bytes_tensor
from ..oip.schemas import InferenceRequest, RequestInput
from ..oip.tensors import Decoded, output_tensors, tensor_inputs, the_input, wanted_outputs
from .proto import grpc_service_pb2 as pb


def parameters(params: Mapping[str, Message]) -> dict[str, Any]:
    """A protobuf parameter map (``InferParameter`` or ``ModelRepositoryParameter``) as plain values."""
    out: dict[str, Any] = {}
    for key, param in params.items():
        kind = param.WhichOneof("parameter_choice")
        out[key] = getattr(param, kind) if kind else None
    return out


def _request(msg: pb.ModelInferRequest) -> InferenceRequest:
    """The message as the REST front end's request model, so that both protocols check it alike."""
    body = {
        "id": msg.id or None,
        "parameters": parameters(msg.parameters),
        "inputs": [
            {"name": i.name, "datatype": i.datatype, "shape": list(i.shape), "parameters": parameters(i.parameters)}
            for i in msg.inputs
        ],
        "outputs": [{"name": o.name, "parameters": parameters(o.parameters)} for o in msg.outputs] or None,
    }
    try:
        return InferenceRequest.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}" for e in exc.errors())
        raise BadRequestError(f"the inference request is not valid: {problems}") from None


def decode_request(msg: pb.ModelInferRequest, io: ModelIO, max_images: int) -> Decoded:
    """The message to a checked request with its images. Typed contents cost a copy in proportion to the
    tensor: run it off the event loop."""
    req = _request(msg)
    outputs = wanted_outputs(req, io)
    inp = the_input(req, io, max_images)
    given = msg.inputs[0]
    raw = msg.raw_input_contents
    if raw:
        if len(raw) != len(msg.inputs):
            raise BadRequestError(
                f"the request has {len(raw)} raw_input_contents for {len(msg.inputs)} input; give one per input"
            )
        if given.HasField("contents"):
            raise BadRequestError(f"input {inp.name!r} has both contents and raw_input_contents; give one of them")
        tensor = decode_tensor(inp.name, inp.datatype, inp.shape, None, memoryview(raw[0]))
    elif given.HasField("contents"):
        tensor = _typed(inp, given.contents)
    else:
        raise BadRequestError(f"input {inp.name!r} has no data: give raw_input_contents or its contents")
    return Decoded(req, outputs, tensor_inputs(inp.name, tensor))


def _typed(inp: RequestInput, contents: pb.InferTensorContents) -> np.ndarray | list[bytes]:
    """An input's typed contents: ``UINT8`` travels as uint32 (protobuf has no 8-bit type), so its range is
    checked here."""
    n = element_count(inp.shape)
    field = "bytes_contents" if inp.datatype == "BYTES" else "uint_contents"
    values = getattr(contents, field)
    if len(values) != n:
        raise BadRequestError(
            f"input {inp.name!r} has {len(values)} elements in contents.{field}; "
            f"{inp.datatype} {list(inp.shape)} needs {n}"
        )
    if inp.datatype == "BYTES":
        return list(values)
    arr = np.array(values, dtype=np.uint32)
    if arr.size and int(arr.max()) > 255:
        raise BadRequestError(f"input {inp.name!r}: contents.uint_contents holds values over 255, outside UINT8")
    return arr.astype(np.uint8).reshape(inp.shape)


def encode_answer(
    decoded: Decoded, mv: ModelVersion, io: ModelIO, logits: np.ndarray, attention: np.ndarray | None = None
) -> pb.ModelInferResponse:
    """The response, every output in ``raw_output_contents``; ``attention`` (N, grid²) when one asks for it."""
    response = pb.ModelInferResponse(model_name=mv.name, model_version=str(mv.version), id=decoded.request.id or "")
    for t in output_tensors(mv, io, logits, decoded.outputs, attention):
        response.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        if isinstance(t.values, np.ndarray):
            response.raw_output_contents.append(np.ascontiguousarray(t.values, dtype="<f4").tobytes())
        else:
            response.raw_output_contents.append(serialize_bytes_tensor(t.values))
    return response
