"""The self-explaining CLIP model (SEM): logits and per-cell attributions in one pass.

A :class:`SelfExplainingCLIP` wraps a vanilla open_clip CLIP model and a frozen zero-shot head
(one text embedding per class). In one forward pass it returns the class logits and, for every
class, one attribution per grid cell: the cosine between each patch token (after the final layer
norm and the image projection) and the class embedding. Nothing is added to the open_clip model,
so the trained weights keep open_clip's own state-dict keys and load strictly into a vanilla
model; explainability lives in the image encoder, which is what task arithmetic transfers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn

from tasks.model.clip import register_model_configs
from tasks.model.names import DEFAULT_TEMPLATES
from tasks.model.vit import vit_embed_patches, vit_forward_from_patches, vit_forward_tokens

logger = logging.getLogger(__name__)


@torch.no_grad()
def zero_shot_head(
    clip_model: nn.Module,
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    *,
    model_name: str | None = None,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Class embeddings from the CLIP text tower: the zero-shot head of a domain.

    The prompts are encoded where the model is, ``batch_size`` at a time: put the model on its
    device first (ImageNet's 1000 classes x 4 templates are minutes of a CPU, a blink of a GPU).

    Args:
        clip_model: the open_clip model whose text tower embeds the prompts.
        class_names: one name per class, in label order.
        templates: prompt templates with one ``{}`` for the class name; averaged per class.
        model_name: the architecture name, to pick its tokenizer; None uses CLIP's BPE tokenizer
            with the model's context length (what open_clip returns for every CLIP text tower).
        batch_size: prompts per text-tower forward pass (bounds the activations' memory).

    Returns:
        A frozen float32 tensor ``[C, D]`` of L2-normalised class embeddings, on the model's
        device.

    Raises:
        ValueError: ``batch_size`` is not positive.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if model_name is not None:
        register_model_configs()
        tokenizer = open_clip.get_tokenizer(model_name)
    else:
        tokenizer = open_clip.SimpleTokenizer(context_length=clip_model.context_length)
    device = next(clip_model.parameters()).device
    was_training = clip_model.training
    clip_model.eval()
    prompts = [template.format(name) for name in class_names for template in templates]
    tokens = tokenizer(prompts)
    text = torch.cat(
        [
            clip_model.encode_text(chunk.to(device), normalize=True).float()
            for chunk in tokens.split(batch_size)
        ]
    )
    text = text.reshape(len(class_names), len(templates), -1).mean(dim=1)
    clip_model.train(was_training)
    return F.normalize(text, dim=-1).detach()


def standardize_per_image(maps: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Zero mean and unit standard deviation over the grid cells of each map.

    Args:
        maps: ``[..., gh, gw]`` attribution maps.
        eps: added to the standard deviation so constant maps stay finite.
    """
    flat = maps.flatten(-2)
    mean = flat.mean(dim=-1, keepdim=True)
    std = flat.std(dim=-1, keepdim=True, unbiased=False)
    return ((flat - mean) / (std + eps)).reshape(maps.shape)


