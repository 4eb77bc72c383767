"""Stage 1 at scale: planning, task submission, labelling and finalize against loopback S3.

Builds an explanation dataset with the real flow (``flows.build_dataset``, a temporary Prefect
API, the thread task runner) from two inputs of ``N`` tiny images each on a moto S3 server on
127.0.0.1 (``ThreadedMotoServer``, port 0, in its own process so that its in-memory objects do
not count in the pipeline's memory):

- ``imagefolder``: ``N`` 16-px PNG files in 100 class folders (ImageNet's layout);
- ``webdataset``: the same images exported to 256-image shards (``export_to_shards``, as the
  pipeline's exporter writes them), built with ``preserve_layout`` as the pipeline's source
  X-dataset is.

The explained model is trivial (a linear map of the mean colour; grid 2x2, budget 6), so the
figures are the pipeline's own costs, not a network's. Each build runs in a fresh process and
reports, per phase (plan, task submission, labelling, finalize): wall seconds, peak resident
memory (sampled every 20 ms), and S3 requests (every botocore API call, by operation), per
output shard and per image; "small" requests are those that are neither an input read nor an
output shard's upload. Labelling also gives the per-task fixed cost: the time of a task's small
requests (plan file, markers, reports) plus Prefect's cost of running a task (tasks run one at
a time: the median gap between one task's end and the next one's start).

Goals (issue #28): nothing O(dataset) in one process beyond the one listing (the plan's peak
memory grows like the listing, labelling's and finalize's do not grow at all); S3 requests
O(shards) outside the per-image reads; the per-task fixed cost at most 5% of a shard's
labelling time at ImageNet's shard size (``--imagenet-images / --imagenet-shards`` images at
``--gpu-images-per-second``, the GPU goal of docs/benchmarks.md).

Run: ``python -m benchmarks.bench_scale --sizes 25000,100000`` (minutes per size on a few
cores; ``--sizes 2000,8000`` for a quick look). Prints a markdown table and, with ``--out``,
writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import logging
import multiprocessing
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

#: Images per output shard of an ImageFolder build (ImageNet: 1.28M images in 1,024 shards).
IMAGES_PER_SHARD = 1250
#: Images per input shard of the exported WebDataset (the exporter's default).
EXPORT_SHARD = 256
CLASSES = 100
IMAGE_SIDE = 16
REGION = "us-east-1"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIABENCHFAKEKEY",
    "AWS_SECRET_ACCESS_KEY": "bench-fake-secret",
    "AWS_DEFAULT_REGION": REGION,
}


# --- the S3 server ------------------------------------------------------------------------


def _serve_moto(connection: Any) -> None:
    """Child process: a moto S3 server on 127.0.0.1, until told to stop."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    connection.send(server.get_host_and_port())
    connection.recv()
    server.stop()


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """The endpoint URL of a moto S3 server running in its own process."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_serve_moto, args=(child,), daemon=True)
    process.start()
    host, port = parent.recv()
    try:
        yield f"http://{host}:{port}"
    finally:
        parent.send("stop")
        process.join(timeout=30)


# --- measurement ----------------------------------------------------------------------------


class Meter:
    """Phases of a run: wall time, peak RSS (sampled), S3 API calls and their time, of each.

    A call is ``image`` (a GET of an input object: an image file or an input shard), ``upload``
    (writing an output shard's tar) or ``small`` (everything else: listings, markers, plan
    files, reports, the manifest): the small ones are what a phase costs whatever its images.
    """

    def __init__(self, input_prefix: str) -> None:
        self.input_prefix = input_prefix
        self.phase = "setup"
        self.started = {"setup": time.perf_counter()}
        self.seconds: dict[str, float] = {}
        self.peak_rss: Counter[str] = Counter()
        self.requests: dict[str, Counter[str]] = {}
        self.calls: dict[str, Counter[str]] = {}
        self.call_seconds: dict[str, Counter[str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def enter(self, phase: str) -> None:
        now = time.perf_counter()
        with self._lock:
            self.seconds[self.phase] = self.seconds.get(self.phase, 0.0) + (
                now - self.started[self.phase]
            )
            self.phase = phase
            self.started[phase] = now
        self._record_rss()

    def close(self) -> None:
        self.enter("done")
        self._stop.set()
        self._sampler.join()

    def kind_of(self, operation: str, key: str) -> str:
        if operation == "GetObject" and key.startswith(self.input_prefix):
            return "image"
        if key.endswith(".tar") and operation in (
            "PutObject",
            "CreateMultipartUpload",
            "UploadPart",
            "CompleteMultipartUpload",
        ):
            return "upload"
        return "small"

    def request(self, operation: str, key: str, seconds: float) -> None:
        kind = self.kind_of(operation, key)
        with self._lock:
            self.requests.setdefault(self.phase, Counter())[operation] += 1
            self.calls.setdefault(self.phase, Counter())[kind] += 1
            self.call_seconds.setdefault(self.phase, Counter())[kind] += seconds

    def _record_rss(self) -> None:
        with open("/proc/self/statm") as handle:
            rss = int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        with self._lock:
            self.peak_rss[self.phase] = max(self.peak_rss[self.phase], rss)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self._record_rss()


def _count_requests(meter: Meter) -> None:
    """Every botocore API call (one HTTP request; a listing page each) goes to ``meter``."""
    from botocore.client import BaseClient

    original = BaseClient._make_api_call

    def counted(self: Any, operation_name: str, api_params: dict[str, Any]) -> Any:
        started = time.perf_counter()
        try:
            return original(self, operation_name, api_params)
        finally:
            key = str(api_params.get("Key", ""))
            meter.request(operation_name, key, time.perf_counter() - started)

    BaseClient._make_api_call = counted  # type: ignore[method-assign]


# --- the input ------------------------------------------------------------------------------


def _png(index: int) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(index).integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _images(size: int) -> Iterator[tuple[str, int, bytes]]:
    """``(relative path, class, PNG)``: ``size`` images, class ``i % CLASSES``, sorted by path."""
    per_class = -(-size // CLASSES)
    for cls in range(CLASSES):
        for i in range(per_class):
            index = cls * per_class + i
            if index < size:
                yield f"c{cls:03d}/img{i:06d}.png", cls, _png(index)


def setup(kind: str, size: int, uri: str) -> None:
    """Write the input of one build under ``uri``."""
    from storage import open_storage
    from storage.core import map_concurrently
    from tasks.data.export import export_to_shards, write_class_names

    storage = open_storage(uri)
    if kind == "imagefolder":
        batch: list[tuple[str, bytes]] = []
        for path, _, data in _images(size):
            batch.append((path, data))
            if len(batch) == 1024:
                map_concurrently(lambda item: storage.write_bytes(*item), batch)
                batch = []
        map_concurrently(lambda item: storage.write_bytes(*item), batch)
        return
    write_class_names(storage, [f"c{cls:03d}" for cls in range(CLASSES)])
    samples = (
        {"__key__": path.removesuffix(".png"), "png": data, "cls": cls}
        for path, cls, data in _images(size)
    )
    export_to_shards(samples, storage, "tiny", "train", samples_per_shard=EXPORT_SHARD)


# --- one build ------------------------------------------------------------------------------


def _trivial_model(num_classes: int) -> Any:
    import torch
    from torch import nn

    class MeanColourClassifier(nn.Module):
        """Logits linear in the image's mean colour: labelling that costs next to nothing."""

        def __init__(self) -> None:
            super().__init__()
            generator = torch.Generator().manual_seed(0)
            self.weight = nn.Parameter(torch.randn(num_classes, 3, generator=generator))

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return images.mean(dim=(2, 3)) @ self.weight.T

    return MeanColourClassifier().eval()


