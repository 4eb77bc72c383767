"""Synthetic image-classification domains with ground-truth evidence masks.

(About 600 lines: one renderer per domain sharing one canvas; splitting the renderers apart would
scatter the one idea, how a domain draws its evidence.)

Five small domains stand in for real source and target datasets so that the whole pipeline
(fine-tuning, Kernel SHAP labelling, vectors, the transfer sweep) runs on a CPU in minutes and
explanation quality can be checked against known evidence regions (pointing game).

Every image is RGB (56 px by default) with one localized object of random position, size and
orientation on a noisy, low-saturation background (a smooth random colour field, pixel noise and a
few faint clutter lines). The four *related* domains put all class evidence inside the object:

* ``shapes``: the object's outline (circle, square, triangle, cross, star); colour is random.
* ``glyphs``: a stroked capital letter (A, E, H, L, T); colour, stroke width, slant are random.
* ``colours``: the object's hue (red, yellow, green, blue, purple); its outline is random.
* ``textures``: the pattern filling the object (stripes, polka dots, checkerboard, rings).

The fifth, ``scenes``, is deliberately *unrelated*: the class is the background (starry night,
sunset sky, brick wall, grass meadow, ocean waves) and the object is a distractor whose shape and
colour are random. A model explaining the related domains learns "look at the object"; on
``scenes`` that is exactly wrong, which is the case where the paper reports that transferring an
explainability vector costs accuracy.

The ``mask.png`` of a sample marks where the class evidence is (``L`` mode, 255 = evidence): the
object, grown by one pixel so that its border is inside, for the related domains; everything but
the (grown) distractor for ``scenes``. :attr:`SyntheticDomain.evidence` says which.

Samples are deterministic: the pixels depend only on (domain, split, seed, index) through a
:class:`numpy.random.SeedSequence`, and PNG encoding uses fixed settings, so the same arguments
give the same bytes. Class ``index % num_classes`` is drawn at position ``index``, which keeps
every split class balanced and every contiguous block of a split (a shard) mixed.
"""

from __future__ import annotations

import colorsys
import logging
import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from tasks.data.images import encode_png

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DEFAULT_PER_CLASS = {"train": 64, "val": 16, "test": 32}
DEFAULT_IMAGE_SIZE = 56
MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 256

# Fixed per-split stream ids: renaming a split must not silently reuse another split's images.
_SPLIT_STREAM = {"train": 1, "val": 2, "test": 3}

# Geometry constants are tuned at 56 px and scaled with the image size.
_REFERENCE_SIZE = 56.0


@dataclass(frozen=True)
class SyntheticDomain:
    """A built-in synthetic domain.

    Attributes:
        name: domain name, used in sample keys and shard names.
        class_names: readable class names in class-id order (prompts "a photo of a {name}.").
        description: what decides the class.
        related: whether the class evidence is the localized object, as in the other domains.
        evidence: ``"object"`` or ``"background"``: what ``mask.png`` marks.
    """

    name: str
    class_names: tuple[str, ...]
    description: str
    related: bool
    evidence: str = "object"

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)


SYNTHETIC_DOMAINS: dict[str, SyntheticDomain] = {
    domain.name: domain
    for domain in (
        SyntheticDomain(
            name="shapes",
            class_names=("circle", "square", "triangle", "cross", "star"),
            description="the outline of the object; its colour is random",
            related=True,
        ),
        SyntheticDomain(
            name="glyphs",
            class_names=("letter A", "letter E", "letter H", "letter L", "letter T"),
            description="the capital letter drawn with strokes; colour and slant are random",
            related=True,
        ),
        SyntheticDomain(
            name="colours",
            class_names=("red", "yellow", "green", "blue", "purple"),
            description="the hue of the object; its outline is random",
            related=True,
        ),
        SyntheticDomain(
            name="textures",
            class_names=("stripes", "polka dots", "checkerboard", "concentric rings"),
            description="the pattern filling the object; its colours are random",
            related=True,
        ),
        SyntheticDomain(
            name="scenes",
            class_names=("starry night", "sunset sky", "brick wall", "grass meadow", "ocean waves"),
            description=(
                "the background scene; the object is a random distractor (unrelated domain: "
                "the evidence is everywhere except the object)"
            ),
            related=False,
            evidence="background",
        ),
    )
}


