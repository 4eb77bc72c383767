"""The shared pretrained start of the embedded default: a tiny CLIP trained on synthetic domains.

Task arithmetic needs every fine-tuned model to start from the same pretrained weights, and the
embedded default may not download any, so this stage trains the tiny ViT CLIP from a random
initialisation with a CLIP-style contrastive objective: each image against its caption
``"a photo of a {class}."``, over the union of all synthetic domains' train splits. The result
is cached in storage under a key derived from the config, with a sidecar that records its
zero-shot accuracy on every domain's val split.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import open_clip
import safetensors.torch
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from storage import layout
from tasks.model import (
    DEFAULT_TEMPLATES,
    SelfExplainingCLIP,
    load_clip,
    model_fingerprint,
    register_model_configs,
    zero_shot_head,
)
from tasks.model.clip import checkpoint_metadata

# Defined without torch (the command line reads them first); re-exported.
from tasks.pretrain_config import SHIPPED as SHIPPED
from tasks.pretrain_config import SHIPPED_BASE_FILE as SHIPPED_BASE_FILE
from tasks.pretrain_config import SHIPPED_PRETRAIN as SHIPPED_PRETRAIN
from tasks.pretrain_config import PretrainConfig as PretrainConfig
from tasks.pretrain_config import resolve_base as resolve_base

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
COMPLETION_UNIT = "model"


def compare_to_shipped(uri: str) -> dict[str, Any]:
    """How far the weights at ``uri`` are from the shipped base (the drift of a rebuild).

    Returns:
        ``identical`` (every tensor bit-equal), ``max_abs_diff`` over all tensors and the number
        of ``differing`` tensors.
    """
    from storage import open_file

    storage, key = open_file(uri)
    rebuilt = safetensors.torch.load(storage.read_bytes(key))
    shipped = safetensors.torch.load_file(str(SHIPPED_BASE_FILE))
    if rebuilt.keys() != shipped.keys():
        raise ValueError(f"{uri} and the shipped base have different tensors")
    differing, worst = 0, 0.0
    for name, tensor in shipped.items():
        if not torch.equal(tensor, rebuilt[name]):
            differing += 1
            worst = max(worst, float((tensor.double() - rebuilt[name].double()).abs().max()))
    return {"identical": differing == 0, "max_abs_diff": worst, "differing": differing}


def base_key(config: PretrainConfig) -> str:
    """Storage key of the base model for ``config``."""
    return layout.base_model_key(config.fingerprint())


def _domains(config: PretrainConfig) -> list[str]:
    from tasks.data.synthetic import SYNTHETIC_DOMAINS

    domains = list(config.domains) if config.domains is not None else sorted(SYNTHETIC_DOMAINS)
    unknown = [name for name in domains if name not in SYNTHETIC_DOMAINS]
    if unknown:
        raise ValueError(f"unknown synthetic domains {unknown}; known: {sorted(SYNTHETIC_DOMAINS)}")
    return domains


def _load_split(
    domains: Sequence[str], split: str, per_class: int, config: PretrainConfig
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{domain: (uint8 images [N, 3, s, s], domain-local labels [N])}`` of a split."""
    from tasks.data.images import sample_to_tensor
    from tasks.data.synthetic import make_split

    data = {}
    for domain in domains:
        images, labels = [], []
        for sample in make_split(
            domain, split, seed=config.seed, per_class=per_class, image_size=config.image_size
        ):
            tensor = sample_to_tensor(sample, config.image_size)
            images.append((tensor * 255.0).round().to(torch.uint8))
            labels.append(int(sample["cls"]))
        data[domain] = (torch.stack(images), torch.tensor(labels, dtype=torch.int64))
    return data


def _caption_ids(domain: str, labels: torch.Tensor, vocabulary: list[str]) -> torch.Tensor:
    from tasks.data.synthetic import SYNTHETIC_DOMAINS

    names = SYNTHETIC_DOMAINS[domain].class_names
    return torch.tensor([vocabulary.index(names[int(y)]) for y in labels], dtype=torch.int64)


