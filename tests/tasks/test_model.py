"""The self-explaining CLIP model: one-pass outputs, equality with vanilla open_clip, loading."""

from __future__ import annotations

import copy
import io

import open_clip
import pytest
import torch
import torch.nn.functional as F

from storage import open_storage
from storage.checkpoints import save_state_dict
from tasks.algorithms.kernel_shap import TokenMaskable, kernel_shap
from tasks.model import (
    DEFAULT_MODEL,
    SelfExplainingCLIP,
    load_clip,
    model_fingerprint,
    register_model_configs,
    standardize_per_image,
    zero_shot_head,
)

CLASSES = ("circle", "square", "triangle")


@pytest.fixture(scope="module")
def clip_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return load_clip(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def sem(clip_model: torch.nn.Module) -> SelfExplainingCLIP:
    head = zero_shot_head(clip_model, CLASSES, model_name=DEFAULT_MODEL)
    return SelfExplainingCLIP(copy.deepcopy(clip_model), head).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(4, 3, 56, 56, generator=torch.Generator().manual_seed(1))


def _normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def test_unknown_model_lists_available_names() -> None:
    with pytest.raises(ValueError, match="available: .*tiny-vit-56"):
        load_clip("no-such-model")


def test_forward_shapes_and_cosine_range(sem: SelfExplainingCLIP, images: torch.Tensor) -> None:
    with torch.no_grad():
        logits, attributions = sem(images)
    assert logits.shape == (4, 3)
    assert attributions.shape == (4, 3, 7, 7)
    assert attributions.abs().max() <= 1.0 + 1e-5


def test_logits_equal_vanilla_open_clip_zero_shot(
    sem: SelfExplainingCLIP, clip_model: torch.nn.Module, images: torch.Tensor
) -> None:
    head = zero_shot_head(clip_model, CLASSES, model_name=DEFAULT_MODEL)
    with torch.no_grad():
        expected = clip_model.logit_scale.exp() * (
            clip_model.encode_image(_normalise(images), normalize=True) @ head.T
        )
        logits, _ = sem(images)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sem.predict(images), expected, rtol=1e-5, atol=1e-5)


def test_attributions_are_cosines_of_open_clip_patch_tokens(
    sem: SelfExplainingCLIP, clip_model: torch.nn.Module, images: torch.Tensor
) -> None:
    visual = copy.deepcopy(clip_model.visual)
    visual.output_tokens = True  # open_clip then also returns the ln_post patch tokens
    head = zero_shot_head(clip_model, CLASSES, model_name=DEFAULT_MODEL)
    with torch.no_grad():
        _, tokens = visual(_normalise(images))
        cosines = F.normalize(tokens @ visual.proj, dim=-1) @ head.T  # [B, 49, C]
        _, attributions = sem(images)
    expected = cosines.transpose(1, 2).reshape(4, 3, 7, 7)
    torch.testing.assert_close(attributions, expected, rtol=1e-5, atol=1e-5)


def test_coarser_grid_averages_token_cells(
    clip_model: torch.nn.Module, images: torch.Tensor
) -> None:
    head = zero_shot_head(clip_model, CLASSES, model_name=DEFAULT_MODEL)
    fine = SelfExplainingCLIP(clip_model, head, grid=(7, 7)).eval()
    coarse = SelfExplainingCLIP(clip_model, head, grid=(1, 1)).eval()
    with torch.no_grad():
        torch.testing.assert_close(coarse(images)[1][..., 0, 0], fine(images)[1].mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="finer than the ViT token grid"):
        SelfExplainingCLIP(clip_model, head, grid=(14, 14))


def test_token_protocol_equals_predict(sem: SelfExplainingCLIP, images: torch.Tensor) -> None:
    assert isinstance(sem, TokenMaskable)
    assert sem.patch_grid == (7, 7)
    with torch.no_grad():
        via_tokens = sem.forward_from_patches(sem.embed_patches(images))
        torch.testing.assert_close(via_tokens, sem.predict(images))
        torch.testing.assert_close(sem.as_classifier()(images), sem.predict(images))


