"""Checkpoints are untrusted input: code-running pickles are refused and run nothing; every kind of bad
file gets a clear error (a one-line message and exit code 2 from ``deepvit export``); every good format
(official, EMA, bare, DDP, our own) loads strictly."""

from __future__ import annotations

import argparse
import contextlib
import pickle
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from deepvit.model.checkpoint import (
    ArchitectureMismatchError,
    CheckpointError,
    ClassCountMismatchError,
    CorruptCheckpointError,
    NotACheckpointError,
    UnsafeCheckpointError,
    load_checkpoint,
    load_weights,
    read_checkpoint,
    save_checkpoint,
    select_state_dict,
    sha256_of,
)
from deepvit.model.config import DeepViTConfig
from deepvit.model.net import DeepViT, build_model

REPO = Path(__file__).parents[2]


class CodeRunningPayload:
    """Unpickling this runs ``exec``, which writes the marker file: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"__import__('pathlib').Path({str(self.marker)!r}).write_text('pwned')",))


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def official(data_dir: Path) -> dict[str, Any]:
    """The official tiny_patch checkpoint's contents, loaded as data."""
    return read_checkpoint(data_dir / "conformance" / "official_tiny_patch.pth.tar")


@pytest.fixture(scope="module")
def expected(data_dir: Path) -> dict[str, np.ndarray]:
    with np.load(data_dir / "conformance" / "official_expected_logits.npz") as npz:
        return {k: npz[k] for k in npz.files if k.startswith("tiny_patch")}


def tiny_patch(data_dir: Path, **changes: Any) -> DeepViT:
    return DeepViT(DeepViTConfig.from_json(data_dir / "tiny_patch.json").replace(**changes)).eval()


def logits_of(model: DeepViT, expected: dict[str, np.ndarray]) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(expected["tiny_patch_input"])).numpy()


def write_payload(kind: str, path: Path, marker: Path, official: dict[str, Any]) -> None:
    payload = CodeRunningPayload(marker)
    if kind == "official-layout":  # the payload sits where the official checkpoint keeps its args
        torch.save({**official, "args": payload}, path)
    elif kind == "legacy-format":  # torch.save's pre-1.6 format
        torch.save({"state_dict": payload}, path, _use_new_zipfile_serialization=False)
    elif kind == "plain-pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:  # pragma: no cover
        raise AssertionError(kind)


PAYLOAD_KINDS = ["official-layout", "legacy-format", "plain-pickle"]


# ---------------------------------------------------------------- code-running pickles


@pytest.mark.parametrize("kind", PAYLOAD_KINDS)
def test_the_payload_is_live_when_loaded_without_weights_only(
    tmp_path: Path, official: dict[str, Any], kind: str
) -> None:
    # Proof that the refusal below matters: an unguarded load runs the payload.
    path, marker = tmp_path / "evil.pth.tar", tmp_path / "marker"
    write_payload(kind, path, marker, official)
    with contextlib.suppress(Exception):  # the plain pickle is no torch file; its payload has run by then
        torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("kind", PAYLOAD_KINDS)
def test_code_running_pickle_is_refused_and_runs_nothing(tmp_path: Path, official: dict[str, Any], kind: str) -> None:
    path, marker = tmp_path / "evil.pth.tar", tmp_path / "marker"
    write_payload(kind, path, marker, official)
    with pytest.raises(UnsafeCheckpointError, match=r"asks to load exec, which could run code") as info:
        read_checkpoint(path)
    assert "plain state dict" in str(info.value)  # says what to do about it
    assert not marker.exists()


# torch warns about the pickle protocol of a non-torch pickle before refusing it; the warning is torch's.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("protocol", [4, 5])
def test_modern_protocol_plain_pickle_is_refused_and_runs_nothing(tmp_path: Path, protocol: int) -> None:
    path, marker = tmp_path / "evil.pkl", tmp_path / "marker"
    path.write_bytes(pickle.dumps(CodeRunningPayload(marker), protocol=protocol))
    with pytest.raises(CheckpointError):
        read_checkpoint(path)
    assert not marker.exists()


# ---------------------------------------------------------------- files that are not (whole) checkpoints


def make_text(tmp_path: Path, data_dir: Path) -> Path:
    path = tmp_path / "notes.pth.tar"
    path.write_text("these are not the weights you are looking for\n")
    return path


def make_json(tmp_path: Path, data_dir: Path) -> Path:
    # The model config passed as --checkpoint by mistake: not a checkpoint, and not an attack either.
    path = tmp_path / "tiny_patch.json"
    path.write_bytes((data_dir / "tiny_patch.json").read_bytes())
    return path


