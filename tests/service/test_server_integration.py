"""A real ``deepvit serve`` process on loopback, serving a real exported DeepViT (the official tiny_cnn
weights), asked by a real HTTP client."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from serving import (
    DATA,
    ROOT,
    Server,
    export_tiny,
    metric_samples,
    running_server,
    start_server,
    stop_server,
)

pytestmark = pytest.mark.integration

PHOTOS = sorted((DATA / "photos").glob("*.jpg"))
MAX_BODY = 2 * 1024 * 1024
MAX_REQUEST_PIXELS = 2_000_000


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    export_tiny(root)
    return root


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    env = {
        "DEEPVIT_MAX_BODY_BYTES": str(MAX_BODY),
        "DEEPVIT_MAX_QUEUE_DELAY_MS": "20",
        "DEEPVIT_MAX_REQUEST_PIXELS": str(MAX_REQUEST_PIXELS),
        # Fixed, so that the batching test sees batches form: left unset, the warm-up may measure batch 1 as
        # the most efficient on this CPU (tests/service/test_batch_choice.py covers that choice).
        "DEEPVIT_MAX_BATCH_SIZE": "32",
    }
    with running_server(repo, log, env) as s:
        yield s


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# -- answers ---------------------------------------------------------------------------------------


def reference_top5(photo: Path) -> list[int]:
    """The reference pipeline: torchvision's eval transform and the PyTorch model with the same weights."""
    torch = pytest.importorskip("torch")
    from torchvision import transforms as T

    from deepvit.model.checkpoint import load_checkpoint
    from deepvit.model.config import DeepViTConfig
    from deepvit.model.net import DeepViT

    cfg = DeepViTConfig.from_json(DATA / "tiny_cnn.json")
    net = DeepViT(cfg).eval()
    load_checkpoint(net, DATA / "conformance" / "official_tiny_cnn.pth.tar", "ema", "tiny_cnn")
    tf = T.Compose(
        [
            T.Resize(int(cfg.img_size / 0.9), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(cfg.img_size),
            T.ToTensor(),
            T.Normalize((0.5,) * 3, (0.5,) * 3),
        ]
    )
    with torch.no_grad():
        logits = net(tf(Image.open(photo).convert("RGB")).unsqueeze(0))[0]
    probs = logits.softmax(-1)
    return [int(i) for i in probs.argsort(descending=True)[:5]]


@pytest.mark.parametrize("photo", PHOTOS, ids=lambda p: p.name)
def test_real_photos_get_the_reference_pipelines_answer(server: Server, photo: Path) -> None:
    with server.client() as c:
        r = c.post("/classify", content=photo.read_bytes(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == {"name": "tiny", "version": 1}
    preds = body["predictions"]
    assert [p["class_id"] for p in preds] == reference_top5(photo)
    scores = [p["score"] for p in preds]
    assert scores == sorted(scores, reverse=True)
    assert 0 < sum(scores) <= 1.0 + 1e-9
    assert preds[0]["label"] == f"class_{preds[0]['class_id']}"


def test_multipart_answers_in_the_order_of_the_parts(server: Server) -> None:
    files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in PHOTOS[:3]]
    with server.client() as c:
        r = c.post("/classify", files=files, params={"top_k": 2})
        single = [
            c.post("/classify", content=p.read_bytes(), headers={"content-type": "image/jpeg"}).json()
            for p in PHOTOS[:3]
        ]
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == [p.name for p in PHOTOS[:3]]
    for got, one in zip(results, single, strict=True):
        assert [p["class_id"] for p in got["predictions"]] == [p["class_id"] for p in one["predictions"][:2]]


def test_request_id_is_returned_and_logged(server: Server) -> None:
    with server.client() as c:
        r = c.post(
            "/classify",
            content=PHOTOS[0].read_bytes(),
            headers={"content-type": "image/jpeg", "x-request-id": "trace-abc-123"},
        )
        generated = c.get("/livez").headers["x-request-id"]
    assert r.headers["x-request-id"] == "trace-abc-123"
    assert len(generated) == 32
    time.sleep(0.2)
    lines = [json.loads(line) for line in server.logs().splitlines() if line.startswith("{")]
    mine = [x for x in lines if x.get("request_id") == "trace-abc-123"]
    assert len(mine) == 1
    entry = mine[0]
    assert entry["route"] == "/classify"
    assert entry["status"] == 200
    assert entry["model"] == "tiny"
    assert entry["version"] == 1
    assert entry["batch_size"] >= 1
    assert entry["latency_ms"] > 0


def test_models_endpoint_and_metrics_expose_provider_and_weights(server: Server) -> None:
    with server.client() as c:
        models = c.get("/models").json()
        text = c.get("/metrics").text
    assert models["default_model"] == "tiny"
    meta = models["models"][0]["metadata"]
    assert meta["weights"] == "ema"
    assert meta["untrained"] is False
    info = metric_samples(text, "deepvit_model_info")
    engine = models["models"][0]["engine"]["name"]  # the CPU engine the warm-up measured fastest
    provider = "openvino" if engine.startswith("openvino") else "cpu"
    assert info == {f'{{model="tiny",precision="fp32",provider="{provider}",version="1",weights="ema"}}': 1.0}
    assert metric_samples(text, "deepvit_model_ready") == {'{model="tiny",version="1"}': 1.0}


# -- bad input: a clear JSON error, the right status, and the server unharmed ----------------------


def _png_claiming(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 49)) + chunk(b"IEND", b"")


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.jpg", PHOTOS[0].read_bytes())
    return buf.getvalue()


JPEG = "image/jpeg"
BAD_INPUTS = [
    # (id, params, body, content type, status, words the error must contain)
    ("empty body", {}, b"", JPEG, 400, "empty"),
    ("text as image", {}, b"just some text", JPEG, 400, "not an image"),
    ("zip as image", {}, "zip", "image/png", 400, "not an image"),
    ("truncated jpeg", {}, "truncated", JPEG, 400, "truncated"),
    ("png bomb", {}, "bomb", "image/png", 413, "pixels"),
    ("oversized body", {}, b"\xff" * (MAX_BODY + 1), JPEG, 413, "limit"),
    ("wrong content type", {}, "photo", "text/plain", 415, "content type"),
    ("json content type", {}, b"{}", "application/json", 415, "image/jpeg"),
    ("top_k 0", {"top_k": "0"}, "photo", JPEG, 400, "top_k"),
    ("top_k -1", {"top_k": "-1"}, "photo", JPEG, 400, "top_k"),
    ("top_k abc", {"top_k": "abc"}, "photo", JPEG, 400, "top_k"),
    ("top_k over classes", {"top_k": "8"}, "photo", JPEG, 400, "7 classes"),
    ("unknown model", {"model": "nope"}, "photo", JPEG, 404, "unknown model"),
    ("unknown version", {"version": "9"}, "photo", JPEG, 404, "no version 9"),
    ("version abc", {"version": "abc"}, "photo", JPEG, 400, "version"),
]


def _body(spec: bytes | str) -> bytes:
    if isinstance(spec, bytes):
        return spec
    photo = PHOTOS[0].read_bytes()
    return {
        "zip": _zip(),
        "truncated": photo[: len(photo) // 2],
        "bomb": _png_claiming(30000, 30000),
        "photo": photo,
    }[spec]


@pytest.mark.parametrize(
    ("case", "params", "body", "ctype", "status", "words"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_input_gets_a_clear_error(
    server: Server, case: str, params: dict[str, str], body: bytes | str, ctype: str, status: int, words: str
) -> None:
    with server.client() as c:
        r = c.post("/classify", params=params, content=_body(body), headers={"content-type": ctype})
        assert r.status_code == status, r.text
        assert r.headers["content-type"] == "application/json"
        assert words in r.json()["error"]
        # ... and the server is unharmed: the next good request is answered.
        ok = c.post("/classify", content=PHOTOS[0].read_bytes(), headers={"content-type": JPEG})
        assert ok.status_code == 200


def test_multipart_without_file_parts_is_400(server: Server) -> None:
    with server.client() as c:
        r = c.post("/classify", data={"note": "hello"}, files={"image": ("x.jpg", PHOTOS[0].read_bytes(), JPEG)})
        assert r.status_code == 400
        assert "'file'" in r.json()["error"]
        r = c.post("/classify", content=b"--x--\r\n", headers={"content-type": "multipart/form-data; boundary=x"})
        assert r.status_code == 400
        assert "file" in r.json()["error"]


def test_a_malformed_multipart_body_is_400(server: Server) -> None:
    garbled = b'--x\r\nContent\x01Disposition: form-data; name="file"\r\n\r\nabc\r\n--x--\r\n'
    with server.client() as c:
        for body, ctype in [(garbled, "multipart/form-data; boundary=x"), (b"abc", "multipart/form-data")]:
            r = c.post("/classify", content=body, headers={"content-type": ctype})
            assert r.status_code == 400, r.text
            assert "multipart" in r.json()["error"]


def test_images_over_the_pixel_budget_of_a_request_are_413_before_decoding(server: Server) -> None:
    # Each 1000 x 1000 image is far under the per-image limit; three of them are over the request's budget.
    png = io.BytesIO()
    Image.new("RGB", (1000, 1000), (90, 140, 200)).save(png, format="PNG")
    files = [("file", (f"{i}.png", png.getvalue(), "image/png")) for i in range(3)]
    with server.client() as c:
        r = c.post("/classify", files=files)
        assert r.status_code == 413, r.text
        assert f"{MAX_REQUEST_PIXELS:,} pixels in all" in r.json()["error"]
        assert c.post("/classify", files=files[:2]).status_code == 200


def test_one_bad_part_names_the_part(server: Server) -> None:
    files = [("file", ("good.jpg", PHOTOS[0].read_bytes(), JPEG)), ("file", ("bad.jpg", b"nope", JPEG))]
    with server.client() as c:
        r = c.post("/classify", files=files)
    assert r.status_code == 400
    assert "bad.jpg" in r.json()["error"]


def test_a_body_over_the_limit_without_content_length_is_413(server: Server) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(5):
            yield b"\0" * (MAX_BODY // 2)

    with server.client() as c:
        r = c.post("/classify", content=chunks(), headers={"content-type": JPEG})
    assert r.status_code == 413
    assert "limit" in r.json()["error"]
    assert r.headers["connection"] == "close"  # the rest of the body is not read: the connection goes


def test_unknown_route_and_method_are_json(server: Server) -> None:
    with server.client() as c:
        r = c.get("/nope")
        assert r.status_code == 404
        assert "/nope" in r.json()["error"]
        r = c.get("/classify")
        assert r.status_code == 405
        assert "GET" in r.json()["error"]


# -- batching --------------------------------------------------------------------------------------


def test_64_concurrent_clients_are_visibly_batched(server: Server) -> None:
    photo = PHOTOS[0].read_bytes()

    async def load() -> list[int]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60) as c:

            async def one() -> int:
                r = await c.post("/classify", content=photo, headers={"content-type": JPEG})
                return r.status_code

            return await asyncio.gather(*(one() for _ in range(64 * 3)))

    with server.client() as c:
        before = metric_samples(c.get("/metrics").text, "deepvit_batch_size_bucket")
    statuses = asyncio.run(load())
    assert statuses == [200] * len(statuses)
    with server.client() as c:
        after = metric_samples(c.get("/metrics").text, "deepvit_batch_size_bucket")
    ones = after['{le="1.0",model="tiny"}'] - before.get('{le="1.0",model="tiny"}', 0)
    total = after['{le="+Inf",model="tiny"}'] - before.get('{le="+Inf",model="tiny"}', 0)
    assert total < 64 * 3, "every image ran in a batch of its own"
    assert ones < total, "no batch larger than one"


# -- the Prometheus exposition ---------------------------------------------------------------------


def test_promtool_accepts_the_metrics(server: Server, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing in CI: install Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    with server.client() as c:
        c.post("/classify", content=PHOTOS[0].read_bytes(), headers={"content-type": JPEG})
        text = c.get("/metrics").text
    for name in (
        "deepvit_http_requests_total",
        "deepvit_request_duration_seconds_bucket",
        "deepvit_preprocess_seconds_bucket",
        "deepvit_queue_wait_seconds_bucket",
        "deepvit_inference_seconds_bucket",
        "deepvit_batch_size_bucket",
        "deepvit_queue_depth",
        "deepvit_inflight_requests",
        "deepvit_images_total",
        "deepvit_rejected_requests_total",
        "deepvit_model_ready",
        "deepvit_model_info",
    ):
        assert f"\n{name}" in text, name
    r = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()


# -- life cycle ------------------------------------------------------------------------------------


def test_readyz_is_503_until_models_are_warmed_then_200(repo: Path, tmp_path: Path) -> None:
    # A large warm-up (batch sizes up to 512) makes the loading window long enough to see.
    env = {"DEEPVIT_MAX_BATCH_SIZE": "512", "DEEPVIT_MAX_QUEUE_SIZE": "512"}
    server = start_server(repo, tmp_path / "log", env, wait_ready=False)
    try:
        seen = []
        end = time.monotonic() + 120
        while time.monotonic() < end:
            r = httpx.get(server.url + "/readyz", timeout=5)
            seen.append(r.status_code)
            if r.status_code == 200:
                break
            assert r.status_code == 503
            assert r.headers["retry-after"] == "1"
            assert "loading" in r.json()["error"]
            time.sleep(0.01)
        assert seen[0] == 503
        assert seen[-1] == 200
        # Classification before ready would have been a 503 too; after, it works.
        r = httpx.post(server.url + "/classify", content=PHOTOS[0].read_bytes(), headers={"content-type": JPEG})
        assert r.status_code == 200
    finally:
        assert stop_server(server) == 0


def test_sigterm_under_load_answers_every_accepted_request(repo: Path, tmp_path: Path) -> None:
    env = {"DEEPVIT_MAX_QUEUE_DELAY_MS": "30", "DEEPVIT_GRACE_PERIOD_S": "20"}
    server = start_server(repo, tmp_path / "log", env)
    photo = PHOTOS[0].read_bytes()
    outcomes: list[str] = []

    async def load(stop_at: float) -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:

            async def worker() -> None:
                while time.monotonic() < stop_at:
                    try:
                        r = await c.post("/classify", content=photo, headers={"content-type": JPEG})
                    except httpx.ConnectError:
                        outcomes.append("refused")  # the process is gone: nothing was accepted
                        return
                    except httpx.TransportError as exc:
                        outcomes.append(f"broken: {exc!r}")  # an accepted request was dropped
                        return
                    if r.status_code == 200:
                        outcomes.append("ok")
                    elif r.status_code == 503 and r.headers.get("retry-after"):
                        outcomes.append("503")
                    else:
                        outcomes.append(f"status {r.status_code}: {r.text}")

            await asyncio.gather(*(worker() for _ in range(16)))

    async def scenario() -> None:
        task = asyncio.create_task(load(time.monotonic() + 6))
        await asyncio.sleep(1.5)
        server.terminate()
        await task

    asyncio.run(scenario())
    code = server.proc.wait(30)
    assert code == 0, server.logs()[-2000:]
    bad = [o for o in outcomes if o not in ("ok", "503", "refused")]
    assert not bad, bad[:5]
    assert outcomes.count("ok") > 16
    assert "503" in outcomes, "no request arrived during the drain"
    logs = server.logs()
    assert "drain_started" in logs
    assert "drain_done" in logs


def test_sigterm_during_the_warm_up_exits_0_without_finishing_it(tmp_path: Path) -> None:
    # A 224 px model warmed up to batch 512 takes many seconds on a CPU; a pod terminated meanwhile must
    # not wait for a warm-up whose model will never serve (it would outlive its grace period).
    from serving import export_artifact

    repo = tmp_path / "repo"
    config = ROOT / "bench" / "deepvit_small_224.json"
    export_artifact(repo / "small" / "1" / "model.onnx", "--model-config", str(config), "--random-init")
    env = {"DEEPVIT_MAX_BATCH_SIZE": "512", "DEEPVIT_MAX_QUEUE_SIZE": "1024", "DEEPVIT_GRACE_PERIOD_S": "20"}
    server = start_server(repo, tmp_path / "log", env, wait_ready=False)
    with httpx.Client(base_url=server.url, timeout=5) as c:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if c.get("/livez").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        if c.get("/readyz").status_code == 200:
            server.terminate()
            server.proc.wait(30)
            pytest.skip("this machine warmed the model up before the signal could be sent")
    server.terminate()
    started = time.monotonic()
    code = server.proc.wait(30)
    elapsed = time.monotonic() - started
    assert code == 0, server.logs()[-2000:]
    assert "load_cancelled" in server.logs()
    assert "model_ready" not in server.logs()
    assert elapsed < 20, f"{elapsed:.1f}s from SIGTERM to exit: past the grace period"


def test_untrained_default_is_reported_everywhere(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    from serving import export_artifact

    export_artifact(
        repo / "rand" / "1" / "model.onnx", "--model-config", str(DATA / "tiny_patch.json"), "--random-init"
    )
    with running_server(repo, tmp_path / "log") as s, s.client() as c:
        meta = c.get("/models").json()["models"][0]["metadata"]
        text = c.get("/metrics").text
    assert meta["untrained"] is True
    assert meta["weights"] == "random_init"
    assert 'weights="random_init"' in next(iter(metric_samples(text, "deepvit_model_info")))
    assert "UNTRAINED" in s.logs()


def test_require_gpu_without_a_gpu_exits_non_zero_with_the_reason(repo: Path, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers() and Path("/dev/nvidia0").exists():
        pytest.skip("a GPU is present: the fallback cannot be provoked here")
    log = tmp_path / "log"
    env = {"DEEPVIT_PROVIDERS": "cuda,cpu", "DEEPVIT_REQUIRE_GPU": "true"}
    server = start_server(repo, log, env, wait_ready=False)
    code = server.proc.wait(60)
    assert code != 0
    assert "DEEPVIT_REQUIRE_GPU" in server.logs()


def test_an_empty_repository_refuses_to_start(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "deepvit.cli", "serve", "--model-repository", str(tmp_path / "empty")],
        capture_output=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert b"holds no" in r.stderr
    assert b"deepvit export" in r.stderr


def test_invalid_settings_exit_2_naming_the_variable(repo: Path, tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "deepvit.cli", "serve", "--model-repository", str(repo)],
        env={**os.environ, "DEEPVIT_MAX_BATCH_SIZE": "zero"},
        capture_output=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert b"MAX_BATCH_SIZE" in r.stderr


def test_an_fp16_artifact_loads_and_agrees_with_fp32(repo: Path, tmp_path: Path) -> None:
    fp16_repo = tmp_path / "repo"
    export_tiny(fp16_repo, precision="fp16")
    with running_server(fp16_repo, tmp_path / "log") as s, s.client() as c:
        info = metric_samples(c.get("/metrics").text, "deepvit_model_info")
        answers = [c.post("/classify", content=p.read_bytes(), headers={"content-type": JPEG}).json() for p in PHOTOS]
    assert 'precision="fp16"' in next(iter(info))
    for photo, answer in zip(PHOTOS, answers, strict=True):
        assert answer["predictions"][0]["class_id"] == reference_top5(photo)[0], photo.name
