"""``explain-transfer serve``: the embedded Prefect stack from the command line.

The stack itself lives in :mod:`deployments.serve`; this module only parses the arguments.
``python -m flows.serve_cli`` runs it on its own.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535, got {value}")
    return value


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``serve`` options to ``parser`` (the ``serve`` subparser of the main CLI)."""
    parser.add_argument(
        "--port", type=_port, default=4200, help="port of the server and UI (default 4200; 0: any)"
    )
    parser.add_argument(
        "--out", default="serve-out", help="Prefect home and default data root (./serve-out)"
    )
    parser.add_argument(
        "--data-root",
        help="root URI the deployments write under (default $EXPLAIN_TRANSFER_DATA, else OUT/data)",
    )
    parser.add_argument(
        "--api-url", help="serve on this existing Prefect API instead of starting a server"
    )
    parser.add_argument(
        "--gpu-limit",
        type=_positive_int,
        help="the 'gpu' tag concurrency limit: shard tasks at once across all runs, set even "
        "over an existing limit (default: this host's GPUs, at least 1, when no limit exists; "
        "give a Dask cluster's total GPUs)",
    )
    parser.add_argument(
        "--result-storage-block",
        help="Prefect block holding task results when the data root is not local "
        "(e.g. s3-bucket/explain-transfer)",
    )
    parser.add_argument(
        "--deployment",
        action="append",
        dest="deployments",
        metavar="FLOW/NAME",
        help="serve only this deployment (repeatable; default: all of deployments/prefect.yaml)",
    )
    parser.add_argument("--run-limit", type=int, help="flow runs this process executes at once")
    return parser


def check_serve_arguments(args: argparse.Namespace) -> None:
    """What ``serve`` checks before it starts anything, each in a second or less.

    Its output folder and data root can be written; with ``--api-url`` that API accepts
    connections, otherwise nothing else holds the port the server will listen on.

    Raises:
        StorageError: a folder or bucket cannot be written.
        OSError: the API does not answer, or the port is taken.
        ValueError: a malformed URI or URL.
    """
    from flows.cli_checks import check_api, check_output, check_port_free

    check_output(args.out)
    if getattr(args, "data_root", None):
        check_output(args.data_root)
    if getattr(args, "api_url", None):
        check_api(args.api_url)
    else:
        check_port_free(args.port)


def serve(args: argparse.Namespace) -> int:
    """Run the embedded stack with parsed arguments until interrupted; the exit status."""
    from deployments.serve import serve_stack

    serve_stack(
        out=args.out,
        port=args.port,
        api_url=getattr(args, "api_url", None),
        data_root=getattr(args, "data_root", None),
        gpu_limit=getattr(args, "gpu_limit", None),
        result_storage_block=getattr(args, "result_storage_block", None),
        deployment_names=getattr(args, "deployments", None),
        run_limit=getattr(args, "run_limit", None),
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flows.serve_cli [--port 4200] [--out DIR] ...``."""
    from flows.cli_errors import EXPECTED_ERRORS, OneLineErrorParser, error_lines

    parser = add_serve_arguments(
        OneLineErrorParser(
            prog="explain-transfer serve",
            description="local Prefect server + UI + the scheduled deployments",
        )
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # One line per API request would bury the stack's own messages.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        check_serve_arguments(args)
    except EXPECTED_ERRORS as exc:
        print("\n".join(error_lines(exc)), file=sys.stderr)
        return 2
    try:
        return serve(args)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
