"""Fresh-image pretraining data, the shipped base model and the accuracy floor."""

from __future__ import annotations

import json

import pytest
import torch

from tasks.pretrain import (
    SHIPPED,
    SHIPPED_BASE_FILE,
    SHIPPED_PRETRAIN,
    FreshBatches,
    PretrainConfig,
    _shift,
    contrastive_loss,
    resolve_base,
)

DOMAINS = ["colours", "shapes"]
VOCABULARY = [
    "red",
    "yellow",
    "green",
    "blue",
    "purple",
    "circle",
    "square",
    "triangle",
    "cross",
    "star",
]


def _batches(**changes):
    config = PretrainConfig(fresh_steps=3, batch_size=10, image_size=32, **changes)
    return list(FreshBatches(config, DOMAINS, VOCABULARY))


def _short_pretraining(**changes) -> PretrainConfig:
    """A fresh-image pretraining of a few 8-image steps on :data:`DOMAINS`."""
    return PretrainConfig(domains=DOMAINS, batch_size=8, val_per_class=2, warmup_steps=1, **changes)


def test_fresh_batches_are_deterministic_new_and_balanced():
    first, again = _batches(augment_shift=2), _batches(augment_shift=2)
    assert len(first) == 3
    for (a, ca), (b, cb) in zip(first, again, strict=True):
        assert torch.equal(a, b) and torch.equal(ca, cb)
    images = torch.cat([b for b, _ in first])
    # No image is drawn twice across steps.
    assert len({bytes(image.numpy()) for image in images}) == len(images)
    captions = torch.cat([c for _, c in first])
    # Round-robin over domains: every other sample is a colour caption, every class present.
    assert (captions[0::2] < 5).all() and (captions[1::2] >= 5).all()
    assert set(captions.tolist()) == set(range(10))
    # A seed changes the images.
    other = _batches(augment_shift=2, seed=1)
    assert not torch.equal(other[0][0], first[0][0])


