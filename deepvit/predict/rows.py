"""The output's rows: one per input file, with its top-k as ``POST /classify`` answers it, or its error.

path              the file, as SRC named it (``s3://bucket/key`` for a bucket)
predictions       list of {label, class_id, score}, softmax probabilities in descending order; null on error
error             why the file has no predictions (not an image, truncated, over a limit); null otherwise
model, version    the model's name and version (the model repository's ``<name>/<version>/``, when the
                  artifact sits in one; else the name recorded in it and a null version)
artifact_sha256   the digest of the artifact file that computed the row
engine            the engine that computed the predictions (``cpu``, ``openvino``, ``openvino-bf16``: see
                  deepvit.artifact.engines); null on error
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deepvit.artifact.predictions import Scored

if TYPE_CHECKING:
    import pyarrow as pa

COLUMNS = ("path", "predictions", "error", "model", "version", "artifact_sha256", "engine")


def schema() -> pa.Schema:
    import pyarrow as pa

    scored = pa.struct([("label", pa.string()), ("class_id", pa.int64()), ("score", pa.float64())])
    return pa.schema(
        [
            ("path", pa.string()),
            ("predictions", pa.list_(scored)),
            ("error", pa.string()),
            ("model", pa.string()),
            ("version", pa.int64()),
            ("artifact_sha256", pa.string()),
            ("engine", pa.string()),
        ]
    )


@dataclass(frozen=True)
class ModelIdentity:
    """What every row says about the model that computed it."""

    name: str
    version: int | None
    sha256: str


def table(
    paths: Sequence[str], outcomes: Sequence[list[Scored] | str], model: ModelIdentity, engine: str | None = None
) -> pa.Table:
    """The rows of ``paths``, each outcome either the top-k (computed by ``engine``) or an error message."""
    import pyarrow as pa

    columns: dict[str, list[Any]] = {
        "path": list(paths),
        "predictions": [o if isinstance(o, list) else None for o in outcomes],
        "error": [o if isinstance(o, str) else None for o in outcomes],
        "model": [model.name] * len(paths),
        "version": [model.version] * len(paths),
        "artifact_sha256": [model.sha256] * len(paths),
        "engine": [engine if isinstance(o, list) else None for o in outcomes],
    }
    return pa.Table.from_pydict(columns, schema=schema())
