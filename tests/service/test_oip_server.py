"""The Open Inference Protocol against a real ``deepvit serve`` process on loopback, spoken by Triton's published
Python client (``tritonclient[http]``): health, metadata, inference with JSON and binary tensors both ways, the
classification extension, encoded images, errors; answers equal to running the artifact directly."""

from __future__ import annotations

import base64
import gzip
import json
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as th
from serving import DATA, Server, export_tiny, metric_samples, running_server
from tritonclient.utils import InferenceServerException

from deepvit.artifact.pixels import ImageLimits, preprocess
from deepvit.artifact.session import read_metadata

pytestmark = pytest.mark.integration

PHOTOS = sorted((DATA / "photos").glob("*.jpg"))[:3]
MODEL = "tiny"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("repo"), name=MODEL)


@pytest.fixture(scope="module")
def server(artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    repo = artifact.parents[2]
    env = {"DEEPVIT_MAX_QUEUE_DELAY_MS": "1", "DEEPVIT_REPOSITORY_CONTROL": "true"}
    with running_server(repo, tmp_path_factory.mktemp("logs") / "server.log", env) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[th.InferenceServerClient]:
    c = th.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=30)
    yield c
    c.close()


@pytest.fixture(scope="module")
def reference(artifact: Path) -> ort.InferenceSession:
    """The artifact run directly, as a user of the file would."""
    return ort.InferenceSession(str(artifact), providers=["CPUExecutionProvider"])


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


def uint8_input(x: np.ndarray, binary: bool) -> th.InferInput:
    inp = th.InferInput("image", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


def parse_classes(strings: np.ndarray) -> list[list[tuple[float, int, str]]]:
    rows = []
    for row in strings:
        parts = [(s.decode() if isinstance(s, bytes) else str(s)).split(":", 2) for s in row]
        rows.append([(float(score), int(index), label) for score, index, label in parts])
    return rows


# -- health and metadata ------------------------------------------------------------------------------
def test_live_ready_and_server_metadata(client: th.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "deepvit-serve"
    assert {"binary_tensor_data", "classification", "model_repository"} <= set(meta["extensions"])


def test_model_metadata(client: th.InferenceServerClient) -> None:
    meta = client.get_model_metadata(MODEL)
    assert meta["name"] == MODEL
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, 64, 64, 3]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 7]}]
    assert client.get_model_metadata(MODEL, "1")["inputs"] == meta["inputs"]
    params = meta["parameters"]
    assert not [k for k, v in params.items() if isinstance(v, (dict, list))]  # the protocol's flat parameters
    assert params["preprocessing_crop_size"] == 64
    assert "TIFF" not in params["encoded_image_input"]
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("nope")
    assert unknown.value.status() == "404"
    with pytest.raises(InferenceServerException) as no_version:
        client.get_model_metadata(MODEL, "9")
    assert no_version.value.status() == "404"


def test_model_ready(client: th.InferenceServerClient, server: Server) -> None:
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready(MODEL, "2")
    assert not client.is_model_ready("nope")
    with server.client() as http:
        r = http.get("/v2/models/nope/ready")
        assert r.status_code == 404
        assert "unknown model 'nope'" in r.json()["error"]
        assert http.get(f"/v2/models/{MODEL}/versions/0/ready").status_code == 400


# -- inference ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("binary_in", [False, True], ids=["json-in", "binary-in"])
@pytest.mark.parametrize("binary_out", [False, True], ids=["json-out", "binary-out"])
def test_infer_equals_the_artifact_run_directly(
    client: th.InferenceServerClient, reference: ort.InferenceSession, binary_in: bool, binary_out: bool
) -> None:
    x = pixels(3, seed=int(binary_in) + 2 * int(binary_out))
    result = client.infer(
        MODEL, [uint8_input(x, binary_in)], outputs=[th.InferRequestedOutput("logits", binary_data=binary_out)]
    )
    got = result.as_numpy("logits")
    want = reference.run(None, {"image": x})[0]
    assert got is not None
    assert got.dtype == np.float32
    assert got.shape == (3, 7)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert result.get_response()["model_version"] == "1"


def test_infer_without_outputs_answers_every_output_in_binary(client: th.InferenceServerClient) -> None:
    result = client.infer(MODEL, [uint8_input(pixels(2), True)], model_version="1")
    assert result.get_output("logits")["parameters"]["binary_data_size"] == 2 * 7 * 4
    assert result.as_numpy("logits").shape == (2, 7)


