"""The GPU check's own machinery that runs anywhere: a wheel larger than one transfer arrives in pieces and
is joined byte for byte; whole wheels are taken as they are. (The check itself needs a GPU: bench/gpu.py.)"""

from __future__ import annotations

import hashlib
from pathlib import Path

from deepvit.bench.gpu import join_wheels


def test_split_wheels_are_joined_in_order_and_whole_ones_kept(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    wheel = bytes(range(256)) * 1000
    name = "onnxruntime_gpu-1.23.0-cp312-cp312-manylinux_2_27_x86_64.whl"
    for i, suffix in enumerate(("aa", "ab", "ac")):  # as split -b names them
        (src / f"{name}.part-{suffix}").write_bytes(wheel[i * 100_000 : (i + 1) * 100_000])
    (src / "fastapi-0.120.0-py3-none-any.whl").write_bytes(b"whole")
    out = join_wheels(src, tmp_path / "out")
    assert sorted(p.name for p in out) == ["fastapi-0.120.0-py3-none-any.whl", name]
    joined = tmp_path / "out" / name
    assert hashlib.sha256(joined.read_bytes()).digest() == hashlib.sha256(wheel).digest()
    assert (tmp_path / "out" / "fastapi-0.120.0-py3-none-any.whl").read_bytes() == b"whole"
