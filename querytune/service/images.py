"""A request's images decoded in bounded memory: what each takes decoded is read from its header before it is
decoded (:func:`decoded_bytes`), a request may hold ``max_decode_mb`` of them and all requests together
``max_decode_inflight_mb`` (:class:`DecodeBudget`, the others wait), and each is decoded no larger than the
model's input needs (:func:`decode`)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from PIL import Image

from ..data.core import check_pixels, reading_image, to_rgb

REDUCE_GAP = 2  # an image is reduced to no less than twice the input size: the bicubic resize does the rest
REDUCED_AS_DECODED = ("RGB", "L")  # the modes reduced as they are; others are converted to RGB at full size first


def pixel_bytes(mode: str) -> int:
    """The bytes PIL holds a pixel of ``mode`` in: 1 for 8-bit single-band modes, 2 for 16-bit grey, else 4 (RGB
    included)."""
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


def _open(data: bytes, name: str, max_pixels: int, size: int) -> Image.Image:
    """The image opened (its header read, nothing decoded) and drafted: a JPEG is decoded at 1/2, 1/4 or 1/8 of its
    size where that leaves at least ``REDUCE_GAP * size`` pixels a side."""
    image = Image.open(io.BytesIO(data))
    check_pixels(image, name, max_pixels)
    image.draft("RGB", (REDUCE_GAP * size, REDUCE_GAP * size))  # other formats: nothing
    return image


def decoded_bytes(data: bytes, name: str, max_pixels: int, size: int) -> int:
    """The memory that decoding the image ``data`` for ``size``-pixel input takes at its peak, from its header:
    the decoded pixels, and their conversion to RGB at full size unless its mode is reduced as decoded. A bad or too
    large image is a one-line DataError naming it."""
    with reading_image(name, not data), _open(data, name, max_pixels, size) as image:
        converted = 0 if image.mode in REDUCED_AS_DECODED else pixel_bytes("RGB")
        return image.width * image.height * (pixel_bytes(image.mode) + converted)


def decode(data: bytes, name: str, max_pixels: int, size: int) -> Image.Image:
    """The image ``data`` in RGB, decoded (JPEG: drafted) and reduced by an integer factor to no less than
    ``REDUCE_GAP * size`` pixels a side, for a resize to ``size``. A bad image is a one-line DataError naming it."""
    with reading_image(name, not data), _open(data, name, max_pixels, size) as image:
        image.load()  # PIL decodes lazily: truncation only shows here
        rgb = image if image.mode in REDUCED_AS_DECODED else to_rgb(image)
        factor = (max(1, rgb.width // (REDUCE_GAP * size)), max(1, rgb.height // (REDUCE_GAP * size)))
        return to_rgb(rgb.reduce(factor) if factor != (1, 1) else rgb)


class DecodeBudget:
    """The bytes of images being decoded, at most ``limit`` at once: :meth:`hold` waits until its share fits."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.freed = asyncio.Condition()

    @asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        """Holds ``size`` bytes (at most ``limit``) of the budget while the block runs."""
        async with self.freed:
            await self.freed.wait_for(lambda: self.used + size <= self.limit)
            self.used += size
        try:
            yield
        finally:
            async with self.freed:
                self.used -= size
                self.freed.notify_all()
