"""The pixel path: image bytes → the artifact's input, a ``uint8 [crop, crop, 3]`` RGB array.

The service, ``deepvit evaluate --artifact`` and training's image folders all decode through
:func:`decode`, and the service and evaluate transform through :func:`transform`, so that what evaluate
measures is what ``/classify`` computes, pixel for pixel.

Reproduces the reference evaluation transform (timm/torchvision, as the official code evaluates):
resize the shorter side to ``resize_shorter`` (the long side to ``int(resize_shorter * long / short)``)
with Pillow's bicubic, then centre-crop with ``round((size - crop) / 2)`` offsets. Cast, mean/std and layout
happen inside the ONNX graph. Before that, what a user sends is made into the RGB picture they see:
EXIF orientation applied, the first frame of an animation, any mode converted to RGB (16-bit scaled to 8).

Untrusted input: only common raster formats are opened, the pixel count is checked from the header
before any pixel is decoded, and truncated or malformed files are refused rather than patched up.
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from .errors import DecodeBusyError, ImageError, ImageTooLargeError
from .metadata import PreprocessSpec

# Formats a camera, phone or browser produces. Others Pillow knows widen the attack surface for no user
# benefit: EPS would call Ghostscript, and TIFF goes through libtiff, which writes to stderr on bad input.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # JPEG covers MPO (phone cameras)
FORMATS_TEXT = "JPEG, PNG, WebP, GIF or BMP"

# Our limits (pixel count and aspect ratio, checked from the header before any pixel is decoded) replace
# Pillow's process-wide bomb check, which only warns below twice its own fixed limit.
Image.MAX_IMAGE_PIXELS = None

_ORIENTATION = 0x0112  # the EXIF tag
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int
    # The resize makes the shorter side ~250 px, so a 2 x 40000 image (80k pixels, a 200-byte PNG) would
    # become 250 x 5 million: the cost grows with the aspect ratio, which is bounded for that reason.
    max_aspect_ratio: float = 20.0


class PixelBudget:
    """The pixels one request may decode in all. Each image reserves its share from its header, before any
    pixel is decoded, so a request of many small files that each claim the per-image maximum is refused
    rather than decoded (its cost would starve every other request of the decode threads). Thread-safe:
    a request's images decode in parallel."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, pixels: int) -> None:
        with self._lock:
            if self.used + pixels > self.limit:
                raise ImageTooLargeError(
                    f"the request's images hold more than {self.limit:,} pixels in all; send fewer or smaller "
                    "images per request"
                )
            self.used += pixels


class DecodeMemory:
    """The memory that decoding may hold at once, over every request of the process. An image reserves what
    decoding it costs (``BYTES_PER_PIXEL`` times its pixel count, from the header) before a pixel is decoded
    and gives it back once its crop is made; an image that needs more than the whole budget is refused, one
    that needs more than is free waits (at most ``wait_s``). So however the headers lie (a 17 KB WebP that
    claims 6000 x 6000 px makes its decoder allocate 144 MB before it finds the data missing), decoding
    never holds more than the budget. ``on_release(bytes)`` runs after each release (to give memory back)."""

    # RGBA while decoding (4 bytes) plus the RGB copy of the conversion (3), and some resize scratch.
    BYTES_PER_PIXEL = 8

    def __init__(self, limit_bytes: int, on_release: Callable[[int], None] | None = None) -> None:
        self.limit = limit_bytes
        self.used = 0
        self._on_release = on_release
        self._free = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int, wait_s: float) -> Iterator[None]:
        need = pixels * self.BYTES_PER_PIXEL
        if need > self.limit:
            raise ImageTooLargeError(
                f"decoding the image needs about {need / 2**20:,.0f} MiB, more than the "
                f"{self.limit / 2**20:,.0f} MiB this server decodes at once; downscale it before sending"
            )
        with self._free:
            if not self._free.wait_for(lambda: self.used + need <= self.limit, timeout=min(max(0.0, wait_s), 3600.0)):
                raise DecodeBusyError("the server's decoding memory stayed taken until the request's deadline")
            self.used += need
        try:
            yield
        finally:
            with self._free:
                self.used -= need
                self._free.notify_all()
            if self._on_release is not None:
                self._on_release(need)


# A local file the user chose (an evaluation or training folder), not an upload: no limits of size or shape.
LOCAL_FILE = ImageLimits(max_pixels=2**62, max_aspect_ratio=float("inf"))


def _open(data: bytes, limits: ImageLimits, budget: PixelBudget | None, formats: tuple[str, ...] | None) -> Image.Image:
    if not data:
        raise ImageError("the image is empty (0 bytes); send the file's bytes as the body or a 'file' part")
    try:
        img = Image.open(io.BytesIO(data), formats=formats)
    except UnidentifiedImageError:
        raise ImageError(f"the body is not an image this service decodes; send {FORMATS_TEXT} bytes") from None
    except Exception as exc:  # a recognised format whose header is malformed
        raise _undecodable(exc) from None
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageError(f"the image has no pixels ({w}x{h})")
    if w * h > limits.max_pixels:
        raise ImageTooLargeError(_too_many_pixels_msg(w * h, limits, f"{w}x{h} = "))
    if max(w, h) > limits.max_aspect_ratio * min(w, h):
        raise ImageTooLargeError(
            f"the image is {w}x{h}, an aspect ratio over the limit of {limits.max_aspect_ratio:g}:1 (resizing its "
            "shorter side would make it far larger than it is); crop it before sending"
        )
    if budget is not None:
        budget.reserve(w * h)
    return img


