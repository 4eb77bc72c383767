"""Architectures by name without torch (tasks/model/names.py), in agreement with open_clip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest

from tasks.model.clip import load_clip, model_activation, register_model_configs
from tasks.model.names import available_models, model_config, model_image_size

REPO = Path(__file__).resolve().parents[2]


def test_the_names_are_open_clips_and_need_no_torch() -> None:
    register_model_configs()
    assert available_models() == open_clip.list_models()
    for name in ("tiny-vit-56", "ViT-B-32", "ViT-B-16-quickgelu"):
        size = open_clip.get_model_config(name)["vision_cfg"]["image_size"]
        assert model_image_size(name) == size
    assert model_activation("ViT-B-32-quickgelu") == "quick_gelu"
    code = (
        "import sys; from tasks.model.names import model_image_size, available_models; "
        "assert model_image_size('ViT-B-32') == 224 and 'tiny-vit-56' in available_models(); "
        "print([m for m in ('torch', 'open_clip') if m in sys.modules])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert done.stdout.strip() == "[]"


def test_an_architecture_registered_at_run_time_counts(tmp_path: Path) -> None:
    config = open_clip.get_model_config("tiny-vit-56")
    (tmp_path / "tiny-vit-56-mine.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path)
    assert "tiny-vit-56-mine" in available_models()
    assert model_image_size("tiny-vit-56-mine") == 56
    assert load_clip("tiny-vit-56-mine") is not None
    with pytest.raises(ValueError, match="unknown model 'no-such-arch'; available: "):
        model_config("no-such-arch")