def test_shift_translates_within_bounds():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8).to(torch.uint8)
    assert torch.equal(_shift(images, 0, torch.Generator()), images)
    shifted = _shift(images, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8


def _features(rows: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(rows, 8, generator=generator), dim=1)


def test_domain_contrast_is_the_loss_within_each_domain():
    """With caption groups an image meets only its own domain's captions and a caption only
    its domain's images: exactly the per-domain loss, finite, with finite gradients."""
    images, captions = _features(6, 0), torch.tensor([0, 1, 1, 2, 3, 4])
    vocabulary, groups = _features(5, 1), torch.tensor([0, 0, 0, 1, 1])
    scale = torch.tensor(2.0)
    grouped = contrastive_loss(images, vocabulary, captions, scale, groups)
    assert torch.isfinite(grouped)
    assert not torch.isclose(grouped, contrastive_loss(images, vocabulary, captions, scale))
    # By hand: images 0-3 are domain 0 (captions 0-2), images 4-5 domain 1 (captions 3-4).
    logits = scale.exp() * images @ vocabulary.T
    spans = [(0, 3)] * 4 + [(3, 5)] * 2
    i2t = [
        torch.nn.functional.cross_entropy(logits[i, lo:hi][None], captions[i : i + 1] - lo)
        for i, (lo, hi) in enumerate(spans)
    ]
    t2i = []
    for caption in range(5):
        rows = [0, 1, 2, 3] if caption < 3 else [4, 5]
        log_p = torch.log_softmax(logits[rows, caption], dim=0)
        t2i.append(-log_p[captions[rows] == caption].mean())
    expected = 0.5 * (torch.stack(i2t).mean() + torch.stack(t2i).mean())
    assert torch.isclose(grouped, expected)
    # One group is the plain loss.
    assert torch.isclose(
        contrastive_loss(images, vocabulary, captions, scale, torch.zeros(5, dtype=torch.long)),
        contrastive_loss(images, vocabulary, captions, scale),
    )
    vocabulary.requires_grad_(True)
    contrastive_loss(images, vocabulary, captions, scale, groups).backward()
    assert torch.isfinite(vocabulary.grad).all()


def test_the_shipped_base_is_in_the_package_with_its_config_and_accuracies():
    assert resolve_base(None) is None and resolve_base("s3://b/k") == "s3://b/k"
    path = resolve_base(SHIPPED)
    assert path == str(SHIPPED_BASE_FILE) and SHIPPED_BASE_FILE.exists()
    sidecar = json.loads(SHIPPED_BASE_FILE.with_suffix(".json").read_text())
    # The packaged file is what the rebuild command trains: the recipe the code names.
    assert PretrainConfig(**sidecar["config"]) == SHIPPED_PRETRAIN
    assert sidecar["metrics"]["steps"] == SHIPPED_PRETRAIN.fresh_steps
    accuracy = sidecar["metrics"]["zero_shot"]
    assert set(accuracy) == {"colours", "glyphs", "scenes", "shapes", "textures"}
    assert all(v["accuracy"] > v["chance"] for v in accuracy.values())


def test_a_model_below_the_accuracy_floor_stops_the_pipeline(tmp_path):
    from flows.pipeline import PipelineConfig, _check_accuracy

    config = PipelineConfig(out_uri=str(tmp_path), min_target_accuracy=0.9)
    assert config.base == SHIPPED
    _check_accuracy({"uri": "m", "metrics": [{"val_accuracy": 0.95}]}, config)
    with pytest.raises(RuntimeError, match="below min_target_accuracy 0.9"):
        _check_accuracy({"uri": "m", "metrics": [{"val_accuracy": 0.5}]}, config)


def test_a_fresh_image_pretraining_reruns_to_bit_identical_weights(tmp_path):
    """The rebuild of the shipped base is reproducible: the same config (fresh images, shifts,
    the render worker) trained twice on the same machine and thread count gives the same bits,
    and compare_to_shipped reports a different file's drift."""
    import safetensors.torch

    from storage import open_storage
    from tasks.pretrain import compare_to_shipped, pretrain_base

    config = _short_pretraining(fresh_steps=4, augment_shift=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = []
        for name in ("first", "second"):
            storage = open_storage(str(tmp_path / name))
            runs.append(storage.url(pretrain_base(config, storage)))
    finally:
        torch.set_num_threads(threads)
    first, second = (safetensors.torch.load_file(uri) for uri in runs)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    drift = compare_to_shipped(runs[0])
    assert not drift["identical"] and drift["max_abs_diff"] > 0


def test_a_locked_text_tower_keeps_its_initialisation_and_the_image_tower_trains(tmp_path):
    """lock_text trains the image tower and the temperature only: every text weight of the
    result is the random initialisation's, bit for bit, and the visual weights moved."""
    import safetensors.torch

    from storage import open_storage
    from tasks.model import load_clip
    from tasks.pretrain import pretrain_base

    config = _short_pretraining(fresh_steps=2, contrast="domain", lock_text=True)
    storage = open_storage(str(tmp_path))
    trained = safetensors.torch.load_file(storage.url(pretrain_base(config, storage)))
    torch.manual_seed(config.seed)
    initial = load_clip(config.model_name).state_dict()
    text = [k for k in initial if not k.startswith("visual.") and k != "logit_scale"]
    assert "text_projection" in text and any(k.startswith("transformer.") for k in text)
    assert all(torch.equal(trained[k], initial[k]) for k in text)
    assert not all(torch.equal(trained[k], initial[k]) for k in initial if k.startswith("visual."))


def test_the_shipped_base_prompts_share_a_component_across_domains():
    """A target's map receives what theta_X learned along the source's mean class embedding s
    scaled by alpha = mean_c t_c . s (tasks.sweep.inputs.head_alignment): the shipped base keeps
    it well above zero for every built-in domain, as a real CLIP's prompts do."""
    from tasks.data.synthetic import SYNTHETIC_DOMAINS
    from tasks.model import load_clip, zero_shot_head

    clip_model = load_clip(SHIPPED_PRETRAIN.model_name, resolve_base(SHIPPED))
    heads = {
        domain: zero_shot_head(clip_model, spec.class_names, model_name=SHIPPED_PRETRAIN.model_name)
        for domain, spec in SYNTHETIC_DOMAINS.items()
    }
    s = torch.nn.functional.normalize(heads["shapes"].mean(dim=0), dim=0)
    alpha = {domain: float((head @ s).mean()) for domain, head in heads.items()}
    assert all(value > 0.5 for value in alpha.values()), alpha
