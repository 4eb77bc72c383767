"""The ``explain-transfer`` command line: every subcommand runs the same Prefect flow a
deployment runs, with its progress on the console (:mod:`flows.progress`: a bar on a terminal,
a line every 10 % or 30 s in a log, nothing with ``-q``).

Without a Prefect API configured (``PREFECT_API_URL``), a run starts a private temporary one
(:mod:`flows.cli_prefect`), whose logs go to files, not the console; ``explain-transfer serve``
starts a persistent one with the UI. Every location is a storage URI (a path or ``s3://...``)
and stays one. Expected failures print one ``error:`` line and exit with status 2
(:mod:`flows.cli_errors`), after checks that run before any compute (:mod:`flows.cli_checks`).

A failure of storage once the run has started (a full, read-only or locked volume, an input
deleted mid-run, an object store that throttles or never answers) is one ``error:`` line too,
naming the path and the cause, and the console's last line; a shard the build gave up on makes
the summary on stdout and then that line. Exit status 2 in every such case.

Each command checks in this order, so that a mistake costs as little as it can: first its
arguments alone (required options, paths that exist and are of the right kind, an output that
can be written, a bucket or scheduler that answers), importing only :mod:`storage`, within a
second or so; then what needs the typed config (field values, the model's image size, domain
names), which imports torch; only then does the Prefect API start. Argument errors of argparse
itself are one ``error:`` line too.

SIGTERM (a scheduler's timeout, ``kill``) stops a run as Ctrl-C does: the private Prefect API
is stopped, the run's logs go to ``{out}/logs`` and the command prints one ``error:`` line and
exits with status 143; what was complete is kept, and the same command resumes it.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from flows.cli_errors import (
    EXPECTED_ERRORS,
    OneLineErrorParser,
    ShardsFailedError,
    configure_logging,
    error_lines,
    reported_error,
)
from flows.datasets_cli import add_parser as add_datasets_parser
from flows.models_cli import add_parser as add_publish_model_parser

logger = logging.getLogger(__name__)


def _load_json(path: str | None) -> dict[str, Any]:
    """The fields of a JSON config file (a path or a storage URI such as ``s3://b/c.json``)."""
    if not path:
        return {}
    from storage import StorageError, open_file

    try:
        if "://" in path:
            storage, key = open_file(path)
            data = json.loads(storage.read_bytes(key))
        else:
            data = json.loads(Path(path).read_text())
    except (OSError, StorageError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read config {path}: {exc}") from None
    if not isinstance(data, dict):
        kind = {list: "a list", str: "a string", type(None): "null"}.get(type(data), "a value")
        raise ValueError(f"config {path} must be a JSON object of fields, got {kind}")
    return data


def _root_uri(uri: str) -> str:
    """The canonical form of a storage root: an absolute local path, or the URI as given."""
    from storage import open_storage

    return open_storage(uri).uri


@contextmanager
def _flows(output_uri: str | None, verbose: bool) -> Iterator[Any]:
    """Run flows against a Prefect API, the run's logs in files (see :mod:`flows.cli_prefect`)."""
    from flows.cli_prefect import prefect_api

    with prefect_api(output_uri, verbose=verbose) as logs:
        yield logs


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.cli_checks import check_pipeline_arguments

    fields = _load_json(args.config)
    out = args.out or fields.pop("out_uri", None)
    if out is None:
        raise ValueError(f"config {args.config}: give out_uri in it, or --out")
    out = _root_uri(out)
    fields.pop("out_uri", None)
    check_pipeline_arguments(fields, out)

    from flows.cli_checks import check_image_size
    from flows.pipeline_config import PipelineConfig, check_domains

    make = PipelineConfig.miniature if getattr(args, "miniature", False) else PipelineConfig
    config = make(out_uri=out, **fields)
    check_image_size(config.model_name, config.image_size)
    check_domains(config)  # an unknown class or an empty split fails here, before any compute
    from flows.pipeline import explain_transfer_pipeline
    from flows.progress import enable_console_progress

    enable_console_progress()
    started = time.perf_counter()
    with _flows(out, args.verbose) as logs:
        if getattr(args, "seeds", 1) > 1:
            from flows.seeds import run_seeds

            print(run_seeds(config, args.seeds))
            print(f"\nall outputs under {out} ({(time.perf_counter() - started) / 60:.1f} min)")
            return 0
        result = explain_transfer_pipeline(config)
    minutes = (time.perf_counter() - started) / 60
    print(_sweep_table(result["sweep"]))
    print(
        f"\nall outputs under {out} ({minutes:.1f} min); sweep table: {result['sweep'].get('table_uri')}"
        f"\nfull logs under {logs.folder}"
    )
    return 0


def _sweep_table(sweep: dict[str, Any]) -> str:
    """The test-split rows of the sweep as a fixed-width table."""
    from storage import open_file

    # read_parquet reads the object whole: an S3 body cannot seek, as Parquet's footer needs.
    storage, key = open_file(sweep["table_uri"])
    rows = storage.read_parquet(key).to_pylist()
    columns = [
        "target",
        "method",
        "lambda",
        "inferences",
        "accuracy",
        "pearson",
        "spearman",
        "insertion_auc",
        "deletion_auc",
        "pointing",
        "chosen",
    ]
    rows = [r for r in rows if r.get("split") == "test"]

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "" if v != v else f"{v:.3f}"
        return str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def cmd_export(args: argparse.Namespace) -> int:
    from flows.cli_checks import check_output, check_synthetic_domain

    check_output(args.out)
    check_synthetic_domain(args.domain)
    from flows.export import export_domain_flow

    per_class = {"train": args.train, "val": args.val, "test": args.test}
    with _flows(args.out, args.verbose):
        result = export_domain_flow(args.domain, args.out, per_class, args.image_size, args.seed)
    _print_json(result)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from flows.cli_checks import check_output

    fields = _load_json(args.config)
    check_output(args.out)
    from tasks.pretrain_config import PretrainConfig

    config = PretrainConfig(**fields)
    from flows.pretrain import pretrain_base_flow
    from flows.progress import enable_console_progress

    enable_console_progress()
    with _flows(args.out, args.verbose):
        if not args.shipped:
            print(pretrain_base_flow(config, args.out))
            return 0
        import torch

        from tasks.pretrain import SHIPPED_PRETRAIN, compare_to_shipped

        # The shipped file was trained on one CPU thread; another thread count reorders sums.
        torch.set_num_threads(1)
        uri = pretrain_base_flow(SHIPPED_PRETRAIN, args.out)
        _print_json({"uri": uri, "against_shipped": compare_to_shipped(uri)})
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from flows.cli_checks import check_build_arguments

    fields = _load_json(args.config)
    overrides = {
        "name": args.name,
        "split": args.split,
        "input_kind": args.input_kind,
        "input_uri": args.input,
        "input_name": args.input_name,
        "class_names_file": args.class_names,
        "checkpoint": args.checkpoint,
        "model_name": args.model,
        "num_shards": args.shards,
        "output_uri": args.out,
        "image_size": args.image_size,
        "decode": args.decode,
    }
    fields.update({k: v for k, v in overrides.items() if v is not None})
    check_build_arguments(fields, args.dask_address)

    from flows.cli_checks import check_image_size, check_synthetic_domain
    from flows.runner_config import RunnerConfig
    from tasks.build_dataset.config import BuildConfig

    label = fields.pop("label", {})
    if args.budget is not None and isinstance(label, dict):
        label = {**label, "budget": args.budget}
    # A label that is not an object (null, a list) is left to the config's own validation.
    config = BuildConfig(**fields, label=label)
    runner = RunnerConfig(
        kind="dask" if args.dask or args.dask_address else "thread",
        max_workers=args.workers or (2 if args.dask or args.dask_address else 1),
        address=args.dask_address,
        gpus_per_worker=args.gpus_per_worker,
    )
    if config.input_kind == "synthetic":
        check_synthetic_domain(config.input_uri)
    check_image_size(config.model_name, config.image_size)
    from flows.build_dataset import build_explanation_dataset
    from flows.progress import PolledProgress
    from tasks.build_dataset.stage import BuildProgress

    progress = BuildProgress(config)
    with _flows(config.output_uri, args.verbose):
        with PolledProgress(
            config.num_shards, f"labelling {config.name}", progress.complete_shards, unit="shard"
        ):
            summary = build_explanation_dataset(config, overwrite=args.overwrite, runner=runner)
    _print_json(summary)
    if summary["missing"]:
        # The summary (stdout) lists them; the console's last line says why they failed.
        raise ShardsFailedError(summary)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from flows.cli_checks import check_finetune_arguments

    fields = _load_json(args.config)
    overrides = {
        "domain": args.domain,
        "mode": args.mode,
        "base": args.base,
        "data": args.data,
        "epochs": args.epochs,
        "beta": args.beta,
        "x_loss": args.x_loss,
        "game_consistency": args.game_consistency,
        "model_name": args.model,
    }
    fields.update({k: v for k, v in overrides.items() if v is not None})
    check_finetune_arguments(fields, args.out)

    from flows.cli_checks import check_image_size
    from tasks.finetune_config import FinetuneConfig

    config = FinetuneConfig(**fields)
    check_image_size(config.model_name, config.image_size)
    from flows.finetune import finetune_flow
    from flows.progress import enable_console_progress

    enable_console_progress()
    with _flows(args.out, args.verbose):
        result = finetune_flow(config, args.out)
    _print_json({k: v for k, v in result.items() if k != "metrics"})
    return 0


def cmd_vector(args: argparse.Namespace) -> int:
    from flows.cli_checks import check_file, check_output

    check_file(args.theta_x, "theta_x")
    check_file(args.theta_p, "theta_p")
    check_output(args.out)
    from flows.vector import compute_vector_flow

    with _flows(args.out, args.verbose):
        result = compute_vector_flow(args.source, args.theta_x, args.theta_p, args.out, args.key)
    _print_json(result)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from flows.cli_checks import check_sweep_arguments

    fields = _load_json(args.config)
    check_sweep_arguments(fields)
    from tasks.sweep.config import SweepConfig

    config = SweepConfig(**fields)
    from flows.sweep import transfer_sweep

    with _flows(config.output_uri, args.verbose):
        result = transfer_sweep(config)
    print(_sweep_table(result))
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from flows.cli_checks import check_file, check_folder
    from storage import join_uri, layout

    out = check_folder(args.out, "output folder")
    sweep_uri = join_uri(out.uri, layout.sweep_key(args.sweep))
    check_file(join_uri(sweep_uri, layout.SWEEP_REPORT_FILE), f"report of sweep {args.sweep!r}")
    check_file(args.preamble, "preamble")
    from storage import open_storage
    from tasks.sweep.markdown import compose_results

    report = open_storage(sweep_uri).read_bytes(layout.SWEEP_REPORT_FILE).decode()
    print(compose_results(Path(args.preamble).read_text(), report), end="")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.serve_cli import serve

    return serve(args)


def _count(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="explain-transfer",
        description="Transfer visual explainability by task arithmetic: a Prefect pipeline.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress on the console (off a terminal it is a line every 10%% or 30 s)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the whole pipeline on the embedded default")
    demo.add_argument("--out", default="demo-out", help="output folder (default: ./demo-out)")
    demo.add_argument("--miniature", action="store_true", help="a tiny run (about a minute)")
    demo.add_argument("--config", help="JSON file of PipelineConfig fields to override")
    demo.add_argument("--seeds", type=_count(1), default=1, help="repeat the study over N seeds")

    results = sub.add_parser("results", help="print docs/results.md: a preamble + a sweep report")
    results.add_argument("--out", default="demo-out", help="the demo's output folder")
    results.add_argument("--sweep", default="embedded-default", help="sweep name")
    results.add_argument("--preamble", default="docs/results-preamble.md")
    results.set_defaults(func=cmd_results)
    demo.set_defaults(func=cmd_demo)

    run = sub.add_parser("run", help="run the whole pipeline from a PipelineConfig JSON file")
    run.add_argument("--config", required=True, help="e.g. configs/embedded-default.json")
    run.add_argument("--out", help="output root URI (default: the config's out_uri)")
    run.set_defaults(func=cmd_demo)

    export = sub.add_parser("export", help="export a synthetic domain to WebDataset shards")
    export.add_argument("--domain", required=True)
    export.add_argument("--out", required=True, help="dataset folder URI")
    export.add_argument("--train", type=_count(0), default=64, help="images per class")
    export.add_argument("--val", type=_count(0), default=16, help="images per class")
    export.add_argument("--test", type=_count(0), default=32, help="images per class")
    export.add_argument("--image-size", type=_count(16), default=56)
    export.add_argument("--seed", type=int, default=0)
    export.set_defaults(func=cmd_export)

    pretrain = sub.add_parser("pretrain", help="pretrain the embedded default's base model")
    pretrain.add_argument("--out", required=True, help="output root URI")
    pretrain.add_argument("--config", help="JSON file of PretrainConfig fields")
    pretrain.add_argument(
        "--shipped", action="store_true", help="rebuild the shipped base and report its drift"
    )
    pretrain.set_defaults(func=cmd_pretrain)

    build = sub.add_parser("build-dataset", help="label a dataset with Kernel SHAP (an X-dataset)")
    build.add_argument("--config", help="JSON file of BuildConfig fields (flags override it)")
    build.add_argument("--name", help="dataset name, e.g. imagenet-x")
    build.add_argument("--split")
    build.add_argument("--input-kind", choices=["synthetic", "imagefolder", "webdataset"])
    build.add_argument("--input", help="synthetic domain name, or folder / shards URI")
    build.add_argument("--input-name", help="webdataset input: the shards' dataset name")
    build.add_argument("--class-names", help="imagefolder: wnid -> name file")
    build.add_argument("--model", help="open_clip architecture (default tiny-vit-56)")
    build.add_argument("--checkpoint", help="explained model weights URI")
    build.add_argument("--budget", type=int, help="model evaluations per image")
    build.add_argument("--image-size", type=int)
    build.add_argument("--shards", type=int, help="number of output shards")
    build.add_argument("--out", help="output root URI")
    build.add_argument(
        "--decode",
        choices=["host", "device"],
        help="decode and resize the JPEGs on the host (default) or where the model runs "
        "(nvjpeg on a GPU: under one core per GPU for the host side)",
    )
    build.add_argument(
        "--workers",
        type=_count(1),
        help="shard threads (default 1) or local Dask workers (default 2)",
    )
    build.add_argument("--dask", action="store_true", help="run shards on a local Dask cluster")
    build.add_argument(
        "--dask-address",
        help="tcp://host:8786 of a Dask scheduler (not on loopback: set PREFECT_API_URL to a "
        "Prefect server its workers reach)",
    )
    build.add_argument("--gpus-per-worker", type=_count(0), default=0)
    build.add_argument("--overwrite", action="store_true", help="relabel complete shards")
    build.set_defaults(func=cmd_build)

    ft = sub.add_parser("finetune", help="fine-tune the self-explaining model (P or X)")
    ft.add_argument("--config", help="JSON file of FinetuneConfig fields (flags override it)")
    ft.add_argument("--domain")
    ft.add_argument("--mode", choices=["P", "X"])
    ft.add_argument("--base", help="pretrained weights URI")
    ft.add_argument("--data", help="training dataset folder URI")
    ft.add_argument("--model")
    ft.add_argument("--epochs", type=int)
    ft.add_argument("--beta", type=float)
    ft.add_argument(
        "--x-loss",
        choices=["labels", "game"],
        help="X mode's explanation loss: the labels (default) or the kept games (game.npz)",
    )
    ft.add_argument(
        "--game-consistency",
        type=float,
        help="X mode: weight of the term keeping the model's values on the labels' kept "
        "coalitions at the labelled model's (default 0: none; needs game.npz)",
    )
    ft.add_argument("--out", required=True, help="output root URI")
    ft.set_defaults(func=cmd_finetune)

    vec = sub.add_parser("vector", help="compute tau_X = theta_X - theta_P")
    vec.add_argument("--source", required=True, help="source domain")
    vec.add_argument("--theta-x", required=True, help="URI of the X model's model.safetensors")
    vec.add_argument("--theta-p", required=True, help="URI of the P model's model.safetensors")
    vec.add_argument("--out", required=True, help="output root URI")
    vec.add_argument("--key", help="vector key (default vectors/{source}.safetensors)")
    vec.set_defaults(func=cmd_vector)

    sweep = sub.add_parser("sweep", help="sweep lambda over target domains")
    sweep.add_argument("--config", required=True, help="JSON file of SweepConfig fields")
    sweep.set_defaults(func=cmd_sweep)

    from flows.serve_cli import add_serve_arguments

    serve = sub.add_parser("serve", help="local Prefect server + UI + scheduled deployments")
    add_serve_arguments(serve)
    serve.set_defaults(func=cmd_serve)
    add_datasets_parser(sub)
    add_publish_model_parser(sub)
    return parser


def _fail(exc: BaseException) -> int:
    """Print an expected failure as ``error:`` lines; the exit status 2."""
    logger.debug("expected failure", exc_info=True)
    print("\n".join(error_lines(exc)), file=sys.stderr, flush=True)
    return 2


class Terminated(BaseException):
    """SIGTERM reached the command (a ``BaseException``, as ``KeyboardInterrupt``: cleanup runs).

    Without it the signal's default action ends the process where it stands, and so does
    Prefect's own handler, which during a flow run reports the run as crashed and then passes the
    signal on to the handler it found: the private Prefect API would be left running as an
    orphan and the run's logs left in its private home.
    """


def _terminate(signum: int, frame: object) -> None:
    signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``explain-transfer ARGV``; the exit status (2 for an expected failure).

    Everything a command started (the private Prefect API, a local Dask cluster, progress
    threads) is stopped before its result or its ``error:`` line is printed. Called as the
    program itself (``argv`` None), the process then ends at once: see :func:`_exit`.
    """
    if argv is not None:
        return _run(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        status: int | str | None = _run(None)
    except SystemExit as exc:  # argparse's usage errors and --help
        status = exc.code
    except Terminated:
        print(
            "error: terminated (SIGTERM); what was complete is kept, and the same command "
            "resumes it",
            file=sys.stderr,
            flush=True,
        )
        status = 128 + signal.SIGTERM
    except KeyboardInterrupt:
        traceback.print_exc()
        status = 130
    except BaseException:
        traceback.print_exc()
        status = 1
    _exit(status)


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    from flows.progress import set_quiet

    set_quiet(args.quiet)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The machines this runs on may have no route out: no telemetry from the local server.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if args.func is cmd_serve:
        from flows.serve_cli import check_serve_arguments

        try:
            check_serve_arguments(args)
        except EXPECTED_ERRORS as exc:
            return _fail(exc)
        # A running server's own failures keep their tracebacks.
        return cmd_serve(args)
    try:
        return args.func(args)
    except Exception as exc:
        # A storage error raised in a Prefect task comes back as it was raised, or inside
        # Prefect's or a task group's exception: the line is about the error itself.
        reported = reported_error(exc)
        if reported is None:
            raise
        return _fail(reported)


def _exit(status: int | str | None) -> NoReturn:
    """End the program once its command is done, without the interpreter's teardown.

    After the interpreter's own shutdown, C++ static destructors run, and a native thread pool
    of a loaded library can still hold a joinable thread then: the process aborts with
    "terminate called without an active exception" (SIGABRT, exit status 134) after a run that
    succeeded (apache/arrow#34314; 2 of 8 demo runs on 2026-12-04). So the program does what the
    shutdown does that matters (waits for its non-daemon threads, runs the atexit handlers:
    logging's flush, Prefect's), flushes its streams and leaves with ``os._exit``: no module
    teardown, no static destructors, and none of the seconds of garbage collection that torch's,
    Prefect's and pydantic's objects cost a busy 2-core machine.
    """
    if status is None:
        code = 0
    elif isinstance(status, int):
        code = status
    else:
        print(status, file=sys.stderr)
        code = 1
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to say
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