@pytest.mark.parametrize("binary_out", [False, True], ids=["json-out", "binary-out"])
def test_classification_extension(
    client: th.InferenceServerClient, reference: ort.InferenceSession, artifact: Path, binary_out: bool
) -> None:
    x = pixels(4, seed=7)
    out = th.InferRequestedOutput("logits", binary_data=binary_out, class_count=3)
    got = client.infer(MODEL, [uint8_input(x, True)], outputs=[out]).as_numpy("logits")
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
    client: th.InferenceServerClient, server: Server, reference: ort.InferenceSession, artifact: Path
) -> None:
    blobs = [p.read_bytes() for p in PHOTOS]
    inp = th.InferInput("image", [len(blobs)], "BYTES")
    inp.set_data_from_numpy(np.array(blobs, dtype=np.object_), binary_data=True)
    outputs = [th.InferRequestedOutput("logits", binary_data=True)]
    got = client.infer(MODEL, [inp], outputs=outputs).as_numpy("logits")
    spec = read_metadata(artifact).preprocess
    crops = np.stack([preprocess(b, spec, ImageLimits(40_000_000)) for b in blobs])
    np.testing.assert_allclose(got, reference.run(None, {"image": crops})[0], rtol=1e-5, atol=1e-6)

    # The same photo through /classify and through v2's classification extension: the same answer.
    with server.client() as http:
        classify = http.post("/classify?top_k=3", content=blobs[0], headers={"content-type": "image/jpeg"}).json()
        data = [base64.b64encode(blobs[0]).decode()]  # JSON carries encoded images as base64
        body = {
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1], "data": data}],
            "outputs": [{"name": "logits", "parameters": {"classification": 3, "classification_score": "probability"}}],
        }
        v2 = http.post(f"/v2/models/{MODEL}/infer", json=body)
    assert v2.status_code == 200, v2.text
    assert v2.headers["content-type"] == "application/json"
    classes = parse_classes(np.array(v2.json()["outputs"][0]["data"]).reshape(1, 3))[0]
    assert [i for _, i, _ in classes] == [p["class_id"] for p in classify["predictions"]]
    assert [label for _, _, label in classes] == [p["label"] for p in classify["predictions"]]
    for (score, _, _), p in zip(classes, classify["predictions"], strict=True):
        assert score == pytest.approx(p["score"], rel=1e-5)


# -- errors -------------------------------------------------------------------------------------------
def _status(client: th.InferenceServerClient, model: str, inp: th.InferInput, version: str = "") -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, [inp], model_version=version)
    return str(err.value.status()), str(err.value.message())


def test_protocol_errors(client: th.InferenceServerClient) -> None:
    wrong_name = th.InferInput("pixels", [1, 64, 64, 3], "UINT8")
    wrong_name.set_data_from_numpy(pixels(1))
    assert _status(client, MODEL, wrong_name) == ("400", "unknown input 'pixels'; the model's input is 'image'")

    wrong_type = th.InferInput("image", [1, 64, 64, 3], "FP32")
    wrong_type.set_data_from_numpy(pixels(1).astype(np.float32))
    status, message = _status(client, MODEL, wrong_type)
    assert status == "400"
    assert "is FP32" in message
    assert "UINT8 [-1, 64, 64, 3]" in message

    wrong_shape = uint8_input(np.zeros((1, 32, 32, 3), np.uint8), True)
    assert _status(client, MODEL, wrong_shape)[0] == "400"
    assert _status(client, "nope", uint8_input(pixels(1), True))[0] == "404"
    assert _status(client, MODEL, uint8_input(pixels(1), True), version="9")[0] == "404"

    not_an_image = th.InferInput("image", [1], "BYTES")
    not_an_image.set_data_from_numpy(np.array([b"PK\x03\x04 a zip"], dtype=np.object_))
    status, message = _status(client, MODEL, not_an_image)
    assert status == "400"
    assert "not an image" in message


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b"{not json", {}),
        (json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 64, 64, 3]}]}).encode(), {}),
        (b'{"inputs": []}', {"inference-header-content-length": "999"}),
        (b'{"inputs": []}xx', {"inference-header-content-length": "14"}),
    ],
    ids=["malformed-json", "no-data", "header-length-past-body", "stray-binary"],
)
def test_malformed_requests_are_400_json(server: Server, body: bytes, headers: dict[str, str]) -> None:
    with server.client() as http:
        r = http.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers)
    assert r.status_code == 400
    assert r.json()["error"]


def test_gzip_request_bodies(client: th.InferenceServerClient, reference: ort.InferenceSession) -> None:
    x = pixels(1, seed=11)
    result = client.infer(MODEL, [uint8_input(x, True)], request_compression_algorithm="gzip")
    np.testing.assert_allclose(result.as_numpy("logits"), reference.run(None, {"image": x})[0], rtol=1e-5, atol=1e-6)


