"""The memory budget: the container's limit read from its cgroup, the upload bound's default derived from it,
start-up refused when the fixed parts do not fit, and a model version whose sessions do not fit failing its
load with the parts named while what served keeps serving."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from deepvit.service.budget import MemoryBudget, MemoryBudgetError, container_memory_limit, resident_bytes, upload_bound
from deepvit.service.config import Settings
from deepvit.service.metrics import Metrics
from deepvit.service.models.manager import ModelManager

MIB = 1 << 20
GIB = 1 << 30


def test_the_container_limit_is_read_from_cgroup_v2_or_v1(tmp_path: Path) -> None:
    assert container_memory_limit(tmp_path) is None  # no cgroup file system
    (tmp_path / "memory.max").write_text("max\n")
    assert container_memory_limit(tmp_path) is None  # v2, no limit
    (tmp_path / "memory.max").write_text(f"{4 * GIB}\n")
    assert container_memory_limit(tmp_path) == 4 * GIB
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert container_memory_limit(v1) is None  # v1's "no limit"
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{2 * GIB}\n")
    assert container_memory_limit(v1) == 2 * GIB


def test_the_upload_bound_follows_the_limit_unless_set() -> None:
    s = Settings(providers=["cpu"])
    assert upload_bound(s, None) == 256 * MIB
    assert upload_bound(s, 2 * GIB) == 256 * MIB  # an eighth
    assert upload_bound(s, 16 * GIB) == 512 * MIB  # at most
    assert upload_bound(s, 64 * MIB) == s.max_body_bytes  # at least one largest body
    assert upload_bound(Settings(providers=["cpu"], max_upload_bytes=100 * MIB), 2 * GIB) == 100 * MIB
    with pytest.raises(ValueError, match="largest body"):
        Settings(providers=["cpu"], max_upload_bytes=MIB)


def test_start_up_is_refused_when_the_fixed_parts_do_not_fit() -> None:
    s = Settings(providers=["cpu"], memory_limit_bytes=1 * GIB)
    budget = MemoryBudget.for_settings(s, process=300 * MIB)
    assert budget.parts() == {"process": 300 * MIB, "sessions": 0, "decode": 512 * MIB, "uploads": 2 * 128 * MIB}
    with pytest.raises(MemoryBudgetError) as refused:
        budget.check_start()
    message = str(refused.value)
    for part in ("process 300 MiB", "decoding 512 MiB", "DEEPVIT_MAX_DECODE_MEMORY_BYTES", "uploads 2 x 128 MiB"):
        assert part in message
    assert "of a 1,024 MiB limit" in message
    smaller = Settings(providers=["cpu"], memory_limit_bytes=1 * GIB, max_decode_memory_bytes=320 * MIB)
    MemoryBudget.for_settings(smaller, process=300 * MIB).check_start()  # 876 MiB: fits


def test_without_a_limit_the_budget_is_reported_not_enforced(caplog: pytest.LogCaptureFixture) -> None:
    budget = MemoryBudget(limit=None, process=100 * MIB, decode=512 * MIB, upload_bound=256 * MIB)
    with caplog.at_level(logging.INFO, logger="deepvit.memory"):
        budget.check_start()
        budget.add_version("m", 1, 64 * GIB)
    assert "no memory limit known" in caplog.text
    assert budget.parts()["sessions"] == 64 * GIB


def test_a_version_that_does_not_fit_fails_its_load_and_what_serves_keeps_serving(tmp_path: Path) -> None:
    budget = MemoryBudget(limit=2 * GIB, process=200 * MIB, decode=512 * MIB, upload_bound=256 * MIB)
    budget.add_version("m", 1, 500 * MIB)  # 1,724 MiB of 2,048
    with pytest.raises(MemoryBudgetError) as refused:
        budget.add_version("m", 2, 400 * MIB)
    assert "model m version 2 does not fit" in str(refused.value)
    assert "model sessions 900 MiB (m v1 500 MiB, m v2 400 MiB)" in str(refused.value)
    assert budget.sessions == {("m", 1): 500 * MIB}  # unchanged
    budget.add_version("m", 1, 600 * MIB)  # a reload of the same version replaces its figure
    budget.remove_version("m", 1)
    assert budget.parts()["sessions"] == 0


def test_the_manager_measures_each_version_into_the_budget(exported_tiny_patch: Path, tmp_path: Path) -> None:
    """A real artifact loads with a budget that fits it and is counted; with a limit that leaves no room it
    fails its load with the parts named, recorded as the version's failure."""
    settings = Settings(model_repository=tmp_path, providers=["cpu"], warmup=False)
    roomy = MemoryBudget(limit=None, process=resident_bytes(), decode=0, upload_bound=0)
    manager = ModelManager(settings, Metrics(), budget=roomy)

    async def load(m: ModelManager) -> None:
        try:
            await m.load_version("tiny", 1, exported_tiny_patch)
        finally:
            await m.close()

    asyncio.run(load(manager))
    assert roomy.sessions == {}  # unloaded by close: given back
    tight = MemoryBudget(limit=roomy.process, process=roomy.process, decode=0, upload_bound=0)
    tight.sessions[("other", 1)] = 1  # the limit is already reached
    refused = ModelManager(settings, Metrics(), budget=tight)
    with pytest.raises(MemoryBudgetError):
        asyncio.run(load(refused))
    failure = refused.failure("tiny", 1)
    assert failure is not None
    assert failure.reason.startswith("model tiny version 1 does not fit the memory limit")
