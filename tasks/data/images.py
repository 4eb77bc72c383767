"""Image decoding and validation shared by every stage that touches pixels.

Stored samples keep the original encoded bytes; everything that needs pixels goes through
:func:`decode_image`, so one function decides how odd inputs (grayscale, CMYK, palette, alpha,
16-bit, truncated or enormous files) become RGB, and one exception type says why an input was
refused. EXIF orientation is deliberately not applied, like torchvision's ``ImageFolder`` and the
usual ImageNet pipelines, so pixels match what those pipelines see.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:  # imported where a tensor is made: a config check reads this module too
    import torch

logger = logging.getLogger(__name__)

# Well above any ImageNet photo (the largest are ~ 4000 x 3000) and below Pillow's own
# decompression-bomb limit, so the check here fires first and with a readable reason.
DEFAULT_MAX_PIXELS = 64_000_000

# Longest side over shortest side. Resizing the short side to the model's input size scales the
# long side by the same factor, so a 1x100000 strip would become 56x5.6M pixels (GiBs) before the
# center crop; no photo or panorama comes near 1:100.
DEFAULT_MAX_ASPECT_RATIO = 100.0

# Sample fields that hold the main image, in the order a reader looks for them.
IMAGE_FIELDS = ("jpg", "png")

_WHITE = (255, 255, 255)


class BadImageError(ValueError):
    """An input that cannot become an RGB image; ``reason`` is a short, stable description.

    Reasons start with one of: ``"zero-byte file"``, ``"not an image"``,
    ``"truncated/corrupt"``, ``"too large"`` or ``"extreme aspect ratio"`` (followed by
    ``": WxH"``).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    @property
    def category(self) -> str:
        """The reason without its details (``"too large: 9000x9000"`` -> ``"too large"``)."""
        return self.reason.split(":", 1)[0]


def sniff_format(data: bytes) -> str | None:
    """The container format from the magic bytes: ``"jpg"``, ``"png"`` or ``None`` for others.

    Only the two formats stored unchanged in shards are told apart here; anything else is
    identified (or refused) by Pillow in :func:`decode_image`.
    """
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return None


def open_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
    draft_size: int | None = None,
) -> Image.Image:
    """Open and fully decode an encoded image without changing its mode.

    Args:
        data: encoded image bytes.
        max_pixels: largest accepted width * height, checked before the pixels are decoded.
        max_aspect_ratio: largest accepted long side / short side, checked before decoding.
        draft_size: for a JPEG, let the decoder scale by 1/2, 1/4 or 1/8 (in the DCT, far
            cheaper than decoding every pixel and resizing) as far as the short side stays at
            least ``draft_size``; other formats, and JPEGs smaller than twice it, are decoded
            in full. The size checks see the stored size.

    Returns:
        The loaded Pillow image in its own mode (``"CMYK"``, ``"P"``, ``"I;16"`` ...).

    Raises:
        BadImageError: for empty, unidentifiable, truncated or too large inputs, and for
            strips too thin to resize.
    """
    img = _open_checked(data, max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio)
    width, height = img.size
    try:
        if draft_size is not None and img.format == "JPEG" and min(width, height) >= 2 * draft_size:
            img.draft(img.mode, (draft_size, draft_size))
        img.load()
    except Exception as exc:  # codecs raise anything from OSError to struct.error
        raise BadImageError(f"truncated/corrupt: {exc}") from exc
    return img


