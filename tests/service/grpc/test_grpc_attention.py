"""The attention output over gRPC, as over REST: a ``tritonclient.grpc`` request that names ``attention``
among its outputs gets the rollout the artifact computes; a model exported without it is FAILED_PRECONDITION
with the re-export in the message. A real server process over the official tiny_cnn, with and without it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tg
from serving import DATA, Server, export_tiny, running_server
from tritonclient.utils import InferenceServerException

from deepvit.artifact.pixels import ImageLimits, preprocess
from deepvit.artifact.session import read_metadata

pytestmark = pytest.mark.integration

PHOTOS = sorted((DATA / "photos").glob("*.jpg"))[:2]


@pytest.fixture(scope="module")
def repo(exported_tiny_cnn_explain: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("attention_repo")
    (root / "explained" / "1").mkdir(parents=True)
    shutil.copy(exported_tiny_cnn_explain, root / "explained" / "1" / "model.onnx")
    export_tiny(root, name="plain")
    return root


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(repo, tmp_path_factory.mktemp("logs") / "server.log") as s:
        yield s


def test_a_request_naming_attention_gets_the_artifacts_rollout(server: Server, repo: Path) -> None:
    artifact = repo / "explained" / "1" / "model.onnx"
    blobs = [p.read_bytes() for p in PHOTOS]
    image = tg.InferInput("image", [len(blobs)], "BYTES")
    image.set_data_from_numpy(np.array(blobs, dtype=np.object_))
    outputs = [tg.InferRequestedOutput("logits"), tg.InferRequestedOutput("attention")]
    with tg.InferenceServerClient(server.grpc) as client:
        meta = client.get_model_metadata("explained", as_json=True)
        result = client.infer("explained", [image], outputs=outputs)
    assert {"name": "attention", "datatype": "FP32", "shape": ["-1", "16"]} in meta["outputs"]
    spec = read_metadata(artifact).preprocess
    crops = np.stack([preprocess(b, spec, ImageLimits(50_000_000, 50.0)) for b in blobs])
    logits, attention = ort.InferenceSession(str(artifact), providers=["CPUExecutionProvider"]).run(
        None, {"image": crops}
    )
    np.testing.assert_allclose(result.as_numpy("attention"), attention, atol=1e-6)
    np.testing.assert_allclose(result.as_numpy("logits"), logits, atol=1e-4)


def test_a_model_without_the_output_is_failed_precondition_naming_the_re_export(server: Server) -> None:
    image = tg.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([PHOTOS[0].read_bytes()], dtype=np.object_))
    with tg.InferenceServerClient(server.grpc) as client, pytest.raises(InferenceServerException) as err:
        client.infer("plain", [image], outputs=[tg.InferRequestedOutput("attention")])
    assert str(err.value.status()) == "StatusCode.FAILED_PRECONDITION"
    assert "deepvit export --explain" in str(err.value.message())
