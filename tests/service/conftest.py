from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    # The service runs on asyncio (uvicorn); async tests use anyio's pytest plugin on that backend.
    return "asyncio"
