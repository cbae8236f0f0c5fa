"""Preprocessing against a plain reference implementation of the official evaluation transform
(torchvision's Resize(shorter, bicubic) + CenterCrop on a Pillow image), on real and synthetic images."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from deepvit.artifact import ImageError, ImageTooLargeError, PreprocessSpec
from deepvit.artifact.pixels import DecodeMemory, ImageLimits, PixelBudget, decode, preprocess

torchvision = pytest.importorskip("torchvision")
T = torchvision.transforms

PHOTOS = sorted((Path(__file__).parents[1] / "data" / "photos").glob("*.jpg"))
SPEC = PreprocessSpec(resize_shorter=248, crop_size=224, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
LIMITS = ImageLimits(max_pixels=40_000_000)


def reference(img: Image.Image, spec: PreprocessSpec = SPEC) -> np.ndarray:
    """What the official evaluation does to a picture (after it is oriented and RGB)."""
    t = T.Compose(
        [T.Resize(spec.resize_shorter, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(spec.crop_size)]
    )
    return np.asarray(t(img.convert("RGB")))


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gradient(w: int, h: int) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    rgb = np.concatenate(
        [np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)), (x + y) / 2 * np.ones((h, w, 1))], 2
    )
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.mark.parametrize("photo", PHOTOS, ids=lambda p: p.name)
def test_real_photos_match_the_reference_transform_exactly(photo: Path) -> None:
    data = photo.read_bytes()
    got = preprocess(data, SPEC, LIMITS)
    assert got.shape == (224, 224, 3)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, reference(Image.open(io.BytesIO(data))))


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (300, 300), (248, 400), (100, 60), (224, 224), (1001, 333)])
def test_any_aspect_and_size_matches_the_reference(size: tuple[int, int]) -> None:
    img = gradient(*size)
    np.testing.assert_array_equal(preprocess(encode(img, "PNG"), SPEC, LIMITS), reference(img))


def test_384_crop_pct_1_resizes_straight_to_the_crop() -> None:
    spec = PreprocessSpec(resize_shorter=384, crop_size=384, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
    img = gradient(500, 700)
    np.testing.assert_array_equal(preprocess(encode(img, "PNG"), spec, LIMITS), reference(img, spec))


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1", "I;16"])
def test_every_mode_becomes_the_rgb_picture(mode: str) -> None:
    base = gradient(320, 240)
    if mode == "I;16":
        arr16 = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)  # full 16-bit range
        img = Image.fromarray(arr16)
        expected = reference(Image.fromarray((arr16 >> 8).astype(np.uint8)))
    else:
        img = base.convert(mode)
        expected = reference(img)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    data = encode(img, fmt)
    if fmt == "JPEG":
        expected = reference(Image.open(io.BytesIO(data)))
    np.testing.assert_array_equal(preprocess(data, SPEC, LIMITS), expected)


def test_sixteen_bit_grey_is_scaled_not_clipped_to_white() -> None:
    arr16 = np.full((256, 256), 32768, dtype=np.uint16)  # mid grey in 16 bits
    out = preprocess(encode(Image.fromarray(arr16), "PNG"), SPEC, LIMITS)
    assert np.all(out == 128)


def test_palette_with_transparency_and_webp_and_gif_and_bmp_and_tiff() -> None:
    base = gradient(300, 200)
    for fmt in ("WEBP", "GIF", "BMP"):
        data = encode(base, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        np.testing.assert_array_equal(preprocess(data, SPEC, LIMITS), reference(Image.open(io.BytesIO(data))))
    p = base.convert("P")
    p.info["transparency"] = 0
    data = encode(p, "PNG", transparency=0)
    np.testing.assert_array_equal(
        preprocess(data, SPEC, LIMITS), reference(Image.open(io.BytesIO(data)).convert("RGBA"))
    )


def test_exif_orientation_is_applied() -> None:
    upright = gradient(300, 400)  # portrait as the user sees it
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # stored landscape, as a phone writes it
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    data = encode(stored, "JPEG", exif=exif, quality=95)
    shown = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert shown.size == (300, 400)
    np.testing.assert_array_equal(preprocess(data, SPEC, LIMITS), reference(shown))


def test_first_frame_of_an_animation() -> None:
    frames = [Image.new("RGB", (260, 260), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    out = preprocess(buf.getvalue(), SPEC, LIMITS)
    assert tuple(out[112, 112]) == (255, 0, 0)


# -- untrusted input -------------------------------------------------------------------------------


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG that claims a huge size: its IDAT holds one row of pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" + b"\x00" * 3 * 16)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def test_a_small_file_claiming_30000_squared_pixels_is_413_before_decoding() -> None:
    data = png_header_only(30000, 30000)
    assert len(data) < 100
    with pytest.raises(ImageTooLargeError, match="900,000,000 pixels"):
        decode(data, LIMITS)


def test_a_request_pixel_budget_is_spent_from_headers_and_refuses_the_image_over_it() -> None:
    budget = PixelBudget(5000 * 5000)
    claiming = png_header_only(4000, 4000)  # 16 M pixels each: under the per-image limit
    with pytest.raises(ImageError, match="truncated"):  # reserved, then decoded: one row of pixels
        decode(claiming, LIMITS, budget)
    assert budget.used == 16_000_000
    with pytest.raises(ImageTooLargeError, match="25,000,000 pixels in all"):
        decode(claiming, LIMITS, budget)  # refused from the header: nothing decoded
    assert budget.used == 16_000_000


def test_a_png_bomb_is_refused_by_its_header() -> None:
    # 10000 x 10000 zeros compress to about 100 kB but would take 300 MB decoded.
    buf = io.BytesIO()
    Image.new("RGB", (10000, 10000)).save(buf, format="PNG", optimize=False, compress_level=9)
    assert buf.tell() < 1_000_000
    with pytest.raises(ImageTooLargeError, match="limit"):
        decode(buf.getvalue(), LIMITS)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty"),
        (b"hello, this is text and not a picture\n", "not an image"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n", "not an image"),  # EPS would run Ghostscript: never opened
    ],
)
def test_non_images_are_bad_requests(data: bytes, match: str) -> None:
    with pytest.raises(ImageError, match=match):
        decode(data, LIMITS)


def test_a_zip_file_is_a_bad_request() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("cat.jpg", PHOTOS[0].read_bytes())
    with pytest.raises(ImageError, match="not an image"):
        decode(buf.getvalue(), LIMITS)


def test_a_truncated_jpeg_is_a_bad_request_not_a_half_grey_picture() -> None:
    data = PHOTOS[0].read_bytes()
    with pytest.raises(ImageError, match="truncated or corrupt"):
        decode(data[: len(data) // 2], LIMITS)


def test_tiff_is_not_among_the_formats_decoded() -> None:
    with pytest.raises(ImageError, match="not an image"):
        decode(encode(gradient(64, 64), "TIFF"), LIMITS)


def test_a_thin_image_is_refused_before_the_resize_makes_it_huge() -> None:
    # 2 x 40000 is only 80,000 pixels and a 200-byte PNG, but resized to a shorter side of 248 it would be
    # 248 x 4,960,000: seconds of CPU and gigabytes. Its aspect ratio gives it away in the header.
    data = encode(Image.new("L", (2, 40000)), "PNG")
    assert len(data) < 1000
    with pytest.raises(ImageTooLargeError, match="aspect ratio"):
        decode(data, LIMITS)
    decode(encode(Image.new("L", (100, 2000)), "PNG"), LIMITS)  # 20:1 is still fine


def _malformed_bmp() -> bytes:
    data = bytearray(encode(Image.new("RGB", (8, 8)), "BMP"))
    data[30:34] = struct.pack("<I", 77)  # biCompression: no such method
    return bytes(data)


def _png_with_text_bomb() -> bytes:
    png = encode(Image.new("RGB", (8, 8)), "PNG")
    text = _chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"a" * 2_000_000))  # 2 kB that inflates to 2 MB
    return png[:33] + text + png[33:]


def _jpeg_with_broken_exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate on display, so the EXIF is parsed
    exif[0x010F] = "Maker"
    data = bytearray(encode(Image.new("RGB", (48, 40)), "JPEG", exif=exif))
    i = data.find(b"\x01\x0f\x00\x02")  # the Make tag (ASCII), big-endian...
    if i >= 0:
        data[i : i + 2] = b"\x01\x00"  # ... renamed ImageWidth, which must be a number
    else:
        i = data.find(b"\x0f\x01\x02\x00")  # ... or little-endian
        data[i : i + 2] = b"\x00\x01"
    return bytes(data)


@pytest.mark.parametrize(
    "make", [_malformed_bmp, _png_with_text_bomb, _jpeg_with_broken_exif], ids=lambda f: f.__name__.strip("_")
)
def test_malformed_files_are_bad_requests_whatever_pillow_raises(make: object) -> None:
    assert callable(make)
    with pytest.raises(ImageError, match="could not be decoded"):
        decode(make(), LIMITS)


# -- DEEPVIT_JPEG_DRAFT: decoding at a reduced scale, an opt-in -----------------------------------------
def recording_memory() -> tuple[DecodeMemory, list[int]]:
    """A decoding budget that records the pixels each image holds."""
    held: list[int] = []
    memory = DecodeMemory(limit_bytes=1 << 30)
    hold = memory.hold

    def recording_hold(pixels: int, wait_s: float):  # type: ignore[no-untyped-def]
        held.append(pixels)
        return hold(pixels, wait_s)

    memory.hold = recording_hold  # type: ignore[method-assign]
    return memory, held


def test_a_drafted_jpeg_decodes_smaller_and_stays_close_to_the_reference() -> None:
    photo = Image.open(PHOTOS[0]).convert("RGB").resize((2016, 1512), Image.Resampling.LANCZOS)
    data = encode(photo, "JPEG", quality=92)
    memory, held = recording_memory()
    exact = preprocess(data, SPEC, LIMITS, memory=memory)
    drafted = preprocess(data, SPEC, LIMITS, memory=memory, draft=True)
    assert drafted.shape == exact.shape == (224, 224, 3)
    # libjpeg decoded at 1/4 (504 x 378: the smallest scale whose shorter side is still >= 248)
    assert held == [2016 * 1512, 504 * 378]
    diff = np.abs(exact.astype(np.int16) - drafted.astype(np.int16))
    assert diff.mean() < 2.0  # out of 255: close, not equal (bench/jpeg_draft.py measures it per photo)
    assert np.array_equal(exact, reference(decode(data, LIMITS)))  # the default is still the reference


def test_draft_leaves_other_formats_and_small_jpegs_as_the_reference_decodes_them() -> None:
    photo = Image.open(PHOTOS[0]).convert("RGB")
    png = encode(photo, "PNG")
    assert np.array_equal(preprocess(png, SPEC, LIMITS, draft=True), preprocess(png, SPEC, LIMITS))
    small = encode(photo.resize((300, 300)), "JPEG", quality=90)  # no scale keeps 248: decoded whole
    assert np.array_equal(preprocess(small, SPEC, LIMITS, draft=True), preprocess(small, SPEC, LIMITS))


def test_a_drafted_progressive_jpeg_holds_the_memory_of_the_whole_picture() -> None:
    """libjpeg keeps a progressive JPEG's coefficients at full size whatever scale it outputs."""
    photo = Image.open(PHOTOS[0]).convert("RGB").resize((2016, 1512))
    data = encode(photo, "JPEG", quality=90, progressive=True)
    memory, held = recording_memory()
    drafted = preprocess(data, SPEC, LIMITS, memory=memory, draft=True)
    assert drafted.shape == (224, 224, 3)
    assert held == [2016 * 1512]