def make_empty(tmp_path: Path, data_dir: Path) -> Path:
    path = tmp_path / "empty.pth.tar"
    path.write_bytes(b"")
    return path


def make_truncated(tmp_path: Path, data_dir: Path) -> Path:
    whole = (data_dir / "conformance" / "official_tiny_patch.pth.tar").read_bytes()
    path = tmp_path / "truncated.pth.tar"
    path.write_bytes(whole[: len(whole) // 2])
    return path


def make_truncated_legacy(tmp_path: Path, data_dir: Path) -> Path:
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.zeros(1000)}, legacy, _use_new_zipfile_serialization=False)
    path = tmp_path / "truncated-legacy.pth"
    path.write_bytes(legacy.read_bytes()[:2000])
    return path


def make_zip(tmp_path: Path, data_dir: Path) -> Path:
    path = tmp_path / "weights.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("README.txt", "a zip, but not one torch.save wrote")
    return path


def make_list(tmp_path: Path, data_dir: Path) -> Path:
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    return path


def make_dict_without_weights(tmp_path: Path, data_dir: Path) -> Path:
    path = tmp_path / "metrics.pth"
    torch.save({"epoch": 3, "metric": 81.2}, path)
    return path


def make_torchscript(tmp_path: Path, data_dir: Path) -> Path:
    import warnings

    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():  # torch.jit is deprecated; people still have such files
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    return path


def make_missing(tmp_path: Path, data_dir: Path) -> Path:
    return tmp_path / "absent.pth.tar"


BAD_FILES: list[tuple[str, Callable[[Path, Path], Path], type[CheckpointError], str]] = [
    ("text", make_text, NotACheckpointError, "is not a PyTorch checkpoint"),
    ("json", make_json, NotACheckpointError, "is not a PyTorch checkpoint"),
    ("empty", make_empty, NotACheckpointError, "is empty, not a checkpoint"),
    ("truncated", make_truncated, CorruptCheckpointError, "truncated or corrupt; copy it again"),
    ("truncated-legacy", make_truncated_legacy, CorruptCheckpointError, "truncated or corrupt"),
    ("zip", make_zip, NotACheckpointError, "is a zip archive but not a PyTorch checkpoint"),
    ("list", make_list, NotACheckpointError, "holds a list, not a state dict"),
    ("no-weights", make_dict_without_weights, NotACheckpointError, r"no state dict in the checkpoint.*'epoch'"),
    ("torchscript", make_torchscript, NotACheckpointError, r"TorchScript archive .*state_dict\(\)"),
    ("missing", make_missing, CheckpointError, "does not exist"),
]


@pytest.mark.parametrize(("make", "error", "message"), [b[1:] for b in BAD_FILES], ids=[b[0] for b in BAD_FILES])
def test_bad_files_get_a_clear_error(
    tmp_path: Path, data_dir: Path, make: Callable[[Path, Path], Path], error: type[Exception], message: str
) -> None:
    path = make(tmp_path, data_dir)
    with pytest.raises(error, match=message) as info:
        select_state_dict(read_checkpoint(path))
    assert not isinstance(info.value, UnsafeCheckpointError)  # a broken file is not reported as an attack


# ---------------------------------------------------------------- formats that load


def test_official_format_with_its_args_namespace_loads_as_data(official: dict[str, Any]) -> None:
    assert isinstance(official["args"], argparse.Namespace)  # allow-listed, and only that class
    assert {"state_dict", "state_dict_ema", "optimizer", "epoch", "arch"} <= set(official)


@pytest.mark.parametrize(("weights", "suffix"), [("state_dict", ""), ("ema", "_ema")])
def test_ema_flag_picks_the_ema_weights(
    data_dir: Path, expected: dict[str, np.ndarray], weights: str, suffix: str
) -> None:
    model = tiny_patch(data_dir)
    path = data_dir / "conformance" / "official_tiny_patch.pth.tar"
    sha = load_checkpoint(model, path, weights, "tiny_patch")
    np.testing.assert_allclose(logits_of(model, expected), expected[f"tiny_patch_logits{suffix}"], atol=1e-5)
    assert sha == sha256_of(path)
    assert len(sha) == 64


def _bare(official: dict[str, Any]) -> Any:
    return official["state_dict"]


def _ddp(official: dict[str, Any]) -> Any:
    return {**official, "state_dict": {f"module.{k}": v for k, v in official["state_dict"].items()}}


def _bare_ddp(official: dict[str, Any]) -> Any:
    return {f"module.{k}": v for k, v in official["state_dict"].items()}


