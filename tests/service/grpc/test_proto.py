"""The committed gRPC message classes are what ``make proto`` writes from the vendored protos, and the protos
are Triton's as published (the source and licence noted beside them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROTO = Path(__file__).resolve().parents[3] / "service" / "grpc" / "proto"
GENERATED = ("grpc_service_pb2.py", "grpc_service_pb2.pyi", "model_config_pb2.py", "model_config_pb2.pyi")


def test_the_committed_stubs_are_what_make_proto_writes(tmp_path: Path) -> None:
    subprocess.run(["sh", str(PROTO / "generate.sh"), sys.executable, str(tmp_path)], check=True, timeout=120)
    for name in GENERATED:
        assert (tmp_path / name).read_text() == (PROTO / name).read_text(), f"{name} is stale: run make proto"


def test_the_vendored_protos_carry_their_licence_and_source() -> None:
    assert "Redistribution and use in source and binary forms" in (PROTO / "LICENSE").read_text()
    for name in ("grpc_service.proto", "model_config.proto"):
        assert "NVIDIA CORPORATION" in (PROTO / name).read_text()[:200]
    doc = (PROTO / "__init__.py").read_text()
    assert "github.com/triton-inference-server/common" in doc
    assert "commit" in doc