def _shift(images: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each uint8 image by up to ``shift`` pixels (reflect padding), from ``generator``."""
    if shift == 0:
        return images
    size = images.shape[-1]
    padded = F.pad(images.float(), (shift, shift, shift, shift), mode="reflect")
    offsets = torch.randint(0, 2 * shift + 1, (len(images), 2), generator=generator)
    return torch.stack(
        [
            padded[i, :, dy : dy + size, dx : dx + size]
            for i, (dy, dx) in enumerate(offsets.tolist())
        ]
    ).to(torch.uint8)


class FreshBatches(torch.utils.data.IterableDataset):
    """Batches of freshly generated train images: step ``t`` is a pure function of (seed, t).

    Sample ``g = t * batch_size + j`` of the stream is image ``g // D`` of domain ``g % D`` (``D``
    domains), so domains and classes stay balanced in every batch and no image repeats.
    """

    def __init__(self, config: PretrainConfig, domains: list[str], vocabulary: list[str]):
        self.config = config
        self.domains = domains
        self.vocabulary = vocabulary

    def __len__(self) -> int:
        return self.config.fresh_steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from tasks.data.synthetic import SYNTHETIC_DOMAINS, render_sample

        config, count = self.config, len(self.domains)
        for step in range(config.fresh_steps):
            images, captions = [], []
            for j in range(config.batch_size):
                index = step * config.batch_size + j
                domain = self.domains[index % count]
                sample = render_sample(
                    domain, "train", index // count, seed=config.seed, image_size=config.image_size
                )
                images.append(torch.from_numpy(sample.image).permute(2, 0, 1))
                captions.append(
                    self.vocabulary.index(SYNTHETIC_DOMAINS[domain].class_names[sample.cls])
                )
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            yield (
                _shift(torch.stack(images), config.augment_shift, generator),
                torch.tensor(captions, dtype=torch.int64),
            )


def _training_batches(
    config: PretrainConfig, domains: list[str], vocabulary: list[str]
) -> tuple[Iterable[tuple[torch.Tensor, torch.Tensor]], int]:
    """The training batches of ``config`` and their number."""
    if config.fresh_steps:
        from tasks.data.stream import worker_options

        # One worker renders the next batches while the main process trains; the batches are the
        # same with or without it. It starts from the fork server, not as a fork of a process
        # that runs an orchestrator (such forks died at exit and failed the finished run).
        loader = torch.utils.data.DataLoader(
            FreshBatches(config, domains, vocabulary),
            batch_size=None,
            num_workers=1,
            prefetch_factor=4,
            **worker_options(1),
        )
        return loader, config.fresh_steps
    train = _load_split(domains, "train", config.per_class, config)
    images = torch.cat([train[domain][0] for domain in domains])
    captions = torch.cat([_caption_ids(d, train[d][1], vocabulary) for d in domains])
    steps_per_epoch = math.ceil(len(captions) / config.batch_size)

    def epochs() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(config.seed)
        for epoch in range(config.epochs):
            order = torch.randperm(len(captions), generator=generator)
            for start in range(0, len(order), config.batch_size):
                index = order[start : start + config.batch_size]
                shift_generator = torch.Generator().manual_seed(
                    config.seed * 1_000_003 + epoch * steps_per_epoch + start
                )
                yield _shift(images[index], config.augment_shift, shift_generator), captions[index]

    return epochs(), config.epochs * steps_per_epoch


def contrastive_loss(
    image_features: torch.Tensor,
    caption_features: torch.Tensor,
    captions: torch.Tensor,
    logit_scale: torch.Tensor,
    caption_groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE between images and the caption vocabulary.

    Images of the same class share one caption, so in-batch pairs would turn same-class images
    into negatives of each other. Instead each image is classified against every caption
    (image -> text) and each caption present in the batch against the batch's images, with all
    images carrying it as positives (text -> image).

    Args:
        image_features: ``[B, D]`` L2-normalised image embeddings.
        caption_features: ``[V, D]`` L2-normalised embeddings of the caption vocabulary.
        captions: ``[B]`` caption index of each image.
        logit_scale: CLIP's log temperature.
        caption_groups: ``[V]`` group (domain) of each caption; when given, an image is
            contrasted only with its own group's captions and a caption only with its group's
            images.
    """
    logits = logit_scale.exp() * image_features @ caption_features.T
    if caption_groups is not None:
        other_group = caption_groups[captions][:, None] != caption_groups[None, :]
        logits = logits.masked_fill(other_group, float("-inf"))
    image_to_text = F.cross_entropy(logits, captions)
    present = torch.unique(captions)
    positives = captions[None, :] == present[:, None]
    targets = positives.float() / positives.sum(dim=1, keepdim=True)
    # Masked pairs have log-probability -inf and target 0: leave them out of the sum.
    log_probs = F.log_softmax(logits.T[present], dim=1).masked_fill(~positives, 0.0)
    text_to_image = -(targets * log_probs).sum(dim=1).mean()
    return 0.5 * (image_to_text + text_to_image)


@torch.no_grad()
def zero_shot_accuracy(
    clip_model: torch.nn.Module,
    class_names: Sequence[str],
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    model_name: str | None = None,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 256,
) -> float:
    """Accuracy of the zero-shot head of ``class_names`` on uint8 ``images``."""
    head = zero_shot_head(clip_model, class_names, templates, model_name=model_name)
    model = SelfExplainingCLIP(clip_model, head).eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        batch = images[start : start + batch_size].float().div_(255.0)
        correct += int(
            (model.predict(batch).argmax(dim=1) == labels[start : start + batch_size]).sum()
        )
    return correct / max(1, len(labels))


