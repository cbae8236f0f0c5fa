"""The attention output made visible: the map over the patch grid drawn as a heat map over the centre crop
the model saw, encoded as PNG. Used by ``POST /explain`` and ``deepvit explain`` alike, so that both draw the
same picture from the same numbers.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .errors import ArtifactError

# Matplotlib's "inferno" (perceptually uniform, readable in grey), sampled at nine points and interpolated:
# dark where the cls token's attention does not reach, bright yellow where it concentrates.
_INFERNO = np.array(
    [
        (0, 0, 4),
        (31, 12, 72),
        (85, 15, 109),
        (136, 34, 106),
        (186, 54, 85),
        (227, 89, 51),
        (249, 140, 10),
        (249, 201, 50),
        (252, 255, 164),
    ],
    dtype=np.float32,
)


def attention_grid(values: np.ndarray, grid: int) -> np.ndarray:
    """The attention output of one image, ``grid * grid`` values row-major, as a (grid, grid) array; an
    ArtifactError when the artifact gave something else (a wrong length, non-finite or negative values)."""
    flat = np.asarray(values, dtype=np.float32).reshape(-1)
    if flat.size != grid * grid:
        raise ArtifactError(f"the attention output has {flat.size} values, not {grid}x{grid}")
    if not np.isfinite(flat).all() or (flat < 0).any():
        raise ArtifactError("the attention output holds negative or non-finite values")
    return flat.reshape(grid, grid)


def colorize(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1], any shape → uint8 RGB of that shape + (3,), through the colour map."""
    pos = np.clip(x, 0.0, 1.0) * (len(_INFERNO) - 1)
    lo = np.floor(pos).astype(np.int64).clip(0, len(_INFERNO) - 2)
    frac = (pos - lo)[..., None]
    rgb: np.ndarray = _INFERNO[lo] * (1.0 - frac) + _INFERNO[lo + 1] * frac
    out: np.ndarray = np.rint(rgb).astype(np.uint8)
    return out


def overlay(crop: np.ndarray, values: np.ndarray, grid: int) -> np.ndarray:
    """The heat map over ``crop`` (uint8 (S, S, 3), the model's input): the grid scaled to the crop with
    bilinear interpolation, from its least (darkest) to its most (brightest) attention, so that a map close
    to uniform still shows its shape (the values themselves say how peaked it is); blended more strongly
    where attention is higher, so that the picture stays visible where it is low."""
    if crop.ndim != 3 or crop.shape[2] != 3 or crop.dtype != np.uint8:
        raise ValueError(f"the crop must be uint8 (S, S, 3), got {crop.dtype} {crop.shape}")
    att = attention_grid(values, grid)
    low, high = float(att.min()), float(att.max())
    att = (att - low) / (high - low) if high - low > 1e-12 else np.full_like(att, 0.5)
    h, w = crop.shape[:2]
    scaled = np.asarray(Image.fromarray(att).resize((w, h), Image.Resampling.BILINEAR))
    heat = colorize(scaled).astype(np.float32)
    alpha = (0.25 + 0.5 * np.clip(scaled, 0.0, 1.0))[..., None]
    out: np.ndarray = np.rint(crop.astype(np.float32) * (1.0 - alpha) + heat * alpha).astype(np.uint8)
    return out


def overlay_png(crop: np.ndarray, values: np.ndarray, grid: int) -> bytes:
    """:func:`overlay`, encoded as PNG."""
    buf = io.BytesIO()
    Image.fromarray(overlay(crop, values, grid)).save(buf, format="PNG")
    return buf.getvalue()
