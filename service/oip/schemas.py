"""Open Inference Protocol (KServe v2) REST messages. Requests are validated with these models; responses are
documented by them (the inference response itself is written by the codec, which also speaks binary)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

Parameters = dict[str, Any]


class _Message(BaseModel):
    # "model_name" and "model_version" are the protocol's names; pydantic reserves "model_" otherwise.
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class RequestInput(_Message):
    name: str
    shape: list[Annotated[int, Field(ge=0)]]
    datatype: str
    parameters: Parameters = Field(default_factory=dict)
    data: Any = Field(None, description="row-major, flat or nested; absent when binary_data_size is given")


class RequestOutput(_Message):
    name: str
    parameters: Parameters = Field(
        default_factory=dict, description="binary_data: bool; classification: k (top-k as BYTES 'score:index:label')"
    )


class InferenceRequest(_Message):
    id: str | None = None
    parameters: Parameters = Field(default_factory=dict, description="binary_data_output: bool")
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = Field(None, description="absent: every output")


class ResponseOutput(_Message):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = Field(None, description="binary_data_size when the data follows the JSON")
    data: list[Any] | None = None


class InferenceResponse(_Message):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]


class TensorMetadata(_Message):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for a variable axis (the batch)")


class ModelMetadata(_Message):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: Parameters = Field(default_factory=dict, description="what this service adds (not in the protocol)")


class ServerMetadata(_Message):
    name: str
    version: str
    extensions: list[str]


class ServerLive(_Message):
    live: bool


class ModelReady(_Message):
    name: str
    version: str
    ready: bool


class RepositoryIndexRequest(_Message):
    ready: bool = Field(False, description="only the versions that are ready")


class RepositoryIndexEntry(_Message):
    name: str
    version: str
    state: str = Field(description="READY, LOADING, UNLOADING or UNAVAILABLE")
    reason: str = Field("", description="why a version does not serve (or what about it is pending)")


class RepositoryLoadRequest(_Message):
    parameters: Parameters = Field(default_factory=dict)


class RepositoryModelState(_Message):
    name: str
    versions: list[str] = Field(description="the versions serving after the request")
