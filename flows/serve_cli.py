"""``explain-transfer serve``: the embedded Prefect stack from the command line.

The stack itself lives in :mod:`deployments.serve`; this module only parses the arguments.
``python -m flows.serve_cli`` runs it on its own.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``serve`` options to ``parser`` (the ``serve`` subparser of the main CLI)."""
    parser.add_argument(
        "--port", type=int, default=4200, help="port of the server and UI (default 4200)"
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
        type=int,
        default=1,
        help="the 'gpu' tag concurrency limit, created when missing (default 1)",
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


def serve(args: argparse.Namespace) -> int:
    """Run the embedded stack with parsed arguments until interrupted; the exit status."""
    from deployments.serve import serve_stack

    serve_stack(
        out=args.out,
        port=args.port,
        api_url=getattr(args, "api_url", None),
        data_root=getattr(args, "data_root", None),
        gpu_limit=getattr(args, "gpu_limit", 1),
        result_storage_block=getattr(args, "result_storage_block", None),
        deployment_names=getattr(args, "deployments", None),
        run_limit=getattr(args, "run_limit", None),
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flows.serve_cli [--port 4200] [--out DIR] ...``."""
    parser = add_serve_arguments(
        argparse.ArgumentParser(
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
        return serve(args)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
