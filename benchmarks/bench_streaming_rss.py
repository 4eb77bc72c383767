"""Peak memory of a fine-tune against the size of its data: streaming keeps it flat.

Writes two WebDataset training sets, ``--samples`` images and ``--factor`` times as many (the
same synthetic ``shapes`` images repeated under new keys, in shards of ``--shard-size``), and
fine-tunes the same model with the same batch for one epoch on each, every run in a fresh
Python process. Reports the peak resident set size (``ru_maxrss``) of the training process and
of its DataLoader decoding workers. Goal: the large run's training-process peak within 15 % of
the small run's.

Run: ``python -m benchmarks.bench_streaming_rss [--samples 1000] [--factor 10]``. Prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from storage import open_storage
from storage.layout import shard_name
from storage.shards import ShardWriter
from tasks.data.synthetic import make_split
from tasks.finetune import FinetuneConfig, finetune
from tasks.model import DEFAULT_MODEL

DOMAIN = "shapes"


def write_dataset(root: Path, base: list[dict], copies: int, shard_size: int) -> str:
    """``copies`` x ``base`` samples as shards of ``shard_size``; returns the folder URI."""
    storage = open_storage(str(root))
    samples = (
        {"__key__": f"c{copy:03d}-{s['__key__']}", "png": s["png"], "cls": s["cls"]}
        for copy in range(copies)
        for s in base
    )
    total, index = copies * len(base), 0
    for start in range(0, total, shard_size):
        with ShardWriter(storage, shard_name(DOMAIN, "train", index)) as writer:
            for _ in range(min(shard_size, total - start)):
                writer.write(next(samples))
        index += 1
    return storage.uri


def child(data: str, out: str, batch_size: int, workers: int) -> None:
    """One fine-tune in this process; prints its figures as JSON."""
    torch.set_num_threads(2)
    config = FinetuneConfig(
        domain=DOMAIN,
        mode="P",
        data=data,
        epochs=1,
        batch_size=batch_size,
        loader_workers=workers,
        checkpoint_every=10_000,
        device="cpu",
    )
    started = time.perf_counter()
    result = finetune(config, open_storage(out), "run")
    figures = {
        "steps": result["steps"],
        "seconds": time.perf_counter() - started,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }
    print(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.batch_size, args.workers)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = list(make_split(DOMAIN, "train", seed=0, per_class=-(-args.samples // 5)))
        base = base[: args.samples]
        rows = []
        for copies in (1, args.factor):
            data = write_dataset(root / f"data-{copies}", base, copies, args.shard_size)
            command = [sys.executable, "-m", "benchmarks.bench_streaming_rss"]
            command += ["--batch-size", str(args.batch_size), "--workers", str(args.workers)]
            command += ["--child", data, str(root / f"out-{copies}")]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            rows.append({"samples": copies * len(base), **json.loads(output.splitlines()[-1])})
    small = rows[0]["rss_mb"]
    print(
        f"model {DEFAULT_MODEL}, batch {args.batch_size}, {args.workers} decoding workers, "
        f"shards of {args.shard_size}, 1 epoch, CPU\n"
    )
    print(
        "| samples | steps | time (s) | peak RSS, trainer (MB) | vs small | peak RSS, worker (MB) |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['samples']} | {row['steps']} | {row['seconds']:.1f} | {row['rss_mb']:.0f} "
            f"| {row['rss_mb'] / small - 1:+.1%} | {row['worker_rss_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
