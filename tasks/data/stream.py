"""Streaming WebDataset reading for training and evaluation: memory bounded by a batch.

Fine-tuning and the sweep never hold a split in memory. They read the complete shards of a
split (:func:`list_split`) as a stream of decoded batches:

- :class:`TrainStream` is the training order. Each epoch the shard list is permuted from
  ``(seed, epoch)``, split by rank (``shards[rank::world_size]``, webdataset's
  ``split_by_node`` rule) and then by ``DataLoader`` worker (``[worker::workers]``,
  ``split_by_worker``); each worker streams its shards through webdataset's bounded sample
  shuffle buffer, seeded by ``(seed, epoch, rank, worker)``, and decodes its batches. The order
  is a function of the shard layout, the seed, the epoch, the world size and the number of
  workers only, so two datasets with the same layout (P's shards and an X-dataset built with
  ``preserve_layout``) are read in the same order.
- :class:`OrderedStream` is the evaluation order: every sample once, in shard order, cut into
  consecutive batches; workers split the *batches* (each worker decodes only its own), so the
  order and the batches do not depend on the number of workers.

Every epoch has a fixed number of steps per rank (``samples // world_size`` samples, the last
batch possibly short), so all ranks of a data-parallel run take the same number of steps.
Batch ``j`` of a rank comes from worker ``j % workers`` (the order in which ``DataLoader``
delivers them), so each worker takes a fixed share of the rank's samples, as webdataset's
``with_epoch``: a worker (or rank) whose shards hold fewer samples than its share starts over
its shards, one holding more leaves the rest for this epoch (a different rest each epoch, the
shard order being redrawn). With one process and no workers every sample comes exactly once
per epoch; with equal shards split evenly, too.
Resuming mid-epoch is exact: :meth:`TrainStream.set_epoch` skips the first batches of the
epoch's seeded stream without decoding them.

Images get CLIP's preprocessing (shorter side resized to the model's size, bicubic, centre
crop, values in ``[0, 1]``); the model applies CLIP's mean and std itself.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import logging
import math
import multiprocessing
import multiprocessing.context
import os
import random
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset
from webdataset.filters import shuffle as wds_shuffle

from storage import open_storage
from storage.shards import complete_shards, read_shard
from tasks.algorithms.games import CoalitionGame
from tasks.data.images import sample_to_tensor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitShards:
    """The complete shards of one split of a dataset folder and their sample counts.

    Attributes:
        uri: the dataset folder.
        name: the shards' dataset name.
        split: the split.
        shards: shard keys, sorted.
        counts: samples per shard (from the completion markers).
        digests: each shard's sha256, as its completion marker records it.
    """

    uri: str
    name: str
    split: str
    shards: tuple[str, ...]
    counts: tuple[int, ...]
    digests: tuple[str | None, ...] = ()

    @property
    def samples(self) -> int:
        """Samples in the split."""
        return sum(self.counts)

    def content(self) -> list[list[Any]]:
        """``[shard key, sha256, samples]`` per shard: what a fingerprint of the split's content
        is made from (a folder re-exported in place with other images changes it)."""
        return [list(row) for row in zip(self.shards, self.digests, self.counts, strict=True)]

    def fingerprint(self) -> str:
        """A digest of :meth:`content`."""
        return hashlib.sha256(json.dumps(self.content()).encode()).hexdigest()[:16]


def dataset_name(uri: str, split: str) -> str:
    """The single shard-name prefix of ``split`` in a dataset folder.

    Raises:
        ValueError: none or several names have shards of ``split``.
    """
    storage = open_storage(uri)
    pattern = re.compile(rf"^(?P<name>.+)-{re.escape(split)}-\d{{6,}}\.tar$")
    names = {match["name"] for unit in storage.completed() if (match := pattern.match(unit))}
    if len(names) != 1:
        found = ", ".join(sorted(names)) or "none"
        raise ValueError(
            f"cannot tell the dataset name of split {split!r} in {storage.uri} "
            f"(found: {found}); set data_name"
        )
    return names.pop()


def list_split(uri: str, split: str, name: str | None = None) -> SplitShards:
    """List the complete shards of a split and their sample counts, reading no shard.

    One listing and one marker read per shard, the reads concurrent (a split of a few thousand
    shards on S3 lists in seconds, not in a request after another).

    Args:
        uri: the dataset folder.
        split: the split.
        name: shard name prefix (None: the only one with shards of ``split``).

    Raises:
        ValueError: no complete shard.
    """
    storage = open_storage(uri)
    name = name or dataset_name(uri, split)
    keys = complete_shards(storage, name, split)
    if not keys:
        raise ValueError(f"dataset {uri} has no complete shard of {name}-{split}")
    infos = storage.completion_infos([key.rsplit("/", 1)[-1] for key in keys])
    counts = tuple(int(info["samples"]) for info in infos)
    digests = tuple(info.get("sha256") for info in infos)
    return SplitShards(storage.uri, name, split, tuple(keys), counts, digests)


class Batch(NamedTuple):
    """A decoded batch.

    Attributes:
        keys: sample keys.
        images: ``[B, 3, s, s]`` float32 in ``[0, 1]``.
        labels: ``[B]`` int64.
        targets: ``[B, gh, gw]`` float32 Kernel SHAP maps of the label class, or None.
        masks: ``[B, s, s]`` bool object masks, or None.
        games: the label class's games (``game.npz``) when the decoder was asked for them.
    """

    keys: list[str]
    images: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor | None
    masks: torch.Tensor | None
    games: GameBatch | None = None


class GameBatch(NamedTuple):
    """The label class's coalition games of a batch, padded to its longest game.

    Attributes:
        coalitions: ``[B, L, P]`` float32 0/1 coalitions (a padded row is all zero).
        weights: ``[B, L]`` float32 regression weights (0 on padded rows).
        values: ``[B, L]`` float32 coalition values of the label class.
        v_empty: ``[B]`` float32 value of the empty coalition.
        v_full: ``[B]`` float32 value of the full coalition.
    """

    coalitions: torch.Tensor
    weights: torch.Tensor
    values: torch.Tensor
    v_empty: torch.Tensor
    v_full: torch.Tensor

    def to(self, device: torch.device | str) -> GameBatch:
        """The same games on ``device``."""
        return GameBatch(*(t.to(device) for t in self))


def stack_games(games: list[Any], grid: tuple[int, int] | None, where: str = "") -> GameBatch:
    """The label class (each game's first class) of ``games`` as one padded :class:`GameBatch`.

    Raises:
        ValueError: a game is on another grid than ``grid``.
    """
    longest = max(len(g.masks) for g in games)
    players = games[0].players
    coalitions = np.zeros((len(games), longest, players), dtype=np.float32)
    weights = np.zeros((len(games), longest), dtype=np.float32)
    values = np.zeros((len(games), longest), dtype=np.float32)
    for i, game in enumerate(games):
        if (grid is not None and tuple(game.grid) != tuple(grid)) or game.players != players:
            raise ValueError(f"game.npz grid {game.grid} in {where} does not match grid {grid}")
        n = len(game.masks)
        coalitions[i, :n] = game.masks
        weights[i, :n] = game.weights
        values[i, :n] = game.values[:, 0]
    v_empty = np.array([g.v_empty[0] for g in games], dtype=np.float32)
    v_full = np.array([g.v_full[0] for g in games], dtype=np.float32)
    return GameBatch(*map(torch.from_numpy, (coalitions, weights, values, v_empty, v_full)))


@dataclass(frozen=True)
class Decoder:
    """Turns raw samples into a :class:`Batch`.

    Attributes:
        image_size: side images are resized and centre-cropped to.
        targets: read ``shap.npy`` (``"require"``: a sample without it is an error; ``"auto"``:
            targets when every sample of the batch has them; ``"no"``: never).
        masks: decode ``mask.png`` when every sample of the batch has one.
        grid: expected ``(gh, gw)`` of the SHAP maps (None: any).
        check_classes: refuse a sample whose first explained class is not its label.
        games: read every sample's ``game.npz`` (an error when one has none).
        where: names the dataset in errors.
    """

    image_size: int
    targets: str = "auto"
    masks: bool = False
    grid: tuple[int, int] | None = None
    check_classes: bool = False
    games: bool = False
    where: str = ""

    def __call__(self, samples: list[dict[str, Any]]) -> Batch:
        """Decode ``samples`` into one batch."""
        images = torch.stack([sample_to_tensor(s, self.image_size) for s in samples])
        labels = torch.tensor([int(s["cls"]) for s in samples], dtype=torch.int64)
        targets = None
        if self.targets != "no":
            missing = [s["__key__"] for s in samples if "shap.npy" not in s]
            if missing and self.targets == "require":
                raise ValueError(
                    f"dataset {self.where}: sample {missing[0]} has no shap.npy: build an "
                    "explanation dataset first (X mode needs Kernel SHAP targets)"
                )
            if not missing:
                targets = torch.from_numpy(np.stack([self._target(s) for s in samples]))
        masks = None
        if self.masks and all("mask.png" in s for s in samples):
            masks = torch.stack([_decode_mask(s["mask.png"], self.image_size) for s in samples])
        keys = [s["__key__"] for s in samples]
        games = self._games(samples, labels) if self.games else None
        return Batch(keys, images, labels, targets, masks, games)

    def _games(self, samples: list[dict[str, Any]], labels: torch.Tensor) -> GameBatch:
        games = []
        for sample, label in zip(samples, labels.tolist(), strict=True):
            if "game.npz" not in sample:
                raise ValueError(
                    f"dataset {self.where}: sample {sample['__key__']} has no game.npz: "
                    "label it again with keep_game (the game loss needs the coalitions)"
                )
            game = CoalitionGame.from_npz(sample["game.npz"])
            if game.classes[0] != label:
                raise ValueError(
                    f"dataset {self.where}: sample {sample['__key__']} has a game of class "
                    f"{game.classes[0]} first, not its label {label}"
                )
            games.append(game)
        return stack_games(games, self.grid, self.where)

    def _target(self, sample: dict[str, Any]) -> np.ndarray:
        phi = np.load(io.BytesIO(sample["shap.npy"]), allow_pickle=False)
        if self.grid is not None and tuple(phi.shape[1:]) != tuple(self.grid):
            raise ValueError(
                f"shap.npy grid {tuple(phi.shape[1:])} in {self.where} does not match grid "
                f"{tuple(self.grid)}"
            )
        if self.check_classes:
            info = sample.get("json")
            info = json.loads(info) if isinstance(info, bytes | str) else (info or {})
            classes = info.get("classes")
            if classes and int(classes[0]) != int(sample["cls"]):
                raise ValueError(
                    f"reference {self.where}: sample {sample['__key__']} explains class "
                    f"{classes[0]} first, not its label {sample['cls']}"
                )
        # The label class comes first (DESIGN: "Which classes").
        return phi[0].astype(np.float32)


def _decode_mask(data: bytes, size: int) -> torch.Tensor:
    mask = Image.open(io.BytesIO(data)).convert("L")
    if mask.size != (size, size):
        mask = mask.resize((size, size), Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(mask) > 127)


def first_sample(split: SplitShards) -> dict[str, Any]:
    """The first raw sample of the split (to check its fields before any compute)."""
    storage = open_storage(split.uri)
    for shard, count in zip(split.shards, split.counts, strict=True):
        if count:
            return next(iter(read_shard(storage, shard)))
    raise ValueError(f"dataset {split.uri} has no sample in {split.name}-{split.split}")


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The shard order of an epoch: a permutation drawn from ``(seed, epoch)`` only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_shards, generator=generator).tolist()


def _identity(batch: Batch) -> Batch:
    return batch


def worker_context() -> multiprocessing.context.BaseContext:
    """Where decoding workers start: a fork server, not a fork of the caller.

    A plain fork copies whatever the caller runs (an orchestrator's threads, its exit handlers),
    and such workers were seen to die at exit; the fork server is a clean process that has
    imported this module once, so each worker still starts in milliseconds.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _process_gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie, killed but not yet reaped, has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:  # no /proc (not Linux): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


# The environment that decides where and how storage is reached (boto3's and this project's).
STORAGE_ENV_PREFIXES = ("AWS_", "EXPLAIN_TRANSFER_")


def _storage_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(STORAGE_ENV_PREFIXES)}


def _init_worker(trainer_pid: int, environ: dict[str, str], worker_id: int) -> None:
    """``worker_init_fn``: take the trainer's storage settings, and end with the trainer.

    Workers start from the fork server, which was started once, with the environment of that
    moment: the storage settings the trainer has now (``AWS_ENDPOINT_URL``, credentials, the
    project's S3 timeouts) replace the server's before the worker opens any storage.
    """
    for name in [k for k in os.environ if k.startswith(STORAGE_ENV_PREFIXES)]:
        del os.environ[name]
    os.environ.update(environ)
    _watch_trainer(trainer_pid, worker_id)


def _watch_trainer(trainer_pid: int, worker_id: int) -> None:
    """End this decoding worker as soon as the trainer that owns it ends.

    Workers start from the fork server, so their parent is the server, not the trainer, and
    torch's own watchdog (which watches the parent) never fires: a SIGKILLed trainer would
    leave its workers, and through them the server, running forever (and holding its output
    pipes open).
    """

    def watch() -> None:
        while not _process_gone(trainer_pid):
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name=f"watch-trainer-{worker_id}", daemon=True).start()


