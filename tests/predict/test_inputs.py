"""SRC → the inputs: a folder (recursive, image names only), a listing, a bucket through the S3 API."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepvit.predict.inputs import InputError, resolve

from .conftest import BROKEN, GOOD, upload

MAX = 10**9


def test_a_folder_is_searched_recursively_for_files_named_as_images(mixed_folder: Path) -> None:
    inputs = resolve(str(mixed_folder), MAX)
    assert sorted(inputs.sizes) == sorted(str(mixed_folder / n) for n in [*GOOD, *BROKEN])
    assert inputs.skipped == 1  # README.txt
    assert inputs.refused == {}
    assert inputs.sizes[str(mixed_folder / "empty.jpg")] == 0


def test_files_over_the_size_limit_are_inputs_refused_without_reading(mixed_folder: Path) -> None:
    inputs = resolve(str(mixed_folder), 5000)
    big = {str(mixed_folder / n) for n in [*GOOD, *BROKEN] if (mixed_folder / n).stat().st_size > 5000}
    assert big
    assert set(inputs.refused) == big
    assert all("over the limit of 5,000" in why for why in inputs.refused.values())
    assert len(inputs) == len(GOOD) + len(BROKEN)


def test_a_listing_names_its_inputs_whatever_their_names(
    mixed_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(mixed_folder)
    listing = tmp_path / "list.txt"
    listing.write_text("# the photos to label\nchelsea.jpg\n\nREADME.txt\nmissing.jpg\nformats\nchelsea.jpg\n")
    inputs = resolve(str(listing), MAX)
    assert sorted(inputs.sizes) == [str(mixed_folder / "README.txt"), str(mixed_folder / "chelsea.jpg")]
    assert inputs.refused == {
        str(mixed_folder / "formats"): "not a file (a folder?); list files",
        str(mixed_folder / "missing.jpg"): "no such file",
    }


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "nowhere", "does not exist"),
        (lambda d: d, "holds no image files"),
        (lambda d: (d / "l.txt").write_text("# nothing\n") and d / "l.txt", "lists no paths"),
        (lambda d: (d / "l.txt").write_text("a.jpg\ns3://b/a.jpg\n") and d / "l.txt", "mixes file systems"),
        (lambda d: (d / "l.bin").write_bytes(b"\xff\xfe\x00") and d / "l.bin", "not UTF-8"),
    ],
)
def test_nothing_to_classify_is_an_error_that_says_why(tmp_path: Path, make: object, message: str) -> None:
    assert callable(make)
    with pytest.raises(InputError, match=message):
        resolve(str(make(tmp_path)), MAX)


def test_a_bucket_prefix_through_the_s3_api(
    mixed_folder: Path, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    upload(mixed_folder, "inputs", "a/b", s3_env)
    inputs = resolve("s3://inputs/a/b/", MAX)
    assert inputs.scheme == "s3"
    assert sorted(inputs.display(p) for p in inputs.sizes) == sorted(f"s3://inputs/a/b/{n}" for n in [*GOOD, *BROKEN])
    assert inputs.skipped == 1
    with pytest.raises(InputError, match="does not exist"):
        resolve("s3://inputs/elsewhere", MAX)
