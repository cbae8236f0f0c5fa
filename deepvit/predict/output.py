"""The output folder (local or a bucket): Parquet files of rows, and what a run before this one left there.

A run is resumable because a row exists only in a complete Parquet file: a file cut short by a crash or a
kill has no footer, cannot be read, and is deleted before anything else happens, so its inputs are done
again; every input with a row in a readable file is done and is not read again. An object store writes an
object whole or not at all. So a rerun with the same ``--output`` leaves every input there exactly once.

Each run names its files after itself (``<run>-….parquet``). A killed run's workers may outlive it by a few
seconds and finish a file after the next run has looked: such a file, neither there when this run began nor
its own, holds inputs this run did again, and is deleted at its end (:meth:`Output.settle`).

``_deepvit_predict.json`` records what the rows were computed with (the artifact's digest, top-k); a rerun
with another artifact or top-k is refused rather than mixed in. Names starting with ``_`` or ``.`` are not
rows (Parquet readers skip them too).
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from .inputs import display_path, filesystem_of

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs

MANIFEST = "_deepvit_predict.json"


class OutputError(ValueError):
    """The output folder cannot take this run's rows."""


@dataclass
class Tally:
    """What the output holds: rows by path (displayed as SRC names them), rows with an error, rows by the
    engine that computed them, and the unreadable files (half written by a run that was killed) that were
    deleted."""

    rows: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    engines: Counter[str] = field(default_factory=Counter)
    deleted: list[str] = field(default_factory=list)


class Output:
    def __init__(self, location: str) -> None:
        self.location = location.rstrip("/") or location
        self.filesystem, self.path, self.scheme = filesystem_of(location)
        self.local = not self.scheme

    def uri(self) -> str:
        """Where Ray Data writes: the local path, or the URI."""
        return display_path(self.scheme, self.path)

    def claim(self, manifest: dict[str, Any]) -> bool:
        """Create the folder and its manifest, or check the manifest a previous run left; True if there was
        one (this run resumes). An OutputError when it was made with another artifact or top-k, or when the
        folder holds files and no manifest (not an output of ``deepvit predict``)."""
        import pyarrow.fs as pafs

        fs, target = self.filesystem, f"{self.path}/{MANIFEST}"
        info = fs.get_file_info(self.path)
        if info.type == pafs.FileType.File:
            raise OutputError(f"--output {self.location} is a file; give a folder (or a prefix) for the Parquet files")
        if fs.get_file_info(target).type == pafs.FileType.File:
            with fs.open_input_stream(target) as f:
                previous = json.loads(f.read())
            for key in ("artifact_sha256", "top_k"):
                if previous.get(key) != manifest[key]:
                    raise OutputError(
                        f"--output {self.location} holds rows computed with {key} {previous.get(key)!r}, not "
                        f"{manifest[key]!r}; give a new --output (or delete it to start again)"
                    )
            return True
        if info.type == pafs.FileType.Directory and self.files():
            raise OutputError(
                f"--output {self.location} holds files but is not the output of deepvit predict (no {MANIFEST}); "
                "give an empty or new folder"
            )
        fs.create_dir(self.path, recursive=True)
        with fs.open_output_stream(target) as f:
            f.write(json.dumps(manifest, indent=2).encode())
        return False

    def files(self) -> list[str]:
        """The row files, in the file system's terms."""
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.path, recursive=False, allow_not_found=True)
        return sorted(
            i.path
            for i in self.filesystem.get_file_info(selector)
            if i.type == pafs.FileType.File and not i.base_name.startswith(("_", ".")) and i.path.endswith(".parquet")
        )

    def settle(self, earlier: list[str], run: str) -> list[str]:
        """At the end of run ``run``: delete the files that appeared meanwhile and are not its own (written
        late by a killed run's workers); the files that hold the rows, and those deleted."""
        late = [f for f in self.files() if f not in earlier and not PurePosixPath(f).name.startswith(f"{run}-")]
        for f in late:
            self.filesystem.delete_file(f)
        return [display_path(self.scheme, f) for f in late]

    def tally(self, files: list[str] | None = None, delete_unreadable: bool = False) -> Tally:
        """Read the path and error of every row of ``files`` (default: all); unreadable files (cut short)
        deleted when asked, else an OutputError."""
        import pyarrow.parquet as pq

        out = Tally()
        for path in self.files() if files is None else files:
            try:
                t = pq.read_table(path, columns=["path", "error", "engine"], filesystem=self.filesystem)
            except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
                if not delete_unreadable:
                    raise OutputError(f"{display_path(self.scheme, path)} cannot be read: {exc}") from None
                self.filesystem.delete_file(path)
                out.deleted.append(display_path(self.scheme, path))
                continue
            out.rows.update(t.column("path").to_pylist())
            out.errors += t.num_rows - t.column("error").null_count
            out.engines.update(e for e in t.column("engine").to_pylist() if e is not None)
        return out

    def write(self, rows: pa.Table, name: str) -> None:
        """Rows the driver writes itself (the inputs refused without reading), as one file ``name`` that
        appears whole: written under a name that is not a row file, then renamed (an object store's put is
        whole)."""
        import pyarrow.parquet as pq

        name = f"{self.path}/{name}"
        if not self.local:
            pq.write_table(rows, name, filesystem=self.filesystem)
            return
        partial = f"{self.path}/_partial-{uuid.uuid4().hex}.parquet"
        pq.write_table(rows, partial, filesystem=self.filesystem)
        self.filesystem.move(partial, name)
