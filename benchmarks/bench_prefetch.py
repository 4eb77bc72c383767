"""Does the labeller keep its model fed? Throughput against the number of decode workers.

Makes ImageNet-like JPEGs (500x375, smooth colour fields with texture and grain, quality 90),
stores them as WebDataset input shards in a temporary folder, and runs the real labeller
(``plan_build`` + ``label_shard``, 224-px inputs) with 1 and more decode workers on two models
of known cost:

- ``trivial``: per-cell mean colours through a linear layer (token-maskable, so Kernel SHAP
  costs no pixel masking); the labeller then runs at the speed of its input side;
- ``tiny-vit``: the tiny open_clip ViT of the tests (``tiny-vit-56``, random init) behind a 4x
  average pooling of the 224-px batch, labelled with budget 150 on a 7x7 grid.

Also measured: the decode-only rate (read nothing, decode + resize to 224 px) on one thread and
on as many threads as the most workers, and, for each labeller run, the fraction of its time
the model waited for input (``ShardOutcome.input_wait_seconds``). Runs of different worker
counts alternate, so a change of the machine's load hits them alike; the best of the repeats
is reported, with the load average beside it.

Run from the repository root: ``python -m benchmarks.bench_prefetch``.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from storage import open_storage
from storage.layout import shard_name
from storage.shards import ShardWriter
from tasks.build_dataset import BuildConfig, LabelConfig, label_shard, plan_build
from tasks.build_dataset.inputs import _image_tensor
from tasks.data.export import write_class_names
from tasks.data.prefetch import available_cores, ordered_map
from tasks.model.loading import load_sem

SIZE = 224
CLASSES = [f"class-{i}" for i in range(10)]
SAMPLES_PER_INPUT_SHARD = 64


def natural_jpeg(seed: int, size: tuple[int, int] = (500, 375)) -> bytes:
    """A photo-like JPEG: a smooth colour field, mid-frequency texture and sensor grain."""
    rng = np.random.default_rng(seed)
    width, height = size

    def field(cells: tuple[int, int], amplitude: float) -> np.ndarray:
        low = rng.normal(0.0, amplitude, (cells[1], cells[0], 3)).astype(np.float32)
        channels = [
            np.asarray(
                Image.fromarray(low[..., c]).resize((width, height), Image.Resampling.BICUBIC)
            )
            for c in range(3)
        ]
        return np.stack(channels, axis=-1)

    pixels = 128 + field((6, 5), 60) + field((60, 45), 25) + rng.normal(0, 6, (height, width, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class CellMeanClassifier(nn.Module):
    """A trivial, token-maskable model: mean colour of each grid cell, averaged, then linear."""

    def __init__(self, num_classes: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.patch_grid = grid  # equal to the labelling grid, so Kernel SHAP masks tokens
        generator = torch.Generator().manual_seed(0)
        self.head = nn.Linear(3, num_classes)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(num_classes, 3, generator=generator))

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        cells = F.adaptive_avg_pool2d(images, self.patch_grid)
        return cells.flatten(2).transpose(1, 2)

    def forward_from_patches(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        return self.head(patch_tokens.mean(dim=1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_from_patches(self.embed_patches(images))


class Pooled(nn.Module):
    """A token-maskable model for smaller images, behind an average pooling of the input."""

    def __init__(self, inner: nn.Module, factor: int) -> None:
        super().__init__()
        self.inner = inner
        self.factor = factor

    @property
    def patch_grid(self) -> tuple[int, int]:
        return self.inner.patch_grid

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner.embed_patches(F.avg_pool2d(images, self.factor))

    def forward_from_patches(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        return self.inner.forward_from_patches(patch_tokens)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner(F.avg_pool2d(images, self.factor))


def make_model(name: str, grid: tuple[int, int]) -> nn.Module:
    if name == "trivial":
        return CellMeanClassifier(len(CLASSES), grid).eval()
    sem = load_sem(None, model_name="tiny-vit-56", class_names=CLASSES, grid=(7, 7)).sem
    return Pooled(sem.as_classifier(), SIZE // 56).eval()


@contextmanager
def explained_model(model: nn.Module) -> Iterator[None]:
    """Let the labeller explain ``model`` instead of loading one from the config."""
    with (
        mock.patch("tasks.build_dataset.stage.load_explained_model", lambda *_: model),
        mock.patch("tasks.build_dataset.stage.explained_model_fingerprint", lambda *_: "benchmark"),
    ):
        yield


def write_input(root: str, images: int) -> None:
    storage = open_storage(root)
    write_class_names(storage, CLASSES)
    for start in range(0, images, SAMPLES_PER_INPUT_SHARD):
        shard = shard_name("bench", "train", start // SAMPLES_PER_INPUT_SHARD)
        with ShardWriter(storage, shard) as writer:
            for n in range(start, min(images, start + SAMPLES_PER_INPUT_SHARD)):
                writer.write({"__key__": f"img-{n:06d}", "jpg": natural_jpeg(n), "cls": n % 10})


def decode_rate(samples: list[dict], workers: int) -> tuple[float, float]:
    """``(images/s, CPU ms/image)`` decoding and resizing to 224 px on ``workers`` threads."""
    start, cpu = time.perf_counter(), time.process_time()
    for _ in ordered_map(lambda s: _image_tensor(s, SIZE), samples, workers=workers):
        pass
    cpu_ms = 1000 * (time.process_time() - cpu) / len(samples)
    return len(samples) / (time.perf_counter() - start), cpu_ms


def labeller_run(
    input_uri: str, output_uri: str, label: LabelConfig, workers: int
) -> tuple[float, float, float]:
    """``(images/s, fraction of the time the model waited for input, CPU ms/image)``."""
    config = BuildConfig(
        name="bench-x",
        split="train",
        input_kind="webdataset",
        input_uri=input_uri,
        input_name="bench",
        image_size=SIZE,
        model_name="tiny-vit-56",
        label=label,
        num_shards=1,
        output_uri=output_uri,
        device="cpu",
        decode_workers=workers,
    )
    plan = plan_build(config)
    cpu = time.process_time()
    outcome = label_shard(plan, 0, overwrite=True)
    cpu_ms = 1000 * (time.process_time() - cpu) / outcome.samples
    return outcome.images_per_second, outcome.input_wait_seconds / outcome.seconds, cpu_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256, help="images for the trivial model")
    parser.add_argument("--vit-images", type=int, default=16, help="images for the tiny ViT")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("tasks").setLevel(logging.ERROR)  # rank-deficiency notes of the toy grid

    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        input_uri = os.path.join(tmp, "input")
        write_input(input_uri, args.images)
        samples = [
            {"__key__": f"img-{n:06d}", "jpg": natural_jpeg(n), "cls": 0}
            for n in range(min(args.images, 128))
        ]
        mean_kb = np.mean([len(s["jpg"]) for s in samples]) / 1024
        most = max(args.workers)
        decode = {1: (0.0, 0.0), most: (0.0, 0.0)}
        for _ in range(args.repeats):
            for workers in decode:
                decode[workers] = max(decode[workers], decode_rate(samples, workers))
        loads.append(os.getloadavg()[0])

        rows = []
        # The trivial model at 7x7/150 (the real labelling settings) and at 2x2/10, where
        # Kernel SHAP's own sampling and solving are negligible and the input side is all.
        settings = [
            ("trivial", "7x7, budget 150", LabelConfig(budget=150), args.images),
            (
                "trivial",
                "2x2, budget 10",
                LabelConfig(grid_h=2, grid_w=2, budget=10),
                args.images,
            ),
            ("tiny-vit", "7x7, budget 150", LabelConfig(budget=150), args.vit_images),
        ]
        for model_name, setting, label, count in settings:
            model = make_model(model_name, label.grid)
            if count != args.images:
                input_uri_n = os.path.join(tmp, f"input-{count}")
                if not os.path.exists(input_uri_n):
                    write_input(input_uri_n, count)
            else:
                input_uri_n = input_uri
            best = {w: (0.0, 1.0, 0.0) for w in args.workers}
            with explained_model(model):
                for _ in range(args.repeats):
                    for workers in args.workers:
                        result = labeller_run(
                            input_uri_n, os.path.join(tmp, f"out-{workers}"), label, workers
                        )
                        best[workers] = max(best[workers], result)
            loads.append(os.getloadavg()[0])
            base = best[args.workers[0]][0]
            for workers in args.workers:
                rate, wait, cpu_ms = best[workers]
                rows.append((model_name, setting, count, workers, rate, rate / base, wait, cpu_ms))

    print(
        f"cores: {available_cores()}, torch threads: {torch.get_num_threads()}, "
        f"JPEGs: 500x375, mean {mean_kb:.0f} KiB; "
        f"1-min load average during the run: {min(loads):.1f} to {max(loads):.1f}"
    )
    print()
    print(
        "| decode + resize to 224 px | images/s | wall ms/image | CPU ms/image | "
        "images per CPU-second | vs 1 thread |"
    )
    print("|---|---|---|---|---|---|")
    for workers, (rate, cpu_ms) in decode.items():
        print(
            f"| {workers} thread{'s' if workers > 1 else ''} | {rate:.1f} | "
            f"{1000 / rate:.2f} | {cpu_ms:.2f} | {1000 / cpu_ms:.0f} | "
            f"{rate / decode[1][0]:.2f}x |"
        )
    print()
    print(
        "| model | labelling | images | decode workers | images/s | vs 1 worker | "
        "model waits | CPU ms/image |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for model_name, setting, count, workers, rate, ratio, wait, cpu_ms in rows:
        print(
            f"| {model_name} | {setting} | {count} | {workers} | {rate:.1f} | {ratio:.2f}x | "
            f"{100 * wait:.1f}% | {cpu_ms:.1f} |"
        )


if __name__ == "__main__":
    main()