def _check_unique_class_names() -> None:
    # A shared base CLIP is pretrained on prompts over the union of domains: a name used by two
    # domains would give two classes the same text embedding.
    seen: dict[str, str] = {}
    for domain in SYNTHETIC_DOMAINS.values():
        for class_name in domain.class_names:
            if class_name in seen:
                raise RuntimeError(
                    f"class {class_name!r} is in both {seen[class_name]!r} and {domain.name!r}"
                )
            seen[class_name] = domain.name


_check_unique_class_names()


@dataclass(frozen=True)
class RenderedSample:
    """One generated sample before encoding.

    Attributes:
        key: the sample key, ``"{domain}-{split}-{index:06d}"``.
        cls: class id.
        image: ``uint8`` array ``[H, W, 3]``.
        object_mask: ``bool`` array ``[H, W]``, exactly the pixels painted by the object.
        evidence_mask: ``bool`` array ``[H, W]``, what ``mask.png`` stores.
    """

    key: str
    cls: int
    image: np.ndarray
    object_mask: np.ndarray
    evidence_mask: np.ndarray

    def to_sample(self) -> dict[str, object]:
        """The WebDataset sample dict: ``__key__``, ``png``, ``cls``, ``mask.png``."""
        mask = Image.fromarray(np.where(self.evidence_mask, 255, 0).astype(np.uint8), mode="L")
        return {
            "__key__": self.key,
            "png": encode_png(Image.fromarray(self.image, mode="RGB")),
            "cls": self.cls,
            "mask.png": encode_png(mask),
        }


def split_length(domain: str, split: str, per_class: int | None = None) -> int:
    """Number of samples :func:`make_split` yields for these arguments."""
    spec = _domain(domain)
    return _per_class(split, per_class) * spec.num_classes


def make_split(
    domain: str,
    split: str,
    *,
    seed: int = 0,
    per_class: int | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
) -> Iterator[dict[str, object]]:
    """Yield the samples of one split of a synthetic domain, deterministically.

    Args:
        domain: a key of :data:`SYNTHETIC_DOMAINS`.
        split: ``"train"``, ``"val"`` or ``"test"``.
        seed: global seed; the same seed gives the same bytes.
        per_class: samples per class; defaults to :data:`DEFAULT_PER_CLASS` for the split.
        image_size: side length in pixels (32 to 256).

    Yields:
        Sample dicts ``{"__key__", "png", "cls", "mask.png"}`` with class ``index % C`` at
        position ``index``.
    """
    total = split_length(domain, split, per_class)
    _check_size(image_size)
    for index in range(total):
        yield render_sample(domain, split, index, seed=seed, image_size=image_size).to_sample()


def make_sample(
    domain: str,
    split: str,
    index: int,
    *,
    seed: int = 0,
    image_size: int = DEFAULT_IMAGE_SIZE,
) -> dict[str, object]:
    """The sample at ``index`` of a split, identical to the one :func:`make_split` yields."""
    return render_sample(domain, split, index, seed=seed, image_size=image_size).to_sample()


def render_sample(
    domain: str,
    split: str,
    index: int,
    *,
    seed: int = 0,
    image_size: int = DEFAULT_IMAGE_SIZE,
) -> RenderedSample:
    """Generate one sample as arrays (the object's exact pixels included, for tests and metrics).

    Args:
        domain: a key of :data:`SYNTHETIC_DOMAINS`.
        split: ``"train"``, ``"val"`` or ``"test"``.
        index: position in the split (class ``index % C``).
        seed: global seed.
        image_size: side length in pixels.

    Returns:
        The rendered sample.
    """
    spec = _domain(domain)
    _per_class(split, None)
    _check_size(image_size)
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be non-negative, got {index} and {seed}")
    rng = np.random.default_rng(
        np.random.SeedSequence([seed, zlib.crc32(spec.name.encode()), _SPLIT_STREAM[split], index])
    )
    cls = index % spec.num_classes
    canvas = _Canvas(image_size, rng)
    image, object_mask = _RENDERERS[spec.name](canvas, cls)
    grown = _dilate(object_mask)
    evidence = grown if spec.evidence == "object" else ~grown
    pixels = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    return RenderedSample(
        key=f"{spec.name}-{split}-{index:06d}",
        cls=cls,
        image=pixels,
        object_mask=object_mask,
        evidence_mask=evidence,
    )


