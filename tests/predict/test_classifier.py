"""One actor's work without Ray: a batch of files → rows, each the top-k of the contract's pixel path and
the artifact's session, or the file's error; the limits of the service."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from deepvit.artifact import OUTPUT_NAME
from deepvit.artifact.pixels import preprocess
from deepvit.artifact.predictions import top_k
from deepvit.artifact.session import metadata_of, open_session, read_metadata
from deepvit.predict.classifier import SERVICE_LIMITS, Classifier, ClassifierSpec
from deepvit.predict.rows import COLUMNS, ModelIdentity

from .conftest import BROKEN, GOOD

MODEL = ModelIdentity("tiny", 1, "ab" * 32)


def _classifier(artifact: Path, scheme: str = "", engine: str = "cpu") -> Classifier:
    spec = ClassifierSpec(artifact.read_bytes(), read_metadata(artifact), MODEL, 3, 1, engine=engine, scheme=scheme)
    return Classifier(spec)


def test_rows_hold_the_top_k_of_the_pixel_path_or_the_error(artifact: Path, mixed_folder: Path) -> None:
    names = [*GOOD, *BROKEN]
    batch = {
        "path": np.array([str(mixed_folder / n) for n in names], dtype=object),
        "bytes": np.array([(mixed_folder / n).read_bytes() for n in names], dtype=object),
    }
    rows = _classifier(artifact)(batch).to_pylist()
    assert [r["path"] for r in rows] == list(batch["path"])
    assert all(list(r) == list(COLUMNS) for r in rows)
    session = open_session(artifact)
    meta = metadata_of(session, "tiny")
    for name, row in zip(names, rows, strict=True):
        assert (row["model"], row["version"], row["artifact_sha256"]) == ("tiny", 1, "ab" * 32)
        if name in BROKEN:
            assert row["predictions"] is None
            assert row["error"]
            continue
        crop = preprocess((mixed_folder / name).read_bytes(), meta.preprocess, SERVICE_LIMITS)
        logits = session.run([OUTPUT_NAME], {"image": crop[None]})[0][0]
        want = top_k(logits, 3, meta.labels)
        assert [(p["label"], p["class_id"]) for p in row["predictions"]] == [(w["label"], w["class_id"]) for w in want]
        assert np.allclose([p["score"] for p in row["predictions"]], [w["score"] for w in want], atol=1e-5)
        assert row["error"] is None


def test_each_broken_file_says_what_is_wrong_with_it(artifact: Path, mixed_folder: Path) -> None:
    outcomes = _classifier(artifact).classify([(mixed_folder / n).read_bytes() for n in BROKEN])
    errors = dict(zip(BROKEN, outcomes, strict=True))
    assert "truncated or corrupt" in str(errors["truncated.jpg"])
    assert "not an image" in str(errors["random.jpg"])
    assert "empty (0 bytes)" in str(errors["empty.jpg"])
    assert "not an image" in str(errors["notes/text.png"])


def test_the_service_limits_hold_and_a_bad_file_does_not_spoil_its_batch(artifact: Path, mixed_folder: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (2100, 100)).save(buf, format="PNG")  # 21:1, over the aspect ratio limit of 20:1
    good = (mixed_folder / "chelsea.jpg").read_bytes()
    first, wide, last = _classifier(artifact).classify([good, buf.getvalue(), good])
    assert isinstance(wide, str)
    assert "aspect ratio over the limit of 20:1" in wide
    assert first == last
    assert isinstance(first, list)
    assert len(first) == 3


def test_the_limits_are_the_services_defaults() -> None:
    from deepvit.service.config import Settings

    settings = Settings()
    assert SERVICE_LIMITS.max_pixels == settings.max_image_pixels
    assert SERVICE_LIMITS.max_aspect_ratio == settings.max_aspect_ratio


def test_bucket_paths_are_written_as_uris(artifact: Path, mixed_folder: Path) -> None:
    batch = {
        "path": np.array(["photos/a/chelsea.jpg"], dtype=object),
        "bytes": np.array([(mixed_folder / "chelsea.jpg").read_bytes()], dtype=object),
    }
    (row,) = _classifier(artifact, "s3")(batch).to_pylist()
    assert row["path"] == "s3://photos/a/chelsea.jpg"


def test_rows_say_which_engine_computed_them(artifact: Path, mixed_folder: Path) -> None:
    names = ["chelsea.jpg", "empty.jpg"]
    batch = {
        "path": np.array(names, dtype=object),
        "bytes": np.array([(mixed_folder / n).read_bytes() for n in names], dtype=object),
    }
    for engine in ("cpu", "openvino"):
        good, broken = _classifier(artifact, engine=engine)(batch).to_pylist()
        assert good["engine"] == engine
        assert broken["engine"] is None  # nothing computed it


def test_calls_are_of_the_size_the_actor_measured_best(artifact: Path, mixed_folder: Path) -> None:
    blobs = [(mixed_folder / n).read_bytes() for n in GOOD[:5]]
    whole = _classifier(artifact).classify(blobs)
    classifier = _classifier(artifact)
    classifier.chosen = dataclasses.replace(classifier.chosen, batch=2)
    sizes: list[int] = []
    run = classifier.session.run

    def recording(outputs: Any, feed: dict[str, np.ndarray]) -> Any:
        sizes.append(len(next(iter(feed.values()))))
        return run(outputs, feed)

    classifier.session = type("Recording", (), {"run": staticmethod(recording)})()
    in_twos = classifier.classify(blobs)
    assert sizes == [2, 2, 1]
    for got, want in zip(in_twos, whole, strict=True):
        assert isinstance(got, list)
        assert isinstance(want, list)
        assert [(p["label"], p["class_id"]) for p in got] == [(p["label"], p["class_id"]) for p in want]
        assert np.allclose([p["score"] for p in got], [p["score"] for p in want], atol=1e-5)


def test_auto_computes_with_an_engine_the_host_offers(artifact: Path, mixed_folder: Path) -> None:
    classifier = _classifier(artifact, engine="auto")
    assert set(classifier.chosen.images_per_s) == {"cpu", "openvino"}  # both measured here
    assert classifier.chosen.engine.name == max(classifier.chosen.images_per_s, key=classifier.chosen.images_per_s.get)
    assert "openvino-bf16" in classifier.chosen.refused
    (row,) = classifier(
        {
            "path": np.array(["a.jpg"], dtype=object),
            "bytes": np.array([(mixed_folder / "chelsea.jpg").read_bytes()], dtype=object),
        }
    ).to_pylist()
    assert row["engine"] == classifier.chosen.engine.name
