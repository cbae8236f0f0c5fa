"""The output's rows: one per input file, with its top-k as ``POST /classify`` answers it, or its error.

path              the file, as SRC named it (``s3://bucket/key`` for a bucket)
predictions       list of {label, class_id, score}, softmax probabilities in descending order; null on error
error             why the file has no predictions (not an image, truncated, over a limit); null otherwise
model, version    the model's name and version (the model repository's ``<name>/<version>/``, when the
                  artifact sits in one; else the name recorded in it and a null version)
artifact_sha256   the digest of the artifact file that computed the row
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deepvit.artifact.predictions import Scored

if TYPE_CHECKING:
    import pyarrow as pa

COLUMNS = ("path", "predictions", "error", "model", "version", "artifact_sha256")


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
        ]
    )


@dataclass(frozen=True)
class ModelIdentity:
    """What every row says about the model that computed it."""

    name: str
    version: int | None
    sha256: str


def table(paths: Sequence[str], outcomes: Sequence[list[Scored] | str], model: ModelIdentity) -> pa.Table:
    """The rows of ``paths``, each outcome either the top-k or an error message."""
    import pyarrow as pa

    columns: dict[str, list[Any]] = {
        "path": list(paths),
        "predictions": [o if isinstance(o, list) else None for o in outcomes],
        "error": [o if isinstance(o, str) else None for o in outcomes],
        "model": [model.name] * len(paths),
        "version": [model.version] * len(paths),
        "artifact_sha256": [model.sha256] * len(paths),
    }
    return pa.Table.from_pydict(columns, schema=schema())
