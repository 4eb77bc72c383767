"""open_clip ViT internals used by token-space masking and the self-explaining model.

The image tower of an open_clip ``VisionTransformer`` split in two: the patch embedding (a
convolution with stride = kernel = patch) and the trunk after it. Mixing the patch embeddings of
an image and a baseline per coalition and running the trunk equals masking pixels on whole
patches, which is how Kernel SHAP masks without materialising one image per coalition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import Tensor, nn


def _check_vit(visual: nn.Module) -> None:
    if getattr(visual, "attn_pool", None) is not None:
        raise NotImplementedError("open_clip ViTs with attentional pooling are not supported")
    if getattr(visual, "pool_type", "tok") not in ("tok", "avg"):
        raise NotImplementedError(f"unsupported ViT pool_type {visual.pool_type!r}")


def vit_embed_patches(visual: nn.Module, images: Tensor) -> Tensor:
    """Patch embeddings of an open_clip ``VisionTransformer``.

    Args:
        visual: ``clip_model.visual`` (open_clip ``VisionTransformer``).
        images: ``[B, 3, H, W]``, normalised for the model.

    Returns:
        ``[B, gh * gw, width]``: the ``conv1`` output in row-major token order, before the class
        token, the positional embedding and ``ln_pre``.
    """
    x = visual.conv1(images)
    return x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)


def _vit_input(visual: nn.Module, patch_tokens: Tensor) -> Tensor:
    """The transformer's input: class token, positional embedding, patch dropout, ``ln_pre``."""
    _check_vit(visual)
    batch = patch_tokens.shape[0]
    cls = visual.class_embedding.view(1, 1, -1).expand(batch, -1, -1).to(patch_tokens.dtype)
    x = torch.cat([cls, patch_tokens], dim=1)
    x = x + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)
    return visual.ln_pre(x)


def _vit_trunk(visual: nn.Module, patch_tokens: Tensor) -> Tensor:
    """Everything of ``VisionTransformer.forward`` after ``conv1`` and before pooling."""
    return visual.transformer(_vit_input(visual, patch_tokens))


def _class_token_shortcut(visual: nn.Module) -> bool:
    """Whether the last block may be run for the class token alone (see below)."""
    transformer = visual.transformer
    blocks = getattr(transformer, "resblocks", None)
    if (
        visual.pool_type != "tok"
        or not blocks
        or not getattr(transformer, "batch_first", False)
        or getattr(transformer, "grad_checkpointing", False)
    ):
        return False
    # Exactly open_clip's plain block (pre-norm self-attention, then MLP): its forward is the
    # one _vit_class_token reproduces; a subclass or another block type takes the full path.
    return type(blocks[-1]) is ResidualAttentionBlock


def _vit_class_token(visual: nn.Module, patch_tokens: Tensor) -> Tensor:
    """The transformer's output at the class token ``[B, width]``.

    With class-token pooling, the logits read only the class token, and in the last block no
    other token's output reaches it: its keys and values need every token after ``ln_1``, its
    query, attention output and MLP only the class token. Running that block for the class
    token alone is the same computation minus the rows nobody reads (about a quarter of a
    3-block ViT's work, an eighth of a 12-block one), up to float rounding of the smaller
    matrix products.
    """
    x = _vit_input(visual, patch_tokens)
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        x = block(x)
    last = blocks[-1]
    normed = last.ln_1(x)
    cls = x[:, :1] + last.ls_1(last.attention(q_x=normed[:, :1], k_x=normed, v_x=normed))
    cls = cls + last.ls_2(last.mlp(last.ln_2(cls)))
    return cls[:, 0]


