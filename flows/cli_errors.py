"""What the command line prints when something is wrong: one line per problem, no traceback.

An *expected* failure (a bad config, a missing input, an unreachable store or scheduler, a
full or read-only volume) is something the user can fix; the command prints it as ``error: ...``
lines and exits with status 2. Anything else is a bug and keeps its traceback.

A storage failure inside a Prefect task reaches the command line as the task raised it (Prefect
re-raises a failed flow's exception), or, for a shard the build gave up on, as the text the
build summary kept (:class:`ShardsFailedError`); :func:`reported_error` finds it when Prefect
or a task group wrapped it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, NoReturn

from pydantic import ValidationError

from storage.errors import StorageError


class AccuracyFloorError(RuntimeError):
    """A model stays below the accuracy the run requires of it (``min_target_accuracy``,
    ``min_accuracy``): a setting to change or a model to train longer, not a crash."""


#: What the command line reports in one line instead of a traceback.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    StorageError,
    AccuracyFloorError,
    ValueError,  # pydantic's ValidationError included
    FileNotFoundError,
    OSError,  # an unreachable Dask scheduler, a read-only folder
)

#: Loggers that print every request (with its signed headers) at DEBUG: kept at WARNING.
WIRE_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3", "aiobotocore", "httpcore")

#: Environment variables whose values never reach a log line.
SECRET_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse with its errors in the command line's form: one ``error:`` line, status 2.

    Its sub-command parsers are of the same class, so every subcommand's usage errors read the
    same (``error: argument --seeds: must be at least 1, got 0 (see explain-transfer demo
    --help)``) instead of a usage block and then the error.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class ShardsFailedError(ValueError):
    """Shards of a build failed after their retries; the others are complete.

    The build summary keeps each failure as text (a task's exception does not travel back),
    so the line is the first failure's message, which names the path and the cause.

    Args:
        summary: the build summary (``missing``, ``complete``, ``failed_errors``).
    """

    def __init__(self, summary: dict[str, Any]) -> None:
        missing = list(summary.get("missing") or [])
        total = len(missing) + len(summary.get("complete") or [])
        errors = [e for e in summary.get("failed_errors") or [] if e]
        first = errors[0].strip().splitlines()[0] if errors else f"shard {missing[0]} failed"
        super().__init__(
            f"{first} ({len(missing)} of {total} shards failed, the others are complete; "
            "the same command finishes them)"
        )


class FieldErrors(ValueError):
    """Several problems of one command's arguments found at once, one line each.

    The command line's own checks raise it (:mod:`flows.cli_checks`) in the form pydantic's
    errors print in (``field: problem``), so a missing option reads the same whichever finds it.
    """

    def __init__(self, lines: list[str]) -> None:
        super().__init__("; ".join(lines))
        self.lines = list(lines)


def reported_error(exc: BaseException) -> BaseException | None:
    """The expected failure behind ``exc``, or None when ``exc`` is a bug (keep its traceback).

    ``exc`` itself when expected; the first expected one in an exception group (a task group,
    a cluster's workers); the storage error that a Prefect exception was raised from.
    """
    inner_exceptions = getattr(exc, "exceptions", None)  # an ExceptionGroup (Python 3.11+)
    if isinstance(inner_exceptions, tuple):
        for inner in inner_exceptions:
            found = reported_error(inner)
            if found is not None:
                return found
        return None
    if isinstance(exc, EXPECTED_ERRORS):
        return exc
    if type(exc).__module__.startswith("prefect"):
        seen = {id(exc)}
        cause = exc.__cause__ or exc.__context__
        while cause is not None and id(cause) not in seen:
            if isinstance(cause, StorageError):
                return cause
            seen.add(id(cause))
            cause = cause.__cause__ or cause.__context__
    return None


def error_lines(exc: BaseException) -> list[str]:
    """The ``error: ...`` lines that describe an expected failure."""
    if isinstance(exc, ValidationError):
        return [f"error: {line}" for line in validation_lines(exc)]
    if isinstance(exc, FieldErrors):
        return [f"error: {line}" for line in exc.lines]
    if isinstance(exc, OSError) and not isinstance(exc, StorageError) and exc.strerror:
        # An OS error from outside storage, in rsync's and git's form: "path: cause".
        where = exc.filename
        return [f"error: {where}: {exc.strerror}" if where else f"error: {exc.strerror}"]
    text = str(exc).strip() or type(exc).__name__
    # One line: the first line of a multi-line message is its summary.
    return [f"error: {text.splitlines()[0]}"]


def validation_lines(exc: ValidationError) -> list[str]:
    """One ``field: problem (got value)`` line per invalid field of a pydantic error."""
    lines = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or exc.title
        line = f"{where}: {_problem(error)}"
        value = error.get("input")
        if error["type"] != "missing" and not isinstance(value, dict):
            line += f" (got {_short(value)})"
        lines.append(line)
    return lines


def _problem(error: dict[str, Any]) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    bounds = {
        "greater_than_equal": (">=", "ge"),
        "greater_than": (">", "gt"),
        "less_than_equal": ("<=", "le"),
        "less_than": ("<", "lt"),
    }
    if kind in bounds:
        op, key = bounds[kind]
        return f"must be {op} {ctx.get(key)}"
    fixed = {
        "missing": "required",
        "extra_forbidden": "unknown field",
        "int_parsing": "must be a whole number",
        "int_type": "must be a whole number",
        "int_from_float": "must be a whole number",
        "float_parsing": "must be a number",
        "float_type": "must be a number",
        "bool_parsing": "must be true or false",
        "bool_type": "must be true or false",
        "string_type": "must be a string",
        "model_type": "must be an object",
        "model_attributes_type": "must be an object",
        "dict_type": "must be an object",
        "tuple_type": "must be a list",
        "list_type": "must be a list",
    }
    if kind in fixed:
        return fixed[kind]
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx.get('pattern')}"
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    message = str(error.get("msg", kind))
    return message[:1].lower() + message[1:]


def _short(value: Any, limit: int = 60) -> str:
    try:
        text = json.dumps(value, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RedactSecrets(logging.Filter):
    """Replaces the values of :data:`SECRET_VARIABLES` by ``***`` in every record it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets = [
            os.environ[name] for name in SECRET_VARIABLES if len(os.environ.get(name, "")) >= 4
        ]

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        redacted = message
        for secret in self.secrets:
            redacted = redacted.replace(secret, "***")
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


class HideExpectedTracebacks(logging.Filter):
    """Drops console records of an expected failure: the command line prints it in one line.

    Those are records that carry the failure (Prefect's task and flow run records), and what
    storage logs while the failure propagates (a shard abandoned, its partial file removed).
    Records of other exceptions pass, tracebacks included; the run's log file keeps them all.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], EXPECTED_ERRORS):
            return False
        # A filter runs in the thread that logs: the exception it is handling, if any.
        if record.name.startswith("storage") and isinstance(sys.exc_info()[1], StorageError):
            return False
        return not (
            record.levelno >= logging.ERROR
            and record.name.startswith("prefect")
            and "Finished in state Failed" in record.getMessage()
        )


def configure_logging(verbose: bool) -> None:
    """Console logging of the command line: WARNING, or DEBUG with ``-v``, never a credential.

    The wire loggers (botocore, urllib3, ...) stay at WARNING even with ``-v``: their DEBUG
    output is every request's signed headers (access key id, session token).
    """
    level = logging.DEBUG if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in WIRE_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        # The console shows WARNING (DEBUG with -v) whatever the loggers let through: a run's
        # log file takes INFO records from the same loggers.
        if type(handler) is logging.StreamHandler and handler.stream in (sys.stderr, sys.stdout):
            handler.setLevel(level)
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())