def pretrain_base(
    config: PretrainConfig,
    storage: Any,
    progress: Callable[[int, int], None] | None = None,
) -> str:
    """Train (or reuse) the base model of ``config`` and return its storage key.

    Args:
        config: the pretraining configuration.
        storage: where the model is cached (``models/base-{fingerprint}/``).
        progress: optional ``progress(step, total_steps)`` callback.

    Returns:
        The key of ``model.safetensors``; its sidecar holds the config, the model fingerprint
        and the zero-shot accuracy per domain.
    """
    from storage.checkpoints import save_state_dict
    from tasks.data.synthetic import SYNTHETIC_DOMAINS

    key = base_key(config)
    out = storage.child(key.rsplit("/", 1)[0])
    if out.is_done(COMPLETION_UNIT, config.fingerprint(), MODEL_FILE):
        logger.info("base model %s already exists: reusing it", storage.url(key))
        return key

    started = time.perf_counter()
    register_model_configs()
    domains = _domains(config)
    vocabulary: list[str] = []
    for domain in domains:
        for name in SYNTHETIC_DOMAINS[domain].class_names:
            if name not in vocabulary:
                vocabulary.append(name)
    caption_groups = None
    if config.contrast == "domain":
        # The vocabulary lists the domains' names in order, so without a shared name caption k
        # belongs to the domain of the k-th name.
        owners = [i for i, d in enumerate(domains) for _ in SYNTHETIC_DOMAINS[d].class_names]
        if len(owners) != len(vocabulary):
            raise ValueError(
                "contrast='domain' needs each class name in one domain only; "
                f"the domains {domains} share some"
            )
        caption_groups = torch.tensor(owners)
    batches, total = _training_batches(config, domains, vocabulary)
    torch.manual_seed(config.seed)
    clip_model = load_clip(config.model_name).train()
    tokenizer = open_clip.get_tokenizer(config.model_name)
    tokens = tokenizer([config.template.format(name) for name in vocabulary])
    # The same normalisation as SelfExplainingCLIP, which takes images in [0, 1].
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    if config.lock_text:
        clip_model.lock_text_tower()
        with torch.no_grad():
            locked_captions = clip_model.encode_text(tokens, normalize=True)
    else:
        # The random word embeddings stay fixed: with a vocabulary of a few dozen captions the
        # text transformer separates them anyway, and a dense AdamW update of the 49k-row table
        # would cost more than the rest of the step.
        clip_model.token_embedding.weight.requires_grad_(False)
    trainable = [(n, p) for n, p in clip_model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in trainable if p.ndim < 2 or "embedding" in n]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    log_every = max(1, total // 20)
    step, losses = 0, []
    for batch_images, batch_captions in batches:
        warmup = (step + 1) / config.warmup_steps if step < config.warmup_steps else 1.0
        cosine = 0.5 * (1 + math.cos(math.pi * step / total))
        for group in optimizer.param_groups:
            group["lr"] = config.lr * min(warmup, cosine)
        batch = (batch_images.float().div_(255.0) - mean) / std
        image_features = clip_model.encode_image(batch, normalize=True)
        caption_features = (
            locked_captions if config.lock_text else clip_model.encode_text(tokens, normalize=True)
        )
        loss = contrastive_loss(
            image_features,
            caption_features,
            batch_captions,
            clip_model.logit_scale,
            caption_groups,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            clip_model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
        step += 1
        if progress is not None:
            progress(step, total)
        if step % log_every == 0:
            logger.info(
                "pretraining step %d/%d loss %.4f",
                step,
                total,
                sum(losses[-log_every:]) / log_every,
            )
    train_seconds = time.perf_counter() - started

    clip_model.eval()
    val = _load_split(domains, "val", config.val_per_class, config)
    zero_shot = {
        domain: {
            "accuracy": zero_shot_accuracy(
                clip_model,
                SYNTHETIC_DOMAINS[domain].class_names,
                *val[domain],
                model_name=config.model_name,
            ),
            "chance": 1.0 / len(SYNTHETIC_DOMAINS[domain].class_names),
        }
        for domain in domains
    }
    fingerprint = model_fingerprint(clip_model)
    save_state_dict(
        out,
        MODEL_FILE,
        {k: v.detach() for k, v in clip_model.state_dict().items()},
        metadata={
            "kind": "base",
            **checkpoint_metadata(clip_model, config.model_name),
            "fingerprint": fingerprint,
            "config": config.to_dict(),
            "metrics": {
                "zero_shot": zero_shot,
                "final_loss": losses[-1],
                "steps": step,
                "train_samples": step * config.batch_size
                if config.fresh_steps
                else config.per_class * len(vocabulary),
                "train_seconds": train_seconds,
            },
        },
    )
    out.publish_done(COMPLETION_UNIT, config.fingerprint(), model_fingerprint=fingerprint)
    logger.info(
        "base model %s written to %s in %.1f s; zero-shot accuracy %s",
        fingerprint,
        storage.url(key),
        train_seconds,
        {d: round(v["accuracy"], 3) for d, v in zero_shot.items()},
    )
    return key