def _deit_style(official: dict[str, Any]) -> Any:
    return {"model": official["state_dict"], "epoch": 1}


@pytest.mark.parametrize("layout", [_bare, _ddp, _bare_ddp, _deit_style], ids=["bare", "ddp", "bare-ddp", "deit"])
def test_other_layouts_load_the_same_weights(
    tmp_path: Path,
    data_dir: Path,
    official: dict[str, Any],
    expected: dict[str, np.ndarray],
    layout: Callable[[dict[str, Any]], Any],
) -> None:
    path = tmp_path / "weights.pth"
    torch.save(layout(official), path)
    model = tiny_patch(data_dir)
    load_checkpoint(model, path, "state_dict", "tiny_patch")
    np.testing.assert_allclose(logits_of(model, expected), expected["tiny_patch_logits"], atol=1e-5)


def test_ema_flag_without_ema_weights_says_so(tmp_path: Path, data_dir: Path, official: dict[str, Any]) -> None:
    bare = tmp_path / "bare.pth"
    torch.save(official["state_dict"], bare)
    with pytest.raises(CheckpointError, match="--ema was given, but the file is a bare state dict"):
        load_checkpoint(tiny_patch(data_dir), bare, "ema", "tiny_patch")

    no_ema = tmp_path / "no_ema.pth.tar"
    torch.save({k: v for k, v in official.items() if k != "state_dict_ema"}, no_ema)
    with pytest.raises(CheckpointError, match=r"has no EMA weights \(keys: \["):
        load_checkpoint(tiny_patch(data_dir), no_ema, "ema", "tiny_patch")


def test_our_own_checkpoints_are_plain_data_in_the_official_layout(
    tmp_path: Path, data_dir: Path, official: dict[str, Any], expected: dict[str, np.ndarray]
) -> None:
    path = tmp_path / "ours.pth.tar"
    cfg = DeepViTConfig.from_json(data_dir / "tiny_patch.json")
    save_checkpoint(
        path,
        {
            "epoch": 2,
            "arch": "tiny_patch",
            "state_dict": official["state_dict"],
            "state_dict_ema": official["state_dict_ema"],
            "config": cfg.to_dict(),
        },
    )
    assert [p.name for p in tmp_path.iterdir()] == ["ours.pth.tar"]  # atomic: no temp file left
    # Readable by a plain weights_only torch.load with no allow-list, as the official loader would read it.
    assert torch.load(path, weights_only=True)["config"] == cfg.to_dict()
    model = tiny_patch(data_dir)
    load_checkpoint(model, path, "ema", "tiny_patch")
    np.testing.assert_allclose(logits_of(model, expected), expected["tiny_patch_logits_ema"], atol=1e-5)


# ---------------------------------------------------------------- another architecture, another class count


def meta_state_dict(arch: str, **changes: Any) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return build_model(arch, **changes).state_dict()


def test_other_architecture_names_the_differences_and_the_matching_arch() -> None:
    with torch.device("meta"):
        model = build_model("deepvit_S")
    with pytest.raises(ArchitectureMismatchError) as info:
        load_weights(model, meta_state_dict("deepvit_patch16_224_re_attn_16b"), "deepvit_S")
    message = str(info.value)
    assert message.startswith("the checkpoint does not fit deepvit_S:")
    assert "missing keys: patch_embed.conv1.weight" in message  # deepvit_S's convolutional stem
    assert "unexpected keys: blocks.0.attn.reatten_matrix.weight" in message  # Re-attention in every block
    assert "shape mismatches: cls_token checkpoint [1, 1, 384] vs model [1, 1, 396]" in message
    assert "its keys and shapes match --arch deepvit_patch16_224_re_attn_16b" in message


def test_resolution_variant_is_suggested_from_the_position_embedding() -> None:
    with torch.device("meta"):
        model = build_model("deepvit_L")
    with pytest.raises(ArchitectureMismatchError) as info:
        load_weights(model, meta_state_dict("deepvit_L_384"), "deepvit_L")
    assert "pos_embed checkpoint [1, 577, 420] vs model [1, 197, 420]" in str(info.value)
    assert "match --arch deepvit_L_384" in str(info.value)


def test_unknown_architecture_asks_for_its_config(data_dir: Path, official: dict[str, Any]) -> None:
    with torch.device("meta"):
        model = build_model("deepvit_S")
    with pytest.raises(ArchitectureMismatchError, match=r"no official architecture matches.*--model-config"):
        load_weights(model, official["state_dict"], "deepvit_S")


