"""The live model repository with a real ``deepvit serve`` process polling its repository on loopback, under sustained
concurrent load from Triton's asyncio client (and ``/classify``): a new version taken into service, a changed file
reloaded, a removed version rolled back, a corrupt version ignored, the last version unloaded by request, each with
zero failed requests."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import json
import os
import shutil
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as th
import tritonclient.http.aio as aio
from serving import DATA, Server, export_tiny, metric_samples, running_server
from tritonclient.utils import InferenceServerException

from deepvit.service.config import Settings
from deepvit.service.metrics import Metrics
from deepvit.service.models.manager import ModelManager, ModelVersion

# -- a real server under load -------------------------------------------------------------------------
POLL_S = 0.2
MODELS = ("swap", "changed", "corrupt", "gone")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    artifact = export_tiny(root, name=MODELS[0])
    for name in MODELS[1:]:
        (root / name / "1").mkdir(parents=True)
        shutil.copy2(artifact, root / name / "1" / "model.onnx")
    return root


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {
        "DEEPVIT_REPOSITORY_POLL_S": str(POLL_S),
        "DEEPVIT_REPOSITORY_CONTROL": "true",
        "DEEPVIT_MAX_QUEUE_DELAY_MS": "2",
        "DEEPVIT_MAX_BATCH_SIZE": "16",
    }
    with running_server(repo, tmp_path_factory.mktemp("logs") / "server.log", env) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[th.InferenceServerClient]:
    c = th.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60)
    yield c
    c.close()


def place_version(repo: Path, model: str, version: int, source: Path | bytes) -> None:
    """Put a version into the repository the way a deployment should: whole, then renamed into place."""
    staging = repo / model / f".incoming-{version}"
    staging.mkdir()
    if isinstance(source, Path):
        shutil.copy2(source, staging / "model.onnx")
    else:
        (staging / "model.onnx").write_bytes(source)
    staging.rename(repo / model / str(version))


def eventually(check: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    end = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        time.sleep(0.05)


class Load:
    """Sustained concurrent load on one model, from a thread of its own: Triton's asyncio client over the
    protocol (binary tensors), and plain HTTP clients on /classify. Records which version answered each request
    and every failure; ``allowed`` statuses count as expected refusals rather than failures."""

    def __init__(self, url: str, model: str, v2_workers: int = 6, classify_workers: int = 2) -> None:
        self.url, self.model = url, model
        self.v2_workers, self.classify_workers = v2_workers, classify_workers
        self.allowed: set[int] = set()
        self.versions: list[str] = []  # in order of completion
        self.refused: collections.Counter[int] = collections.Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name=f"load-{model}")
        self._image = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
        self._jpeg = (DATA / "photos" / "chelsea.jpg").read_bytes()

    def __enter__(self) -> Load:
        self._thread.start()
        self.wait_for(lambda: len(self.versions) >= 20, "the load to get going")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def wait_for(self, check: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
        eventually(lambda: check() or bool(self.failures), what, timeout_s)
        assert not self.failures, self.failures[:5]

    def count(self, version: str) -> int:
        return self.versions.count(version)

    def _record(self, status: int, version: str, error: str) -> None:
        if status == 200:
            self.versions.append(version)
        elif status in self.allowed:
            self.refused[status] += 1
        else:
            self.failures.append(f"{status}: {error}")

    async def _run(self) -> None:
        triton = aio.InferenceServerClient(self.url.removeprefix("http://"))
        async with httpx.AsyncClient(base_url=self.url, timeout=60) as http:
            try:
                await asyncio.gather(
                    *(self._v2(triton) for _ in range(self.v2_workers)),
                    *(self._classify(http) for _ in range(self.classify_workers)),
                )
            finally:
                await triton.close()

    async def _v2(self, triton: aio.InferenceServerClient) -> None:
        inp = aio.InferInput("image", [1, 64, 64, 3], "UINT8")
        inp.set_data_from_numpy(self._image, binary_data=True)
        out = aio.InferRequestedOutput("logits", binary_data=True, class_count=1)
        while not self._stop.is_set():
            try:
                result = await triton.infer(self.model, [inp], outputs=[out])
                self._record(200, result.get_response()["model_version"], "")
            except InferenceServerException as exc:
                self._record(int(exc.status() or 0), "", str(exc.message()))
            except Exception as exc:  # a reset connection is a failure too
                self._record(0, "", repr(exc))

    async def _classify(self, http: httpx.AsyncClient) -> None:
        while not self._stop.is_set():
            try:
                r = await http.post(
                    f"/classify?model={self.model}", content=self._jpeg, headers={"content-type": "image/jpeg"}
                )
                self._record(r.status_code, str(r.json()["model"]["version"]) if r.status_code == 200 else "", r.text)
            except Exception as exc:
                self._record(0, "", repr(exc))


def index(client: th.InferenceServerClient, model: str) -> dict[str, tuple[str, str]]:
    return {e["version"]: (e["state"], e["reason"]) for e in client.get_model_repository_index() if e["name"] == model}


def events(server: Server, event: str, model: str) -> list[dict[str, object]]:
    out = []
    for line in server.logs().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("event") == event and record.get("model") == model:
                out.append(record)
    return out


def events_versions(server: Server) -> set[str]:
    return {str(e.get("version")) for e in events(server, "model_load_failed", "corrupt")}


def scrape(server: Server, metric: str) -> dict[str, float]:
    return metric_samples(httpx.get(server.url + "/metrics").text, metric)


def test_a_swap_lets_requests_on_the_old_session_finish_there_then_releases_it(repo: Path) -> None:
    """In process: requests that looked up the old session before a reload (and were still reading their
    bodies) are computed by it; the reload waits for them, closes the old batcher and lets the session go."""
    artifact = repo / "swap" / "1" / "model.onnx"
    image = np.zeros((64, 64, 3), np.uint8)

    async def scenario() -> None:
        settings = Settings(model_repository=repo, providers=["cpu"], max_batch_size=4)
        manager = ModelManager(settings, Metrics())
        old = await manager.load_version("swap", 1, artifact)
        manager.loaded = True
        session = weakref.ref(old.runtime.session)

        async def request() -> ModelVersion:
            with manager.lease("swap", None) as mv:
                await asyncio.sleep(0.05)  # still reading the body when the swap begins
                await mv.batcher.submit(image, time.monotonic() + 10)
                return mv

        requests = [asyncio.create_task(request()) for _ in range(40)]
        await asyncio.sleep(0.01)
        new = await manager.load_version("swap", 1, artifact)  # the same number: a changed file
        served_by = await asyncio.gather(*requests)
        assert all(mv is old for mv in served_by)
        assert manager.resolve("swap", None) is new
        del old, served_by, requests
        await asyncio.sleep(0.1)  # let the loop drop its last callbacks
        gc.collect()
        assert session() is None
        await manager.close()

    asyncio.run(scenario())


def test_queue_depth_is_the_sum_over_the_versions_of_a_model(repo: Path) -> None:
    """Two versions batch at once (latest:2 here; a swap's old and new sessions alike): deepvit_queue_depth{model}
    counts the images queued in both, and a version unloaded stops counting without hiding the other's."""
    artifact = repo / "swap" / "1" / "model.onnx"
    image = np.zeros((64, 64, 3), np.uint8)

    async def scenario() -> None:
        settings = Settings(
            model_repository=repo, providers=["cpu"], max_batch_size=8, max_queue_delay_ms=500, warmup=False
        )
        metrics = Metrics()
        manager = ModelManager(settings, metrics)
        v1 = await manager.load_version("swap", 1, artifact)
        v2 = await manager.load_version("swap", 2, artifact)
        manager.loaded = True

        def depth() -> float | None:
            return metrics.registry.get_sample_value("deepvit_queue_depth", {"model": "swap"})

        deadline = time.monotonic() + 10
        first = asyncio.create_task(v1.batcher.submit_many([image] * 3, deadline))
        second = asyncio.create_task(v2.batcher.submit_many([image] * 2, deadline))
        await asyncio.sleep(0.05)  # both queued, waiting for their batch windows
        assert depth() == 5
        await asyncio.gather(first, second)
        assert depth() == 0

        waiting = asyncio.create_task(v2.batcher.submit_many([image] * 2, time.monotonic() + 10))
        await asyncio.sleep(0.05)
        assert depth() == 2
        await manager.unload_version(v1)
        assert depth() == 2  # v1's last word does not hide v2's queue
        await waiting
        assert depth() == 0
        await manager.close()

    asyncio.run(scenario())


@pytest.mark.integration
def test_new_version_taken_into_service_under_load_then_rolled_back(
    server: Server, client: th.InferenceServerClient, repo: Path
) -> None:
    with Load(server.url, "swap") as load:
        place_version(repo, "swap", 2, repo / "swap" / "1" / "model.onnx")
        load.wait_for(lambda: load.count("2") >= 30, "version 2 to take the traffic")
        switched = len(load.versions)
        load.wait_for(lambda: len(load.versions) >= switched + 60, "more requests on version 2")
        assert set(load.versions[-40:]) == {"2"}  # once in service, it has all the traffic
        assert index(client, "swap") == {
            "1": ("UNAVAILABLE", "not selected by the version policy latest:1"),
            "2": ("READY", ""),
        }
        ready = scrape(server, "deepvit_model_ready")
        assert ready.get('{model="swap",version="2"}') == 1
        assert '{model="swap",version="1"}' not in ready  # unloaded: its series is gone

        # The new version's file removed: version 1 comes back (latest:1 of what is on disk), without a miss.
        before = len(load.versions)
        shutil.rmtree(repo / "swap" / "2")
        load.wait_for(lambda: load.versions[before:].count("1") >= 30, "version 1 to serve again")
    assert not load.failures, load.failures[:5]
    assert not load.refused
    assert index(client, "swap") == {"1": ("READY", "")}


@pytest.mark.integration
def test_changed_file_is_reloaded_under_load(server: Server, repo: Path) -> None:
    artifact = repo / "changed" / "1" / "model.onnx"
    with Load(server.url, "changed") as load:
        assert len(events(server, "model_ready", "changed")) == 1
        later = time.time() + 5
        os.utime(artifact, (later, later))  # same version number, a file that is new to the server
        load.wait_for(lambda: len(events(server, "model_ready", "changed")) == 2, "the changed file to be loaded")
        after = len(load.versions)
        load.wait_for(lambda: len(load.versions) >= after + 30, "requests on the reloaded session")
    assert not load.failures, load.failures[:5]
    assert not load.refused
    assert set(load.versions) == {"1"}
    assert scrape(server, "deepvit_model_ready").get('{model="changed",version="1"}') == 1


@pytest.mark.integration
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_version_disturbs_nothing(
    server: Server, client: th.InferenceServerClient, repo: Path, damage: str
) -> None:
    version = {"garbage": 2, "truncated": 3}[damage]
    good = (repo / "corrupt" / "1" / "model.onnx").read_bytes()
    bad = os.urandom(50_000) if damage == "garbage" else good[: len(good) // 2]
    failures_key = f'{{model="corrupt",version="{version}"}}'
    serving = client.get_model_metadata("corrupt")["parameters"]["version"]
    with Load(server.url, "corrupt") as load:
        place_version(repo, "corrupt", version, bad)
        eventually(lambda: str(version) in events_versions(server), "the failure to be logged")
        state, reason = index(client, "corrupt")[str(version)]
        assert state == "UNAVAILABLE"
        assert f"corrupt/{version}/model.onnx" in reason
        assert str(repo) not in reason  # paths relative to the repository
        assert scrape(server, "deepvit_model_load_failures_total")[failures_key] == 1
        assert scrape(server, "deepvit_model_ready")[failures_key] == 0  # what DeepvitModelNotReady watches
        before = len(load.versions)
        time.sleep(10 * POLL_S)  # polls go on: the same file is not tried again
        load.wait_for(lambda: len(load.versions) >= before + 30, "more requests")
    assert scrape(server, "deepvit_model_load_failures_total")[failures_key] == 1
    assert not load.failures, load.failures[:5]
    assert set(load.versions) == {serving}  # the version serving before still has all the traffic
    assert client.is_model_ready("corrupt")
    assert client.is_server_ready()

    # A repaired file under the same number is noticed and loaded.
    shutil.rmtree(repo / "corrupt" / str(version))
    place_version(repo, "corrupt", version, good)
    eventually(lambda: client.is_model_ready("corrupt", str(version)), "the repaired version to load")
    assert scrape(server, "deepvit_model_ready")[failures_key] == 1


@pytest.mark.integration
def test_unloading_the_last_version_gives_404_not_500(
    server: Server, client: th.InferenceServerClient, repo: Path
) -> None:
    with Load(server.url, "gone") as load:
        load.allowed = {404, 503}
        client.unload_model("gone")
        load.wait_for(lambda: load.refused[404] >= 20, "requests to be refused")
        # An answer the version gave before it went may still be on its way to a worker: every worker has
        # made a few more requests (each refused) once 80 more refusals are in.
        load.wait_for(lambda: load.refused[404] >= 100, "every worker to be refused")
        served_before = len(load.versions)
        assert not client.is_model_ready("gone")
        assert index(client, "gone") == {"1": ("UNAVAILABLE", "unloaded by request")}
        time.sleep(5 * POLL_S)  # polling leaves an unloaded model alone
        assert not client.is_model_ready("gone")
        assert len(load.versions) == served_before
        assert client.is_server_ready()  # the other models serve

        client.load_model("gone")
        assert client.is_model_ready("gone")
        load.wait_for(lambda: len(load.versions) >= served_before + 20, "requests to be served again")
    assert not load.failures, load.failures[:5]
    assert set(load.refused) <= {404, 503}
    with pytest.raises(InferenceServerException) as unknown:
        client.unload_model("nope")
    assert unknown.value.status() == "404"
