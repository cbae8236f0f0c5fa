"""The Open Inference Protocol over gRPC against a real ``deepvit serve`` process on loopback, spoken by Triton's
published client (``tritonclient.grpc``): health, metadata, inference with raw and typed tensors, encoded images,
the classification extension, the repository extension, status codes, ``grpc.health.v1`` and reflection;
answers equal to running the artifact directly."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tg
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from serving import DATA, Server, export_tiny, metric_samples, running_server, start_server, stop_server
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from deepvit.artifact.pixels import ImageLimits, preprocess
from deepvit.artifact.session import read_metadata

pytestmark = pytest.mark.integration

PHOTOS = sorted((DATA / "photos").glob("*.jpg"))[:3]
MODEL = "tiny"
BODY_LIMIT = 2 * 1024 * 1024  # the server's message limit here, so that an oversized one is cheap to send
MAX_PENDING = 40  # images in the pipeline at once: a request of more is refused as overloaded


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("repo"), name=MODEL)


@pytest.fixture(scope="module")
def server(artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {
        "DEEPVIT_MAX_QUEUE_DELAY_MS": "1",
        "DEEPVIT_REPOSITORY_CONTROL": "true",
        "DEEPVIT_MAX_BODY_BYTES": str(BODY_LIMIT),
        "DEEPVIT_MAX_PENDING_IMAGES": str(MAX_PENDING),
    }
    with running_server(artifact.parents[2], tmp_path_factory.mktemp("logs") / "server.log", env) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[tg.InferenceServerClient]:
    c = tg.InferenceServerClient(server.grpc)
    yield c
    c.close()


@pytest.fixture(scope="module")
def reference(artifact: Path) -> ort.InferenceSession:
    """The artifact run directly, as a user of the file would."""
    return ort.InferenceSession(str(artifact), providers=["CPUExecutionProvider"])


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


def uint8_input(x: np.ndarray, name: str = "image") -> tg.InferInput:
    inp = tg.InferInput(name, list(x.shape), "UINT8")
    inp.set_data_from_numpy(x)
    return inp


def bytes_input(blobs: list[bytes]) -> tg.InferInput:
    inp = tg.InferInput("image", [len(blobs)], "BYTES")
    inp.set_data_from_numpy(np.array(blobs, dtype=np.object_))
    return inp


def failure(call: object, *args: object, **kw: object) -> tuple[str, str]:
    """(status code, message) of a call that must fail."""
    with pytest.raises(InferenceServerException) as err:
        call(*args, **kw)  # type: ignore[operator]
    return str(err.value.status()), str(err.value.message())


def parse_classes(strings: np.ndarray) -> list[list[tuple[float, int, str]]]:
    return [[(float(s), int(i), label) for s, i, label in (e.decode().split(":", 2) for e in row)] for row in strings]


# -- health and metadata ------------------------------------------------------------------------------
def test_live_ready_and_server_metadata(client: tg.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "deepvit-serve"
    assert {"binary_tensor_data", "classification", "model_repository"} <= set(meta["extensions"])


def test_model_metadata_and_ready(client: tg.InferenceServerClient) -> None:
    meta = client.get_model_metadata(MODEL, as_json=True)
    assert meta["name"] == MODEL
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": ["-1", "64", "64", "3"]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", "7"]}]
    assert client.get_model_metadata(MODEL, "1", as_json=True)["inputs"] == meta["inputs"]
    code, message = failure(client.get_model_metadata, "nope")
    assert code == "StatusCode.NOT_FOUND"
    assert "'nope'" in message
    assert failure(client.get_model_metadata, MODEL, "9")[0] == "StatusCode.NOT_FOUND"
    assert failure(client.get_model_metadata, MODEL, "x")[0] == "StatusCode.INVALID_ARGUMENT"
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready(MODEL, "2")
    assert not client.is_model_ready("nope")


def test_health_and_reflection(server: Server) -> None:
    with grpc.insecure_channel(server.grpc) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services


# -- inference ----------------------------------------------------------------------------------------
def test_raw_uint8_tensors_equal_the_artifact_run_directly(
    client: tg.InferenceServerClient, reference: ort.InferenceSession
) -> None:
    x = pixels(3, seed=1)
    result = client.infer(MODEL, [uint8_input(x)], outputs=[tg.InferRequestedOutput("logits")], request_id="r-1")
    got = result.as_numpy("logits")
    assert got is not None
    assert got.dtype == np.float32
    assert got.shape == (3, 7)
    np.testing.assert_allclose(got, reference.run(None, {"image": x})[0], rtol=1e-5, atol=1e-6)
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == (MODEL, "1", "r-1")
    assert len(response.raw_output_contents) == 1  # the answer in raw bytes, as Triton answers


def test_typed_contents_equal_raw_ones(server: Server, reference: ort.InferenceSession) -> None:
    """Tensors in ``contents`` (the proto's typed fields, UINT8 as uint32) instead of raw bytes, through the
    client library's own stub."""
    x = pixels(2, seed=2)
    inp = service_pb2.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=list(x.shape))
    inp.contents.uint_contents.extend(x.reshape(-1).tolist())
    with grpc.insecure_channel(server.grpc) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        answer = stub.ModelInfer(service_pb2.ModelInferRequest(model_name=MODEL, inputs=[inp]), timeout=30)
        inp.contents.uint_contents[0] = 256
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(service_pb2.ModelInferRequest(model_name=MODEL, inputs=[inp]), timeout=30)
    got = np.frombuffer(answer.raw_output_contents[0], dtype="<f4").reshape(2, 7)
    np.testing.assert_allclose(got, reference.run(None, {"image": x})[0], rtol=1e-5, atol=1e-6)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "over 255" in (err.value.details() or "")


