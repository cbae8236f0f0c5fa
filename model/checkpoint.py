"""Checkpoints are untrusted input: safe load, format detection, one pure key filter, strict load.

Accepted formats:
- the official training script's ``.pth.tar`` (a dict with ``state_dict``, ``state_dict_ema``, ``args`` as an
  ``argparse.Namespace``, ``epoch``, ``optimizer``, ...) and this project's own checkpoints, which use the
  same layout with the config as plain data, so either loader reads the other's files;
- DeiT-style dicts with ``model`` / ``model_ema``;
- a bare state dict; DDP / EMA-wrapper ``module.`` prefixes are removed.

``torch.load`` always runs with ``weights_only=True``; the only class allow-listed is ``argparse.Namespace``,
which carries data and no code. A pickle that names anything else is refused before it can run.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from .atomic import atomic_path
from .config import VARIANTS, ConfigError, DeepViTConfig

if TYPE_CHECKING:
    from .net import DeepViT

WeightsKind = Literal["state_dict", "ema"]
SAFE_GLOBALS: list[Any] = [argparse.Namespace]
_ZIP_MAGIC = b"PK\x03\x04"
# torch.save's pre-1.6 (non-zip) format starts with this pickled magic number (torch/serialization.py).
_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."
# The weights-only unpickler's refusal of a named global: the one sign that the pickle wants to run code.
# Other weights-only failures ("Unsupported operand ...") are bytes that are not a torch pickle at all,
# e.g. a JSON or text file.
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([A-Za-z_][\w.]*) was not an allowed global")


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says why and what to do."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle names code to run: refused without running it."""


class NotACheckpointError(CheckpointError):
    pass


class CorruptCheckpointError(CheckpointError):
    pass


class ArchitectureMismatchError(CheckpointError):
    pass


class ClassCountMismatchError(CheckpointError):
    pass


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_checkpoint(path: str | Path) -> Any:
    """``torch.load`` with weights_only, its failures translated into CheckpointError subclasses."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if not head:
        raise NotACheckpointError(f"{path} is empty, not a checkpoint")
    if head.startswith(_ZIP_MAGIC) and _is_torchscript(path):
        raise NotACheckpointError(
            f"{path} is a TorchScript archive (torch.jit.save), which holds code as well as weights and is not "
            "loaded here; save the weights with torch.save(model.state_dict(), ...) and export from that"
        )
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types here; each is sorted below
        text = str(exc)
        refused = _REFUSED_GLOBAL.search(text)
        if refused:
            raise UnsafeCheckpointError(
                f"refused {path}: the pickle asks to load {refused.group(1)}, which could run code. "
                "Checkpoints are loaded as data only; re-save it as a plain state dict "
                "(torch.save(model.state_dict(), ...)) from a trusted environment"
            ) from None
        if head.startswith(_ZIP_MAGIC) and not _could_be_torch_zip(path):
            raise NotACheckpointError(
                f"{path} is a zip archive but not a PyTorch checkpoint (it has no data.pkl written by torch.save)"
            ) from None
        if head.startswith(_ZIP_MAGIC) or head == _LEGACY_MAGIC:
            reason = text.splitlines()[0].split(". ")[0][:160] if text else type(exc).__name__
            raise CorruptCheckpointError(
                f"{path} looks like a PyTorch checkpoint but cannot be read ({reason}): "
                "it is truncated or corrupt; copy it again and compare its sha256"
            ) from None
        raise NotACheckpointError(
            f"{path} is not a PyTorch checkpoint (expected a file written by torch.save)"
        ) from None


def _zip_names(path: Path) -> list[str] | None:
    """The member names of a zip archive; None when it cannot be read as one (e.g. truncated)."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError):
        return None


def _is_torchscript(path: Path) -> bool:
    """torch.jit.save writes ``<name>/constants.pkl`` and ``<name>/code/``; torch.save writes neither."""
    names = _zip_names(path) or []
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def class_names_of(obj: Any, num_classes: int | None) -> list[str] | None:
    """The class names a ``deepvit train`` checkpoint carries, when they fit its head; else None."""
    names = obj.get("class_names") if isinstance(obj, Mapping) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return None
    return names if num_classes is None or len(names) == num_classes else None


def _could_be_torch_zip(path: Path) -> bool:
    """False only for a readable zip without torch.save's ``<name>/data.pkl``; a broken zip may be
    a truncated checkpoint."""
    names = _zip_names(path)
    return names is None or any(name.endswith("/data.pkl") for name in names)


def is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def select_state_dict(obj: Any, weights: WeightsKind = "state_dict") -> dict[str, Tensor]:
    """Pick the weights out of whatever dict the file held."""
    if is_state_dict(obj):
        if weights == "ema":
            raise CheckpointError("--ema was given, but the file is a bare state dict with no EMA weights")
        return dict(obj)
    if not isinstance(obj, Mapping):
        raise NotACheckpointError(f"the file holds a {type(obj).__name__}, not a state dict or checkpoint dict")
    candidates = ("state_dict_ema", "model_ema") if weights == "ema" else ("state_dict", "model")
    for key in candidates:
        if key in obj and is_state_dict(obj[key]):
            return dict(obj[key])
    if weights == "ema":
        raise CheckpointError(f"--ema was given, but the checkpoint has no EMA weights (keys: {sorted(obj)})")
    raise NotACheckpointError(f"no state dict in the checkpoint (top-level keys: {sorted(map(str, obj))})")