def worker_options(num_workers: int) -> dict[str, Any]:
    """``DataLoader`` options of workers started from the fork server (none without workers):
    each takes the caller's current storage settings and ends when the caller ends."""
    if not num_workers:
        return {}
    return {
        "multiprocessing_context": worker_context(),
        "worker_init_fn": functools.partial(_init_worker, os.getpid(), _storage_environment()),
    }


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class TrainStream(IterableDataset):
    """The training batches of one rank, epoch by epoch (see the module docstring).

    Args:
        split: the split's shards.
        decoder: turns raw samples into batches.
        batch_size: samples per batch on this rank (the global batch is
            ``batch_size * world_size``).
        seed: seeds the shard order and the sample shuffle.
        shuffle_buffer: samples in webdataset's shuffle buffer (0 or 1: no sample shuffle).
        num_workers: ``DataLoader`` decoding processes (0: in this process); capped at this
            rank's shard count.
        rank: this process's rank.
        world_size: processes training together.

    Raises:
        ValueError: fewer shards than processes, or fewer samples than processes.
    """

    def __init__(
        self,
        split: SplitShards,
        decoder: Decoder,
        *,
        batch_size: int,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        if len(split.shards) < world_size:
            raise ValueError(
                f"{split.uri} has {len(split.shards)} shards of {split.name}-{split.split}, "
                f"fewer than the {world_size} training processes: write more shards"
            )
        if split.samples < world_size:
            raise ValueError(f"{split.uri}: {split.samples} samples for {world_size} processes")
        self.split = split
        self.decoder = decoder
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.rank = rank
        self.world_size = world_size
        per_rank = math.ceil((len(split.shards) - rank) / world_size)
        self.num_workers = max(0, min(num_workers, per_rank))
        self.epoch = 0
        self.skip = 0

    @property
    def samples_per_rank(self) -> int:
        """Samples each rank takes per epoch."""
        return self.split.samples // self.world_size

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch on every rank."""
        return math.ceil(self.samples_per_rank / self.batch_size)

    def batch_sizes(self) -> list[int]:
        """The size of each batch of an epoch (the last may be short)."""
        quota, size = self.samples_per_rank, self.batch_size
        return [min(size, quota - j * size) for j in range(self.steps_per_epoch)]

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Read ``epoch`` next, starting after its first ``skip_batches`` batches."""
        self.epoch, self.skip = epoch, skip_batches

    def rank_shards(self) -> list[int]:
        """Indices of this rank's shards this epoch, in reading order."""
        order = shard_order(len(self.split.shards), self.seed, self.epoch)
        return order[self.rank :: self.world_size]

    def _raw_samples(self, shards: list[int], needed: int) -> Iterator[dict[str, Any]]:
        storage = open_storage(self.split.uri)
        passes, given = 0, 0
        while given < needed:
            if passes == 1:
                logger.debug("rank %d starts over its shards to fill its epoch", self.rank)
            if not any(self.split.counts[i] for i in shards):
                raise ValueError(f"{self.split.uri}: no sample in this worker's shards")
            for index in shards:
                for sample in read_shard(storage, self.split.shards[index]):
                    yield sample
                    given += 1
                    if given == needed:
                        return
            passes += 1

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = _worker()
        shards = self.rank_shards()[worker::workers]
        sizes = self.batch_sizes()
        mine = range(worker, len(sizes), workers)
        stream = self._raw_samples(shards, sum(sizes[j] for j in mine))
        if self.shuffle_buffer > 1:
            rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{worker}")
            stream = wds_shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(stream)
        # DataLoader asks worker 0 first: every worker starts at the round holding the first
        # batch wanted, and loader() drops the batches of that round before it.
        first = self.skip - self.skip % workers
        for j in mine:
            samples = [next(stream) for _ in range(sizes[j])]
            if j >= first:
                yield self.decoder(samples)

    def loader(self) -> Iterator[Batch]:
        """This epoch's batches in order (after the skipped ones), decoded by the workers."""
        loader = DataLoader(
            self,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_identity,
            **worker_options(self.num_workers),
        )
        return itertools.islice(loader, self.skip % max(1, self.num_workers), None)


class OrderedStream(IterableDataset):
    """Every sample of a split once, in shard order, in consecutive batches.

    Args:
        split: the split's shards.
        decoder: turns raw samples into batches.
        batch_size: samples per batch.
        limit: read only the first ``limit`` samples.
        num_workers: ``DataLoader`` decoding processes (0: in this process); batch ``j`` is
            decoded by worker ``j % num_workers``, so the batches do not depend on it.
    """

    def __init__(
        self,
        split: SplitShards,
        decoder: Decoder,
        *,
        batch_size: int,
        limit: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.split = split
        self.decoder = decoder
        self.batch_size = batch_size
        self.samples = split.samples if limit is None else min(limit, split.samples)
        self.num_workers = num_workers

    def __len__(self) -> int:
        return math.ceil(self.samples / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = _worker()
        storage = open_storage(self.split.uri)
        size, chunk, seen = self.batch_size, [], 0
        for shard, count in zip(self.split.shards, self.split.counts, strict=True):
            if seen >= self.samples:
                break
            last = (min(seen + count, self.samples) - 1) // size
            if not count or not any(j % workers == worker for j in range(seen // size, last + 1)):
                # None of this worker's batches lies in the shard: it is not read.
                seen += count
                continue
            for sample in read_shard(storage, shard):
                if seen >= self.samples:
                    break
                mine = (seen // size) % workers == worker
                seen += 1
                if mine:
                    chunk.append(sample)
                    if len(chunk) == size or seen == self.samples:
                        yield self.decoder(chunk)
                        chunk = []
        if chunk:
            yield self.decoder(chunk)

    def loader(self) -> DataLoader:
        """A ``DataLoader`` yielding the batches in order."""
        return DataLoader(
            self,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_identity,
            **worker_options(self.num_workers),
        )