def _domain(name: str) -> SyntheticDomain:
    try:
        return SYNTHETIC_DOMAINS[name]
    except KeyError:
        raise ValueError(
            f"unknown synthetic domain {name!r}; choose from {sorted(SYNTHETIC_DOMAINS)}"
        ) from None


def _per_class(split: str, per_class: int | None) -> int:
    if split not in _SPLIT_STREAM:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    count = DEFAULT_PER_CLASS[split] if per_class is None else per_class
    if count < 0:
        raise ValueError(f"per_class must be non-negative, got {count}")
    return count


def _check_size(image_size: int) -> None:
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(
            f"image_size must be in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {image_size}"
        )


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Grow a boolean mask by one pixel (3x3 neighbourhood)."""
    padded = np.pad(mask, 1)
    height, width = mask.shape
    out = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            out |= padded[dy : dy + height, dx : dx + width]
    return out


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float64)


class _Canvas:
    """Random drawing primitives at one image size, all driven by one generator."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size = size
        self.rng = rng
        self.scale = size / _REFERENCE_SIZE
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
        self.xs = xs + 0.5
        self.ys = ys + 0.5

    def uniform(self, low: float, high: float) -> float:
        return float(self.rng.uniform(low, high))

    def background(self) -> np.ndarray:
        """A smooth low-saturation colour field with pixel noise and faint clutter lines."""
        cells = int(self.rng.integers(2, 5))
        base = self.uniform(0.3, 0.7)
        hue = self.uniform(0.0, 1.0)
        field = np.empty((cells, cells, 3))
        for i in range(cells):
            for j in range(cells):
                field[i, j] = _hsv(
                    hue + self.uniform(-0.08, 0.08),
                    self.uniform(0.0, 0.22),
                    np.clip(base + self.uniform(-0.18, 0.18), 0.12, 0.9),
                )
        small = Image.fromarray(np.rint(field * 255).astype(np.uint8), mode="RGB")
        smooth = np.asarray(small.resize((self.size, self.size), Image.Resampling.BICUBIC))
        image = smooth.astype(np.float64) / 255.0
        lines = Image.new("L", (self.size, self.size), 0)
        draw = ImageDraw.Draw(lines)
        for _ in range(int(self.rng.integers(0, 4))):
            points = [tuple(self.rng.uniform(0, self.size, 2)) for _ in range(2)]
            draw.line(points, fill=int(self.rng.integers(25, 50)), width=1)
        clutter = np.asarray(lines, dtype=np.float64)[..., None] / 255.0
        image = image + clutter * np.where(image.mean() > 0.5, -1.0, 1.0)
        return self.noisy(image, self.uniform(0.02, 0.06))

    def noisy(self, image: np.ndarray, sigma: float) -> np.ndarray:
        return np.clip(image + self.rng.normal(0.0, sigma, image.shape), 0.0, 1.0)

    def placement(self, low: float, high: float) -> tuple[float, float, float]:
        """A random object size (fraction of the image side) and a center keeping it inside."""
        extent = self.uniform(low, high) * self.size
        half = extent / 2.0
        cx = self.uniform(half + 1.0, self.size - half - 1.0)
        cy = self.uniform(half + 1.0, self.size - half - 1.0)
        return cx, cy, extent

    def polygon_mask(self, points: list[tuple[float, float]]) -> np.ndarray:
        canvas = Image.new("L", (self.size, self.size), 0)
        ImageDraw.Draw(canvas).polygon(points, fill=255)
        return np.asarray(canvas) > 0

    def ellipse_mask(self, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        canvas = Image.new("L", (self.size, self.size), 0)
        ImageDraw.Draw(canvas).ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255)
        return np.asarray(canvas) > 0

    def strokes_mask(
        self, strokes: list[tuple[tuple[float, float], tuple[float, float]]], width: int
    ) -> np.ndarray:
        canvas = Image.new("L", (self.size, self.size), 0)
        draw = ImageDraw.Draw(canvas)
        radius = width / 2.0
        for start, end in strokes:
            draw.line([start, end], fill=255, width=width)
            # Round caps, so joints of an L or an E are closed.
            for x, y in (start, end):
                draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
        return np.asarray(canvas) > 0

    def vivid_colour(self) -> np.ndarray:
        return _hsv(self.uniform(0, 1), self.uniform(0.6, 1.0), self.uniform(0.65, 1.0))

    def solid_fill(self, colour: np.ndarray) -> np.ndarray:
        """A colour with a gentle random shading gradient and pixel noise."""
        angle = self.uniform(0, 2 * math.pi)
        ramp = (self.xs * math.cos(angle) + self.ys * math.sin(angle)) / self.size - 0.5
        shade = 1.0 + self.uniform(0.0, 0.25) * ramp
        return self.noisy(colour[None, None, :] * shade[..., None], 0.025)


