"""The artifact's ONNX Runtime sessions as the service opens them."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from deepvit.artifact.session import open_session


@pytest.mark.parametrize("spinning", [False, True])
def test_a_session_over_several_cores_leaves_them_idle_after_a_run_unless_told_to_spin(
    exported_tiny_patch: Path, spinning: bool
) -> None:
    """ONNX Runtime's default spins its pool threads for some 25 ms after every run: a core busy for nothing
    while the server waits for its next request. The service's sessions stop the spin when a run ends
    (DEEPVIT_INTRA_OP_SPINNING brings it back)."""
    session = open_session(exported_tiny_patch, intra_op_threads=2, spinning=spinning)
    crop = session.get_inputs()[0].shape[1]
    x = {"image": np.zeros((1, crop, crop, 3), np.uint8)}
    session.run(None, x)  # the first run's own start-up work
    time.sleep(0.2)
    idle_cpu = []
    for _ in range(5):
        session.run(None, x)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        time.sleep(0.15)  # the server waiting for its next request
        idle_cpu.append((time.process_time() - cpu0) / (time.perf_counter() - wall0))
    if spinning:
        assert max(idle_cpu) > 0.02  # ONNX Runtime's default: a pool thread spinning after the run
    else:
        assert max(idle_cpu) < 0.02  # asleep: under 2% of a core between runs
