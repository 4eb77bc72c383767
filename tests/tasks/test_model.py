"""The self-explaining CLIP model: one-pass outputs, equality with vanilla open_clip, loading."""

from __future__ import annotations

import copy
import io
import json
import logging
from pathlib import Path

import open_clip
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from storage import open_storage
from storage.checkpoints import load_sidecar, load_state_dict, save_state_dict
from tasks.algorithms.kernel_shap import TokenMaskable, kernel_shap
from tasks.model import (
    DEFAULT_MODEL,
    SelfExplainingCLIP,
    load_clip,
    load_sem,
    model_fingerprint,
    model_image_size,
    register_model_configs,
    standardize_per_image,
    zero_shot_head,
)
from tasks.model.clip import (
    checkpoint_metadata,
    clip_activation,
    model_activation,
    weights_activation,
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


QUICK = "tiny-vit-56-quickgelu"


@pytest.fixture(scope="module")
def quick_model() -> torch.nn.Module:
    """A tiny architecture trained-to-be with QuickGELU (random weights stand in for OpenAI's)."""
    torch.manual_seed(2)
    return load_clip(QUICK)


def _save_quick(storage, key: str, model: torch.nn.Module) -> str:
    save_state_dict(storage, key, model.state_dict(), checkpoint_metadata(model, QUICK))
    return storage.url(key)


def test_activation_is_read_from_configs_and_modules(quick_model: torch.nn.Module) -> None:
    assert [model_activation(n) for n in (DEFAULT_MODEL, QUICK)] == ["gelu", "quick_gelu"]
    assert [model_activation(n) for n in ("ViT-B-32", "ViT-B-32-quickgelu")] == [
        "gelu",
        "quick_gelu",
    ]
    assert clip_activation(load_clip(DEFAULT_MODEL)) == "gelu"
    assert clip_activation(quick_model) == "quick_gelu"
    assert checkpoint_metadata(quick_model, QUICK) == {
        "model_name": QUICK,
        "activation": "quick_gelu",
    }


def test_quick_gelu_weights_are_refused_by_gelu_and_load_into_quick_gelu(
    tmp_path, quick_model: torch.nn.Module, images: torch.Tensor
) -> None:
    storage = open_storage(str(tmp_path))
    uri = _save_quick(storage, "weights/base.safetensors", quick_model)
    assert load_sidecar(storage, "weights/base.safetensors")["activation"] == "quick_gelu"
    with pytest.raises(ValueError, match=f"trained with quick_gelu .*use model_name '{QUICK}'"):
        load_clip(DEFAULT_MODEL, uri)
    with pytest.raises(ValueError, match="trained with quick_gelu"):
        load_sem(uri, model_name=DEFAULT_MODEL, class_names=CLASSES)

    loaded = load_clip(QUICK, uri)
    tokens = open_clip.get_tokenizer(QUICK)(["a photo of a circle."])
    with torch.no_grad():
        for model in (loaded, quick_model):
            model.eval()
        torch.testing.assert_close(
            loaded.encode_image(_normalise(images)), quick_model.encode_image(_normalise(images))
        )
        torch.testing.assert_close(loaded.encode_text(tokens), quick_model.encode_text(tokens))
        # What the refusal prevents: the same tensors in a GELU model compute something else.
        gelu = open_clip.create_model(DEFAULT_MODEL, pretrained=None).eval()
        gelu.load_state_dict(quick_model.state_dict(), strict=True)
        assert not torch.allclose(
            gelu.encode_image(_normalise(images)), quick_model.encode_image(_normalise(images))
        )
    # Without a model_name the sidecar's architecture is built; the keys stay open_clip's.
    sem = load_sem(uri, class_names=CLASSES).sem
    assert clip_activation(sem.clip) == "quick_gelu"
    vanilla = open_clip.create_model(QUICK, pretrained=None)
    vanilla.load_state_dict(load_state_dict(storage, "weights/base.safetensors"), strict=True)


def test_weights_without_sidecar_follow_open_clip_naming(
    tmp_path, quick_model: torch.nn.Module, caplog: pytest.LogCaptureFixture
) -> None:
    storage = open_storage(str(tmp_path))
    data = safetensors.torch.save(dict(quick_model.state_dict()))
    storage.write_bytes("vit-quickgelu-release.safetensors", data)
    with pytest.raises(ValueError, match="'quickgelu' in its file name"):
        load_clip(DEFAULT_MODEL, storage.url("vit-quickgelu-release.safetensors"))
    load_clip(QUICK, storage.url("vit-quickgelu-release.safetensors"))

    assert weights_activation("w/ViT-B-32-openai.safetensors", {}, "ViT-B-32")[0] == "quick_gelu"
    assert weights_activation("vit_b_32-laion400m_e31.pt", {}, "ViT-B-32")[0] == "quick_gelu"
    assert weights_activation("ViT-B-32-laion2b_s34b_b79k.bin", {}, "ViT-B-32")[0] == "gelu"
    assert weights_activation("ViT-B-32-openai.pt", {"activation": "gelu"}, "ViT-B-32")[0] == "gelu"
    assert weights_activation("x.pt", {"config": {"model_name": QUICK}})[0] == "quick_gelu"
    assert weights_activation("weights.pt", {}, "ViT-B-32")[0] is None

    # Weights that do not tell load as the architecture says, and the log says how to state it.
    storage.write_bytes("weights.safetensors", data)
    with caplog.at_level("WARNING", logger="tasks.model.clip"):
        load_clip(QUICK, storage.url("weights.safetensors"))
        # Only warnings count: other tests may leave the loggers' levels lower (the CLI's).
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        gelu_data = safetensors.torch.save(dict(load_clip(DEFAULT_MODEL).state_dict()))
        storage.write_bytes("other.safetensors", gelu_data)
        load_clip(DEFAULT_MODEL, storage.url("other.safetensors"))
    [record] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "cannot tell which activation" in record.getMessage()
    assert f"model_name '{QUICK}'" in record.getMessage()


def test_the_imagenet_config_names_the_activation_of_openai_weights() -> None:
    config = json.loads((Path(__file__).parents[2] / "configs/imagenet-vit-b-32.json").read_text())
    recorded, how = weights_activation(config["base"], {}, config["model_name"])
    assert "openai" in config["base"].lower() and recorded == "quick_gelu", how
    assert model_activation(config["model_name"]) == recorded
    assert model_image_size(config["model_name"]) == config["image_size"]


def _shapes_shards(root: str) -> str:
    from storage.layout import shard_name
    from storage.shards import ShardWriter
    from tasks.data.synthetic import make_split

    storage = open_storage(root)
    with ShardWriter(storage, shard_name("shapes", "train", 0)) as writer:
        for sample in make_split("shapes", "train", seed=0, per_class=2):
            writer.write({k: sample[k] for k in ("__key__", "png", "cls")})
    return root


def test_fine_tuned_checkpoints_carry_the_activation_forward(
    tmp_path, quick_model: torch.nn.Module
) -> None:
    from tasks.finetune import FinetuneConfig, finetune

    base = _save_quick(open_storage(str(tmp_path / "base")), "model.safetensors", quick_model)
    fields = {
        "domain": "shapes",
        "mode": "P",
        "base": base,
        "data": _shapes_shards(str(tmp_path / "data")),
        "batch_size": 4,
        "max_steps": 1,
        "loader_workers": 0,
        "device": "cpu",
    }
    out = open_storage(str(tmp_path / "out"))
    with pytest.raises(ValueError, match="trained with quick_gelu"):
        finetune(FinetuneConfig(**fields), out, "ft-gelu")
    result = finetune(FinetuneConfig(**fields, model_name=QUICK), out, "ft-quick")
    sidecar = load_sidecar(out, result["key"])
    assert weights_activation(result["key"], sidecar)[0] == "quick_gelu"
    with pytest.raises(ValueError, match="trained with quick_gelu"):
        load_sem(result["uri"], model_name=DEFAULT_MODEL)
    loaded = load_sem(result["uri"])
    assert clip_activation(loaded.sem.clip) == "quick_gelu"
    assert loaded.fingerprint == result["fingerprint"] != model_fingerprint(quick_model)


def test_zero_shot_head_in_batches_equals_one_pass(clip_model: torch.nn.Module) -> None:
    templates = ("a photo of a {}.", "a drawing of a {}.")
    whole = zero_shot_head(clip_model, CLASSES, templates, model_name=DEFAULT_MODEL)
    batched = zero_shot_head(clip_model, CLASSES, templates, model_name=DEFAULT_MODEL, batch_size=4)
    torch.testing.assert_close(batched, whole, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="batch_size"):
        zero_shot_head(clip_model, CLASSES, model_name=DEFAULT_MODEL, batch_size=0)


def test_load_sem_computes_the_head_on_the_requested_device(monkeypatch) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reference = zero_shot_head(load_clip(DEFAULT_MODEL), CLASSES, model_name=DEFAULT_MODEL)
    assert torch.equal(load_sem(None, class_names=CLASSES).sem.class_embeddings, reference)

    seen: list[tuple[str, str]] = []
    encode_text = open_clip.model.CLIP.encode_text

    def recording(self, text, normalize=False):
        seen.append((text.device.type, next(self.parameters()).device.type))
        return encode_text(self, text, normalize=normalize)

    monkeypatch.setattr(open_clip.model.CLIP, "encode_text", recording)
    # The meta device stands in for a GPU: tensors there have shapes and no data.
    sem = load_sem(None, class_names=CLASSES, device="meta").sem
    assert seen and set(seen) == {("meta", "meta")}
    assert sem.class_embeddings.device.type == "meta"
    assert sem.class_embeddings.shape == reference.shape
