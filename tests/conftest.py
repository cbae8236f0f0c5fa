"""Fixtures shared by the model and service suites: the test data, the ``deepvit`` command run
in-process, one artifact exported from an official checkpoint, and the app serving it in process."""

from __future__ import annotations

import contextlib
import io
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from inprocess import InProcessApp

DATA_DIR = Path(__file__).parent / "data"


@dataclass(frozen=True)
class CliResult:
    code: int
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


def _run_deepvit(*argv: object) -> CliResult:
    from deepvit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse errors and SystemExit("message"), as the console script would
            if isinstance(exc.code, str):
                print(exc.code, file=err)
                code = 1
            else:
                code = exc.code or 0
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def run_deepvit() -> Callable[..., CliResult]:
    """``deepvit ARGS...`` in this process; returns the exit code and what it printed."""
    return _run_deepvit


@pytest.fixture(scope="session")
def exported_tiny_patch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The official tiny_patch checkpoint exported (fp32, state_dict) by ``deepvit export``."""
    pytest.importorskip("torch", reason="exporting needs the train extra")
    out = tmp_path_factory.mktemp("exported_tiny_patch") / "model.onnx"
    result = _run_deepvit(
        "export",
        "--model-config",
        DATA_DIR / "tiny_patch.json",
        "--checkpoint",
        DATA_DIR / "conformance" / "official_tiny_patch.pth.tar",
        "--output",
        out,
    )
    assert result.code == 0, result.stderr
    return out


@pytest.fixture
def tiny_app(exported_tiny_patch: Path, tmp_path: Path) -> Iterator[InProcessApp]:
    """The app (in process, no socket) over a repository holding the exported tiny_patch as ``tiny`` v1."""
    from inprocess import InProcessApp

    from deepvit.service.app import create_app
    from deepvit.service.config import Settings

    artifact = tmp_path / "repo" / "tiny" / "1" / "model.onnx"
    artifact.parent.mkdir(parents=True)
    shutil.copy(exported_tiny_patch, artifact)
    app = create_app(Settings(model_repository=tmp_path / "repo", providers=["cpu"], warmup=False))
    try:
        yield InProcessApp(app, app.state.ctx, artifact)
    finally:
        app.state.ctx.decode_pool.shutdown()