# -- shared pipeline ----------------------------------------------------------------------------------
def test_v2_requests_count_in_the_shared_metrics(client: th.InferenceServerClient, server: Server) -> None:
    def scrape() -> str:
        with server.client() as http:
            return http.get("/metrics").text

    before = scrape()
    client.infer(MODEL, [uint8_input(pixels(5), True)])
    after = scrape()
    key = f'{{model="{MODEL}"}}'
    images = metric_samples(after, "deepvit_images_total")[key] - metric_samples(before, "deepvit_images_total")[key]
    assert images == 5  # N images of one request are N batch items
    requests = metric_samples(after, "deepvit_http_requests_total")
    assert any('route="/v2/models/{name}/infer"' in k and 'status="200"' in k for k in requests)
    assert (
        metric_samples(after, "deepvit_batch_size_count")[key] > metric_samples(before, "deepvit_batch_size_count")[key]
    )


def test_repository_index_and_load_errors(client: th.InferenceServerClient, server: Server) -> None:
    assert client.get_model_repository_index() == [{"name": MODEL, "version": "1", "state": "READY", "reason": ""}]
    with pytest.raises(InferenceServerException) as unknown:
        client.load_model("nope")
    assert unknown.value.status() == "404"
    with pytest.raises(InferenceServerException) as config:
        client.load_model(MODEL, config=json.dumps({"backend": "onnxruntime"}))
    assert config.value.status() == "400"
    client.load_model(MODEL)  # nothing changed: a no-op that succeeds
    assert client.is_model_ready(MODEL)
    with httpx.Client(base_url=server.url) as http:
        assert http.post("/v2/repository/index", json={"ready": True}).json()[0]["state"] == "READY"


# -- decoding off the event loop, bounded; leases around the inference only -----------------------------
def test_a_gzip_bomb_is_413_without_blocking_the_event_loop(server: Server) -> None:
    """A few kB of gzip that inflate to 20 MiB of JSON tensors: refused at the JSON limit, decoded in the
    decode pool two at a time, while the liveness probe keeps answering at once."""
    head = b'{"inputs":[{"name":"image","datatype":"UINT8","shape":[%d,64,64,3],"data":['
    bombs = [gzip.compress(head % n + b"0," * (10 * 1024 * 1024) + b"0]}]}") for n in (1000000, 2)]
    assert all(len(b) < 100_000 for b in bombs)
    statuses: list[int] = []

    def send(body: bytes) -> None:
        with server.client() as http:
            r = http.post(f"/v2/models/{MODEL}/infer", content=body, headers={"Content-Encoding": "gzip"})
            statuses.append(r.status_code)
            assert "limit" in r.json()["error"]

    threads = [threading.Thread(target=send, args=(bombs[i % 2],)) for i in range(8)]
    probes: list[float] = []
    with server.client() as http:
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            t0 = time.monotonic()
            assert http.get("/v2/health/live").status_code == 200
            probes.append(time.monotonic() - t0)
            time.sleep(0.01)
    for t in threads:
        t.join()
    assert statuses == [413] * 8
    assert statistics.median(probes) < 0.2, probes


def test_ready_answers_the_protocol_body(server: Server) -> None:
    with server.client() as http:
        r = http.get("/v2/health/ready")
    assert r.status_code == 200
    assert r.json()["ready"] is True


def test_a_slow_upload_holds_up_no_unload_and_is_served_by_the_reloaded_version(
    client: th.InferenceServerClient, server: Server, reference: ort.InferenceSession
) -> None:
    """The version is leased around the inference only: an unload does not wait for a body still arriving
    (it used to, for up to DEEPVIT_REQUEST_TIMEOUT_S), and the request is computed by the version serving
    under its name once its body is in. With repository control on, no model loaded is still ready."""
    x = pixels(1, seed=21)
    body, header_length = th.InferenceServerClient.generate_request_body([uint8_input(x, True)])
    answer: list[httpx.Response] = []

    started, reloaded = threading.Event(), threading.Event()

    def chunks() -> Iterator[bytes]:
        yield body[:10]
        started.set()
        reloaded.wait(60)  # the rest of the body once the model has been unloaded and loaded again
        yield body[10:]

    def upload() -> None:
        with server.client() as http:
            headers = {"Inference-Header-Content-Length": str(header_length), "Content-Length": str(len(body))}
            answer.append(http.post(f"/v2/models/{MODEL}/infer", content=chunks(), headers=headers))

    slow = threading.Thread(target=upload)
    slow.start()
    assert started.wait(30)
    t0 = time.monotonic()
    client.unload_model(MODEL)
    assert time.monotonic() - t0 < 2
    with server.client() as http:
        ready = http.get("/v2/health/ready")
        assert (ready.status_code, ready.json()["ready"]) == (200, True)  # explicit mode: nothing loaded is ready
        assert http.get("/readyz").status_code == 200  # the one readiness: every surface says the same
    client.load_model(MODEL)
    reloaded.set()
    slow.join()
    assert answer[0].status_code == 200, answer[0].text
    length = answer[0].headers.get("Inference-Header-Content-Length")
    got = th.InferResult.from_response_body(answer[0].content, header_length=length and int(length)).as_numpy("logits")
    np.testing.assert_allclose(got, reference.run(None, {"image": x})[0], rtol=1e-5, atol=1e-6)
