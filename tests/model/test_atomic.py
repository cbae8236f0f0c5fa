"""Checkpoints, artifacts and run files are replaced whole or not at all."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deepvit.model.atomic import atomic_path, copy_atomic, write_text_atomic


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "last.pth.tar"
    target.write_text("epoch 3")

    def write_half_then_fail() -> None:
        with atomic_path(target) as tmp:
            tmp.write_text("epoch 4, half writ")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_half_then_fail()
    assert target.read_text() == "epoch 3"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth.tar"]


def test_a_complete_write_replaces_the_file(tmp_path: Path) -> None:
    target = tmp_path / "run" / "labels.txt"  # the folder is made when missing
    write_text_atomic(target, "circle\nsquare\n")
    copy_atomic(target, tmp_path / "run" / "copy.txt")
    assert (tmp_path / "run" / "copy.txt").read_text() == "circle\nsquare\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["copy.txt", "labels.txt"]


def test_temporaries_of_a_killed_writer_are_removed_not_those_of_a_live_one(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".last.pth.tar.{int(gone.stdout)}.tmp"  # that process has exited
    live = tmp_path / f".last.pth.tar.{os.getppid()}.tmp"  # a running process (this one's parent)
    for f in (orphan, live):
        f.write_bytes(b"half a checkpoint")
    write_text_atomic(tmp_path / "last.pth.tar", "whole")
    assert not orphan.exists()
    assert live.exists()