def _global_pool(visual: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    if visual.pool_type == "avg":
        return x[:, 1:].mean(dim=1), x[:, 1:]
    return x[:, 0], x[:, 1:]


def vit_forward_tokens(visual: nn.Module, patch_tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Pooled image embedding and projected patch tokens from patch embeddings.

    Reproduces ``VisionTransformer.forward`` (class token, positional embedding, patch dropout,
    ``ln_pre``, transformer, ``ln_post``, global pooling, ``proj``) starting from
    :func:`vit_embed_patches`. The patch tokens go through the same final layer norm and
    projection as the pooled token, which is what the self-explaining head needs.

    Args:
        visual: ``clip_model.visual`` (open_clip ``VisionTransformer``, token or average pooling).
        patch_tokens: ``[B, gh * gw, width]`` patch embeddings.

    Returns:
        ``(pooled [B, embed_dim], tokens [B, gh * gw, embed_dim])``, both unnormalised.
    """
    x = _vit_trunk(visual, patch_tokens)
    if visual.final_ln_after_pool:
        pooled, tokens = _global_pool(visual, x)
        pooled, tokens = visual.ln_post(pooled), visual.ln_post(tokens)
    else:
        pooled, tokens = _global_pool(visual, visual.ln_post(x))
    if visual.proj is not None:
        pooled, tokens = pooled @ visual.proj, tokens @ visual.proj
    return pooled, tokens


def vit_forward_from_patches(visual: nn.Module, patch_tokens: Tensor) -> Tensor:
    """Pooled image embedding ``[B, embed_dim]`` from patch embeddings.

    ``vit_forward_from_patches(visual, vit_embed_patches(visual, x))`` equals ``visual(x)``.

    Args:
        visual: ``clip_model.visual`` (open_clip ``VisionTransformer``, token or average pooling).
        patch_tokens: ``[B, gh * gw, width]`` patch embeddings.
    """
    if _class_token_shortcut(visual):
        # ln_post is per token: before or after taking the class token is the same.
        pooled = visual.ln_post(_vit_class_token(visual, patch_tokens))
    else:
        x = _vit_trunk(visual, patch_tokens)
        if visual.final_ln_after_pool:
            pooled = visual.ln_post(_global_pool(visual, x)[0])
        else:
            pooled = _global_pool(visual, visual.ln_post(x))[0]
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled


class OpenCLIPClassifier(nn.Module):
    """An open_clip ViT image tower with a fixed class-embedding head, token-maskable.

    ``logits = logit_scale * normalise(visual(images)) @ normalise(class_embeddings).T``.
    Images must already be resized and normalised for the model (open_clip's mean and std):
    preprocessing stays outside so that the masking baseline lives in the model's input space.

    Args:
        clip_model: an open_clip ``CLIP`` model (only its ``visual`` tower is kept) or the
            ``VisionTransformer`` itself.
        class_embeddings: ``[C, embed_dim]`` class embeddings (normalised here, kept frozen).
        logit_scale: multiplier of the cosine similarities; defaults to
            ``clip_model.logit_scale.exp()`` when the model has one, else 100.
    """

    def __init__(
        self,
        clip_model: nn.Module,
        class_embeddings: Tensor,
        logit_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.visual = getattr(clip_model, "visual", clip_model)
        _check_vit(self.visual)
        if logit_scale is None:
            scale = getattr(clip_model, "logit_scale", None)
            logit_scale = float(scale.detach().exp()) if scale is not None else 100.0
        self.logit_scale = float(logit_scale)
        self.register_buffer(
            "class_embeddings", F.normalize(class_embeddings.detach().float(), dim=-1)
        )

    @property
    def patch_grid(self) -> tuple[int, int]:
        """The ViT token grid ``(rows, cols)``."""
        return tuple(self.visual.grid_size)

    def _head(self, embedding: Tensor) -> Tensor:
        # float32 even under autocast: a bf16 logit near 10 moves in steps of 1/16, which is
        # noise on the differences between coalitions that Kernel SHAP regresses on
        dtype = torch.promote_types(embedding.dtype, torch.float32)
        with torch.autocast(embedding.device.type, enabled=False):
            z = F.normalize(embedding.to(dtype), dim=-1)
            return self.logit_scale * z @ self.class_embeddings.to(dtype).T

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``[B, C]`` of normalised images ``[B, 3, H, W]``."""
        return self._head(self.visual(images))

    def embed_patches(self, images: Tensor) -> Tensor:
        """Patch embeddings ``[B, L, width]`` (see :func:`vit_embed_patches`)."""
        return vit_embed_patches(self.visual, images)

    def forward_from_patches(self, patch_tokens: Tensor) -> Tensor:
        """Logits ``[B, C]`` from patch embeddings (see :func:`vit_forward_from_patches`)."""
        return self._head(vit_forward_from_patches(self.visual, patch_tokens))
