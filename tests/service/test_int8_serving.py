"""An int8 artifact served end to end: a real ``deepvit serve`` process on loopback over the official tiny_cnn
weights, exported fp32 and int8 side by side, asked by a real HTTP client with the shipped photographs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from serving import DATA, Server, export_tiny, metric_samples, running_server

pytestmark = pytest.mark.integration

PHOTOS = sorted((DATA / "photos").glob("*.jpg"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    pytest.importorskip("torch", reason="exporting needs the train extra")
    repo = tmp_path_factory.mktemp("repo")
    export_tiny(repo, name="tiny")
    export_tiny(repo, name="tiny8", precision="int8")
    with running_server(repo, tmp_path_factory.mktemp("logs") / "server.log", {"DEEPVIT_DEFAULT_MODEL": "tiny"}) as s:
        yield s


def test_int8_answers_as_float32_does_on_photographs(server: Server) -> None:
    with server.client() as c:
        for photo in PHOTOS:
            body = photo.read_bytes()
            answers = [
                c.post("/classify", params={"model": m}, content=body, headers={"content-type": "image/jpeg"})
                for m in ("tiny", "tiny8")
            ]
            assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
            fp32, int8 = (a.json() for a in answers)
            assert int8["model"] == {"name": "tiny8", "version": 1}
            assert int8["predictions"][0]["label"] == fp32["predictions"][0]["label"], photo.name
            assert abs(int8["predictions"][0]["score"] - fp32["predictions"][0]["score"]) < 0.05


def test_models_shows_how_int8_was_made_and_what_it_costs(server: Server) -> None:
    with server.client() as c:
        models = {m["name"]: m for m in c.get("/models").json()["models"]}
        text = c.get("/metrics").text
    meta = models["tiny8"]["metadata"]
    assert meta["precision"] == "int8"
    assert meta["quantization"]["method"] == "dynamic"
    assert meta["quantization"]["speed"][0]["speedup"] > 0
    assert meta["accuracy"]["passed"] is True
    assert meta["accuracy"]["top1_agreement"] >= 0.99
    assert "mean_abs_prob_diff" in meta["accuracy"]
    fp32 = models["tiny"]["metadata"]
    assert (fp32["precision"], fp32["accuracy"], fp32["quantization"]) == ("fp32", None, None)
    info = metric_samples(text, "deepvit_model_info")
    assert info['{model="tiny8",precision="int8",provider="cpu",version="1",weights="ema"}'] == 1.0
