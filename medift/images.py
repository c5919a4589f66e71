"""The one image pipeline: read a raw image, letterbox it to the model's square input, store PNG.

Every image the models see goes through `load_and_letterbox` exactly once, when shards are
written (medift.shards); training and evaluation decode the stored PNG bytes with
`decode_image`. Keeping one code path means train and eval pixels can never disagree.

Choices, and why:
- Letterbox (keep aspect ratio, pad to a square) rather than stretch or crop: lesion shape
  and cell shape are attributes the questions ask about, so they must not be distorted, and
  a crop could cut a lesion off. This follows the reference (560x560 letterboxed crops).
- Truncated files are an error, never silently padded with grey: a half-decoded image still
  gets a description and would be trained on as if it were whole.
- PNG with fixed settings and no metadata, so the same pixels always give the same bytes and
  shard checksums are reproducible.
- DICOM files (TCIA's CBIS-DDSM) are read with pydicom: MONOCHROME1 is inverted so that
  dense tissue is bright as in every other image, and 12/16-bit values are stretched to 8
  bits like any other high-depth image. A file whose pixel data is cut short is an error.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps

# Fixed PNG settings: part of the byte-determinism contract of the shards.
PNG_COMPRESS_LEVEL = 6
RESAMPLE = Image.Resampling.BICUBIC

RGB = tuple[int, int, int]


class ImageLoadError(OSError):
    """A raw image could not be read in full; the message names the file."""


def _high_depth_to_8bit(image: Image.Image) -> Image.Image:
    """Scale a 16/32-bit or float grayscale image to 8 bits using its own min..max.

    PIL's own `convert("L")` clips 16-bit values at 255, which turns most of a 12- or 16-bit
    scan white; a per-image linear stretch keeps the contrast that exists in the file.
    """
    array = np.asarray(image, dtype=np.float64)
    low, high = float(array.min()), float(array.max())
    if high > low:
        array = (array - low) * (255.0 / (high - low))
    else:
        array = np.zeros_like(array)
    return Image.fromarray(np.round(array).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image, fill: RGB = (0, 0, 0)) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparent pixels become `fill`.

    `convert("RGB")` alone would expose whatever colour hides under transparent pixels.
    """
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = _high_depth_to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*fill, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def letterbox(image: Image.Image, size: int, fill: RGB = (0, 0, 0)) -> Image.Image:
    """Resize to fit a `size` x `size` square keeping the aspect ratio, then pad with `fill`.

    The longer side becomes exactly `size`; the image is centred (any odd pixel of padding
    goes right/bottom). Always returns a new RGB image.
    """
    if size < 1:
        raise ValueError(f"letterbox size must be >= 1, got {size}")
    rgb = to_rgb(image, fill)
    width, height = rgb.size
    if width < 1 or height < 1:
        raise ValueError(f"cannot letterbox an empty image of size {rgb.size}")
    scale = size / max(width, height)
    new_width = max(1, min(size, round(width * scale)))
    new_height = max(1, min(size, round(height * scale)))
    resized = rgb.resize((new_width, new_height), RESAMPLE)
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(resized, ((size - new_width) // 2, (size - new_height) // 2))
    return canvas


def encode_image(image: Image.Image) -> bytes:
    """PNG bytes, deterministic for the same pixels (no metadata, fixed compression)."""
    rgb = to_rgb(image)
    # A bare RGB copy drops info/ICC/EXIF that PIL could otherwise write into the file.
    clean = Image.frombytes("RGB", rgb.size, rgb.tobytes())
    buffer = io.BytesIO()
    clean.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    return buffer.getvalue()


def decode_image(data: bytes) -> Image.Image:
    """Stored image bytes -> fully loaded RGB image."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return to_rgb(image)


DICOM_MAGIC_OFFSET = 128


def is_dicom(path: str | os.PathLike) -> bool:
    """By the `.dcm` suffix or the `DICM` marker after the 128-byte preamble."""
    if os.fspath(path).lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as handle:
            head = handle.read(DICOM_MAGIC_OFFSET + 4)
    except OSError:
        return False
    return head[DICOM_MAGIC_OFFSET:] == b"DICM"


def _read_dicom(path: str | os.PathLike) -> Image.Image:
    """A DICOM file's pixels as a PIL image (L, I or RGB), fully decoded."""
    import pydicom  # imported here: only DICOM releases need it
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(path)
        pixels = np.asarray(dataset.pixel_array)
    except (InvalidDicomError, RuntimeError, NotImplementedError, KeyError, AttributeError) as error:
        # Not DICOM, no pixel data, or a compressed transfer syntax without its decoder.
        raise ValueError(f"DICOM pixel data unreadable: {type(error).__name__}: {error}") from error
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        return Image.fromarray(pixels.astype(np.uint8), mode="RGB")
    if pixels.ndim != 2:
        raise ValueError(f"unsupported DICOM pixel array of shape {pixels.shape} (one frame expected)")
    if str(dataset.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        pixels = pixels.max() - pixels.astype(np.int64) + pixels.min()
    if pixels.dtype == np.uint8:
        return Image.fromarray(pixels, mode="L")
    return _high_depth_to_8bit(Image.fromarray(pixels.astype(np.float32), mode="F"))


def _read_strict(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode `path`, refusing truncated files.

    `LOAD_TRUNCATED_IMAGES` is a process-wide PIL switch that some libraries turn on; it is
    forced off for this read so a cut-off file can never slip through.
    """
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as image:
            image.load()
            # Phone/web photos (e.g. Fitzpatrick17k) may be stored rotated with an EXIF flag;
            # apply it so the model sees the image as a viewer does.
            return ImageOps.exif_transpose(image)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def load_image(path: str | os.PathLike) -> Image.Image:
    """A raw image file (JPEG, PNG, ... or DICOM) as RGB, or `ImageLoadError` naming the file."""
    try:
        if is_dicom(path):
            return to_rgb(_read_dicom(path))
        return to_rgb(_read_strict(path))
    except FileNotFoundError as error:
        raise ImageLoadError(f"image file not found: {os.fspath(path)}") from error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        # PIL reports truncation and corrupt data as OSError / SyntaxError / ValueError.
        raise ImageLoadError(f"cannot read image {os.fspath(path)}: {type(error).__name__}: {error}") from error


def load_and_letterbox(path: str | os.PathLike, size: int) -> bytes:
    """Raw image file -> letterboxed `size` x `size` RGB PNG bytes (the shard image)."""
    return encode_image(letterbox(load_image(path), size))


def load_and_letterbox_many(paths: Sequence[str], size: int, keep_errors: bool = False) -> list[bytes | ImageLoadError]:
    """`load_and_letterbox` over a chunk of paths: the unit of work sent to a worker process.

    With `keep_errors`, an unreadable image gives its `ImageLoadError` in its place, so
    that one bad file does not sink the chunk; otherwise the first error is raised.
    """
    results: list[bytes | ImageLoadError] = []
    for path in paths:
        try:
            results.append(load_and_letterbox(path, size))
        except ImageLoadError as error:
            if not keep_errors:
                raise
            results.append(error)
    return results
