"""A worker process for the crash tests: labels a shard or fine-tunes, and can SIGKILL itself.

SIGKILL cannot be caught, so no ``finally`` or ``__exit__`` runs: this is the crash of a worker
whose machine is lost, not an exception. The kill points are test instrumentation around the
real stage functions.

Usage::

    worker.py label PLAN_JSON SHARD_INDEX [--kill-after-batches N | --kill-before-marker]
    worker.py finetune CONFIG_JSON STORAGE_URI OUT_KEY [--kill-at-step N]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

from storage import open_storage
from storage.core import Storage
from tasks.build_dataset import BuildPlan, label_shard
from tasks.finetune import FinetuneConfig, finetune


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _label(args: argparse.Namespace) -> None:
    plan = BuildPlan.from_dict(json.loads(Path(args.plan).read_text()))
    progress = None
    if args.kill_after_batches:
        batches = [0]

        def progress(done: int, total: int) -> None:
            batches[0] += 1
            if batches[0] >= args.kill_after_batches:
                _die()

    if args.kill_before_marker:
        original = Storage.mark_complete

        def mark_complete(self: Storage, unit: str, info: dict[str, Any] | None = None) -> None:
            # The tar is uploaded by now; dying here is the worst moment for a reader.
            _die()
            original(self, unit, info)

        Storage.mark_complete = mark_complete  # type: ignore[method-assign]
    label_shard(plan, args.shard, progress=progress)


def _finetune(args: argparse.Namespace) -> None:
    config = FinetuneConfig.model_validate_json(Path(args.config).read_text())

    def progress(step: int, total: int) -> None:
        if args.kill_at_step and step == args.kill_at_step:
            _die()

    finetune(config, open_storage(args.storage), args.out_key, progress=progress)


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    if "TORCH_NUM_THREADS" in os.environ:
        import torch

        torch.set_num_threads(int(os.environ["TORCH_NUM_THREADS"]))
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    label = commands.add_parser("label")
    label.add_argument("plan")
    label.add_argument("shard", type=int)
    label.add_argument("--kill-after-batches", type=int, default=0)
    label.add_argument("--kill-before-marker", action="store_true")
    tune = commands.add_parser("finetune")
    tune.add_argument("config")
    tune.add_argument("storage")
    tune.add_argument("out_key")
    tune.add_argument("--kill-at-step", type=int, default=0)
    args = parser.parse_args()
    _label(args) if args.command == "label" else _finetune(args)


if __name__ == "__main__":
    main()
