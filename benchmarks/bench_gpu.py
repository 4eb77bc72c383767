"""The real run's figures on a GPU: ViT-B/32 Kernel SHAP labelling and fine-tuning throughput.

- **Labelling**: images/s of :func:`tasks.algorithms.kernel_shap.kernel_shap_explain` on
  224-px images with open_clip's ``ViT-B-32`` (random init: speed does not depend on the weights)
  behind a 1,000-class zero-shot-style head, 7x7 cells (one ViT patch each, so token-space
  masking), budget 150, the labeller's precision (``--precision``; default float32). Where the time goes: the model (timed around
  every call, with CUDA synchronisation) and everything else (sampling, solve, copies).
- **Forward-pass floor**: images/s if labelling cost nothing but its 150 forward passes
  (token-space trunk rows/s / 150). The labeller's fraction of the floor is the figure of merit
  (goal: >= 60%, i.e. >= 360 images/s on one H100).
- **Decoding on the device** (``BuildConfig.decode: device``): images/s of
  :func:`tasks.data.images.decode_jpegs` + :func:`~tasks.data.images.resize_to_tensor` on
  ImageNet-like 500x375 JPEGs (nvjpeg on a GPU), and the host's CPU milliseconds per image
  while it runs (the figure of issue 26's one core per GPU); beside it, Pillow's host decode on
  one thread, the labeller's ``decode: host``.
- **Fine-tuning**: samples/s of X-mode training steps (classification + explanation loss,
  AdamW, bf16 autocast) of the self-explaining ViT-B/32.

Run from the repository root on the GPU machine::

    python -m benchmarks.bench_gpu --device cuda --out bench-gpu.json

It also runs on a CPU (``--device cpu --images 4 --steps 2 --batch 4``) as a smoke test of the
same code path; CPU figures are not the GPU goal.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasks.algorithms.kernel_shap import kernel_shap_explain
from tasks.explanation_losses import explanation_loss
from tasks.model import SelfExplainingCLIP, load_clip
from tasks.model.vit import OpenCLIPClassifier

MODEL = "ViT-B-32"
IMAGE_SIZE = 224
GRID = (7, 7)
NUM_CLASSES = 1000


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedClassifier(nn.Module):
    """Wraps a token-maskable classifier; accumulates the seconds spent in model calls."""

    def __init__(self, inner: OpenCLIPClassifier, device: torch.device) -> None:
        super().__init__()
        self.inner = inner
        self.device = device
        self.seconds = 0.0

    @property
    def patch_grid(self) -> tuple[int, int]:
        return self.inner.patch_grid

    def _timed(self, fn, x: Tensor) -> Tensor:
        _sync(self.device)
        start = time.perf_counter()
        out = fn(x)
        _sync(self.device)
        self.seconds += time.perf_counter() - start
        return out

    def forward(self, images: Tensor) -> Tensor:
        return self._timed(self.inner, images)

    def embed_patches(self, images: Tensor) -> Tensor:
        return self._timed(self.inner.embed_patches, images)

    def forward_from_patches(self, patch_tokens: Tensor) -> Tensor:
        return self._timed(self.inner.forward_from_patches, patch_tokens)


def _classifier(device: torch.device) -> OpenCLIPClassifier:
    torch.manual_seed(0)
    clip_model = load_clip(MODEL)
    head = F.normalize(torch.randn(NUM_CLASSES, clip_model.visual.output_dim), dim=-1)
    return OpenCLIPClassifier(clip_model, head).to(device).eval()


def bench_labelling(
    device: torch.device, images: int, batch: int, budget: int, precision: str = "auto"
) -> dict:
    """Labeller images/s, the time split, and the forward-pass floor."""
    model = TimedClassifier(_classifier(device), device).eval()
    data = torch.rand(images, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
    classes = torch.randint(0, NUM_CLASSES, (images,), device=device)
    # Warm-up: kernels, cuDNN/cuBLAS autotuning, allocator.
    kernel_shap_explain(
        model, data[:batch], classes[:batch], grid=GRID, budget=budget, precision=precision
    )
    model.seconds = 0.0
    _sync(device)
    start = time.perf_counter()
    for i in range(0, images, batch):
        kernel_shap_explain(
            model,
            data[i : i + batch],
            classes[i : i + batch],
            grid=GRID,
            budget=budget,
            seed=i,
            precision=precision,
        )
    _sync(device)
    total = time.perf_counter() - start

    # The floor: the same token-space forward rows, nothing else.
    inner = model.inner
    reduced = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(device.type, dtype=reduced or torch.bfloat16, enabled=bool(reduced))
    with torch.inference_mode(), autocast:
        tokens = inner.embed_patches(data[:batch])
        rows = tokens.repeat_interleave(budget, dim=0)[: 1024 * max(1, batch // 8)]
        inner.forward_from_patches(rows[:64])
        _sync(device)
        start = time.perf_counter()
        for chunk in rows.split(1024):
            inner.forward_from_patches(chunk)
        _sync(device)
        floor_rows_per_s = len(rows) / (time.perf_counter() - start)
    floor = floor_rows_per_s / budget
    ips = images / total
    return {
        "images": images,
        "budget": budget,
        "images_per_s": ips,
        "model_seconds": model.seconds,
        "other_seconds": total - model.seconds,
        "model_fraction": model.seconds / total,
        "forward_floor_images_per_s": floor,
        "fraction_of_floor": ips / floor,
    }


def bench_decode(device: torch.device, images: int, batch: int) -> dict:
    """Device decode + resize of ImageNet-like JPEGs: images/s and host CPU ms per image."""
    from benchmarks.bench_cpu_per_gpu import imagenet_like_jpeg
    from tasks.build_dataset.inputs import _image_tensor
    from tasks.data.images import decode_jpegs, device_decodable, resize_to_tensor

    encoded = [imagenet_like_jpeg(i % 16) for i in range(batch)]

    def device_batch() -> None:
        assert all(device_decodable(d) for d in encoded)
        torch.stack([resize_to_tensor(x, IMAGE_SIZE) for x in decode_jpegs(encoded, device)])

    def host_batch() -> None:
        torch.stack([_image_tensor({"jpg": d}, IMAGE_SIZE) for d in encoded])

    figures = {"jpeg": "500x375, quality 90", "batch": batch}
    for name, run in (("device", device_batch), ("host_pillow_one_thread", host_batch)):
        run()  # warm-up (nvjpeg's handles, the kernels)
        _sync(device)
        rounds = max(1, images // batch) if name == "device" else max(1, images // batch // 8)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(rounds):
            run()
        _sync(device)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        count = rounds * batch
        figures[name] = {
            "images_per_s": round(count / wall, 1),
            "host_cpu_ms_per_image": round(1e3 * cpu / count, 3),
        }
    return figures


def bench_finetuning(device: torch.device, steps: int, batch: int) -> dict:
    """X-mode training samples/s of the self-explaining ViT-B/32."""
    torch.manual_seed(0)
    clip_model = load_clip(MODEL)
    head = F.normalize(torch.randn(NUM_CLASSES, clip_model.visual.output_dim), dim=-1)
    sem = SelfExplainingCLIP(clip_model, head, grid=GRID).to(device).train()
    optimizer = torch.optim.AdamW([p for p in sem.parameters() if p.requires_grad], lr=1e-5)
    images = torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    targets = torch.randn(batch, *GRID, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            logits, maps = sem(images)
            loss = F.cross_entropy(logits.float(), labels)
            loss = loss + explanation_loss(maps, labels, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = time.perf_counter() - start
    return {"steps": steps, "batch": batch, "samples_per_s": steps * batch / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=2048, help="images labelled")
    parser.add_argument("--label-batch", type=int, default=64, help="images per labeller call")
    parser.add_argument("--budget", type=int, default=150)
    parser.add_argument("--steps", type=int, default=30, help="fine-tuning steps timed")
    parser.add_argument("--batch", type=int, default=128, help="fine-tuning batch")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="of the labeller's forwards (auto: float32, the labeller's default)",
    )
    parser.add_argument("--out", help="write the figures here as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    figures = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.machine(),
        "torch": torch.__version__,
        "labelling": bench_labelling(
            device, args.images, min(args.label_batch, args.images), args.budget, args.precision
        ),
        "decode": bench_decode(device, args.images, min(args.label_batch, args.images)),
        "finetuning": bench_finetuning(device, args.steps, args.batch),
    }
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