def _open_checked(data: bytes, *, max_pixels: int, max_aspect_ratio: float) -> Image.Image:
    """The image's header read and its size checked; no pixel is decoded yet."""
    if not data:
        raise BadImageError("zero-byte file")
    try:
        with warnings.catch_warnings():
            # The size check below replaces Pillow's decompression-bomb warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise BadImageError(f"too large: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise BadImageError("not an image") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        # Headers Pillow recognises but cannot parse are damaged files, not foreign formats.
        raise BadImageError(f"truncated/corrupt: {exc}") from exc
    width, height = img.size
    if width <= 0 or height <= 0:
        raise BadImageError(f"truncated/corrupt: empty size {width}x{height}")
    if width * height > max_pixels:
        raise BadImageError(f"too large: {width}x{height}")
    if max(width, height) > max_aspect_ratio * min(width, height):
        raise BadImageError(f"extreme aspect ratio: {width}x{height}")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is flattened onto white.

    Args:
        img: a loaded image.

    Returns:
        An ``"RGB"`` image of the same size.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return _high_depth_to_rgb(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # CMYK (including Adobe's inverted JPEGs, which Pillow handles), YCbCr, L, 1, P, LAB, HSV.
    return img.convert("RGB")


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    # Pillow's convert("RGB") clips 16-bit values at 255, which turns most of the image white.
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
        arr = arr / 257.0
    elif img.mode == "F" and arr.max(initial=0) <= 1.0:
        arr = arr * 255.0
    gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None
) -> Image.Image:
    """Decode image bytes to a loaded RGB Pillow image.

    Grayscale, CMYK, palette, 16-bit and alpha images are converted to RGB (alpha flattened on
    white); for animated formats the first frame is used.

    Args:
        data: encoded image bytes (any format Pillow reads).
        max_pixels: largest accepted width * height.
        draft_size: a large JPEG may be decoded at a reduced scale whose short side is still
            at least this (see :func:`open_image`).

    Returns:
        An ``"RGB"`` image.

    Raises:
        BadImageError: with reason ``"zero-byte file"``, ``"not an image"``,
            ``"truncated/corrupt: ..."``, ``"too large: WxH"`` or
            ``"extreme aspect ratio: WxH"``.
    """
    img = open_image(data, max_pixels=max_pixels, draft_size=draft_size)
    try:
        return to_rgb(img)
    except Exception as exc:  # an undecodable mode is a corrupt file to callers
        raise BadImageError(f"truncated/corrupt: cannot convert mode {img.mode}") from exc


def encode_png(img: Image.Image) -> bytes:
    """Encode an image as PNG with fixed settings, so equal pixels give equal bytes.

    No metadata is written and the compression level is pinned, which keeps synthetic data and
    converted files byte-identical across runs.
    """
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", compress_level=6, optimize=False)
    return buffer.getvalue()