Point = tuple[float, float]


def _transform(
    unit_points: list[Point], cx: float, cy: float, extent: float, angle: float
) -> list[Point]:
    """Map points of the unit box [-0.5, 0.5]^2 to image coordinates (rotate, scale, move)."""
    cos, sin = math.cos(angle), math.sin(angle)
    return [
        (cx + extent * (x * cos - y * sin), cy + extent * (x * sin + y * cos))
        for x, y in unit_points
    ]


def _regular(count: int, radius: float, phase: float = -math.pi / 2) -> list[Point]:
    return [
        (
            radius * math.cos(phase + 2 * math.pi * k / count),
            radius * math.sin(phase + 2 * math.pi * k / count),
        )
        for k in range(count)
    ]


def _star_points() -> list[Point]:
    outer = _regular(5, 0.5)
    inner = _regular(5, 0.2, phase=-math.pi / 2 + math.pi / 5)
    return [point for pair in zip(outer, inner, strict=True) for point in pair]


_CROSS = [
    (-0.17, -0.5),
    (0.17, -0.5),
    (0.17, -0.17),
    (0.5, -0.17),
    (0.5, 0.17),
    (0.17, 0.17),
    (0.17, 0.5),
    (-0.17, 0.5),
    (-0.17, 0.17),
    (-0.5, 0.17),
    (-0.5, -0.17),
    (-0.17, -0.17),
]


def _shape_mask(canvas: _Canvas, shape: int, low: float = 0.45, high: float = 0.75) -> np.ndarray:
    """The mask of shape ``shape`` (the ``shapes`` class order) at a random pose."""
    cx, cy, extent = canvas.placement(low, high)
    angle = canvas.uniform(0, 2 * math.pi)
    if shape == 0:
        rx = extent / 2 * canvas.uniform(0.85, 1.0)
        ry = extent / 2 * canvas.uniform(0.85, 1.0)
        return canvas.ellipse_mask(cx, cy, rx, ry)
    if shape == 1:
        # A square rotated inside the same extent: side / sqrt(2) keeps any angle within bounds.
        corners = [(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)]
        return canvas.polygon_mask(_transform(corners, cx, cy, extent / math.sqrt(2), angle))
    if shape == 2:
        return canvas.polygon_mask(_transform(_regular(3, 0.5), cx, cy, extent, angle))
    if shape == 3:
        return canvas.polygon_mask(_transform(_CROSS, cx, cy, extent / math.sqrt(2), angle))
    return canvas.polygon_mask(_transform(_star_points(), cx, cy, extent, angle))


def _render_shapes(canvas: _Canvas, cls: int) -> tuple[np.ndarray, np.ndarray]:
    background = canvas.background()
    mask = _shape_mask(canvas, cls)
    fill = canvas.solid_fill(canvas.vivid_colour())
    return np.where(mask[..., None], fill, background), mask


_LETTERS: dict[int, list[tuple[Point, Point]]] = {
    0: [((-0.35, 0.5), (0.0, -0.5)), ((0.0, -0.5), (0.35, 0.5)), ((-0.2, 0.12), (0.2, 0.12))],
    1: [
        ((-0.3, -0.5), (-0.3, 0.5)),
        ((-0.3, -0.5), (0.3, -0.5)),
        ((-0.3, 0.0), (0.2, 0.0)),
        ((-0.3, 0.5), (0.3, 0.5)),
    ],
    2: [((-0.3, -0.5), (-0.3, 0.5)), ((0.3, -0.5), (0.3, 0.5)), ((-0.3, 0.0), (0.3, 0.0))],
    3: [((-0.3, -0.5), (-0.3, 0.5)), ((-0.3, 0.5), (0.3, 0.5))],
    4: [((-0.35, -0.5), (0.35, -0.5)), ((0.0, -0.5), (0.0, 0.5))],
}


