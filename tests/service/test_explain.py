"""``POST /explain`` and the v2 ``attention`` output, in process over the official tiny_cnn exported with
``--explain``: the same pipeline and answers as ``/classify``, plus the attention the artifact computes and
its heat map over the crop the model saw; a model without the output is a 409 that names the re-export."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from inprocess import InProcessApp, grey_png, v2_bytes_request
from PIL import Image

from deepvit.artifact import heatmap
from deepvit.artifact.pixels import ImageLimits, preprocess
from deepvit.artifact.session import open_session, read_metadata

PHOTOS = sorted((Path(__file__).parents[1] / "data" / "photos").glob("*.jpg"))
JPEG = {"content-type": "image/jpeg"}


def direct(artifact: Path, data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The crop, logits and attention of running the artifact itself on one encoded image."""
    meta = read_metadata(artifact)
    crop = preprocess(data, meta.preprocess, ImageLimits(50_000_000, 50.0))
    logits, attention = open_session(artifact).run(None, {"image": crop[None]})
    return crop, logits[0], attention[0]


def serve(app: InProcessApp, *requests: tuple[str, str, dict[str, Any]]) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        async with app.serving() as (client, _):
            return [await client.request(method, url, **kw) for method, url, kw in requests]

    return asyncio.run(run())


def png_pixels(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    return np.asarray(img.convert("RGB"))


def test_explain_answers_classify_s_predictions_with_the_artifacts_attention_and_an_overlay(
    explain_app: InProcessApp,
) -> None:
    data = PHOTOS[0].read_bytes()
    explained, classified = serve(
        explain_app,
        ("POST", "/explain?top_k=3", {"content": data, "headers": JPEG}),
        ("POST", "/classify?top_k=3", {"content": data, "headers": JPEG}),
    )
    assert explained.status_code == 200, explained.text
    body = explained.json()
    assert body["model"] == {"name": "tiny", "version": 1}
    assert body["predictions"] == classified.json()["predictions"]
    crop, _, attention = direct(explain_app.artifact, data)
    assert body["attention"]["grid"] == 4  # 64 px, 16 px patches
    np.testing.assert_allclose(body["attention"]["values"], attention, atol=1e-6)
    assert sum(body["attention"]["values"]) == pytest.approx(1.0, abs=1e-5)
    overlay = png_pixels(base64.b64decode(body["overlay_png"]))
    assert overlay.shape == crop.shape  # drawn over the centre crop the model saw, as deepvit explain draws it
    np.testing.assert_allclose(overlay, heatmap.overlay(crop, attention, 4), atol=1)


def test_multipart_explains_every_part_in_order(explain_app: InProcessApp) -> None:
    files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in PHOTOS[:3]]
    (r,) = serve(explain_app, ("POST", "/explain?top_k=1", {"files": files}))
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == [p.name for p in PHOTOS[:3]]
    for path, x in zip(PHOTOS[:3], results, strict=True):
        _, logits, attention = direct(explain_app.artifact, path.read_bytes())
        assert x["predictions"][0]["class_id"] == int(logits.argmax())
        np.testing.assert_allclose(x["attention"]["values"], attention, atol=1e-6)
        assert png_pixels(base64.b64decode(x["overlay_png"])).shape == (64, 64, 3)


def test_accept_png_answers_the_overlay_itself_for_one_image_and_406_for_several(explain_app: InProcessApp) -> None:
    data = PHOTOS[1].read_bytes()
    files = [("file", ("a.jpg", data, "image/jpeg")), ("file", ("b.jpg", data, "image/jpeg"))]
    one, many = serve(
        explain_app,
        ("POST", "/explain", {"content": data, "headers": {**JPEG, "accept": "image/png"}}),
        ("POST", "/explain", {"files": files, "headers": {"accept": "image/png"}}),
    )
    assert one.status_code == 200
    assert one.headers["content-type"] == "image/png"
    assert png_pixels(one.content).shape == (64, 64, 3)
    assert one.headers["x-model-name"] == "tiny"
    assert one.headers["x-model-version"] == "1"
    assert many.status_code == 406
    assert "application/json" in many.json()["error"]


def test_a_model_without_the_attention_output_is_a_409_naming_the_re_export(tiny_app: InProcessApp) -> None:
    explain, v2 = serve(
        tiny_app,
        ("POST", "/explain", {"content": grey_png(), "headers": {"content-type": "image/png"}}),
        (
            "POST",
            "/v2/models/tiny/infer",
            {"json": {**v2_bytes_request(grey_png()), "outputs": [{"name": "attention"}]}},
        ),
    )
    for r in (explain, v2):
        assert r.status_code == 409, r.text
        assert "deepvit export --explain" in r.json()["error"]
    assert tiny_app.ctx.pipeline.admission.pending == 0