def filter_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Pure: drop the ``module.`` prefix that DistributedDataParallel and EMA wrappers add."""
    out = {}
    for key, value in sd.items():
        while key.startswith("module."):
            key = key[len("module.") :]
        out[key] = value
    return out


@dataclass(frozen=True)
class KeyReport:
    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # key, checkpoint shape, model shape

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def compare_keys(expected: Mapping[str, Tensor], sd: Mapping[str, Tensor]) -> KeyReport:
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [
        (k, tuple(sd[k].shape), tuple(expected[k].shape))
        for k in expected
        if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)
    ]
    return KeyReport(missing, unexpected, mismatched)


def _meta_state_dict(cfg: DeepViTConfig) -> dict[str, Tensor]:
    from .net import DeepViT

    with torch.device("meta"):
        return DeepViT(cfg).state_dict()


def suggest_architecture(sd: Mapping[str, Tensor]) -> str | None:
    """The official variant whose keys and shapes the weights match, ignoring the classifier width."""
    for name, cfg in VARIANTS.items():
        report = compare_keys(_meta_state_dict(cfg), sd)
        if not report.missing and not report.unexpected and all(k.startswith("head.") for k, _, _ in report.mismatched):
            return name
    return None


def _short(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", … ({len(items)} in all)" if len(items) > n else "")


def load_weights(model: nn.Module, sd: Mapping[str, Tensor], arch_label: str) -> None:
    """Strict load with an error that names what differs and which architecture would fit."""
    report = compare_keys(model.state_dict(), sd)
    if report.ok:
        model.load_state_dict(sd, strict=True)
        return
    head_only = (
        not report.missing and not report.unexpected and all(k.startswith("head.") for k, _, _ in report.mismatched)
    )
    if head_only:
        ckpt_classes = report.mismatched[0][1][0]
        model_classes = report.mismatched[0][2][0]
        raise ClassCountMismatchError(
            f"the checkpoint's head has {ckpt_classes} classes but the model is configured for "
            f"{model_classes}; pass --labels with {ckpt_classes} lines (or a config with "
            f'"num_classes": {ckpt_classes})'
        )
    lines = [f"the checkpoint does not fit {arch_label}:"]
    if report.missing:
        lines.append(f"  missing keys: {_short(report.missing)}")
    if report.unexpected:
        lines.append(f"  unexpected keys: {_short(report.unexpected)}")
    if report.mismatched:
        shapes = [f"{k} checkpoint {list(a)} vs model {list(b)}" for k, a, b in report.mismatched]
        lines.append(f"  shape mismatches: {_short(shapes, 4)}")
    suggestion = suggest_architecture(sd)
    if suggestion:
        lines.append(f"  its keys and shapes match --arch {suggestion}")
    else:
        lines.append("  no official architecture matches; pass the config it was trained with (--model-config)")
    raise ArchitectureMismatchError("\n".join(lines))


def weights_of(obj: Any, weights: WeightsKind = "state_dict") -> dict[str, Tensor]:
    """The chosen weights of what ``read_checkpoint`` returned, with wrapper prefixes removed."""
    return filter_state_dict(select_state_dict(obj, weights))


def head_classes(sd: Mapping[str, Tensor]) -> int | None:
    """The classifier width the weights were trained with, when they have a linear head."""
    head = sd.get("head.weight")
    return int(head.shape[0]) if head is not None and head.ndim == 2 else None


def model_from_checkpoint(
    obj: Any, source: str | Path, cfg: DeepViTConfig | None, arch: str, weights: WeightsKind
) -> DeepViT:
    """The model that ``obj``'s chosen weights (as ``read_checkpoint`` returned it) fit, loaded strictly, in
    eval mode: built from ``cfg``, else from the config a ``deepvit train`` checkpoint carries, with the class
    count of the weights' head."""
    from .net import DeepViT

    sd = weights_of(obj, weights)
    if cfg is None:
        saved = obj.get("config") if isinstance(obj, Mapping) else None
        if not isinstance(saved, dict):
            raise ConfigError(f"{source} carries no model config: pass --arch or --model-config")
        cfg = DeepViTConfig.from_dict(saved)
        arch = str(obj.get("arch", arch))
    classes = head_classes(sd)
    if classes is not None:
        cfg = cfg.replace(num_classes=classes)
    model = DeepViT(cfg).eval()
    load_weights(model, sd, arch)
    return model


def load_checkpoint(model: nn.Module, path: str | Path, weights: WeightsKind, arch_label: str) -> str:
    """Load weights from ``path`` into ``model`` (strict); returns the file's sha256."""
    load_weights(model, weights_of(read_checkpoint(path), weights), arch_label)
    return sha256_of(path)


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> None:
    """Atomic write: a crash leaves the previous file, never half a file."""
    with atomic_path(path) as tmp:
        torch.save(dict(payload), tmp)
