"""The model repository on disk: what a scan finds and what a change of files plans to load and unload."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from unittest.mock import ANY

import pytest

from deepvit.service.models.disk import plan_loads, plan_unloads, scan_repository

# -- what a poll decides ------------------------------------------------------------------------------
A, B, C = (1, 100), (2, 100), (3, 200)  # (mtime_ns, size) signatures


def test_a_new_version_is_loaded_and_its_predecessor_unloaded_once_it_serves() -> None:
    assert plan_loads({1: A, 2: B}, {1: A}, {}, "latest:1") == [2]
    assert plan_unloads([1, 2], [1], "latest:1") == []  # 2 does not serve yet: 1 stays
    assert plan_unloads([1, 2], [1, 2], "latest:1") == [1]


def test_a_failed_version_leaves_its_predecessor_serving_and_is_not_retried_as_is() -> None:
    assert plan_loads({1: A, 2: B}, {1: A}, {2: B}, "latest:1") == []
    assert plan_unloads([1, 2], [1], "latest:1") == []
    assert plan_loads({1: A, 2: C}, {1: A}, {2: B}, "latest:1") == [2]  # the file changed: try again
    assert plan_loads({1: A, 2: B}, {1: A}, {2: B}, "latest:1", retry_failed=True) == [2]  # asked explicitly


def test_a_changed_file_is_reloaded_even_when_kept_as_a_fallback() -> None:
    assert plan_loads({1: A}, {1: B}, {}, "latest:1") == [1]
    assert plan_loads({1: C, 2: B}, {1: A}, {2: B}, "latest:1") == [1]  # 2 failed, 1 serves and changed


def test_a_removed_version_is_unloaded_and_the_policy_falls_back() -> None:
    assert plan_loads({1: A}, {2: B}, {}, "latest:1") == [1]
    assert plan_unloads([1], [2], "latest:1") == [2]  # removed means unwanted, even if 1 failed to load
    assert plan_unloads([1], [1, 2], "latest:1") == [2]
    assert plan_unloads([], [1, 2], "latest:1") == [1, 2]  # the model is gone


def test_a_gone_version_is_unloaded_even_while_a_wanted_one_is_missing() -> None:
    assert plan_unloads([1, 3], [1, 2], "latest:1") == [2]


def test_unsettled_files_wait_for_the_next_scan() -> None:
    assert plan_loads({1: A, 2: B}, {1: A}, {}, "latest:1", settled={1}) == []
    assert plan_loads({1: A, 2: B}, {1: A}, {}, "latest:1", settled={1, 2}) == [2]


@pytest.mark.parametrize(
    ("policy", "loads", "unloads"),
    [("all", [2, 3], []), ("latest:2", [2, 3], []), ("specific:1,3", [3], [])],
)
def test_policies(policy: str, loads: list[int], unloads: list[int]) -> None:
    on_disk = {1: A, 2: B, 3: C}
    assert plan_loads(on_disk, {1: A}, {}, policy) == loads
    assert plan_unloads(list(on_disk), [1], policy) == unloads


def write(root: Path, name: str, version: int, content: bytes = b"good") -> None:
    (root / name / str(version)).mkdir(parents=True, exist_ok=True)
    (root / name / str(version) / "model.onnx").write_bytes(content)


def test_the_scan_skips_odd_version_names_and_models_removed_mid_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for version in ("1", "²", "01", "0", "-1", "1.5", "١"):  # "١": an Arabic-Indic one, also isdigit()
        (tmp_path / "m" / version).mkdir(parents=True)
        (tmp_path / "m" / version / "model.onnx").write_bytes(b"good")
    write(tmp_path, "vanishing", 1)
    assert scan_repository(tmp_path) == {"m": {1: tmp_path / "m" / "1" / "model.onnx"}, "vanishing": {1: ANY}}

    iterdir = Path.iterdir

    def racing_iterdir(self: Path) -> Iterator[Path]:
        if self.name == "vanishing":
            raise FileNotFoundError(2, "No such file or directory", str(self))
        return iterdir(self)

    monkeypatch.setattr(Path, "iterdir", racing_iterdir)
    assert scan_repository(tmp_path) == {"m": {1: tmp_path / "m" / "1" / "model.onnx"}}