def _undecodable(exc: BaseException) -> ImageError:
    detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return ImageError(f"the image could not be decoded ({detail}); the file is truncated or corrupt")


def _too_many_pixels_msg(pixels: int | None, limits: ImageLimits, dims: str = "") -> str:
    what = f"{dims}{pixels:,} pixels" if pixels else "too many pixels"
    return f"the image is {what}; the limit is {limits.max_pixels:,} pixels, so downscale it before sending"


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode to 8-bit RGB, as the user sees it."""
    if img.mode.startswith("I;16"):
        # 16-bit grey: scale to 8 bits (Pillow's own conversion would clip everything above 255 to white).
        img = Image.fromarray((np.asarray(img) >> 8).astype(np.uint8))
    elif img.mode == "I":
        arr = np.asarray(img)
        shift = 8 if arr.max(initial=0) > 255 else 0  # 32-bit container of 16-bit data, or of 8-bit data
        img = Image.fromarray((arr >> shift).clip(0, 255).astype(np.uint8))
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # Pillow asks for this route for palette transparency
    return img if img.mode == "RGB" else img.convert("RGB")


def decode(
    data: bytes,
    limits: ImageLimits,
    budget: PixelBudget | None = None,
    formats: tuple[str, ...] | None = ALLOWED_FORMATS,
) -> Image.Image:
    """Bytes → RGB picture, EXIF-oriented, first frame. Raises ImageError / ImageTooLargeError.
    ``formats=None`` opens any format Pillow knows (local files only: see ALLOWED_FORMATS)."""
    return _decode_opened(_open(data, limits, budget, formats))  # at the first frame of an animation


def _decode_opened(img: Image.Image) -> Image.Image:
    try:
        img.load()
        if img.getexif().get(_ORIENTATION, 1) != 1:  # exif_transpose copies even an upright image
            img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except MemoryError:
        raise ImageTooLargeError("the image needs more memory to decode than this server has free") from None
    except Exception as exc:
        # Pillow reports malformed input as OSError, ValueError, SyntaxError, EOFError, struct.error,
        # TypeError... from deep inside its plugins: every one of them is the file's fault, not ours.
        raise _undecodable(exc) from None


def resize_shorter_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    # torchvision's _compute_resized_output_size: the long side is truncated, not rounded.
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def center_crop_box(width: int, height: int, crop: int) -> tuple[int, int, int, int]:
    # torchvision's center_crop: offsets int(round((size - crop) / 2)).
    left = round((width - crop) / 2.0)
    top = round((height - crop) / 2.0)
    return left, top, left + crop, top + crop


def transform(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """RGB picture → uint8 (crop, crop, 3), the artifact's input for one image."""
    size = resize_shorter_size(img.width, img.height, spec.resize_shorter)
    if size != img.size:
        img = img.resize(size, _RESAMPLE[spec.interpolation])
    img = img.crop(center_crop_box(img.width, img.height, spec.crop_size))
    return np.asarray(img, dtype=np.uint8)


def draft_jpeg(img: Image.Image, spec: PreprocessSpec) -> int:
    """Let libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale (scaling in the DCT domain), the smallest that
    still leaves the shorter side at least the resize's: decoding costs up to 8 x 8 times less, and so does its
    memory. Not the reference transform: the pixels differ a little (``deepvit bench --jpeg-draft`` measures
    by how much), so it is an opt-in. Other formats are left as they are. Returns the pixels whose decoding
    memory to hold: the drafted picture's, but the whole picture's for a progressive JPEG, whose coefficients
    libjpeg keeps at full size whatever the scale it outputs."""
    pixels = img.width * img.height
    if isinstance(img, JpegImagePlugin.JpegImageFile):  # MPO, phones' multi-picture JPEG, included
        side = spec.resize_shorter
        img.draft(img.mode, (side, side))  # keeps both sides >= side, so the orientation does not matter
        if not img.info.get("progressive"):
            pixels = img.width * img.height
    return pixels


def preprocess(
    data: bytes,
    spec: PreprocessSpec,
    limits: ImageLimits,
    budget: PixelBudget | None = None,
    memory: DecodeMemory | None = None,
    wait_s: float = 0.0,
    draft: bool = False,
) -> np.ndarray:
    """Bytes → the artifact's input for one image: what the service computes for an upload. With ``memory``,
    the image's decoding cost is held from it (waiting at most ``wait_s``) until the crop is made; ``draft``:
    see :func:`draft_jpeg`."""
    img = _open(data, limits, budget, ALLOWED_FORMATS)
    pixels = draft_jpeg(img, spec) if draft else img.width * img.height
    if memory is None:
        return transform(_decode_opened(img), spec)
    with memory.hold(pixels, wait_s):
        return transform(_decode_opened(img), spec)


def load_file(path: str | Path) -> Image.Image:
    """A local image file → the RGB picture, decoded exactly as an upload of the same bytes is."""
    return decode(Path(path).read_bytes(), LOCAL_FILE, formats=None)
