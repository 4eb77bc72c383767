"""The configuration of the base-model pretraining (:mod:`tasks.pretrain` runs it) and the
shipped base it made.

Defined apart from the training code, which imports torch and open_clip, so that the command
line can judge a config before anything heavy starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from tasks.config import StageConfig
from tasks.model.names import DEFAULT_MODEL, DEFAULT_TEMPLATES


class PretrainConfig(StageConfig):
    """Configuration of the base-model pretraining.

    Attributes:
        model_name: open_clip architecture (trained from random initialisation).
        domains: synthetic domains whose train splits are pooled (None: all of them).
        per_class: training images per class and domain.
        val_per_class: validation images per class and domain (zero-shot accuracy).
        image_size: image side in pixels.
        epochs: passes over the pooled data.
        batch_size: images per step.
        lr: peak AdamW learning rate (cosine decay to zero after a linear warm-up).
        warmup_steps: linear warm-up steps.
        weight_decay: AdamW weight decay on matrices.
        seed: seeds the initialisation, the data order and the synthetic data.
        template: caption template with one ``{}`` for the class name.
        fresh_steps: when positive, train this many steps on freshly generated images instead
            of epochs over a fixed pool: step ``t`` draws train-split samples
            ``t * batch_size ... (t + 1) * batch_size - 1`` round-robin over the domains, so no
            image is seen twice and the data depend only on (seed, step); ``per_class`` and
            ``epochs`` are then unused.
        augment_shift: random translation of each training image by up to this many pixels
            (reflect-padded), drawn from (seed, step).
        contrast: what each image is contrasted with. ``"vocabulary"``: every caption of every
            domain. ``"domain"``: only its own domain's captions (and each caption only with its
            domain's images), the way the zero-shot heads are used.
        lock_text: keep the text tower at its random initialisation and train the image tower
            (and the temperature) alone. The prompts, which share the template, then keep the
            large common component they start with (mean cosine about 0.9), as a real CLIP's
            prompts keep one; a text tower trained on a few dozen prompts spreads them over the
            sphere instead, and task arithmetic transfers through that component (see
            ``tasks.sweep.inputs.head_alignment``).
    """

    model_name: str = DEFAULT_MODEL
    domains: tuple[str, ...] | None = None
    per_class: int = Field(default=48, ge=1)
    val_per_class: int = Field(default=20, ge=1)
    image_size: int = Field(default=56, ge=8)
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=32, ge=2)
    lr: float = Field(default=1e-3, gt=0)
    warmup_steps: int = Field(default=20, ge=0)
    weight_decay: float = Field(default=0.05, ge=0)
    seed: int = 0
    template: str = DEFAULT_TEMPLATES[0]
    fresh_steps: int = Field(default=0, ge=0)
    augment_shift: int = Field(default=0, ge=0)
    contrast: Literal["vocabulary", "domain"] = "vocabulary"
    lock_text: bool = False


# The base model shipped with the package: trained once by ``explain-transfer pretrain --shipped``
# with :data:`SHIPPED_PRETRAIN`; its sidecar holds that config and the measured accuracies.
SHIPPED = "shipped"
SHIPPED_BASE_FILE = Path(__file__).parent / "model" / "weights" / "tiny-vit-56-base.safetensors"
SHIPPED_PRETRAIN = PretrainConfig(
    fresh_steps=20000,
    batch_size=32,
    lr=1e-3,
    warmup_steps=100,
    augment_shift=3,
    val_per_class=100,
    contrast="domain",
    lock_text=True,
)


def resolve_base(base: str | None) -> str | None:
    """The weights URI that ``base`` names: :data:`SHIPPED` is the packaged base model."""
    if base != SHIPPED:
        return base
    if not SHIPPED_BASE_FILE.exists():
        raise FileNotFoundError(
            f"the shipped base model {SHIPPED_BASE_FILE.name} is missing from the package; "
            "rebuild it with `explain-transfer pretrain --shipped --out DIR` or set base to None"
        )
    return str(SHIPPED_BASE_FILE)
