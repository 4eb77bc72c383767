"""The share of fine-tuning wall time that resumable checkpoints block the training loop.

Runs the embedded default's prediction-only fine-tune of one source domain (the shipped base,
``shapes`` at 64 train images per class, 12 epochs of batch 32, validation every 4 epochs, on
CPU) and times every call of ``Finetuner._save_last``: the part of a checkpoint the training
loop waits for (the whole write when synchronous; the copy of the state and the wait for the
previous write when asynchronous). ``--set field=value`` overrides a ``FinetuneConfig`` field
(e.g. ``--set checkpoint_every=50``).

``--state-of MODEL`` instead reports what a checkpoint of that open_clip architecture weighs
(the CLIP state dict plus AdamW's two moments of the image encoder) and how long writing it to
a local folder takes here, for extrapolating to object storage.

Run: ``python -m benchmarks.bench_checkpoints [--set checkpoint_async=true]``. Prints JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from storage import open_storage
from storage.checkpoints import save_state_dict
from tasks.data.export import export_synthetic_domain
from tasks.finetune import FinetuneConfig, Finetuner, build_optimizer, finetune
from tasks.model import SelfExplainingCLIP, load_clip, zero_shot_head
from tasks.pretrain import SHIPPED, resolve_base

DOMAIN = "shapes"


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def measure_finetune(overrides: dict[str, Any], root: Path) -> dict[str, Any]:
    """Fine-tune once with ``overrides``; return wall time and time blocked in checkpoints."""
    data = root / "data"
    if not data.exists():
        export_synthetic_domain(
            str(data), DOMAIN, splits=("train", "val"), per_class={"train": 64, "val": 100}
        )
    fields = dict(
        domain=DOMAIN,
        mode="P",
        base=resolve_base(SHIPPED),
        data=str(data),
        val_data=str(data),
        epochs=12,
        batch_size=32,
        eval_every=4,
        loader_workers=0,
        device="cpu",
    )
    config = FinetuneConfig(**{**fields, **overrides})
    blocked: list[float] = []
    original = Finetuner._save_last

    def timed(self: Finetuner, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            blocked.append(time.perf_counter() - started)

    Finetuner._save_last = timed  # type: ignore[method-assign]
    try:
        out = open_storage(str(root / f"out-{time.monotonic_ns()}"))
        started = time.perf_counter()
        result = finetune(config, out, "run")
        wall = time.perf_counter() - started
    finally:
        Finetuner._save_last = original  # type: ignore[method-assign]
    return {
        "overrides": overrides,
        "steps": result["steps"],
        "fingerprint": result["fingerprint"],
        "wall_s": round(wall, 2),
        "checkpoints": len(blocked),
        "checkpoint_s": round(sum(blocked), 3),
        "checkpoint_share": round(sum(blocked) / wall, 4),
    }


def measure_state(model_name: str, root: Path) -> dict[str, Any]:
    """Bytes of a resumable checkpoint of ``model_name`` and its local write time."""
    clip = load_clip(model_name, None)
    head = zero_shot_head(clip, ["a", "b"], ("a photo of a {}.",), model_name=model_name)
    model = SelfExplainingCLIP(clip, head)
    optimizer = build_optimizer(model, FinetuneConfig(domain=DOMAIN, mode="P", data="unused"))
    # One step with zero gradients creates AdamW's moments without moving anything much.
    for param in model.clip.visual.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    state = model.encoder_state_dict()
    model_bytes = sum(t.numel() * t.element_size() for t in state.values())
    started = time.perf_counter()
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict()}, buffer)
    out = open_storage(str(root / "state"))
    out.write_bytes("last-optim.pt", buffer.getvalue())
    save_state_dict(out, "last.safetensors", state, {})
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    {k: v.detach().clone() for k, v in state.items()}
    snapshot_s = time.perf_counter() - started
    optim_bytes = len(buffer.getvalue())
    return {
        "model": model_name,
        "model_mb": round(model_bytes / 1e6, 1),
        "optimizer_mb": round(optim_bytes / 1e6, 1),
        "total_mb": round((model_bytes + optim_bytes) / 1e6, 1),
        "local_write_s": round(write_s, 2),
        "model_clone_s": round(snapshot_s, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--state-of", metavar="MODEL", help="e.g. ViT-B-32")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.state_of:
            figures = measure_state(args.state_of, Path(tmp))
        else:
            overrides = dict(item.split("=", 1) for item in args.set)
            figures = measure_finetune(
                {k: _parse_value(v) for k, v in overrides.items()}, Path(tmp)
            )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
