"""A job's images: decoded safely, encoded for output (SPEC §10).

Fetching them is `worker.fetch`; where the result goes (base64 or S3) is `worker.output`.

- Limits: the pixel limit (``WORKER_MAX_PIXELS``) is read from the image header before any pixel
  is decoded.
- Decoding: a short list of raster formats (never EPS, which would run Ghostscript), EXIF
  orientation applied, grayscale/palette/CMYK/16-bit converted, alpha kept aside.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from worker.errors import JobError

#: Raster formats a job may send. EPS/PS (Ghostscript), PDF and exotic plugins are refused.
_WANTED_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF")
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
# `decode_image` enforces WORKER_MAX_PIXELS from the header itself; Pillow's own guard would
# answer differently (a warning, or an error under another name) around its fixed 89 M pixels.
Image.MAX_IMAGE_PIXELS = None
Image.init()  # register every plugin now; `formats=` then restricts what may be opened
# (phone photos' MPO is its own opener in older Pillow, part of JPEG's in newer ones)
IMAGE_FORMATS = tuple(f for f in _WANTED_FORMATS if f in Image.OPEN)


@dataclass
class Decoded:
    """An image ready for the models: BGR uint8 pixels, and the alpha channel if it had one."""

    bgr: np.ndarray
    alpha: np.ndarray | None = None
    format: str | None = None
    scaled_from: tuple[int, int] | None = None


def _to_8bit(arr: np.ndarray) -> np.ndarray:
    """16-bit, 32-bit integer or float grey as 8-bit, scaled so the brightest pixel maps to at
    most 255 — in integers (or float32 for float input), in place where possible: a 40-megapixel
    picture never holds a float64 copy (8 bytes a pixel, twice over)."""
    if arr.dtype.kind == "f":
        grey = arr.astype(np.float32, copy=True)
        np.nan_to_num(grey, copy=False)
        np.clip(grey, 0, 255, out=grey)
        return grey.astype(np.uint8)
    work = arr.astype(np.uint32, copy=True) if arr.dtype.kind == "u" else np.maximum(arr, 0).astype(np.uint32)
    top = int(work.max()) if work.size else 0
    if top > 0xFFFF:  # 32-bit input: to 16 bits first, so ×255 stays within uint32
        shift = top.bit_length() - 16
        work >>= shift
        top >>= shift
    if top > 255:
        work *= 255
        work //= top
    return work.astype(np.uint8)


def decode_image(data: bytes, *, max_pixels: int, max_side: int | None, what: str) -> Decoded:
    """Decode with the pixel limit checked from the header, EXIF orientation applied.

    Internal logic:

    1. open (header only) among `IMAGE_FORMATS`; anything else is NOT_AN_IMAGE;
    2. width × height over ``max_pixels`` → IMAGE_TOO_LARGE, before decoding a pixel;
    3. decode (a truncated or corrupt body is NOT_AN_IMAGE), apply EXIF orientation;
    4. to RGB: palette/grayscale/16-bit/CMYK converted, alpha kept aside and composited on
       mid-grey for the models; then scale down to ``max_side``.
    """
    img: Image.Image
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, struct.error, EOFError) as err:
        raise JobError(
            "NOT_AN_IMAGE",
            f"{what} is not an image in a supported format ({', '.join(IMAGE_FORMATS)}): {err}",
        ) from None
    try:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise JobError("NOT_AN_IMAGE", f"{what} has no pixels")
        if width * height > max_pixels:
            raise JobError(
                "IMAGE_TOO_LARGE",
                f"{what} is {width}×{height} = {width * height} pixels; the limit is {max_pixels} (WORKER_MAX_PIXELS)",
            )
        fmt = img.format
        try:
            img.load()
            img = ImageOps.exif_transpose(img) or img
        except (OSError, ValueError, SyntaxError, EOFError, struct.error) as err:
            raise JobError(
                "NOT_AN_IMAGE", f"{what} could not be decoded: {type(err).__name__}: {err}"
            ) from None
        alpha: np.ndarray | None = None
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            img = Image.fromarray(_to_8bit(np.asarray(img)), "L")
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            rgba = img.convert("RGBA")
            alpha = np.asarray(rgba)[:, :, 3].copy()
            grey = Image.new("RGB", rgba.size, (128, 128, 128))
            grey.paste(rgba, mask=rgba.getchannel("A"))
            img = grey
        elif img.mode != "RGB":
            img = img.convert("RGB")
        scaled_from = None
        if max_side is not None and max(img.size) > max_side:
            scaled_from = img.size
            factor = max_side / max(img.size)
            size = (max(1, round(img.size[0] * factor)), max(1, round(img.size[1] * factor)))
            img = img.resize(size, Image.Resampling.LANCZOS)
            if alpha is not None:
                alpha = np.asarray(Image.fromarray(alpha, "L").resize(size, Image.Resampling.LANCZOS))
        rgb = np.asarray(img, dtype=np.uint8)
        return Decoded(
            bgr=np.ascontiguousarray(rgb[:, :, ::-1]), alpha=alpha, format=fmt, scaled_from=scaled_from
        )
    finally:
        img.close()


def encode_image(bgr: np.ndarray, alpha: np.ndarray | None, output_format: str) -> bytes:
    """PNG, JPEG (quality 95) or WebP (quality 95); alpha kept where the format carries it."""
    fmt = OUTPUT_FORMATS[output_format]
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    img = Image.fromarray(rgb, "RGB")
    if alpha is not None and fmt in ("PNG", "WEBP") and alpha.shape == rgb.shape[:2]:
        img.putalpha(Image.fromarray(alpha, "L"))
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, "JPEG", quality=95)
    elif fmt == "WEBP":
        img.save(buf, "WEBP", quality=95)
    else:
        img.save(buf, "PNG", compress_level=3)
    return buf.getvalue()
