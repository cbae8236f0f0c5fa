"""A small labelled image set made on the spot: coloured shapes on varied backgrounds, image-folder layout.

It exists so that training, export, evaluation and serving can be proven end to end on a CPU in minutes
without downloading anything. The class is the shape; colour, size, position, a small rotation, the
background (flat, gradient, noise, each in its own colours) and the image size (not always square, so the
resize-then-crop path matters) vary per image. Everything is drawn from one seed, so a set is reproducible.

    python -m model.synthetic --output DIR [--train-per-class 150] [--val-per-class 25] [--seed 0]

writes ``DIR/train/<class>/*.png`` and ``DIR/val/<class>/*.png``.
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw

Point = tuple[float, float]
RGB = tuple[int, int, int]

# Canvas sizes drawn per image: square and not, all larger than the tiny configs' crops.
SIZES: tuple[tuple[int, int], ...] = ((64, 64), (72, 64), (64, 80), (96, 96), (80, 72))


def _polygon(cx: float, cy: float, r: float, angles_deg: Sequence[float], radii: Sequence[float]) -> list[Point]:
    return [
        (cx + r * k * math.cos(math.radians(a)), cy + r * k * math.sin(math.radians(a)))
        for a, k in zip(angles_deg, radii, strict=True)
    ]


def _regular(n: int, rot: float, inner: float | None = None) -> tuple[list[float], list[float]]:
    """Angles and radius factors of a regular n-gon, or of an n-pointed star when ``inner`` is given."""
    if inner is None:
        return [rot - 90 + 360 * i / n for i in range(n)], [1.0] * n
    angles = [rot - 90 + 180 * i / n for i in range(2 * n)]
    return angles, [1.0 if i % 2 == 0 else inner for i in range(2 * n)]


def _rotate(points: list[Point], cx: float, cy: float, deg: float) -> list[Point]:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def _circle(img: Image.Image, cx: float, cy: float, r: float, rot: float, fg: RGB) -> None:
    d = ImageDraw.Draw(img)
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)


def _ring(img: Image.Image, cx: float, cy: float, r: float, rot: float, fg: RGB) -> None:
    d = ImageDraw.Draw(img)
    d.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fg, width=max(2, int(r * 0.3)))


def _square(img: Image.Image, cx: float, cy: float, r: float, rot: float, fg: RGB) -> None:
    d = ImageDraw.Draw(img)
    a, k = _regular(4, rot + 45)
    d.polygon(_polygon(cx, cy, r * 1.15, a, k), fill=fg)


def _triangle(img: Image.Image, cx: float, cy: float, r: float, rot: float, fg: RGB) -> None:
    d = ImageDraw.Draw(img)
    a, k = _regular(3, rot)
    d.polygon(_polygon(cx, cy + r * 0.2, r * 1.2, a, k), fill=fg)


def _star(img: Image.Image, cx: float, cy: float, r: float, rot: float, fg: RGB) -> None:
    d = ImageDraw.Draw(img)
    a, k = _regular(5, rot, inner=0.42)
    d.polygon(_polygon(cx, cy, r * 1.15, a, k), fill=fg)


def _cross(img: Image.Image, cx: float, cy: float, r: float, rot: float, fg: RGB) -> None:
    d = ImageDraw.Draw(img)
    w = r * 0.35
    for x0, y0, x1, y1 in ((-r, -w, r, w), (-w, -r, w, r)):
        box = [(cx + x0, cy + y0), (cx + x1, cy + y0), (cx + x1, cy + y1), (cx + x0, cy + y1)]
        d.polygon(_rotate(box, cx, cy, rot), fill=fg)


def _crescent(img: Image.Image, cx: float, cy: float, r: float, rot: float, fg: RGB) -> None:
    d = ImageDraw.Draw(img)
    # A disc minus a shifted disc, drawn through a mask so that any background shows through the bite.
    mask = Image.new("L", img.size, 0)
    m = ImageDraw.Draw(mask)
    m.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    bite = math.radians(rot * 9)  # the bite may face any way
    ox, oy = r * 0.55 * math.cos(bite), r * 0.55 * math.sin(bite)
    m.ellipse((cx - r + ox, cy - r + oy, cx + r + ox, cy + r + oy), fill=0)
    d.bitmap((0, 0), mask, fill=fg)


def _arrow(img: Image.Image, cx: float, cy: float, r: float, rot: float, fg: RGB) -> None:
    d = ImageDraw.Draw(img)
    w = r * 0.3
    pts = [(-r, -w), (0, -w), (0, -r * 0.8), (r, 0), (0, r * 0.8), (0, w), (-r, w)]
    d.polygon(_rotate([(cx + x, cy + y) for x, y in pts], cx, cy, rot), fill=fg)


Drawer = Callable[[Image.Image, float, float, float, float, RGB], None]
SHAPES: dict[str, Drawer] = {
    "arrow": _arrow,
    "circle": _circle,
    "crescent": _crescent,
    "cross": _cross,
    "ring": _ring,
    "square": _square,
    "star": _star,
    "triangle": _triangle,
}
CLASSES: tuple[str, ...] = tuple(sorted(SHAPES))


def _colour(rng: random.Random) -> RGB:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def _far_colour(rng: random.Random, away_from: Sequence[RGB], min_dist: float = 160.0) -> RGB:
    # The shape must stay visible: pick a colour far (in RGB) from every background colour.
    best, best_d = (0, 0, 0), -1.0
    for _ in range(64):
        c = _colour(rng)
        dist = min(math.dist(c, b) for b in away_from)
        if dist >= min_dist:
            return c
        if dist > best_d:
            best, best_d = c, dist
    return best


def _background(rng: random.Random, size: tuple[int, int]) -> tuple[Image.Image, list[RGB]]:
    w, h = size
    # Textured backgrounds with edges of their own (stripes, checks) were tried and dropped: a tiny ViT
    # then needs several times the images and steps to reach the same accuracy on a CPU budget.
    kind = rng.choice(("flat", "gradient", "noise"))
    a = _colour(rng)
    b = tuple(max(0, min(255, v + rng.randint(-50, 50))) for v in a)
    b_rgb: RGB = (b[0], b[1], b[2])
    img = Image.new("RGB", size, a)
    d = ImageDraw.Draw(img)
    if kind == "gradient":
        across = rng.random() < 0.5  # left to right, or top to bottom
        n = w if across else h
        for i in range(n):
            t = i / max(1, n - 1)
            fill = tuple(round(p + (q - p) * t) for p, q in zip(a, b_rgb, strict=True))
            d.line([(i, 0), (i, h)] if across else [(0, i), (w, i)], fill=fill)
    elif kind == "noise":
        noise = Image.frombytes("L", size, rng.randbytes(w * h)).convert("RGB")
        img = Image.blend(img, noise, rng.uniform(0.2, 0.4))
    return img, [a, b_rgb]


def draw_example(shape: str, rng: random.Random) -> Image.Image:
    """One image of ``shape``: random size, background, colour, scale, position and rotation (±20°)."""
    size = rng.choice(SIZES)
    img, bg_colours = _background(rng, size)
    w, h = size
    short = min(w, h)
    r = short * rng.uniform(0.26, 0.38)
    cx = w / 2 + rng.uniform(-0.1, 0.1) * short
    cy = h / 2 + rng.uniform(-0.1, 0.1) * short
    fg = _far_colour(rng, bg_colours)
    SHAPES[shape](img, cx, cy, r, rng.uniform(-20, 20), fg)
    return img


def generate(
    output: str | Path, train_per_class: int = 150, val_per_class: int = 25, seed: int = 0
) -> tuple[Path, Path]:
    """Write the set under ``output``; returns (train dir, val dir). Same seed, same pixels."""
    output = Path(output)
    rng = random.Random(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for shape in CLASSES:
            folder = output / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                draw_example(shape, rng).save(folder / f"{shape}_{i:04d}.png")
    return output / "train", output / "val"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.synthetic", description=__doc__.splitlines()[0])
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--train-per-class", type=int, default=150)
    p.add_argument("--val-per-class", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    train, val = generate(args.output, args.train_per_class, args.val_per_class, args.seed)
    n = len(CLASSES)
    print(f"wrote {n} classes: {n * args.train_per_class} images in {train}, {n * args.val_per_class} in {val}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