def test_class_count_mismatch_says_how_many(data_dir: Path, official: dict[str, Any]) -> None:
    with pytest.raises(ClassCountMismatchError, match="head has 10 classes but the model is configured for 7"):
        load_weights(tiny_patch(data_dir, num_classes=7), official["state_dict"], "tiny_patch")


# ---------------------------------------------------------------- the same errors through `deepvit export`


@pytest.fixture(scope="module")
def other_arch_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real state dict of deepvit_patch16_224_re_attn_16b (86 MB), for loading as deepvit_S."""
    path = tmp_path_factory.mktemp("re_attn_16b") / "re_attn_16b.pth"
    torch.save(build_model("deepvit_patch16_224_re_attn_16b").state_dict(), path)
    return path


def test_cli_refuses_a_code_running_pickle(
    tmp_path: Path, data_dir: Path, official: dict[str, Any], run_deepvit: Any
) -> None:
    path, marker, out = tmp_path / "evil.pth.tar", tmp_path / "marker", tmp_path / "out" / "model.onnx"
    write_payload("official-layout", path, marker, official)
    result = run_deepvit(
        "export", "--model-config", data_dir / "tiny_patch.json", "--checkpoint", path, "--output", out
    )
    assert result.code == 2
    assert result.stderr.strip().splitlines()[-1].startswith("deepvit export: error: refused")
    assert "could run code" in result.stderr
    assert not marker.exists()
    assert not out.parent.exists()


@pytest.mark.parametrize("make", [b[1] for b in BAD_FILES], ids=[b[0] for b in BAD_FILES])
def test_cli_bad_files_exit_2_with_one_line(
    tmp_path: Path, data_dir: Path, make: Callable[[Path, Path], Path], run_deepvit: Any
) -> None:
    path, out = make(tmp_path, data_dir), tmp_path / "out" / "model.onnx"
    result = run_deepvit(
        "export", "--model-config", data_dir / "tiny_patch.json", "--checkpoint", path, "--output", out
    )
    assert result.code == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("deepvit export: error: ")
    assert len(lines) <= 2  # at most the "reading checkpoint" progress line, then the error
    assert not out.parent.exists()


def test_cli_other_architecture_suggests_the_matching_one(
    tmp_path: Path, other_arch_checkpoint: Path, run_deepvit: Any
) -> None:
    out = tmp_path / "model.onnx"
    result = run_deepvit("export", "--arch", "deepvit_S", "--checkpoint", other_arch_checkpoint, "--output", out)
    assert result.code == 2
    assert "deepvit export: error: the checkpoint does not fit deepvit_S:" in result.stderr
    for part in ("missing keys:", "unexpected keys:", "shape mismatches:"):
        assert part in result.stderr
    assert "its keys and shapes match --arch deepvit_patch16_224_re_attn_16b" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_cli_class_count_against_labels(tmp_path: Path, data_dir: Path, run_deepvit: Any) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\nfish\nfrog\n")
    out = tmp_path / "out" / "model.onnx"
    result = run_deepvit(
        "export",
        "--model-config",
        data_dir / "tiny_patch.json",
        "--checkpoint",
        data_dir / "conformance" / "official_tiny_patch.pth.tar",
        "--labels",
        labels,
        "--output",
        out,
    )
    assert result.code == 2
    assert "head has 10 classes but" in result.stderr
    assert "has 5 names" in result.stderr
    assert not out.parent.exists()


def test_cli_ema_without_ema_weights(
    tmp_path: Path, data_dir: Path, official: dict[str, Any], run_deepvit: Any
) -> None:
    bare = tmp_path / "bare.pth"
    torch.save(official["state_dict"], bare)
    out = tmp_path / "out" / "model.onnx"
    args = ["export", "--model-config", data_dir / "tiny_patch.json", "--checkpoint", bare, "--ema", "--output", out]
    result = run_deepvit(*args)
    assert result.code == 2
    assert "--ema was given, but the file is a bare state dict with no EMA weights" in result.stderr
    assert not out.parent.exists()


@pytest.mark.parametrize("case", ["text", "evil"])
def test_exit_status_of_the_real_command(tmp_path: Path, data_dir: Path, official: dict[str, Any], case: str) -> None:
    marker = tmp_path / "marker"
    if case == "text":
        path = make_text(tmp_path, data_dir)
    else:
        path = tmp_path / "evil.pth.tar"
        write_payload("official-layout", path, marker, official)
    out = tmp_path / "out" / "model.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "deepvit.cli", "export", "--arch", "deepvit_S", "--checkpoint", path, "--output", out],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("deepvit export: error: ")
    assert "Traceback" not in proc.stderr
    assert not marker.exists()
    assert not out.parent.exists()
