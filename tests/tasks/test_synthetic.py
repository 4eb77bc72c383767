"""Synthetic domains: determinism, balance, image format and evidence masks."""

from __future__ import annotations

import colorsys
import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from tasks.data.synthetic import (
    SYNTHETIC_DOMAINS,
    make_sample,
    make_split,
    render_sample,
    split_length,
)

DOMAINS = sorted(SYNTHETIC_DOMAINS)


def _decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _grow(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    h, w = mask.shape
    return np.any([padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)], axis=0)


def test_domains_are_distinct_and_one_is_unrelated():
    assert len(SYNTHETIC_DOMAINS) >= 5
    names = [name for d in SYNTHETIC_DOMAINS.values() for name in d.class_names]
    assert len(names) == len(set(names)), "a class name is shared by two domains"
    for domain in SYNTHETIC_DOMAINS.values():
        assert 4 <= domain.num_classes <= 6
        assert domain.evidence in ("object", "background")
        assert domain.related == (domain.evidence == "object")
    unrelated = [d for d in SYNTHETIC_DOMAINS.values() if not d.related]
    assert [d.name for d in unrelated] == ["scenes"]


@pytest.mark.parametrize("domain", DOMAINS)
def test_same_seed_same_bytes_other_seed_differs(domain):
    first = list(make_split(domain, "val", seed=3, per_class=2))
    again = list(make_split(domain, "val", seed=3, per_class=2))
    other = list(make_split(domain, "val", seed=4, per_class=2))
    assert first == again
    assert [s["__key__"] for s in first] == [s["__key__"] for s in other]
    assert all(a["png"] != b["png"] for a, b in zip(first, other, strict=True))
    assert make_sample(domain, "val", 3, seed=3) == first[3]


def test_splits_hold_different_images():
    train = {s["png"] for s in make_split("shapes", "train", per_class=4)}
    test = {s["png"] for s in make_split("shapes", "test", per_class=4)}
    assert len(train) == 20 and not train & test


@pytest.mark.parametrize("domain", DOMAINS)
def test_class_balanced_keys_and_default_sizes(domain):
    spec = SYNTHETIC_DOMAINS[domain]
    samples = list(make_split(domain, "train", per_class=3))
    assert len(samples) == 3 * spec.num_classes == split_length(domain, "train", 3)
    assert Counter(s["cls"] for s in samples) == {c: 3 for c in range(spec.num_classes)}
    # Classes interleave, so any contiguous block (a shard) is mixed.
    assert [s["cls"] for s in samples[: spec.num_classes]] == list(range(spec.num_classes))
    assert [s["__key__"] for s in samples[:2]] == [
        f"{domain}-train-000000",
        f"{domain}-train-000001",
    ]
    assert split_length(domain, "train") == 64 * spec.num_classes
    assert split_length(domain, "val") == 16 * spec.num_classes
    assert split_length(domain, "test") == 32 * spec.num_classes


@pytest.mark.parametrize("size", [32, 56, 64])
def test_image_and_mask_format(size):
    for domain in DOMAINS:
        sample = make_sample(domain, "test", 1, image_size=size)
        image, mask = _decode(sample["png"]), _decode(sample["mask.png"])
        assert (image.mode, image.size) == ("RGB", (size, size))
        assert (mask.mode, mask.size) == ("L", (size, size))
        assert set(np.unique(np.asarray(mask))) <= {0, 255}
        assert set(sample) == {"__key__", "png", "cls", "mask.png"}


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown synthetic domain"):
        next(make_split("nope", "train"))
    with pytest.raises(ValueError, match="unknown split"):
        next(make_split("shapes", "dev"))
    with pytest.raises(ValueError, match="image_size"):
        next(make_split("shapes", "train", image_size=16))


@pytest.mark.parametrize("domain", DOMAINS)
def test_mask_marks_the_evidence(domain):
    spec = SYNTHETIC_DOMAINS[domain]
    for index in range(12):
        rendered = render_sample(domain, "train", index, seed=1)
        obj = rendered.object_mask
        stored = np.asarray(_decode(rendered.to_sample()["mask.png"])) == 255
        np.testing.assert_array_equal(stored, rendered.evidence_mask)
        # Big enough to see, small enough to leave background, inside the frame.
        assert 0.03 < obj.mean() < 0.6
        grown = _grow(obj)
        if spec.evidence == "object":
            assert stored[obj].all(), "an object pixel lies outside the mask"
            assert not stored[~grown].any(), "the mask reaches pixels away from the object"
        else:
            assert not stored[obj].any(), "the distractor object is marked as evidence"
            np.testing.assert_array_equal(stored, ~grown)


def test_object_pixels_differ_from_background():
    # The object is painted, not just masked: its colour statistics differ from the background.
    for domain in ("shapes", "colours", "scenes"):
        for index in range(5):
            rendered = render_sample(domain, "val", index)
            pixels = rendered.image.astype(float)
            inside = pixels[rendered.object_mask].mean(axis=0)
            outside = pixels[~_grow(rendered.object_mask)].mean(axis=0)
            assert np.abs(inside - outside).max() > 20


def test_colour_class_is_the_object_hue():
    hues = {0: 0.0, 1: 0.15, 2: 0.33, 3: 0.62, 4: 0.8}
    for index in range(15):
        rendered = render_sample("colours", "train", index)
        r, g, b = rendered.image[rendered.object_mask].mean(axis=0) / 255.0
        hue = colorsys.rgb_to_hsv(r, g, b)[0]
        distance = {c: min(abs(hue - h), 1 - abs(hue - h)) for c, h in hues.items()}
        assert min(distance, key=distance.get) == rendered.cls
        # The background carries no class colour: it is much less saturated than the object.
        bg = rendered.image[~_grow(rendered.object_mask)].astype(float) / 255.0
        bg_saturation = (bg.max(axis=1) - bg.min(axis=1)).mean()
        obj = rendered.image[rendered.object_mask].astype(float) / 255.0
        assert (obj.max(axis=1) - obj.min(axis=1)).mean() > 2 * bg_saturation