def test_classification_extension(
    client: tg.InferenceServerClient, reference: ort.InferenceSession, artifact: Path
) -> None:
    x = pixels(4, seed=7)
    out = tg.InferRequestedOutput("logits", class_count=3)
    got = client.infer(MODEL, [uint8_input(x)], outputs=[out]).as_numpy("logits")
    assert got is not None
    assert got.shape == (4, 3)
    logits = reference.run(None, {"image": x})[0]
    labels = read_metadata(artifact).labels
    for row, want in zip(parse_classes(got), logits, strict=True):
        assert [i for _, i, _ in row] == list(np.argsort(-want, kind="stable")[:3])
        assert [label for _, i, label in row] == [labels[i] for _, i, _ in row]
        for score, i, _ in row:
            assert score == pytest.approx(float(want[i]), rel=1e-4, abs=1e-5)  # the raw logit, as Triton


def test_encoded_images_are_preprocessed_as_classify_does(
    client: tg.InferenceServerClient, server: Server, reference: ort.InferenceSession, artifact: Path
) -> None:
    blobs = [p.read_bytes() for p in PHOTOS]
    got = client.infer(MODEL, [bytes_input(blobs)]).as_numpy("logits")
    spec = read_metadata(artifact).preprocess
    crops = np.stack([preprocess(b, spec, ImageLimits(40_000_000)) for b in blobs])
    np.testing.assert_allclose(got, reference.run(None, {"image": crops})[0], rtol=1e-5, atol=1e-6)

    top3 = client.infer(MODEL, [bytes_input(blobs[:1])], outputs=[tg.InferRequestedOutput("logits", class_count=3)])
    with server.client() as http:
        classify = http.post("/classify?top_k=3", content=blobs[0], headers={"content-type": "image/jpeg"}).json()
    classes = parse_classes(top3.as_numpy("logits"))[0]
    assert [i for _, i, _ in classes] == [p["class_id"] for p in classify["predictions"]]


# -- errors -------------------------------------------------------------------------------------------
def test_bad_tensors_are_invalid_argument_with_what_the_model_takes(client: tg.InferenceServerClient) -> None:
    code, message = failure(client.infer, MODEL, [uint8_input(pixels(1), name="pixels")])
    assert (code, message) == ("StatusCode.INVALID_ARGUMENT", "unknown input 'pixels'; the model's input is 'image'")

    wrong_type = tg.InferInput("image", [1, 64, 64, 3], "FP32")
    wrong_type.set_data_from_numpy(pixels(1).astype(np.float32))
    code, message = failure(client.infer, MODEL, [wrong_type])
    assert code == "StatusCode.INVALID_ARGUMENT"
    assert "is FP32" in message
    assert "UINT8 [-1, 64, 64, 3]" in message

    code, message = failure(client.infer, MODEL, [uint8_input(np.zeros((1, 32, 32, 3), np.uint8))])
    assert code == "StatusCode.INVALID_ARGUMENT"
    assert "[1, 32, 32, 3]" in message

    code, message = failure(client.infer, MODEL, [bytes_input([b"PK\x03\x04 a zip"])])
    assert code == "StatusCode.INVALID_ARGUMENT"
    assert "not an image" in message

    code, message = failure(client.infer, MODEL, [uint8_input(pixels(1))], outputs=[tg.InferRequestedOutput("probs")])
    assert code == "StatusCode.INVALID_ARGUMENT"
    assert "the model's output is 'logits'" in message


def test_unknown_models_and_versions_are_not_found(client: tg.InferenceServerClient) -> None:
    code, message = failure(client.infer, "nope", [uint8_input(pixels(1))])
    assert code == "StatusCode.NOT_FOUND"
    assert "unknown model 'nope'" in message
    assert failure(client.infer, MODEL, [uint8_input(pixels(1))], model_version="9")[0] == "StatusCode.NOT_FOUND"