@pytest.mark.parametrize("variant", ["plain", "avg_pool", "grad_checkpointing", "subclass"])
def test_forward_from_patches_equals_the_open_clip_tower(
    clip_model: torch.nn.Module, images: torch.Tensor, variant: str
) -> None:
    """The class-token shortcut of the last block (plain blocks, token pooling) and the full
    path it falls back to (any other case) both give ``visual(x)``."""
    from open_clip.transformer import ResidualAttentionBlock

    from tasks.model import vit

    visual = copy.deepcopy(clip_model.visual).eval()
    if variant == "avg_pool":
        visual.pool_type = "avg"
    elif variant == "grad_checkpointing":
        visual.transformer.grad_checkpointing = True
    elif variant == "subclass":

        class Block(ResidualAttentionBlock):
            pass

        visual.transformer.resblocks[-1].__class__ = Block
    assert vit._class_token_shortcut(visual) == (variant == "plain")
    x = _normalise(images)
    with torch.no_grad():
        expected = visual(x)
        got = vit.vit_forward_from_patches(visual, vit.vit_embed_patches(visual, x))
    assert not torch.equal(expected, torch.zeros_like(expected))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_kernel_shap_token_masking_equals_pixel_masking(
    sem: SelfExplainingCLIP, images: torch.Tensor
) -> None:
    classes = torch.tensor([0, 1])
    kwargs = {"grid": (7, 7), "budget": 40, "seed": 3}
    by_tokens = kernel_shap(sem, images[:2], classes, masking="token", **kwargs)
    by_pixels = kernel_shap(sem.as_classifier(), images[:2], classes, masking="pixel", **kwargs)
    torch.testing.assert_close(by_tokens, by_pixels, rtol=1e-4, atol=1e-4)


def test_only_the_image_encoder_trains_and_head_stays_out_of_the_state_dict(
    sem: SelfExplainingCLIP,
) -> None:
    trainable = {name for name, p in sem.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("clip.visual.") for name in trainable)
    assert not sem.clip.logit_scale.requires_grad
    state = sem.encoder_state_dict()
    register_model_configs()
    vanilla = open_clip.create_model(DEFAULT_MODEL, pretrained=None)
    assert set(state) == set(vanilla.state_dict())
    vanilla.load_state_dict(state, strict=True)
    assert not any("class_embeddings" in key for key in sem.state_dict())


def test_zero_shot_head_is_normalised_template_average(clip_model: torch.nn.Module) -> None:
    templates = ("a photo of a {}.", "a drawing of a {}.")
    head = zero_shot_head(clip_model, CLASSES, templates, model_name=DEFAULT_MODEL)
    singles = [
        zero_shot_head(clip_model, CLASSES, (t,), model_name=DEFAULT_MODEL) for t in templates
    ]
    assert head.shape == (3, clip_model.visual.output_dim)
    assert not head.requires_grad
    torch.testing.assert_close(head.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(head, F.normalize(singles[0] + singles[1], dim=-1))


def test_standardize_per_image() -> None:
    maps = torch.randn(2, 3, 7, 7) * 5 + 2
    out = standardize_per_image(maps)
    torch.testing.assert_close(out.mean(dim=(-2, -1)), torch.zeros(2, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        out.flatten(-2).std(dim=-1, unbiased=False), torch.ones(2, 3), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(standardize_per_image(3 * maps + 1), out, atol=1e-4, rtol=0)


@pytest.mark.parametrize("wrapped", [False, True])
def test_load_clip_from_storage(tmp_path, clip_model: torch.nn.Module, wrapped: bool) -> None:
    """Safetensors, and torch files wrapped the way training scripts save them."""
    storage = open_storage(str(tmp_path))
    state = clip_model.state_dict()
    if wrapped:
        buffer = io.BytesIO()
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, buffer)
        storage.write_bytes("weights/clip.pt", buffer.getvalue())
        uri = storage.url("weights/clip.pt")
    else:
        save_state_dict(storage, "weights/clip.safetensors", state, {"kind": "test"})
        uri = "file://" + str(tmp_path / "weights" / "clip.safetensors")
    loaded = load_clip(DEFAULT_MODEL, uri)
    assert model_fingerprint(loaded) == model_fingerprint(clip_model)
