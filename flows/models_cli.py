"""``explain-transfer publish-model``: put a checkpoint into an output root and announce it.

``publish-model SOURCE --out ROOT --domain D [--mode P]`` copies ``SOURCE`` (a
``model.safetensors`` with its ``model.json`` sidecar) to ``ROOT/models/D-P-{fingerprint}/``
and emits ``explain-transfer.checkpoint.published`` to the Prefect API of ``PREFECT_API_URL``
(a served stack: ``explain-transfer serve``), whose ``regenerate-on-publish`` deployment then
relabels the X-datasets the new model supersedes. The logic is :func:`flows.events.publish_model`.

``python -m flows.models_cli publish-model ...`` runs it without the rest of the CLI.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from flows.cli_errors import EXPECTED_ERRORS, error_lines


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``publish-model`` under ``subparsers`` (the CLI's subcommands)."""
    parser = subparsers.add_parser(
        "publish-model",
        help="copy a checkpoint into an output root and emit its published event",
        description="Copy a model.safetensors and its sidecar into ROOT/models/ and emit "
        "explain-transfer.checkpoint.published to the Prefect API of PREFECT_API_URL: a served "
        "stack's regenerate-on-publish deployment then relabels the X-datasets under ROOT that "
        "a model of the same domain and mode labelled.",
    )
    parser.add_argument("source", metavar="SOURCE", help="model.safetensors (path or s3://)")
    parser.add_argument("--out", required=True, metavar="ROOT", help="the output root")
    parser.add_argument("--domain", required=True, help="the domain it was fine-tuned on")
    parser.add_argument("--mode", choices=("P", "X"), default="P", help="P or X (default P)")
    parser.add_argument("--no-event", action="store_true", help="copy only, emit nothing")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=cmd_publish_model)
    return parser


def cmd_publish_model(args: argparse.Namespace) -> int:
    """``publish-model``: one line (or JSON) saying where the model went and the event sent."""
    from flows.events import publish_model

    result = publish_model(args.source, args.out, args.domain, args.mode, emit=not args.no_event)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    state = "copied to" if result["copied"] else "already at"
    print(f"{args.domain}-{args.mode} {result['fingerprint']} {state} {result['uri']}")
    if result["event_id"]:
        print(f"event explain-transfer.checkpoint.published sent ({result['event_id']})")
    elif not args.no_event:
        print("no event sent: set PREFECT_API_URL to the Prefect API that serves the deployments")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flows.models_cli publish-model ...``; the exit status (2: expected error)."""
    parser = argparse.ArgumentParser(prog="explain-transfer")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except EXPECTED_ERRORS as exc:
        print("\n".join(error_lines(exc)), file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