def test_over_the_limits_is_resource_exhausted(client: tg.InferenceServerClient) -> None:
    big = np.frombuffer(np.random.default_rng(0).bytes(BODY_LIMIT + 1), dtype=np.uint8)
    code, message = failure(client.infer, MODEL, [bytes_input([big.tobytes()])])
    assert code == "StatusCode.RESOURCE_EXHAUSTED"
    assert str(BODY_LIMIT) in message  # gRPC's own words: the size and the limit
    code, message = failure(client.infer, MODEL, [uint8_input(pixels(65))])
    assert code == "StatusCode.RESOURCE_EXHAUSTED"
    assert "65 images in one request; the limit is 64" in message


def test_overload_is_unavailable_with_the_reason(server: Server) -> None:
    """More images than the pipeline may hold: refused at once, before decoding, as a load balancer or a
    retrying client reads it (the reason and a retry delay in the trailing metadata too)."""
    x = pixels(MAX_PENDING + 1)
    inp = service_pb2.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=list(x.shape))
    request = service_pb2.ModelInferRequest(model_name=MODEL, inputs=[inp], raw_input_contents=[x.tobytes()])
    with grpc.insecure_channel(server.grpc) as channel, pytest.raises(grpc.RpcError) as err:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "the server is overloaded" in (err.value.details() or "")
    trailers = dict(err.value.trailing_metadata() or ())
    assert trailers["deepvit-reason"] == "overloaded"
    assert int(trailers["retry-after"]) >= 1
    with server.client() as http:
        rejected = metric_samples(http.get("/metrics").text, "deepvit_rejected_requests_total")
    assert rejected['{reason="overloaded"}'] >= 1


def test_the_callers_deadline_bounds_the_call(client: tg.InferenceServerClient) -> None:
    code, _ = failure(client.infer, MODEL, [uint8_input(pixels(32))], client_timeout=0.001)
    assert code == "StatusCode.DEADLINE_EXCEEDED"


# -- shared pipeline and the repository --------------------------------------------------------------
def test_grpc_calls_count_in_the_shared_metrics(client: tg.InferenceServerClient, server: Server) -> None:
    def scrape() -> str:
        with server.client() as http:
            return http.get("/metrics").text

    before = scrape()
    client.infer(MODEL, [uint8_input(pixels(5))])
    failure(client.infer, "nope", [uint8_input(pixels(1))])
    after = scrape()
    key = f'{{model="{MODEL}"}}'
    images = metric_samples(after, "deepvit_images_total")[key] - metric_samples(before, "deepvit_images_total")[key]
    assert images == 5  # N images of one call are N batch items of the same batcher
    calls = metric_samples(after, "deepvit_grpc_requests_total")
    assert any('method="ModelInfer"' in k and 'code="OK"' in k for k in calls), calls
    assert any('code="NOT_FOUND"' in k for k in calls)


def test_repository_extension(client: tg.InferenceServerClient, reference: ort.InferenceSession) -> None:
    index = client.get_model_repository_index(as_json=True)["models"]
    assert index == [{"name": MODEL, "version": "1", "state": "READY"}]  # an empty reason is not written
    assert failure(client.load_model, "nope")[0] == "StatusCode.NOT_FOUND"
    code, message = failure(client.load_model, MODEL, config='{"backend": "onnxruntime"}')
    assert code == "StatusCode.INVALID_ARGUMENT"
    assert "config" in message
    client.unload_model(MODEL)
    assert not client.is_model_ready(MODEL)
    assert failure(client.infer, MODEL, [uint8_input(pixels(1))])[0] == "StatusCode.NOT_FOUND"
    client.load_model(MODEL)
    assert client.is_model_ready(MODEL)
    x = pixels(1, seed=3)
    got = client.infer(MODEL, [uint8_input(x)]).as_numpy("logits")
    np.testing.assert_allclose(got, reference.run(None, {"image": x})[0], rtol=1e-5, atol=1e-6)


def test_load_and_unload_need_repository_control(artifact: Path, tmp_path: Path) -> None:
    with running_server(artifact.parents[2], tmp_path / "server.log") as s, tg.InferenceServerClient(s.grpc) as c:
        code, message = failure(c.unload_model, MODEL)
        assert code == "StatusCode.PERMISSION_DENIED"
        assert "DEEPVIT_REPOSITORY_CONTROL=true" in message
        assert c.is_model_ready(MODEL)


def test_a_taken_port_stops_the_start_naming_the_setting(artifact: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="server exited with 1") as err:  # before HTTP listens
            start_server(artifact.parents[2], tmp_path / "server.log", {"DEEPVIT_GRPC_PORT": str(port)}, False)
    assert f"gRPC could not listen on 127.0.0.1:{port}" in str(err.value)
    assert "DEEPVIT_GRPC_PORT" in str(err.value)


def test_port_0_turns_grpc_off(artifact: Path, tmp_path: Path) -> None:
    server = start_server(artifact.parents[2], tmp_path / "server.log", {"DEEPVIT_GRPC_PORT": "0"})
    try:
        with server.client() as http:
            assert http.get("/readyz").status_code == 200
        assert "grpc_started" not in server.logs()
    finally:
        stop_server(server)
