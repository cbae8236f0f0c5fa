"""The model repository on disk: ``<repository>/<name>/<version>/model.onnx``, versions being positive
integers; what a scan finds, how a changed file is told, and what a change of files means for the served set.

The plans are pure functions of what is on disk, what serves and what failed, so each decision of the live
repository is tested without files or sessions.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from ..config import parse_version_policy

log = logging.getLogger("deepvit.repository")

ARTIFACT_NAME = "model.onnx"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_VERSION_RE = re.compile(r"[1-9][0-9]{0,17}")  # ASCII digits only: str.isdigit() takes "²", which int() refuses

Signature = tuple[int, int]  # (mtime_ns, size) of model.onnx: what tells a changed file
Found = dict[int, tuple[Path, Signature]]  # version -> (model.onnx, its signature)


def artifact_signature(path: Path) -> Signature:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


def scan_repository(root: Path) -> dict[str, dict[int, Path]]:
    """Every ``<name>/<version>/model.onnx`` under ``root``; other entries are ignored."""
    found: dict[str, dict[int, Path]] = {}
    if not root.is_dir():
        return found
    for model_dir in sorted(root.iterdir()):
        if not model_dir.is_dir() or not _NAME_RE.match(model_dir.name):
            continue
        try:
            version_dirs = list(model_dir.iterdir())
        except OSError as exc:  # removed (or made unreadable) since the listing
            log.warning("skipping %s: %s", model_dir, exc)
            continue
        for version_dir in version_dirs:
            if not _VERSION_RE.fullmatch(version_dir.name):
                if version_dir.is_dir():
                    log.warning("skipping %s: a version is a positive integer (1, 2, ...)", version_dir)
                continue
            artifact = version_dir / ARTIFACT_NAME
            if artifact.is_file():
                found.setdefault(model_dir.name, {})[int(version_dir.name)] = artifact
    return found


def scan_signatures(root: Path) -> dict[str, Found]:
    """:func:`scan_repository` with each file's signature (a file removed between listing and stat is left out)."""
    out: dict[str, Found] = {}
    for name, versions in scan_repository(root).items():
        for v, path in versions.items():
            try:
                out.setdefault(name, {})[v] = (path, artifact_signature(path))
            except OSError:
                continue
    return out


def select_versions(versions: Sequence[int], policy: str) -> list[int]:
    kind, arg = parse_version_policy(policy)
    ordered = sorted(versions)
    if kind == "all":
        return ordered
    if kind == "latest":
        assert isinstance(arg, int)
        return ordered[-arg:]
    assert isinstance(arg, tuple)
    return [v for v in ordered if v in arg]


def plan_loads(
    on_disk: Mapping[int, Signature],
    served: Mapping[int, Signature | None],
    failed: Mapping[int, Signature | None],
    policy: str,
    *,
    settled: Collection[int] | None = None,
    retry_failed: bool = False,
) -> list[int]:
    """Versions to load: wanted ones that do not serve yet, and serving ones (wanted, or kept because a wanted
    one failed) whose file changed. ``settled`` (when given) limits them to files seen unchanged by the
    previous scan; a file that failed is skipped unless it changed since or ``retry_failed``."""
    out = []
    for v in sorted(set(select_versions(list(on_disk), policy)) | (set(served) & set(on_disk))):
        sig = on_disk[v]
        if v in served and served[v] == sig:
            continue
        if settled is not None and v not in settled:
            continue
        if not retry_failed and failed.get(v) == sig:
            continue
        out.append(v)
    return out


def plan_unloads(on_disk: Collection[int], served: Collection[int], policy: str) -> list[int]:
    """Served versions to release: those the policy no longer wants, but only once every wanted version
    serves (so a failed newcomer leaves its predecessor serving); those whose file is gone, always."""
    wanted = set(select_versions(list(on_disk), policy))
    if wanted <= set(served):
        return sorted(set(served) - wanted)
    return sorted(v for v in served if v not in on_disk)
