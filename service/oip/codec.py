"""The Open Inference Protocol's tensor encodings, both ways.

JSON: a tensor's ``data`` is its elements in row-major order, flat or nested. The binary tensor data
extension: the body is the JSON header (its length in the ``Inference-Header-Content-Length`` HTTP header)
followed by the raw tensors, in the order of the tensors whose ``parameters`` give a ``binary_data_size``;
numbers little-endian, each BYTES element prefixed by its length as a 4-byte little-endian integer.

Pure functions over numpy; what a caller got wrong raises ``BadRequestError`` naming the tensor.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
import zlib
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np

from ..errors import BadRequestError, PayloadTooLargeError, UnsupportedMediaTypeError

HEADER_LENGTH = "Inference-Header-Content-Length"

NUMPY_DTYPES: dict[str, type[np.generic]] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
DATATYPES = (*NUMPY_DTYPES, "BYTES")

Tensor = np.ndarray | list[bytes]  # BYTES tensors are a flat list of elements
_LENGTH = struct.Struct("<I")


def element_count(shape: Sequence[int]) -> int:
    return math.prod(shape)


# -- the body ---------------------------------------------------------------------------------------
def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo a request's ``Content-Encoding`` (gzip or deflate, as Triton's clients send), at most ``limit``
    bytes of it: a small compressed body must not expand past the body limit."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaTypeError(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequestError(f"the {encoding} body could not be decompressed ({exc})") from None
    if len(out) > limit:
        raise PayloadTooLargeError(f"the body decompresses to over {limit:,} bytes, the limit")
    if not inflater.eof:
        raise BadRequestError(f"the {encoding} body is truncated")
    if inflater.unused_data:
        raise BadRequestError(f"{len(inflater.unused_data)} bytes follow the end of the {encoding} stream")
    return out


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary tensor data) of a request body."""
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise BadRequestError(f"{HEADER_LENGTH} must be an integer, not {header_length!r}") from None
    if not 0 < n <= len(body):
        raise BadRequestError(f"{HEADER_LENGTH} is {n}, but the body has {len(body)} bytes")
    return body[:n], body[n:]