def test_bad_input_to_explain_is_a_clear_error(explain_app: InProcessApp) -> None:
    text, bad_image, top_k = serve(
        explain_app,
        ("POST", "/explain", {"content": b"hello", "headers": {"content-type": "text/plain"}}),
        ("POST", "/explain", {"content": b"not an image", "headers": {"content-type": "image/png"}}),
        ("POST", "/explain?top_k=99", {"content": grey_png(), "headers": {"content-type": "image/png"}}),
    )
    assert text.status_code == 415
    assert "image/jpeg" in text.json()["error"]
    assert bad_image.status_code == 400
    assert bad_image.json()["error"]
    assert top_k.status_code == 400
    assert "7 classes" in top_k.json()["error"]


def test_v2_serves_the_attention_output_when_a_request_names_it(explain_app: InProcessApp) -> None:
    data = PHOTOS[2].read_bytes()
    outputs = [{"name": "logits"}, {"name": "attention"}]
    meta, answer, bad = serve(
        explain_app,
        ("GET", "/v2/models/tiny", {}),
        ("POST", "/v2/models/tiny/infer", {"json": {**v2_bytes_request(data, data), "outputs": outputs}}),
        (
            "POST",
            "/v2/models/tiny/infer",
            {
                "json": {
                    **v2_bytes_request(data),
                    "outputs": [{"name": "attention", "parameters": {"classification": 2}}],
                }
            },
        ),
    )
    assert {"name": "attention", "datatype": "FP32", "shape": [-1, 16]} in meta.json()["outputs"]
    assert answer.status_code == 200, answer.text
    got = {o["name"]: o for o in answer.json()["outputs"]}
    _, logits, attention = direct(explain_app.artifact, data)
    assert got["attention"]["shape"] == [2, 16]
    assert got["attention"]["datatype"] == "FP32"
    np.testing.assert_allclose(np.reshape(got["attention"]["data"], (2, 16)), [attention, attention], atol=1e-6)
    np.testing.assert_allclose(np.reshape(got["logits"]["data"], (2, 7))[0], logits, atol=1e-4)
    assert bad.status_code == 400
    assert "classification" in bad.json()["error"]


def test_models_lists_the_attention_output(explain_app: InProcessApp) -> None:
    (r,) = serve(explain_app, ("GET", "/models", {}))
    (model,) = r.json()["models"]
    text = str(model)
    assert "attention" in text
    assert "rollout" in text


def test_deepvit_explain_gives_the_same_answer_and_picture_without_a_server(
    explain_app: InProcessApp, exported_tiny_patch: Path, run_deepvit: Callable[..., Any], tmp_path: Path
) -> None:
    photo = PHOTOS[3]
    (served,) = serve(explain_app, ("POST", "/explain?top_k=2", {"content": photo.read_bytes(), "headers": JPEG}))
    out = tmp_path / "overlay.png"
    result = run_deepvit("explain", photo, "--artifact", explain_app.artifact, "--output", out, "--top-k", 2, "--json")
    assert result.code == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["predictions"] == served.json()["predictions"]
    np.testing.assert_allclose(answer["attention"]["values"], served.json()["attention"]["values"], atol=1e-6)
    np.testing.assert_array_equal(
        png_pixels(out.read_bytes()), png_pixels(base64.b64decode(served.json()["overlay_png"]))
    )

    text = run_deepvit("explain", photo, "--artifact", explain_app.artifact)
    assert text.code == 0
    assert "attention over the 4x4 patches" in text.stdout

    plain = run_deepvit("explain", photo, "--artifact", exported_tiny_patch)
    assert plain.code == 2
    assert "deepvit export --explain" in plain.stderr
    not_image = run_deepvit("explain", tmp_path / "overlay.png.txt", "--artifact", explain_app.artifact)
    assert not_image.code == 2
    assert "cannot read" in not_image.stderr


def test_an_artifact_of_the_first_schema_serves_classify_and_answers_explain_with_409(
    exported_tiny_patch: Path, tmp_path: Path
) -> None:
    import onnx

    from deepvit.service.app import create_app
    from deepvit.service.config import Settings

    proto = onnx.load(str(exported_tiny_patch))
    props = {p.key: p.value for p in proto.metadata_props}
    props["deepvit.schema"] = "1"
    del props["deepvit.outputs"]  # what an export before the attention output wrote
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    artifact = tmp_path / "repo" / "tiny" / "1" / "model.onnx"
    artifact.parent.mkdir(parents=True)
    onnx.save_model(proto, str(artifact))
    app = create_app(Settings(model_repository=tmp_path / "repo", providers=["cpu"], warmup=False))
    try:
        old = InProcessApp(app, app.state.ctx, artifact)
        classified, explained = serve(
            old,
            ("POST", "/classify", {"content": grey_png(), "headers": {"content-type": "image/png"}}),
            ("POST", "/explain", {"content": grey_png(), "headers": {"content-type": "image/png"}}),
        )
    finally:
        app.state.ctx.decode_pool.shutdown()
    assert classified.status_code == 200, classified.text
    assert explained.status_code == 409
    assert "deepvit export --explain" in explained.json()["error"]