def _render_glyphs(canvas: _Canvas, cls: int) -> tuple[np.ndarray, np.ndarray]:
    background = canvas.background()
    cx, cy, extent = canvas.placement(0.5, 0.75)
    # A modest slant only: a letter turned upside down is a different glyph to a reader.
    angle = canvas.uniform(-0.35, 0.35)
    width = max(2, round(extent * canvas.uniform(0.1, 0.15)))
    # The stroke width adds to the drawn extent, so the letter body is shrunk to stay inside.
    body = max(extent - width, extent * 0.6)
    strokes = [tuple(_transform([start, end], cx, cy, body, angle)) for start, end in _LETTERS[cls]]
    mask = canvas.strokes_mask(strokes, width)
    if canvas.uniform(0, 1) < 0.5:
        colour = _hsv(canvas.uniform(0, 1), canvas.uniform(0.0, 0.6), canvas.uniform(0.0, 0.12))
    else:
        colour = canvas.vivid_colour()
    fill = canvas.solid_fill(colour)
    return np.where(mask[..., None], fill, background), mask


# Hue centers (fraction of the colour wheel) of the ``colours`` classes.
_HUES = (0.0, 0.15, 0.33, 0.62, 0.8)


def _render_colours(canvas: _Canvas, cls: int) -> tuple[np.ndarray, np.ndarray]:
    background = canvas.background()
    mask = _shape_mask(canvas, int(canvas.rng.integers(0, 5)), 0.3, 0.55)
    colour = _hsv(
        _HUES[cls] + canvas.uniform(-0.035, 0.035),
        canvas.uniform(0.6, 1.0),
        canvas.uniform(0.55, 1.0),
    )
    fill = canvas.solid_fill(colour)
    return np.where(mask[..., None], fill, background), mask


def _render_textures(canvas: _Canvas, cls: int) -> tuple[np.ndarray, np.ndarray]:
    background = canvas.background()
    cx, cy, extent = canvas.placement(0.55, 0.8)
    if canvas.uniform(0, 1) < 0.5:
        mask = canvas.ellipse_mask(cx, cy, extent / 2, extent / 2 * canvas.uniform(0.75, 1.0))
    else:
        corners = [(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)]
        angle = canvas.uniform(0, 2 * math.pi)
        mask = canvas.polygon_mask(_transform(corners, cx, cy, extent / math.sqrt(2), angle))
    angle = canvas.uniform(0, math.pi)
    u = (canvas.xs - cx) * math.cos(angle) + (canvas.ys - cy) * math.sin(angle)
    v = -(canvas.xs - cx) * math.sin(angle) + (canvas.ys - cy) * math.cos(angle)
    # At least one 8-px patch per period (the tiny ViT's patch at 56 px): a finer pattern aliases
    # inside a patch and cannot be told apart by its tokens.
    period = canvas.uniform(9.0, 13.0) * canvas.scale
    if cls == 0:
        pattern = np.mod(u, period) < period / 2
    elif cls == 1:
        du = np.mod(u, period) - period / 2
        dv = np.mod(v, period) - period / 2
        pattern = du**2 + dv**2 < (0.3 * period) ** 2
    elif cls == 2:
        cell = period * 0.6
        pattern = (np.floor(u / cell) + np.floor(v / cell)) % 2 == 0
    else:
        pattern = np.mod(np.hypot(u, v), period) < period / 2
    light = canvas.vivid_colour()
    dark = _hsv(canvas.uniform(0, 1), canvas.uniform(0.2, 0.9), canvas.uniform(0.05, 0.3))
    fill = canvas.noisy(np.where(pattern[..., None], light, dark), 0.025)
    return np.where(mask[..., None], fill, background), mask


