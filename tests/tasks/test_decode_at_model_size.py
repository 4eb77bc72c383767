"""Decoding at the size the model takes: the centre crop resized alone, large JPEGs drafted."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.data.images import decode_image, image_to_tensor, open_image


def _jpeg(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    field = np.stack([np.sin(2 * np.pi * (a * x + b * y)) for a, b in rng.uniform(0.5, 3, (3, 2))])
    pixels = 127 + 90 * field.transpose(1, 2, 0) + rng.normal(0, 10, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _resize_then_crop(img: Image.Image, size: int) -> torch.Tensor:
    """The former preprocessing: resize the whole image (short side = size), crop the centre."""
    width, height = img.size
    scale = size / min(width, height)
    new_w = size if width <= height else max(size, round(width * scale))
    new_h = size if height < width else max(size, round(height * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    arr = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255


@pytest.mark.parametrize(
    "shape", [(500, 375), (375, 500), (500, 333), (333, 500), (301, 225), (200, 150), (224, 300)]
)
def test_resizing_the_crop_alone_matches_resize_then_crop(shape):
    img = decode_image(_jpeg(*shape))
    ours = image_to_tensor(img, 224)
    reference = _resize_then_crop(img, 224)
    assert ours.shape == (3, 224, 224)
    # the same sampling positions; Pillow's per-box filter weights move a pixel by 1/255 at most
    assert float((ours - reference).abs().max()) <= 1 / 255 + 1e-6
    assert float((ours != reference).float().mean()) < 0.3


def test_an_image_of_the_model_size_is_taken_as_it_is():
    img = decode_image(_jpeg(224, 224))
    expected = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(image_to_tensor(img, 224), expected)


def test_a_large_jpeg_is_drafted_to_the_scale_nearest_above_the_model_size():
    data = _jpeg(1200, 900)
    drafted = open_image(data, draft_size=224)
    assert drafted.size == (300, 225)  # 1/4: the smallest scale keeping the short side >= 224
    assert open_image(data).size == (1200, 900)
    full = image_to_tensor(decode_image(data), 224)
    fast = image_to_tensor(decode_image(data, draft_size=224), 224)
    # a different route to the same picture: close, not equal
    assert float((fast - full).abs().mean()) < 0.02


@pytest.mark.parametrize("shape", [(500, 375), (447, 600)])
def test_jpegs_below_twice_the_model_size_and_other_formats_decode_in_full(shape):
    data = _jpeg(*shape)
    assert np.array_equal(
        np.asarray(decode_image(data, draft_size=224)), np.asarray(decode_image(data))
    )
    buffer = io.BytesIO()
    Image.open(io.BytesIO(_jpeg(1200, 900))).save(buffer, "PNG")
    assert open_image(buffer.getvalue(), draft_size=224).size == (1200, 900)
