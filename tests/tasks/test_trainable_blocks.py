"""``trainable_blocks``: the source's P and X train only the image tower's last blocks.

The frozen part is bit-identical to the base after fine-tuning (so the explainability vector is
zero there), the last blocks and the projection move, a tower with fewer blocks is refused, and
models trained before the field existed keep their fingerprints.
"""

from __future__ import annotations

import pytest
import torch
from xdata_helpers import build_small_xdata

from flows.pipeline import _finetune_config
from flows.pipeline_config import PipelineConfig, check_domains
from storage import open_storage
from storage.checkpoints import load_state_dict, save_state_dict
from tasks.build_dataset import LabelConfig
from tasks.finetune import FinetuneConfig, finetune
from tasks.model import DEFAULT_MODEL, SelfExplainingCLIP, load_clip


def test_only_the_last_blocks_the_norm_and_the_projection_train() -> None:
    clip = load_clip(DEFAULT_MODEL)
    sem = SelfExplainingCLIP(clip, torch.randn(5, clip.visual.output_dim))
    sem.train_last_blocks(1)
    trained = {n for n, p in sem.clip.visual.named_parameters() if p.requires_grad}
    last = len(clip.visual.transformer.resblocks) - 1
    assert trained and all(
        n.startswith((f"transformer.resblocks.{last}.", "ln_post.")) or n == "proj" for n in trained
    ), trained
    assert "proj" in trained and "conv1.weight" not in trained
    # The text tower stays frozen whatever the setting.
    assert not any(p.requires_grad for n, p in sem.clip.named_parameters() if "visual" not in n)
    with pytest.raises(ValueError, match="has 3"):
        sem.train_last_blocks(4)


def test_fine_tuning_leaves_the_frozen_part_of_the_base_as_it_was(tmp_path) -> None:
    torch.manual_seed(0)
    storage = open_storage(str(tmp_path / "base"))
    save_state_dict(storage, "base.safetensors", load_clip(DEFAULT_MODEL).state_dict(), {})
    base = storage.url("base.safetensors")
    plan = build_small_xdata(str(tmp_path / "x"), LabelConfig(budget=60), checkpoint=base)
    config = FinetuneConfig(
        domain="shapes",
        mode="X",
        base=base,
        data=plan.dataset_uri,
        split="val",
        epochs=2,
        batch_size=5,
        lr=1e-3,
        loader_workers=0,
        device="cpu",
        trainable_blocks=1,
    )
    out = open_storage(str(tmp_path / "out"))
    result = finetune(config, out, "x")
    before = load_state_dict(storage, "base.safetensors")
    after = load_state_dict(out, result["key"])
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved, "nothing trained"
    assert all(
        k.startswith(("visual.transformer.resblocks.2.", "visual.ln_post.")) or k == "visual.proj"
        for k in moved
    ), moved
    assert "visual.proj" in moved


def test_the_field_leaves_earlier_fingerprints_and_reaches_only_the_source() -> None:
    def fingerprint(**fields) -> str:
        return FinetuneConfig(domain="shapes", mode="X", data="x", **fields).resume_fingerprint()

    assert fingerprint() == "21058915a1fd5ee6"
    assert fingerprint(trainable_blocks=1) != fingerprint()
    config = PipelineConfig(out_uri="x", trainable_blocks=2)
    plans = check_domains(config)
    source = _finetune_config(config, plans["shapes"], "X", "base", "data")
    target = _finetune_config(config, plans["glyphs"], "P", "base", "data", target=True)
    assert (source.trainable_blocks, target.trainable_blocks) == (2, None)
    with pytest.raises(ValueError):
        PipelineConfig(out_uri="x", trainable_blocks=0)