def _scene(canvas: _Canvas, cls: int) -> np.ndarray:
    size, scale, rng = canvas.size, canvas.scale, canvas.rng
    xs, ys = canvas.xs, canvas.ys
    if cls == 0:
        top = _hsv(canvas.uniform(0.6, 0.7), canvas.uniform(0.5, 0.9), canvas.uniform(0.08, 0.2))
        bottom = top * canvas.uniform(0.4, 0.8)
        t = (ys / size)[..., None]
        image = top * (1 - t) + bottom * t
        for _ in range(int(rng.integers(15, 35))):
            x, y = rng.integers(0, size, 2)
            radius = int(rng.integers(0, 2))
            image[max(0, y - radius) : y + radius + 1, max(0, x - radius) : x + radius + 1] = _hsv(
                canvas.uniform(0.1, 0.18), canvas.uniform(0.0, 0.3), canvas.uniform(0.85, 1)
            )
        return canvas.noisy(image, 0.015)
    if cls == 1:
        top = _hsv(canvas.uniform(0.7, 0.8), canvas.uniform(0.4, 0.8), canvas.uniform(0.3, 0.55))
        bottom = _hsv(canvas.uniform(0.02, 0.1), canvas.uniform(0.7, 1.0), canvas.uniform(0.8, 1.0))
        horizon = canvas.uniform(0.6, 1.0)
        t = np.clip(ys / (size * horizon), 0, 1)[..., None]
        return canvas.noisy(top * (1 - t) + bottom * t, 0.02)
    if cls == 2:
        mortar = _hsv(0.1, canvas.uniform(0.0, 0.15), canvas.uniform(0.65, 0.85))
        row = canvas.uniform(5.0, 8.0) * scale
        length = row * canvas.uniform(2.0, 2.8)
        offset = canvas.uniform(0, length)
        image = np.empty((size, size, 3))
        row_index = np.floor(ys / row)
        shifted = xs + offset + (row_index % 2) * length / 2
        brick_index = np.floor(shifted / length)
        # One colour per brick, from a hash of its (row, column) so bricks differ consistently.
        palette = np.stack(
            [
                _hsv(
                    canvas.uniform(0.0, 0.05), canvas.uniform(0.55, 0.85), canvas.uniform(0.4, 0.7)
                )
                for _ in range(16)
            ]
        )
        brick_id = ((row_index * 7 + brick_index * 3) % 16).astype(int)
        image[:] = palette[brick_id]
        joint = (np.mod(ys, row) < 1.0) | (np.mod(shifted, length) < 1.0)
        image[joint] = mortar
        return canvas.noisy(image, 0.03)
    if cls == 3:
        base = _hsv(
            canvas.uniform(0.22, 0.36), canvas.uniform(0.5, 0.85), canvas.uniform(0.3, 0.55)
        )
        image = np.broadcast_to(base, (size, size, 3)).copy()
        blades = Image.new("RGB", (size, size), (0, 0, 0))
        draw = ImageDraw.Draw(blades)
        for _ in range(int(60 * scale * scale)):
            x, y = rng.uniform(0, size, 2)
            tall = canvas.uniform(3, 8) * scale
            lean = canvas.uniform(-2, 2) * scale
            colour = _hsv(
                canvas.uniform(0.2, 0.38), canvas.uniform(0.5, 0.9), canvas.uniform(0.2, 0.8)
            )
            draw.line([(x, y), (x + lean, y - tall)], fill=tuple(int(c * 255) for c in colour))
        painted = np.asarray(blades, dtype=np.float64) / 255.0
        image = np.where(painted.sum(axis=2, keepdims=True) > 0, painted, image)
        return canvas.noisy(image, 0.02)
    deep = _hsv(canvas.uniform(0.55, 0.64), canvas.uniform(0.6, 0.95), canvas.uniform(0.3, 0.5))
    crest = _hsv(canvas.uniform(0.5, 0.58), canvas.uniform(0.2, 0.5), canvas.uniform(0.75, 0.95))
    period = canvas.uniform(6.0, 9.0) * scale
    wobble = canvas.uniform(1.0, 3.0) * scale
    wavelength = canvas.uniform(14.0, 24.0) * scale
    phase = canvas.uniform(0, 2 * math.pi)
    wave = np.sin(
        2 * math.pi * (ys + wobble * np.sin(2 * math.pi * xs / wavelength + phase)) / period
    )
    t = ((wave + 1) / 2)[..., None] ** 2
    return canvas.noisy(deep * (1 - t) + crest * t, 0.02)


def _render_scenes(canvas: _Canvas, cls: int) -> tuple[np.ndarray, np.ndarray]:
    background = _scene(canvas, cls)
    mask = _shape_mask(canvas, int(canvas.rng.integers(0, 5)), 0.3, 0.5)
    fill = canvas.solid_fill(canvas.vivid_colour())
    return np.where(mask[..., None], fill, background), mask


_RENDERERS: dict[str, Callable[[_Canvas, int], tuple[np.ndarray, np.ndarray]]] = {
    "shapes": _render_shapes,
    "glyphs": _render_glyphs,
    "colours": _render_colours,
    "textures": _render_textures,
    "scenes": _render_scenes,
}
