"""CPU cost per image of every CPU-side step of the GPU labelling path (ViT-B/32, 224 px, 150).

On a GPU the labeller's host does everything but the model's forward: decode and resize the
input, stack the batch, draw the coalitions and lay out the forward rows, solve the
regressions, and encode and write the output samples. This benchmark runs each of those steps
on the CPU, one thread, exactly as the labeller calls it, on the shapes of the real run (7x7
cells, budget 150, the label and the top-1 class, batches of 32 images of ImageNet size), and
reports the CPU milliseconds per image of each (``time.process_time``; the model's forward and
its launch are left out: they belong to the device and need one to measure). Cores per GPU =
total CPU seconds per image x the GPU's images per second.

The input is an ImageNet-like JPEG made with Pillow (500x375, smooth colour field, texture and
grain, quality 90), the same kind as benchmarks/bench_prefetch.py uses.

Run from the repository root: ``python -m benchmarks.bench_cpu_per_gpu``.
"""

from __future__ import annotations

import argparse
import io
import logging
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from storage import LocalStorage
from storage.shards import ShardWriter
from tasks.algorithms.games import npz_bytes
from tasks.algorithms.kernel_shap import (
    CoalitionValues,
    KernelShapConfig,
    derive_seed,
    plan_coalitions,
    solve_coalitions,
)
from tasks.algorithms.kernel_shap_stream import ExplainRequest
from tasks.algorithms.leverage_shap import sample_leverage_coalitions_batch
from tasks.build_dataset.batches import _stack
from tasks.build_dataset.inputs import _image_tensor
from tasks.build_dataset.stage import _labelled_samples
from tasks.data.images import decode_image, decode_jpegs, device_decodable, resize_to_tensor
from tasks.data.readers import image_for_storage

log = logging.getLogger("bench_cpu_per_gpu")

#: The goal of issue 26: one H100 labels this many images per second.
GPU_IMAGES_PER_SECOND = 360


