"""The app driven in process (httpx over ASGI, no socket) over a repository holding one real artifact."""

from __future__ import annotations

import base64
import contextlib
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from fastapi import FastAPI
from PIL import Image

from deepvit.service.context import AppContext
from deepvit.service.models.manager import ModelVersion


def grey_png(side: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), 127, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def v2_bytes_request(*images: bytes) -> dict[str, object]:
    """A v2 inference request carrying encoded images (the BYTES form of the ``image`` input)."""
    data = [base64.b64encode(b).decode() for b in images]
    return {"inputs": [{"name": "image", "shape": [len(images)], "datatype": "BYTES", "data": data}]}


@dataclass
class InProcessApp:
    """The app over a repository holding the exported tiny_patch as ``tiny`` version 1, driven in process."""

    app: FastAPI
    ctx: AppContext
    artifact: Path

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[tuple[httpx.AsyncClient, ModelVersion]]:
        """Load the model (no warm-up), yield a client and the loaded version; release the model after."""
        mv = await self.ctx.models.load_version("tiny", 1, self.artifact)
        self.ctx.models.loaded = True
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://test") as c:
                yield c, mv
        finally:
            await self.ctx.models.close()
