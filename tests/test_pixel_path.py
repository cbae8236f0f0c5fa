"""One pixel path for both halves: ``deepvit evaluate --artifact`` feeds the graph the same crop, bit for bit,
that ``POST /classify`` feeds it for the same file — over the shipped photos and the images where decoders
disagree (16-bit PNG, palette with transparency, CMYK JPEG, EXIF rotation, animation, grey) — and so gives
the same answers."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
from inprocess import InProcessApp
from PIL import Image

pytest.importorskip("torch", reason="deepvit evaluate needs the train extra")

from deepvit.artifact.session import read_metadata
from deepvit.model.training.evaluation import ArtifactImages, evaluate_artifact
from deepvit.model.training.folders import image_folder

PHOTOS = Path(__file__).parent / "data" / "photos"


def _save(img: Image.Image, path: Path, **kwargs: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)


def awkward_images(folder: Path) -> list[Path]:
    """The shipped photos, and one file for each case where a naive ``.convert("RGB")`` goes wrong."""
    photo = Image.open(PHOTOS / "chelsea.jpg").convert("RGB")
    small = photo.resize((photo.width // 2, photo.height // 2))
    grey = np.asarray(small.convert("L"), dtype=np.uint16)
    cases = {
        # 16-bit grey: Pillow's own conversion clips every value over 255 to white.
        "grey16.png": (Image.fromarray(grey * 257), {}),
        # Palette with a transparent index (converted through RGBA, as Pillow asks).
        "palette_transparent.png": (small.quantize(64), {"transparency": 0}),
        "cmyk.jpg": (small.convert("CMYK"), {"quality": 90}),
        "grey.jpg": (small.convert("L"), {"quality": 90}),
    }
    paths = []
    for name, (img, kwargs) in cases.items():
        _save(img, folder / name, **kwargs)
        paths.append(folder / name)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90° clockwise
    _save(small, folder / "exif_rotated.jpg", exif=exif.tobytes(), quality=90)
    frames = [small, small.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    _save(frames[0], folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    paths += [folder / "exif_rotated.jpg", folder / "animated.gif"]
    for photo_path in sorted(PHOTOS.glob("*.jpg")):
        target = folder / photo_path.name
        target.write_bytes(photo_path.read_bytes())
        paths.append(target)
    return paths


def classify_inputs(app: InProcessApp, files: list[Path]) -> tuple[dict[Path, np.ndarray], dict[Path, list[object]]]:
    """What the served model's session receives for each file posted to /classify, and the answers."""
    crops: dict[Path, np.ndarray] = {}
    answers: dict[Path, list[object]] = {}

    async def run() -> None:
        async with app.serving() as (client, mv):
            real_run = mv.runtime.run
            seen: list[np.ndarray] = []

            def recording_run(batch: np.ndarray) -> np.ndarray:
                seen.append(batch.copy())
                return real_run(batch)

            mv.runtime.run = recording_run  # type: ignore[method-assign]
            for path in files:
                r = await client.post(
                    "/classify?top_k=5", content=path.read_bytes(), headers={"content-type": "application/octet-stream"}
                )
                assert r.status_code == 200, (path.name, r.text)
                (batch,) = seen
                seen.clear()
                crops[path], answers[path] = batch[0], r.json()["predictions"]

    asyncio.run(run())
    return crops, answers


def test_evaluate_and_classify_feed_the_graph_the_same_crop(tiny_app: InProcessApp, tmp_path: Path) -> None:
    files = awkward_images(tmp_path / "data" / "class_3")
    served, answers = classify_inputs(tiny_app, files)

    folder = image_folder(tmp_path / "data", None)
    spec = read_metadata(tiny_app.artifact).preprocess
    evaluated = ArtifactImages(folder, spec)
    assert len(evaluated) == len(files)
    for i, (path, _) in enumerate(folder.samples):
        crop, _ = evaluated[i]
        assert crop.dtype == np.uint8
        np.testing.assert_array_equal(crop, served[Path(path)], err_msg=Path(path).name)

    # The 16-bit file is the 8-bit grey picture, not white (what Pillow's own conversion would give).
    grey16, _ = evaluated[[Path(p).name for p, _ in folder.samples].index("grey16.png")]
    assert 20 < grey16.mean() < 235

    # And the same answers: evaluate's --predictions rows are /classify's prediction objects.
    report = evaluate_artifact(tiny_app.artifact, tmp_path / "data", workers=0)
    for row in report.prediction_rows():
        served_top = answers[Path(row["path"])]
        assert [p["class_id"] for p in row["predictions"]] == [p["class_id"] for p in served_top]  # type: ignore[index]
        for ours, theirs in zip(row["predictions"], served_top, strict=True):
            assert ours["score"] == pytest.approx(theirs["score"], abs=1e-6)  # type: ignore[index]


def test_a_gif_and_a_16_bit_png_are_evaluated_not_skipped(tmp_path: Path) -> None:
    awkward_images(tmp_path / "data" / "x")
    names = {Path(p).name for p, _ in image_folder(tmp_path / "data", None).samples}
    assert {"animated.gif", "grey16.png", "cmyk.jpg"} <= names
    buf = io.BytesIO()
    Image.open(tmp_path / "data" / "x" / "grey16.png").save(buf, format="PNG")
    assert Image.open(buf).mode.startswith("I")
