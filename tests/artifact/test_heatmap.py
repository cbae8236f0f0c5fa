"""The heat map of the attention output: drawn over the crop, brightest where the attention is highest, and
refusing what is not an attention map of the grid."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from deepvit.artifact import ArtifactError
from deepvit.artifact.heatmap import attention_grid, colorize, overlay, overlay_png


def test_the_overlay_is_brightest_over_the_cell_with_the_most_attention() -> None:
    crop = np.full((64, 64, 3), 100, dtype=np.uint8)
    values = np.full(16, 0.5 / 15, dtype=np.float32)
    values[6] = 0.5  # row 1, column 2 of a 4 x 4 grid
    out = overlay(crop, values, 4).astype(float).sum(axis=2)
    cells = out.reshape(4, 16, 4, 16).mean(axis=(1, 3))
    assert np.unravel_index(cells.argmax(), (4, 4)) == (1, 2)
    assert out.shape == (64, 64)


def test_the_png_is_the_crop_size_and_keeps_the_picture_visible_where_attention_is_low() -> None:
    rng = np.random.default_rng(0)
    crop = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    png = overlay_png(crop, np.full(9, 1 / 9, dtype=np.float32), 3)
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG"
    assert img.size == (48, 48)
    assert img.mode == "RGB"
    flat = overlay(crop, np.r_[np.ones(1), np.zeros(8)].astype(np.float32), 3)
    # Where the attention is zero the picture still shows through (a quarter of the heat colour only).
    corner = flat[-8:, -8:].astype(float)
    assert np.corrcoef(corner.ravel(), crop[-8:, -8:].astype(float).ravel())[0, 1] > 0.9


def test_the_colour_map_runs_from_dark_to_bright() -> None:
    ramp = colorize(np.linspace(0, 1, 11)).astype(float).sum(axis=1)
    assert (np.diff(ramp) > 0).all()
    assert tuple(colorize(np.array([0.0]))[0]) == (0, 0, 4)


@pytest.mark.parametrize(
    ("values", "why"),
    [(np.ones(15) / 15, "15 values"), (np.r_[np.ones(15), -1.0], "negative"), (np.r_[np.ones(15), np.nan], "finite")],
)
def test_what_is_not_an_attention_map_of_the_grid_is_refused(values: np.ndarray, why: str) -> None:
    with pytest.raises(ArtifactError, match=why):
        attention_grid(values, 4)
