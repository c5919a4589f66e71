"""The one image pipeline: letterbox geometry, deterministic PNG, strict reading."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from medift.images import (
    ImageLoadError,
    decode_image,
    encode_image,
    letterbox,
    load_and_letterbox,
    load_image,
)


def _solid(width: int, height: int, colour=(255, 255, 255), mode: str = "RGB") -> Image.Image:
    return Image.new(mode, (width, height), colour)


def test_letterbox_wide_image_keeps_aspect_and_pads_top_bottom():
    boxed = letterbox(_solid(200, 100), 64)
    assert boxed.size == (64, 64) and boxed.mode == "RGB"
    pixels = np.asarray(boxed)
    content_rows = np.where(pixels.max(axis=(1, 2)) > 0)[0]
    # 200x100 -> 64x32, centred: rows 16..47 hold the image, the rest is black padding.
    assert (content_rows.min(), content_rows.max()) == (16, 47)
    assert pixels[:, :, 0].max(axis=0).min() == 255  # full width used


def test_letterbox_tall_image_keeps_aspect_and_pads_left_right():
    pixels = np.asarray(letterbox(_solid(30, 90), 90))
    content_cols = np.where(pixels.max(axis=(0, 2)) > 0)[0]
    assert (content_cols.min(), content_cols.max()) == (30, 59)


def test_letterbox_fill_colour_and_grey_or_alpha_input():
    boxed = letterbox(_solid(10, 40, 128, mode="L"), 40, fill=(0, 0, 255))
    assert boxed.mode == "RGB"
    assert boxed.getpixel((0, 0)) == (0, 0, 255)
    assert boxed.getpixel((20, 20)) == (128, 128, 128)
    transparent = letterbox(Image.new("RGBA", (8, 8), (255, 0, 0, 0)), 8, fill=(0, 255, 0))
    assert transparent.getpixel((4, 4)) == (0, 255, 0)


def test_letterbox_16bit_grey_is_stretched_not_clipped():
    array = np.linspace(0, 4095, 16 * 16).reshape(16, 16).astype(np.uint16)
    boxed = letterbox(Image.fromarray(array), 16)
    values = np.asarray(boxed)[:, :, 0]
    assert values.min() == 0 and values.max() == 255 and len(np.unique(values)) > 100


def test_letterbox_upscales_small_images():
    assert letterbox(_solid(3, 2), 50).size == (50, 50)


def test_encode_is_deterministic_and_round_trips():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    image.info["comment"] = "should not be written"
    data = encode_image(image)
    assert data == encode_image(image.copy())
    assert data.startswith(b"\x89PNG")
    decoded = decode_image(data)
    assert decoded.mode == "RGB" and np.array_equal(np.asarray(decoded), np.asarray(image))


def test_load_and_letterbox_reads_jpeg_and_png(tmp_path):
    for name, fmt in (("a.jpg", "JPEG"), ("b.png", "PNG")):
        path = tmp_path / name
        _solid(40, 20, (200, 10, 10)).save(path, format=fmt)
        data = load_and_letterbox(path, 32)
        assert decode_image(data).size == (32, 32)
        assert data == load_and_letterbox(str(path), 32)


def test_truncated_image_raises_error_naming_the_file(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    path = tmp_path / "cut_off.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="cut_off.jpg"):
        load_and_letterbox(path, 32)


def test_truncated_image_refused_even_if_pil_tolerance_is_switched_on(tmp_path, monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    buffer = io.BytesIO()
    noise = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="PNG")
    path = tmp_path / "short.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="short.png"):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_missing_and_non_image_files_name_the_file(tmp_path):
    with pytest.raises(ImageLoadError, match="nowhere.png"):
        load_and_letterbox(tmp_path / "nowhere.png", 16)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ImageLoadError, match="notes.png"):
        load_and_letterbox(text, 16)
