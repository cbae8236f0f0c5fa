"""The output folder: its manifest, what a run left there (files cut short deleted, late files of a killed
run deleted), and the driver's own rows written whole."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deepvit.predict.output import MANIFEST, Output, OutputError
from deepvit.predict.rows import ModelIdentity, table

MODEL = ModelIdentity("tiny", 1, "ab" * 32)
MANIFEST_OF = {"artifact_sha256": "ab" * 32, "top_k": 5, "source": "photos"}


def _rows(*paths: str) -> pa.Table:
    return table(list(paths), ["the image is empty (0 bytes)"] * len(paths), MODEL)


def test_a_new_output_is_claimed_then_resumed(tmp_path: Path) -> None:
    out = Output(str(tmp_path / "out"))
    assert out.claim(MANIFEST_OF) is False
    assert (tmp_path / "out" / MANIFEST).is_file()
    assert out.claim(MANIFEST_OF) is True


@pytest.mark.parametrize(("key", "value"), [("artifact_sha256", "cd" * 32), ("top_k", 3)])
def test_rows_of_another_artifact_or_top_k_are_not_mixed_in(tmp_path: Path, key: str, value: object) -> None:
    Output(str(tmp_path)).claim(MANIFEST_OF)
    with pytest.raises(OutputError, match=f"computed with {key}"):
        Output(str(tmp_path)).claim({**MANIFEST_OF, key: value})


def test_a_folder_of_other_files_or_a_file_is_refused(tmp_path: Path) -> None:
    pq.write_table(_rows("a.jpg"), tmp_path / "someone-elses.parquet")
    with pytest.raises(OutputError, match="not the output of deepvit predict"):
        Output(str(tmp_path)).claim(MANIFEST_OF)
    with pytest.raises(OutputError, match="is a file"):
        Output(str(tmp_path / "someone-elses.parquet")).claim(MANIFEST_OF)


def test_a_file_cut_short_is_deleted_and_its_rows_are_not_done(tmp_path: Path) -> None:
    out = Output(str(tmp_path))
    out.claim(MANIFEST_OF)
    out.write(_rows("a.jpg", "b.jpg"), "run1-0.parquet")
    out.write(_rows("c.jpg"), "run1-1.parquet")
    whole = (tmp_path / "run1-1.parquet").read_bytes()
    (tmp_path / "run1-1.parquet").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(OutputError, match="cannot be read"):
        out.tally()
    found = out.tally(delete_unreadable=True)
    assert found.rows == {"a.jpg": 1, "b.jpg": 1}
    assert found.errors == 2
    assert found.deleted == [str(tmp_path / "run1-1.parquet")]
    assert not (tmp_path / "run1-1.parquet").exists()


def test_files_a_killed_run_finished_late_are_deleted_at_the_end(tmp_path: Path) -> None:
    out = Output(str(tmp_path))
    out.claim(MANIFEST_OF)
    out.write(_rows("a.jpg"), "run1-0.parquet")
    earlier = out.files()
    out.write(_rows("b.jpg"), "run1-1.parquet")  # run1's worker, after run2 looked
    out.write(_rows("b.jpg"), "run2-0.parquet")  # run2 did b.jpg again
    assert out.settle(earlier, "run2") == [str(tmp_path / "run1-1.parquet")]
    assert out.tally().rows == {"a.jpg": 1, "b.jpg": 1}


def test_the_drivers_rows_leave_nothing_half_written(tmp_path: Path) -> None:
    out = Output(str(tmp_path / "out"))
    out.claim(MANIFEST_OF)
    out.write(_rows("a.jpg"), "run1-refused.parquet")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MANIFEST, "run1-refused.parquet"]
