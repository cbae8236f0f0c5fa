"""What ``deepvit predict SRC`` reads: SRC resolved into a list of files on one pyarrow file system.

SRC is a local folder (searched recursively), an object-store prefix (``s3://bucket/photos/``, ``gs://…``),
or a file listing paths, one per line (local paths, or URIs of one object store). In a folder or under a
prefix, the inputs are the files named as images (:data:`IMAGE_SUFFIXES`); a listing's lines are inputs
whatever their names. pyarrow's file systems find the credentials the usual way (the AWS or Google
environment, configuration files, instance metadata) and an S3-compatible endpoint in ``AWS_ENDPOINT_URL``.

Files that are missing, not files or larger than the limit are inputs all the same: they get an error row
without being read (:attr:`Inputs.refused`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow.fs

# The suffixes of the formats the pixel path decodes (JPEG, PNG, WebP, GIF, BMP; MPO: phones' JPEG).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".png", ".webp", ".gif", ".bmp")
URI_SCHEMES = ("s3", "gs", "gcs", "file")


class InputError(ValueError):
    """SRC names nothing to classify, or something that cannot be listed."""


@dataclass
class Inputs:
    """The files of one run: ``paths`` to read, in the file system's terms (``bucket/key`` on S3), with their
    size; ``refused`` the inputs given an error row without reading, by path; ``skipped`` how many files of a
    folder or prefix were not named as images."""

    filesystem: pyarrow.fs.FileSystem
    scheme: str  # "" for local paths, else the URI scheme that ``display`` puts back
    sizes: dict[str, int] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    skipped: int = 0

    def display(self, path: str) -> str:
        return display_path(self.scheme, path)

    def __len__(self) -> int:
        return len(self.sizes) + len(self.refused)


def display_path(scheme: str, path: str) -> str:
    """A path as the user wrote it: ``s3://bucket/key`` rather than pyarrow's ``bucket/key``."""
    return f"{scheme}://{path}" if scheme else path


def is_uri(location: str) -> bool:
    scheme, sep, _ = location.partition("://")
    return bool(sep) and scheme.lower() in URI_SCHEMES


def filesystem_of(location: str) -> tuple[pyarrow.fs.FileSystem, str, str]:
    """``(file system, path in its terms, scheme)`` of a local path or a URI; local paths made absolute."""
    import pyarrow.fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location)), ""
    scheme = location.partition("://")[0].lower()
    try:
        fs, path = pafs.FileSystem.from_uri(location)
    except (OSError, ValueError) as exc:
        raise InputError(f"{location}: {_first_line(exc)}") from None
    return fs, path.rstrip("/"), "" if scheme == "file" else scheme


def resolve(src: str, max_file_bytes: int) -> Inputs:
    """SRC → its inputs, sorted by path; an InputError when SRC is missing or holds no input at all."""
    import pyarrow.fs as pafs

    fs, path, scheme = filesystem_of(src)
    info = _info(fs, path, src)
    if info.type == pafs.FileType.Directory:
        inputs = Inputs(fs, scheme)
        for entry in _listdir(fs, path, src):
            if entry.type != pafs.FileType.File:
                continue
            if entry.path.lower().endswith(IMAGE_SUFFIXES):
                _add(inputs, entry.path, entry.size, max_file_bytes)
            else:
                inputs.skipped += 1
        if not len(inputs):
            raise InputError(f"{src} holds no image files ({', '.join(IMAGE_SUFFIXES)}), searched recursively")
        return inputs
    if info.type != pafs.FileType.File:
        raise InputError(f"{src} does not exist: give a folder, a file listing paths, or an s3:// or gs:// prefix")
    return _from_listing(fs, path, src, max_file_bytes)


def _from_listing(fs: pyarrow.fs.FileSystem, path: str, src: str, max_file_bytes: int) -> Inputs:
    """A listing: one path per line (blank lines and ``#`` comments ignored), all on one file system;
    relative local paths are relative to the current directory, as a shell would take them."""
    import pyarrow.fs as pafs

    with fs.open_input_stream(path) as f:
        raw = f.read()
    try:
        lines = [ln.strip() for ln in raw.decode("utf-8").splitlines()]
    except UnicodeDecodeError:
        raise InputError(f"{src} is neither a folder nor a text file listing paths (it is not UTF-8)") from None
    entries = sorted({ln for ln in lines if ln and not ln.startswith("#")})
    if not entries:
        raise InputError(f"{src} lists no paths (one per line)")
    schemes = {e.partition("://")[0].lower() if is_uri(e) else "" for e in entries}
    if len(schemes) > 1:
        raise InputError(f"{src} mixes file systems ({', '.join(s or 'local' for s in sorted(schemes))}); list one")
    fs, _, scheme = filesystem_of(entries[0])  # one file system for all (from_uri per line would be slow)
    paths = [e.partition("://")[2] if is_uri(e) else os.path.abspath(os.path.expanduser(e)) for e in entries]
    inputs = Inputs(fs, scheme)
    infos = fs.get_file_info(paths)
    for info in infos:
        if info.type == pafs.FileType.File:
            _add(inputs, info.path, info.size, max_file_bytes)
        elif info.type == pafs.FileType.NotFound:
            inputs.refused[info.path] = "no such file"
        else:
            inputs.refused[info.path] = "not a file (a folder?); list files"
    return inputs


def _add(inputs: Inputs, path: str, size: int | None, max_file_bytes: int) -> None:
    if size is not None and size > max_file_bytes:
        inputs.refused[path] = (
            f"the file is {size:,} bytes, over the limit of {max_file_bytes:,} (--max-file-bytes); it was not read"
        )
    else:
        inputs.sizes[path] = size or 0


def _info(fs: pyarrow.fs.FileSystem, path: str, src: str) -> pyarrow.fs.FileInfo:
    try:
        return fs.get_file_info(path)
    except OSError as exc:
        raise InputError(f"{src}: {_first_line(exc)}") from None


def _listdir(fs: pyarrow.fs.FileSystem, path: str, src: str) -> list[pyarrow.fs.FileInfo]:
    import pyarrow.fs as pafs

    try:
        return sorted(fs.get_file_info(pafs.FileSelector(path, recursive=True)), key=lambda i: i.path)
    except OSError as exc:
        raise InputError(f"{src} cannot be listed: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