class BinaryData:
    """The binary part of a request, handed out in order to the tensors that declare a binary_data_size."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._offset = 0

    def take(self, size: int, name: str) -> memoryview:
        end = self._offset + size
        if end > len(self._data):
            raise BadRequestError(
                f"input {name!r} declares binary_data_size {size}, but only {len(self._data) - self._offset} "
                "bytes of binary data remain after the JSON header"
            )
        chunk = self._data[self._offset : end]
        self._offset = end
        return chunk

    def finish(self) -> None:
        left = len(self._data) - self._offset
        if left:
            raise BadRequestError(
                f"{left} bytes of binary data follow the JSON header that no input claims with binary_data_size"
            )


# -- BYTES ------------------------------------------------------------------------------------------
def serialize_bytes_tensor(items: Iterable[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(item)) + item for item in items)


def deserialize_bytes_tensor(buf: bytes | memoryview, name: str = "tensor", expected: int | None = None) -> list[bytes]:
    """The elements of a serialized BYTES tensor; with ``expected``, a 400 as soon as there are more."""
    view = memoryview(buf)
    out: list[bytes] = []
    i = 0
    while i < len(view):
        if expected is not None and len(out) >= expected:
            raise BadRequestError(f"BYTES input {name!r} holds more than the {expected} elements its shape declares")
        if i + 4 > len(view):
            raise BadRequestError(f"BYTES input {name!r}: {len(view) - i} stray bytes where a 4-byte length belongs")
        (n,) = _LENGTH.unpack_from(view, i)
        i += 4
        if i + n > len(view):
            raise BadRequestError(f"BYTES input {name!r}: element {len(out)} claims {n} bytes, {len(view) - i} remain")
        out.append(bytes(view[i : i + n]))
        i += n
    return out


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    for item in data:
        out.extend(_flatten(item))
    return out


def _bytes_from_json(name: str, data: Any, encoding: Literal["utf-8", "base64"], count: int) -> list[bytes]:
    items = _flatten(data)
    if len(items) != count:  # before decoding any of them
        raise BadRequestError(f"input {name!r} has {len(items)} elements; its shape needs {count}")
    if not all(isinstance(s, str) for s in items):
        raise BadRequestError(f"BYTES input {name!r}: JSON data must be strings")
    if encoding == "utf-8":
        return [s.encode("utf-8") for s in items]
    try:
        return [base64.b64decode(s, validate=True) for s in items]
    except (binascii.Error, ValueError):
        raise BadRequestError(
            f"BYTES input {name!r}: in JSON each element must be base64 (or send it as binary data)"
        ) from None


# -- decoding a request's tensor --------------------------------------------------------------------
def decode_tensor(
    name: str,
    datatype: str,
    shape: Sequence[int],
    data: Any,
    binary: memoryview | None,
    *,
    json_bytes: Literal["utf-8", "base64"] = "utf-8",
) -> Tensor:
    """One input tensor, from its JSON ``data`` or its binary chunk; checked against its declared shape."""
    count = element_count(shape)
    if datatype == "BYTES":
        items = deserialize_bytes_tensor(binary, name, count) if binary is not None else None
        if items is None:
            if data is None:
                raise BadRequestError(f"input {name!r} has neither data nor a binary_data_size")
            items = _bytes_from_json(name, data, json_bytes, count)
        if len(items) != count:
            raise BadRequestError(f"input {name!r} has {len(items)} elements; its shape {list(shape)} needs {count}")
        return items
    if datatype not in NUMPY_DTYPES:
        raise BadRequestError(f"input {name!r}: unknown datatype {datatype!r} (one of {', '.join(DATATYPES)})")
    dtype = np.dtype(NUMPY_DTYPES[datatype]).newbyteorder("<")
    if binary is not None:
        if len(binary) != count * dtype.itemsize:
            raise BadRequestError(
                f"input {name!r}: {len(binary)} bytes of binary data; {datatype} {list(shape)} is "
                f"{count * dtype.itemsize} bytes"
            )
        return np.frombuffer(binary, dtype=dtype).reshape(shape)
    if data is None:
        raise BadRequestError(f"input {name!r} has neither data nor a binary_data_size")
    return _array_from_json(name, datatype, dtype, shape, data)


def _array_from_json(name: str, datatype: str, dtype: np.dtype[Any], shape: Sequence[int], data: Any) -> np.ndarray:
    count = element_count(shape)
    if isinstance(data, list) and data and not isinstance(data[0], list) and len(data) != count:
        # a flat list of the wrong length: refused before numpy copies it
        raise BadRequestError(f"input {name!r} has {len(data)} elements; its shape {list(shape)} needs {count}")
    try:
        arr = np.asarray(data)
    except ValueError:  # ragged nesting
        raise BadRequestError(f"input {name!r}: the nested data is ragged; give it as a flat list") from None
    if arr.size != element_count(shape):
        raise BadRequestError(
            f"input {name!r} has {arr.size} elements; its shape {list(shape)} needs {element_count(shape)}"
        )
    kinds = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}[dtype.kind]
    if arr.size and arr.dtype.kind not in kinds:
        raise BadRequestError(f"input {name!r}: its JSON data is not {datatype} values")
    if arr.size and dtype.kind in "iu":
        info = np.iinfo(dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise BadRequestError(f"input {name!r}: values outside the {datatype} range {info.min}..{info.max}")
    return arr.astype(dtype).reshape(shape)


# -- encoding a response ----------------------------------------------------------------------------
def encode_tensor(
    name: str, datatype: str, shape: Sequence[int], values: np.ndarray | Sequence[bytes], *, binary: bool
) -> tuple[dict[str, Any], bytes]:
    """An output's JSON description and its binary chunk (empty unless ``binary``)."""
    out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(shape)}
    if datatype == "BYTES":
        assert not isinstance(values, np.ndarray)
        if binary:
            raw = serialize_bytes_tensor(values)
            out["parameters"] = {"binary_data_size": len(raw)}
            return out, raw
        out["data"] = [v.decode("utf-8", errors="replace") for v in values]
        return out, b""
    arr = np.ascontiguousarray(values, dtype=np.dtype(NUMPY_DTYPES[datatype]).newbyteorder("<"))
    if binary:
        raw = arr.tobytes()
        out["parameters"] = {"binary_data_size": len(raw)}
        return out, raw
    out["data"] = arr.reshape(-1).tolist()
    return out, b""


def encode_response(header: dict[str, Any], chunks: Sequence[bytes]) -> tuple[bytes, dict[str, str]]:
    """(body, headers): plain JSON, or the JSON header and the binary chunks when any output is binary."""
    head = json.dumps(header, separators=(",", ":")).encode()
    if not any("binary_data_size" in (o.get("parameters") or {}) for o in header.get("outputs", [])):
        return head, {"content-type": "application/json"}
    return head + b"".join(chunks), {HEADER_LENGTH: str(len(head)), "content-type": "application/octet-stream"}