def image_to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` (bicubic), center-crop, and return a float tensor.

    No normalisation is applied: the model applies CLIP's mean and std itself.

    Args:
        img: a Pillow image (converted to RGB if needed).
        size: output side length in pixels.

    Returns:
        A ``float32`` tensor of shape ``[3, size, size]`` with values in ``[0, 1]``.
    """
    import torch

    img = to_rgb(img)
    width, height = img.size
    new_w, new_h, left, top = _resize_geometry(width, height, size)
    if (width, height) != (size, size):
        if (new_w, new_h) != (width, height):
            # Only the centre crop is resized: the source box of the crop in the resized
            # image's scale, so the pixels sampled are those of resizing whole and cropping
            # (Pillow computes its filter weights per box, so a pixel may differ by 1/255),
            # for a quarter less work on a 4:3 image.
            sx, sy = width / new_w, height / new_h
            box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
            img = img.resize((size, size), Image.Resampling.BICUBIC, box=box)
        else:
            img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def _resize_geometry(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """``(new_w, new_h, left, top)``: the short side resized to ``size``, the centre crop's corner."""
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    scale = size / min(width, height)
    # max(size, ...) keeps the short side exactly `size` despite rounding.
    new_w = size if width <= height else max(size, round(width * scale))
    new_h = size if height < width else max(size, round(height * scale))
    return new_w, new_h, (new_w - size) // 2, (new_h - size) // 2


def device_decodable(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
) -> bool:
    """Whether :func:`decode_jpegs` may decode these bytes: a YCbCr or grayscale JPEG.

    Reads the header only (no pixel is decoded) and applies :func:`open_image`'s checks, so an
    input refused here is refused with the same reason as on the host. CMYK and other JPEGs,
    and every other format, are for :func:`decode_image`.

    Raises:
        BadImageError: as :func:`open_image`, for the checks a header allows.
    """
    if sniff_format(data) != "jpg":
        return False
    img = _open_checked(data, max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio)
    return img.format == "JPEG" and img.mode in ("RGB", "L")


def decode_jpegs(
    datas: Sequence[bytes], device: torch.device
) -> list[torch.Tensor | BadImageError]:
    """Decode JPEGs on ``device`` (nvjpeg on a GPU, libjpeg-turbo on the CPU), in one batch.

    On a CUDA device torchvision sends baseline JPEGs to the GPU's hardware decoder (A100 and
    later) and progressive ones through nvjpeg's hybrid path (Huffman decoding on the host);
    on the CPU the same call decodes with libjpeg-turbo, pixel for pixel what Pillow decodes.
    A batch that fails is decoded again one image at a time, so one bad file costs its own
    place only.

    Args:
        datas: encoded JPEGs (:func:`device_decodable` ones).
        device: where to decode and leave the pixels.

    Returns:
        Per input, a ``uint8`` tensor ``[3, H, W]`` (RGB, grayscale repeated) on ``device``, or
        the :class:`BadImageError` (``"truncated/corrupt: ..."``) that input raised.
    """
    import torch
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as _decode_jpeg

    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in datas]
    if not encoded:
        return []
    # torchvision raises RuntimeError for what its decoders refuse; ValueError for some headers.
    try:
        return list(_decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
    except (RuntimeError, ValueError):
        pass
    out: list[torch.Tensor | BadImageError] = []
    for one in encoded:
        try:
            out.append(_decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
        except (RuntimeError, ValueError) as exc:
            out.append(BadImageError(f"truncated/corrupt: {_decoder_message(exc)}"))
    return out


def _decoder_message(exc: Exception) -> str:
    """torchvision's message without its source location (``decode_jpeg, file.cpp:171, ...``)."""
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return re.sub(r"^decode_jpegs?\w*, \S+:\d+, ", "", text)


def resize_to_tensor(image: torch.Tensor, size: int) -> torch.Tensor:
    """:func:`image_to_tensor` for a decoded ``uint8`` ``[3, H, W]`` tensor, where it lies.

    The same geometry (short side to ``size``, bicubic with antialiasing, centre crop) done
    the way Pillow does it: a horizontal pass, then a vertical one, each rounded to 8 bits
    (torch's antialiased bicubic has Pillow's kernel; one pass without the rounding between
    would move high-contrast pixels by up to 3/255). Against Pillow the pixels differ by at
    most 1/255, on about 1 pixel in 4,000 (tests/tasks/test_device_decode.py).

    Returns:
        ``float32`` ``[3, size, size]`` in ``[0, 1]`` on the image's device.
    """
    import torch.nn.functional as F

    _, height, width = image.shape
    new_w, new_h, left, top = _resize_geometry(width, height, size)
    pixels = image.unsqueeze(0).float()
    for shape in ((height, new_w), (new_h, new_w)):
        if shape != tuple(pixels.shape[-2:]):
            pixels = (
                F.interpolate(
                    pixels, size=shape, mode="bicubic", antialias=True, align_corners=False
                )
                .clamp_(0.0, 255.0)
                .round_()
            )
    crop = pixels[0, :, top : top + size, left : left + size]
    return crop.div(255.0).contiguous()


def sample_image_bytes(sample: Mapping[str, object]) -> tuple[str, bytes]:
    """The main image field of a sample dict and its bytes (``"jpg"`` or ``"png"``).

    Raises:
        KeyError: if the sample holds neither field.
    """
    for field in IMAGE_FIELDS:
        data = sample.get(field)
        if isinstance(data, bytes | bytearray):
            return field, bytes(data)
    raise KeyError(f"sample {sample.get('__key__')!r} has no image field {IMAGE_FIELDS}")


def sample_to_tensor(
    sample: Mapping[str, object], size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> torch.Tensor:
    """Decode a sample's image and return it as a ``[3, size, size]`` tensor in ``[0, 1]``."""
    _, data = sample_image_bytes(sample)
    return image_to_tensor(decode_image(data, max_pixels=max_pixels, draft_size=size), size)
