"""The config: the official variants by name, the JSON form (official field names), and clear
ConfigErrors for unknown fields, wrong types and combinations that cannot describe a DeepViT."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from deepvit.model.config import VARIANTS, ConfigError, DeepViTConfig, get_config

TINY_PATCH: dict[str, Any] = {
    "img_size": 32,
    "patch_size": 16,
    "embed_dim": 48,
    "depth": 4,
    "num_heads": 12,
    "mlp_ratio": 3,
    "qkv_bias": True,
    "layernorm_eps": 1e-06,
    "reattention_blocks": [0, 1, 2, 3],
    "transform_scale": False,
    "patch_embed": "conv",
    "scale_adjustment": 1.0,
    "num_classes": 10,
}


def write_config(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "model.json"
    path.write_text(json.dumps(data))
    return path


def test_json_form_reads_the_official_field_names(tmp_path: Path) -> None:
    cfg = DeepViTConfig.from_json(write_config(tmp_path, TINY_PATCH))
    assert (cfg.img_size, cfg.embed_dim, cfg.depth, cfg.num_classes) == (32, 48, 4, 10)
    assert cfg.reattention_blocks == (0, 1, 2, 3)
    assert (cfg.head_dim, cfg.num_patches) == (4, 4)
    assert cfg.in_chans == 3  # fields the JSON leaves out take the official defaults


@pytest.mark.parametrize("arch", sorted(VARIANTS))
def test_json_round_trip_keeps_every_variant(tmp_path: Path, arch: str) -> None:
    cfg = get_config(arch)
    assert DeepViTConfig.from_json(write_config(tmp_path, cfg.to_dict())) == cfg


def test_registered_variants_are_the_official_models() -> None:
    s, big = get_config("deepvit_S"), get_config("deepvit_L")
    assert (s.embed_dim, s.depth, s.reattention_blocks, s.patch_embed) == (396, 16, tuple(range(11, 16)), "cnn")
    assert (s.transform_scale, s.scale_adjustment) == (True, 0.5)
    assert (big.embed_dim, big.depth, big.reattention_blocks) == (420, 32, tuple(range(20, 32)))
    assert (big.transform_scale, big.scale_adjustment) == (False, 0.5)
    assert get_config("deepvit_L_384").img_size == 384
    for depth in (16, 24, 32):
        c = get_config(f"deepvit_patch16_224_re_attn_{depth}b")
        assert (c.embed_dim, c.depth, c.reattention_blocks, c.patch_embed) == (384, depth, tuple(range(depth)), "conv")
    for c in VARIANTS.values():
        assert (c.num_heads, c.mlp_ratio, c.qkv_bias, c.layernorm_eps) == (12, 3.0, True, 1e-6)


def test_unknown_architecture_names_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"unknown architecture 'deepvit_XL'.*deepvit_S.*deepvit_L_384"):
        get_config("deepvit_XL")


def test_unknown_field_is_named(tmp_path: Path) -> None:
    data = {**TINY_PATCH, "embed_dims": 48, "heads": 12}
    with pytest.raises(ConfigError, match=r"unknown config fields \['embed_dims', 'heads'\]"):
        DeepViTConfig.from_json(write_config(tmp_path, data))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"embed_dim": 50}, "embed_dim 50 is not divisible by num_heads 12"),
        ({"img_size": 40}, "img_size 40 is not divisible by patch_size 16"),
        ({"patch_embed": "resnet"}, "patch_embed must be 'conv' or 'cnn', not 'resnet'"),
        ({"patch_embed": "cnn", "patch_size": 5, "img_size": 30}, "patch_size must be even"),
        ({"reattention_blocks": [3, 4, 7]}, r"reattention_blocks \[4, 7\] are outside 0..3"),
        ({"depth": 0, "reattention_blocks": []}, "depth must be positive"),
        ({"num_classes": -1}, "num_classes must be positive"),
        ({"scale_adjustment": 0}, "scale_adjustment must be positive"),
        ({"crop_pct": 1.5}, r"crop_pct must be in \(0, 1\]"),
    ],
)
def test_invalid_combinations_say_what_is_wrong(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DeepViTConfig.from_json(write_config(tmp_path, {**TINY_PATCH, **change}))


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        DeepViTConfig.from_dict({**TINY_PATCH, "embed_dim": 50, "img_size": 40})
    assert "embed_dim 50" in str(info.value)
    assert "img_size 40" in str(info.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # A string "false" is truthy: accepting it would silently build a different model.
        ({"transform_scale": "false"}, "transform_scale must be true or false, not 'false'"),
        ({"depth": "4"}, "depth must be an integer, not '4'"),
        ({"depth": 4.5}, "depth must be an integer, not 4.5"),
        ({"mlp_ratio": "3"}, "mlp_ratio must be a number"),
        ({"reattention_blocks": 3}, "reattention_blocks must be a list of block indices, not 3"),
        ({"reattention_blocks": ["0"]}, "reattention_blocks must be a list of block indices"),
        ({"patch_embed": 1}, "patch_embed must be a string"),
    ],
)
def test_wrong_json_types_name_the_field(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DeepViTConfig.from_json(write_config(tmp_path, {**TINY_PATCH, **change}))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot read model config"),
        ("[1, 2, 3]", "must be a JSON object of config fields"),
    ],
)
def test_unreadable_config_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "model.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        DeepViTConfig.from_json(path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read model config"):
        DeepViTConfig.from_json(tmp_path / "absent.json")


def test_config_errors_reach_the_command_line_as_one_line(tmp_path: Path, run_deepvit: Any) -> None:
    path = write_config(tmp_path, {**TINY_PATCH, "embed_dim": 50})
    out = tmp_path / "out" / "model.onnx"
    result = run_deepvit("export", "--model-config", path, "--random-init", "--output", out)
    assert result.code == 2
    assert result.stderr.strip().splitlines() == [
        "deepvit export: error: invalid DeepViT config: embed_dim 50 is not divisible by num_heads 12"
    ]
    assert not out.parent.exists()

    result = run_deepvit("export", "--arch", "deepvit_XL", "--random-init", "--output", out)
    assert result.code == 2
    assert "unknown architecture 'deepvit_XL'" in result.stderr
    assert "Traceback" not in result.stderr