def build(kind: str, size: int, uri: str, out: str) -> dict[str, Any]:
    """Run the build flow on the input at ``uri``, instrumented; returns its figures."""
    import torch
    from prefect.testing.utilities import prefect_test_harness

    import flows.build_dataset as flow_module
    import tasks.build_dataset.stage as stage
    from flows.runners import RunnerConfig
    from storage.checkpoints import state_fingerprint
    from tasks.build_dataset import BuildConfig, LabelConfig

    torch.set_num_threads(1)
    logging.getLogger("prefect").setLevel(logging.WARNING)
    meter = Meter(input_prefix=uri.split("/", 3)[3] + "/")
    _count_requests(meter)

    models: dict[int, Any] = {}

    def trivial(config: Any, class_names: Any) -> Any:
        model = models.setdefault(len(class_names), _trivial_model(len(class_names)))
        return stage._CachedModel(None, model, state_fingerprint(model.state_dict()))

    stage._explained_model = trivial  # type: ignore[assignment]

    spans: list[tuple[float, float]] = []
    submitted: list[int] = []
    lock = threading.Lock()

    def phase(name: str, function: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            meter.enter(name)
            return function(*args, **kwargs)

        return wrapped

    original_label_task, original_submit = flow_module.label_task, flow_module._submit_tasks

    def label_task(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original_label_task(*args, **kwargs)
        finally:
            with lock:
                spans.append((started, time.perf_counter()))

    def submit(*args: Any, **kwargs: Any) -> Any:
        meter.enter("submit")
        submitted.append(len(pickle.dumps(args[0])))
        futures = original_submit(*args, **kwargs)
        meter.enter("label")
        spans.append((time.perf_counter(), time.perf_counter()))  # the tasks' start line
        return futures

    flow_module.label_task = label_task  # type: ignore[assignment]
    flow_module._submit_tasks = submit  # type: ignore[assignment]
    flow_module.plan_build = phase("plan", flow_module.plan_build)  # type: ignore[assignment]
    flow_module.finalize_build = phase("finalize", flow_module.finalize_build)  # type: ignore

    label = LabelConfig(grid_h=2, grid_w=2, budget=6, top_k=0, images_per_batch=64)
    fields: dict[str, Any] = dict(
        name=f"bench-{kind}",
        input_kind=kind,
        input_uri=uri,
        image_size=IMAGE_SIDE,
        label=label,
        output_uri=out,
        device="cpu",
        decode_workers=4,
    )
    if kind == "webdataset":
        # The pipeline's source X-dataset: the input's layout, shared by tasks of ~IMAGES_PER_SHARD.
        fields.update(
            input_name="tiny",
            preserve_layout=True,
            num_shards=max(1, size // IMAGES_PER_SHARD),
        )
    else:
        fields.update(num_shards=max(1, size // IMAGES_PER_SHARD))
    config = BuildConfig(**fields)
    with prefect_test_harness(server_startup_timeout=180):
        meter.enter("flow-start")
        summary = flow_module.build_explanation_dataset(
            config, runner=RunnerConfig(kind="thread", max_workers=1)
        )
    meter.close()
    assert summary["missing"] == [] and summary["samples"] == size, summary

    shards = len(summary["complete"])
    tasks = min(fields["num_shards"], shards)  # BuildPlan.num_tasks
    # One task at a time: the gap before each task is Prefect's cost of running a task (state
    # changes, parameters, results); the small requests inside are the task's own fixed cost.
    spans.sort()
    gaps = [after[0] - before[1] for before, after in itertools.pairwise(spans)]
    # The mean, not the median: Prefect's gaps are bimodal (a few ms, or about two seconds
    # when its background threads wait for a CPU-bound task to let go of the GIL).
    prefect_per_task = statistics.fmean(gaps) if gaps else None
    label_calls = meter.calls.get("label", Counter())
    label_call_seconds = meter.call_seconds.get("label", Counter())
    phases = {}
    for name in ("plan", "submit", "label", "finalize"):
        requests = meter.requests.get(name, Counter())
        total = sum(requests.values())
        calls = meter.calls.get(name, Counter())
        phases[name] = {
            "seconds": round(meter.seconds.get(name, 0.0), 3),
            "peak_rss_mb": round(meter.peak_rss[name] / 2**20, 1),
            "requests": total,
            "requests_per_shard": round(total / shards, 2),
            "requests_per_image": round(total / size, 4),
            "small_requests_per_shard": round(calls["small"] / shards, 2),
            "by_kind": dict(calls),
            "by_operation": dict(requests.most_common()),
        }
    return {
        "kind": kind,
        "images": size,
        "output_shards": shards,
        "tasks": tasks,
        "input_shards": -(-size // EXPORT_SHARD) if kind == "webdataset" else None,
        "task_parameter_bytes": submitted[0] if submitted else None,
        "phases": phases,
        "task_small_requests": round(label_calls["small"] / tasks, 1),
        "task_fixed_seconds_in_task": round(label_call_seconds["small"] / tasks, 3),
        "task_fixed_seconds_prefect": None
        if prefect_per_task is None
        else round(prefect_per_task, 3),
        "prefect_gaps": [round(gap, 3) for gap in gaps],
        "label_seconds_per_image": round(meter.seconds.get("label", 0.0) / size, 6),
    }


# --- driver ---------------------------------------------------------------------------------


def _child(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.bench_scale", *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _table(rows: list[dict[str, Any]], goal_seconds: float) -> str:
    lines = [
        "| input | images | shards (tasks) | phase | s | peak RSS MB | S3 requests | per shard "
        "| per image | small per shard |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        for name, figures in row["phases"].items():
            lines.append(
                f"| {row['kind']} | {row['images']} | {row['output_shards']} ({row['tasks']}) "
                f"| {name} | {figures['seconds']} | {figures['peak_rss_mb']} "
                f"| {figures['requests']} | {figures['requests_per_shard']} "
                f"| {figures['requests_per_image']} | {figures['small_requests_per_shard']} |"
            )
    lines.append("")
    lines.append(
        "| input | images | task params (bytes) | small requests/task | their s/task (summed) "
        f"| Prefect s/task (mean gap) | fixed / ImageNet shard ({goal_seconds:.2f} s) |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        prefect = row["task_fixed_seconds_prefect"]
        fixed = row["task_fixed_seconds_in_task"] + (prefect or 0.0)
        share = f"{100 * fixed / goal_seconds:.1f}%" + ("" if prefect is not None else " (1 task)")
        lines.append(
            f"| {row['kind']} | {row['images']} | {row['task_parameter_bytes']} "
            f"| {row['task_small_requests']} | {row['task_fixed_seconds_in_task']} "
            f"| {prefect if prefect is not None else '-'} | {share} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", default="25000,100000", help="images per input, e.g. 25000,100000"
    )
    parser.add_argument("--kinds", default="imagefolder,webdataset")
    parser.add_argument("--imagenet-images", type=int, default=1_281_167)
    parser.add_argument("--imagenet-shards", type=int, default=64)  # configs/imagenet-vit-b-32.json
    parser.add_argument("--gpu-images-per-second", type=float, default=360.0)
    parser.add_argument("--out", help="write the figures here as JSON")
    parser.add_argument(
        "--child", nargs=4, metavar=("STEP", "KIND", "SIZE", "URI"), help=argparse.SUPPRESS
    )
    parser.add_argument("--output-uri", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        step, kind, size, uri = args.child
        if step == "setup":
            setup(kind, int(size), uri)
            print(json.dumps({"ok": True}))
        else:
            print(json.dumps(build(kind, int(size), uri, args.output_uri)))
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    kinds = args.kinds.split(",")
    goal_seconds = args.imagenet_images / args.imagenet_shards / args.gpu_images_per_second
    rows = []
    with moto_server() as endpoint, tempfile.TemporaryDirectory() as home:
        import boto3

        env = {
            **os.environ,
            **CREDENTIALS,
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
            "PREFECT_HOME": home,
        }
        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=endpoint, region_name=REGION, **_keys()).create_bucket(
            Bucket=bucket
        )
        for size in sizes:
            for kind in kinds:
                uri = f"s3://{bucket}/input-{kind}-{size}"
                started = time.perf_counter()
                _child(["--child", "setup", kind, str(size), uri], env)
                print(
                    f"{kind} {size}: input written in {time.perf_counter() - started:.0f} s",
                    file=sys.stderr,
                )
                out = f"s3://{bucket}/xdata-{kind}-{size}"
                row = _child(["--child", "build", kind, str(size), uri, "--output-uri", out], env)
                rows.append(row)
                print(f"{kind} {size}: built", file=sys.stderr)
    print(_table(rows, goal_seconds))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(
                {"goal_seconds_per_imagenet_shard": goal_seconds, "runs": rows}, handle, indent=2
            )


def _keys() -> dict[str, str]:
    return {
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    }


if __name__ == "__main__":
    main()