class SelfExplainingCLIP(nn.Module):
    """A CLIP image encoder with a frozen zero-shot head that explains itself in one pass.

    The whole image encoder (``clip.visual``) is trainable; the text tower and ``logit_scale``
    are frozen. Images are given in ``[0, 1]``; CLIP's normalisation is applied inside.

    Attributes:
        clip: the wrapped open_clip model (its ``state_dict()`` is the checkpoint).
        class_embeddings: ``[C, D]`` L2-normalised head (a non-persistent buffer).
        grid: ``(gh, gw)`` of the attribution maps.
    """

    def __init__(
        self,
        clip_model: nn.Module,
        class_embeddings: torch.Tensor,
        grid: tuple[int, int] = (7, 7),
        mean: Sequence[float] = OPENAI_DATASET_MEAN,
        std: Sequence[float] = OPENAI_DATASET_STD,
    ) -> None:
        """Wrap ``clip_model``.

        Args:
            clip_model: an open_clip CLIP model with a ViT image tower (class-token or average
                pooling, no attentional pooler).
            class_embeddings: ``[C, D]`` class embeddings (normalised here).
            grid: attribution grid; must not be finer than the ViT token grid.
            mean: per-channel normalisation mean.
            std: per-channel normalisation std.

        Raises:
            ValueError: the image tower is not a supported ViT, or the grid is finer than it.
        """
        super().__init__()
        visual = clip_model.visual
        if not hasattr(visual, "conv1") or getattr(visual, "attn_pool", None) is not None:
            raise ValueError("SelfExplainingCLIP needs an open_clip ViT without attentional pool")
        if visual.pool_type not in ("tok", "avg"):
            raise ValueError(f"unsupported ViT pool_type {visual.pool_type!r}")
        if not isinstance(visual.patch_dropout, nn.Identity):
            # Dropping tokens in training would drop the very cells the attributions live on.
            raise ValueError("SelfExplainingCLIP needs a ViT without patch dropout")
        token_grid = tuple(visual.grid_size)
        self.grid = (int(grid[0]), int(grid[1]))
        if self.grid[0] > token_grid[0] or self.grid[1] > token_grid[1]:
            raise ValueError(f"grid {self.grid} is finer than the ViT token grid {token_grid}")
        self.clip = clip_model
        for name, param in clip_model.named_parameters():
            param.requires_grad_(name.startswith("visual."))
        self.register_buffer(
            "class_embeddings",
            F.normalize(class_embeddings.detach().float(), dim=-1),
            persistent=False,
        )
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def patch_grid(self) -> tuple[int, int]:
        """The ViT token grid ``(gh, gw)``: the unit of token-space masking."""
        return tuple(self.clip.visual.grid_size)

    @property
    def num_classes(self) -> int:
        """Number of classes of the current head."""
        return self.class_embeddings.shape[0]

    def set_head(self, class_embeddings: torch.Tensor) -> None:
        """Replace the zero-shot head (another domain's classes); the encoder is untouched."""
        self.class_embeddings = F.normalize(class_embeddings.detach().float(), dim=-1).to(
            self.class_embeddings.device
        )

    def train_last_blocks(self, blocks: int) -> None:
        """Train only the image tower's last ``blocks`` transformer blocks, its final norm and
        its projection; the patch embedding, positions and earlier blocks stay the base's.

        Raises:
            ValueError: the tower has fewer blocks.
        """
        visual = self.clip.visual
        resblocks = visual.transformer.resblocks
        if blocks > len(resblocks):
            raise ValueError(f"trainable_blocks {blocks}: the image tower has {len(resblocks)}")
        keep = {
            id(p)
            for block in list(resblocks)[len(resblocks) - blocks :]
            for p in block.parameters()
        }
        keep |= {id(p) for p in visual.ln_post.parameters()}
        if isinstance(visual.proj, nn.Parameter):
            keep.add(id(visual.proj))
        for param in visual.parameters():
            param.requires_grad_(id(param) in keep)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The open_clip state dict (all of CLIP, open_clip's own keys): what a checkpoint holds."""
        return self.clip.state_dict()

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embeddings ``[B, gh*gw, width]`` of images in ``[0, 1]``.

        Each embedding depends on its own patch's pixels only, so replacing an embedding by a
        baseline's embedding is exactly replacing that patch's pixels: token-space masking.
        """
        images = (images - self.pixel_mean) / self.pixel_std
        return vit_embed_patches(self.clip.visual, images.to(self.clip.visual.conv1.weight.dtype))

    def _logits(self, pooled: torch.Tensor) -> torch.Tensor:
        # float32 even under autocast (as OpenCLIPClassifier's head): reduced-precision logits
        # round away the differences between coalitions that Kernel SHAP labels are made of
        dtype = torch.promote_types(pooled.dtype, torch.float32)
        with torch.autocast(pooled.device.type, enabled=False):
            head = self.class_embeddings.to(dtype)
            scale = self.clip.logit_scale.to(dtype).exp()
            logits = scale * F.normalize(pooled.to(dtype), dim=-1) @ head.T
            if getattr(self.clip, "logit_bias", None) is not None:
                logits = logits + self.clip.logit_bias.to(dtype)
        return logits

    def forward_from_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]`` from (possibly masked) patch embeddings of :meth:`embed_patches`."""
        pooled = vit_forward_from_patches(self.clip.visual, patches)
        return self._logits(pooled)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]``: the plain classifier that Kernel SHAP explains."""
        return self.forward_from_patches(self.embed_patches(images))

    def as_classifier(self) -> SEMClassifier:
        """A view of this model whose ``forward`` is :meth:`predict` (for pixel-masking code)."""
        return SEMClassifier(self)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Classify and explain in one pass.

        Args:
            images: ``[B, 3, H, W]`` in ``[0, 1]`` at the model's resolution.

        Returns:
            ``(logits [B, C], attributions [B, C, gh, gw])``; an attribution is the cosine
            between a patch's projected token and the class embedding, averaged over the
            tokens of a grid cell when the token grid is finer than the attribution grid.
        """
        pooled, tokens = vit_forward_tokens(self.clip.visual, self.embed_patches(images))
        head = self.class_embeddings.to(tokens.dtype)
        per_token = F.normalize(tokens, dim=-1) @ head.T
        gh, gw = self.patch_grid
        maps = per_token.transpose(1, 2).reshape(images.shape[0], -1, gh, gw)
        if (gh, gw) != self.grid:
            maps = F.adaptive_avg_pool2d(maps, self.grid)
        return self._logits(pooled), maps


class SEMClassifier(nn.Module):
    """The classifier of a :class:`SelfExplainingCLIP`: ``forward(images) -> logits``.

    Shares the SEM's weights and implements the token-masking protocol, so Kernel SHAP can
    explain it with pixel or token masking alike.
    """

    def __init__(self, sem: SelfExplainingCLIP) -> None:
        super().__init__()
        self.sem = sem

    @property
    def patch_grid(self) -> tuple[int, int]:
        """The ViT token grid ``(gh, gw)``."""
        return self.sem.patch_grid

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """See :meth:`SelfExplainingCLIP.embed_patches`."""
        return self.sem.embed_patches(images)

    def forward_from_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """See :meth:`SelfExplainingCLIP.forward_from_patches`."""
        return self.sem.forward_from_patches(patches)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]`` of images in ``[0, 1]``."""
        return self.sem.predict(images)