def imagenet_like_jpeg(seed: int, size: tuple[int, int] = (500, 375)) -> bytes:
    """A JPEG of ImageNet's typical size and content statistics (not a flat colour)."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width] / max(size)
    field = np.stack(
        [
            np.sin(2 * np.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y + rng.uniform()))
            for _ in range(3)
        ],
        axis=-1,
    )
    texture = np.sin(40 * x + 30 * np.sin(8 * y))[..., None]
    pixels = 127 + 70 * field + 25 * texture + rng.normal(0, 12, size=(height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def cpu_ms(step: Callable[[], object], repeats: int) -> float:
    """Median CPU milliseconds of ``repeats`` runs of ``step`` (after one warm-up run)."""
    step()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        step()
        times.append(time.process_time() - start)
    return 1e3 * float(np.median(times))


def _former_decode(data: bytes, size: int) -> torch.Tensor:
    """The decode before issue 26: every pixel decoded, the whole image resized, then cropped."""
    img = decode_image(data)
    width, height = img.size
    scale = size / min(width, height)
    new_w = size if width <= height else max(size, round(width * scale))
    new_h = size if height < width else max(size, round(height * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    arr = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


#: The totals a step counts in: the host decoding (``decode: host``, the default; WebDataset
#: input, whose reader does not decode), the same with image-folder input as it was before
#: issue 26's last round (the reader decoded every file to check it, then the labeller decoded
#: it again; now the reader reads the header), and ``decode: device`` (either input).
HOST = "host decode"
HOST_FOLDER = "host decode, image folder, before (two decodes)"
DEVICE = "device decode"
TOTALS = (HOST, HOST_FOLDER, DEVICE)
EVERY = frozenset(TOTALS)
ON_HOST = frozenset((HOST, HOST_FOLDER))


def measure(
    batch: int, repeats: int, budget: int, shard_size: int
) -> list[tuple[str, float, frozenset[str]]]:
    """``(step, CPU ms per image, the totals it counts in)`` of each host step of labelling."""
    config = KernelShapConfig(grid=(7, 7), budget=budget, batch_size=2048)
    samples = [
        {"__key__": f"{i:09d}", "jpg": imagenet_like_jpeg(i % 8), "cls": i % 1000}
        for i in range(batch)
    ]
    large = [imagenet_like_jpeg(i % 8, (1000, 750)) for i in range(batch)]
    images = [_image_tensor(s, 224) for s in samples]
    seeds = [derive_seed(s["__key__"], 0) for s in samples]
    plan = plan_coalitions(config, seeds)
    classes = torch.stack([torch.tensor([s["cls"], (s["cls"] + 1) % 1000]) for s in samples])
    values = torch.randn(len(plan.row_masks), 2, dtype=torch.float64)
    evaluated = CoalitionValues(
        plan=plan, values=values, classes=classes, baseline="tensor", masking="token"
    )
    result = solve_coalitions(config, evaluated)
    request = ExplainRequest(
        images=torch.stack(images),
        classes=classes,
        seeds=seeds,
        context=(samples, classes, classes[:, 1]),
    )
    batches_per_shard = max(1, shard_size // batch)
    # The labeller's default output: the labels, their metadata and each image's game.npz.
    encoding = {"baseline_mean": [0.5] * 3, "model_fingerprint": "f" * 16, "keep_game": True}

    def write_shard() -> None:
        with tempfile.TemporaryDirectory() as folder:
            storage = LocalStorage(folder)
            with ShardWriter(storage, "x-train-000000.tar", temp_dir=folder) as writer:
                for b in range(batches_per_shard):
                    for out in _labelled_samples(request, result, **encoding):
                        out["__key__"] = f"{b:05d}{out['__key__']}"
                        writer.write(out)

    def encode() -> None:
        _labelled_samples(request, result, **encoding)

    # The arrays of each game.npz, written the former way and the current way.
    game_arrays = [dict(np.load(io.BytesIO(game.to_npz()))) for game in result.games]

    def games_savez() -> None:
        for arrays in game_arrays:
            np.savez_compressed(io.BytesIO(), **arrays)

    def games_direct() -> None:
        for arrays in game_arrays:
            npz_bytes(arrays)

    none: frozenset[str] = frozenset()
    encoded = [s["jpg"] for s in samples]
    cpu = torch.device("cpu")
    steps = [
        (
            "decode + resize, 500x375 JPEG (before: whole image resized)",
            lambda: [_former_decode(s["jpg"], 224) for s in samples],
            none,
            batch,
        ),
        (
            "image-folder reader's check before: a full decode",
            lambda: [image_for_storage(d, "k") for d in encoded],
            frozenset((HOST_FOLDER,)),
            batch,
        ),
        (
            "decode + resize + float tensor, 500x375 JPEG",
            lambda: [_image_tensor(s, 224) for s in samples],
            ON_HOST,
            batch,
        ),
        (
            "decode + resize, 1000x750 JPEG (before)",
            lambda: [_former_decode(d, 224) for d in large],
            none,
            batch,
        ),
        (
            "decode + resize, 1000x750 JPEG (drafted at 1/2)",
            lambda: [_image_tensor({"jpg": d}, 224) for d in large],
            none,
            batch,
        ),
        (
            "device decode, host side: header checks (reader and labeller) + bytes to tensors",
            lambda: [
                (
                    device_decodable(d),
                    device_decodable(d),
                    torch.frombuffer(bytearray(d), dtype=torch.uint8),
                )
                for d in encoded
            ],
            frozenset((DEVICE,)),
            batch,
        ),
        (
            "device decode + resize, run on the CPU (a GPU's work there)",
            lambda: [resize_to_tensor(x, 224) for x in decode_jpegs(encoded, cpu)],
            none,
            batch,
        ),
        ("collate the batch (stack)", lambda: _stack(images, pin_memory=False), ON_HOST, batch),
        ("per-image seeds", lambda: [derive_seed(s["__key__"], 0) for s in samples], EVERY, batch),
        (
            "coalition sampling",
            lambda: sample_leverage_coalitions_batch(
                49, budget - 2, [torch.Generator().manual_seed(s) for s in seeds]
            ),
            EVERY,
            batch,
        ),
        (
            "plan (sampling + forward-row layout)",
            lambda: plan_coalitions(config, seeds),
            none,
            batch,
        ),
        ("solve (2 classes)", lambda: solve_coalitions(config, evaluated), EVERY, batch),
        ("encode the output samples (npy, game.npz, json)", encode, EVERY, batch),
        (
            "game.npz by np.savez_compressed (before)",
            games_savez,
            none,
            batch,
        ),
        ("game.npz written directly (npz_bytes)", games_direct, none, batch),
        (
            f"encode + write + publish a shard of {batches_per_shard * batch}",
            write_shard,
            none,
            batches_per_shard * batch,
        ),
    ]
    rows = [(name, cpu_ms(step, repeats) / count, total) for name, step, total, count in steps]
    by_name = {name: ms for name, ms, _ in rows}
    layout = by_name["plan (sampling + forward-row layout)"] - by_name["coalition sampling"]
    writing = by_name[steps[-1][0]] - by_name["encode the output samples (npy, game.npz, json)"]
    rows.append(("forward-row layout (plan less sampling)", layout, EVERY))
    rows.append(("tar write + publish (shard less encoding)", writing, EVERY))
    return rows


def markdown(rows: list[tuple[str, float, frozenset[str]]], batch: int) -> str:
    """The table: a column per total saying which steps it counts, then the totals."""
    short = {HOST: "host", HOST_FOLDER: "folder before", DEVICE: "device"}
    lines = [
        f"| step (batches of {batch}, one thread) | CPU ms / image | "
        + " | ".join(f"in {short[t]}" for t in TOTALS)
        + " |",
        "|---|---|" + "---|" * len(TOTALS),
    ]
    totals = dict.fromkeys(TOTALS, 0.0)
    for name, ms, counted in rows:
        marks = " | ".join("yes" if t in counted else "" for t in TOTALS)
        lines.append(f"| {name} | {ms:.3f} | {marks} |")
        for t in counted:
            totals[t] += ms
    for t in TOTALS:
        cores = totals[t] * 1e-3 * GPU_IMAGES_PER_SECOND
        lines.append(
            f"| **total, {t}: ms / image; cores per GPU at {GPU_IMAGES_PER_SECOND} images/s** "
            f"| **{totals[t]:.3f}** | **{cores:.2f}** | | |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="images per batch (the default)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget", type=int, default=150)
    parser.add_argument("--shard-size", type=int, default=1024, help="samples per output shard")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("tasks").setLevel(logging.WARNING)
    logging.getLogger("storage").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    log.info(
        "%s", markdown(measure(args.batch, args.repeats, args.budget, args.shard_size), args.batch)
    )


if __name__ == "__main__":
    main()
