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


def _export_official(tmp_path_factory: pytest.TempPathFactory, name: str, *extra: str) -> Path:
    """An official tiny checkpoint exported by ``deepvit export`` (fp32, state_dict, plus ``extra``)."""
    pytest.importorskip("torch", reason="exporting needs the train extra")
    out = tmp_path_factory.mktemp(f"exported_{name}") / "model.onnx"
    checkpoint = DATA_DIR / "conformance" / f"official_{name}.pth.tar"
    result = _run_deepvit(
        "export", "--model-config", DATA_DIR / f"{name}.json", "--checkpoint", checkpoint, *extra, "--output", out
    )
    assert result.code == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def exported_tiny_patch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The official tiny_patch checkpoint exported (fp32, state_dict) by ``deepvit export``."""
    return _export_official(tmp_path_factory, "tiny_patch")


@pytest.fixture(scope="session")
def exported_tiny_cnn_explain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The official tiny_cnn checkpoint (a 4 x 4 patch grid) exported with the attention output (--explain)."""
    return _export_official(tmp_path_factory, "tiny_cnn", "--explain")


def _app_over(artifact_source: Path, tmp_path: Path) -> Iterator[InProcessApp]:
    from inprocess import InProcessApp

    from deepvit.service.app import create_app
    from deepvit.service.config import Settings

    artifact = tmp_path / "repo" / "tiny" / "1" / "model.onnx"
    artifact.parent.mkdir(parents=True)
    shutil.copy(artifact_source, artifact)
    app = create_app(Settings(model_repository=tmp_path / "repo", providers=["cpu"], warmup=False))
    try:
        yield InProcessApp(app, app.state.ctx, artifact)
    finally:
        app.state.ctx.decode_pool.shutdown()


@pytest.fixture
def tiny_app(exported_tiny_patch: Path, tmp_path: Path) -> Iterator[InProcessApp]:
    """The app (in process, no socket) over a repository holding the exported tiny_patch as ``tiny`` v1."""
    yield from _app_over(exported_tiny_patch, tmp_path)


@pytest.fixture
def explain_app(exported_tiny_cnn_explain: Path, tmp_path: Path) -> Iterator[InProcessApp]:
    """The same over the tiny_cnn exported with the attention output, as ``tiny`` v1."""
    yield from _app_over(exported_tiny_cnn_explain, tmp_path)
