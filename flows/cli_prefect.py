"""The Prefect API a command-line run talks to, and where its logs go.

With ``PREFECT_API_URL`` set (a ``prefect server``, Prefect Cloud, ``explain-transfer serve``) a
run uses that API. Otherwise it starts a private temporary one: its own Prefect home and SQLite
database (two commands at once never share one), its server output in a log file instead of the
console, and a startup timeout that fits a busy 2-core machine. The run's own full log (every
Prefect record, tracebacks included) is written beside it. The private API listens on
127.0.0.1, so only processes on this machine reach it: a run on a Dask cluster elsewhere needs
``PREFECT_API_URL``, or is refused before anything starts (:func:`flows.cli_checks.check_dask_api`).

Where the logs end up: ``{out}/logs/`` when the output is a local folder that the run created or
used, otherwise the private home ``{PREFECT_HOME}/cli-runs/{time}-{pid}/``. When the output
cannot take them (a full or read-only volume: what may have ended the run), they stay in the
private home, and one line on stderr says where, before the run's own error line.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

#: Seconds the temporary API may take to start (Prefect's own default, 20 s, is too short for
#: a 2-core machine busy with a build); ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``
#: overrides it.
STARTUP_TIMEOUT = 300.0


class PrefectAPIUnavailableError(OSError):
    """The temporary Prefect API did not start (an expected failure: one line, status 2)."""


@dataclass
class RunLogs:
    """Where a command-line run's logs are: the server's and the run's own."""

    folder: Path
    server_log: Path | None
    run_log: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _startup_timeout() -> float:
    text = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "").strip()
    return float(text) if text else STARTUP_TIMEOUT


def _start_server(home: Path, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start Prefect's API (no UI, ephemeral services) on a free loopback port."""
    import prefect

    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_UI_ENABLED": "0",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The flags Prefect's own temporary server sets: ephemeral services, one app.
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
    }
    env.pop("PREFECT_API_URL", None)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(Path(prefect.__file__).parent.parent),
                "--factory",
                "prefect.server.api.server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--lifespan",
                "on",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return process, f"http://127.0.0.1:{port}/api"


def _wait_healthy(process: subprocess.Popen[bytes], api_url: str, log_path: Path) -> None:
    import httpx

    timeout = _startup_timeout()
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise PrefectAPIUnavailableError(
                    f"the temporary Prefect API exited during startup (code "
                    f"{process.returncode}); its log: {log_path}"
                )
            try:
                if client.get(f"{api_url}/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
    raise PrefectAPIUnavailableError(
        f"the temporary Prefect API did not start within {timeout:.0f} s (raise "
        f"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); its log: {log_path}"
    )


def _drain_prefect_workers() -> None:
    """Send the run's buffered logs and events to the API before it stops (as Prefect's own
    test harness does), so nothing reports a lost connection at exit."""
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        try:
            result = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        except RuntimeError:  # the worker never started
            pass
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    try:
        run_coro_as_sync(drain())
    except Exception:  # losing a log line at exit is not worth failing a run
        logger.debug("could not drain Prefect's log and event workers", exc_info=True)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _add_run_log(path: Path) -> logging.Handler:
    """Every INFO+ record of the run (tracebacks included) into ``path``."""
    from flows.cli_errors import RedactSecrets

    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactSecrets())
    # On the root logger only: Prefect's flow- and task-run loggers propagate to it.
    logging.getLogger().addHandler(handler)
    # The project's INFO records reach the file even though the console shows WARNING.
    for name in ("flows", "tasks", "storage"):
        logging.getLogger(name).setLevel(min(logging.getLogger(name).getEffectiveLevel(), 20))
    return handler


def _remove_run_log(handler: logging.Handler) -> None:
    logging.getLogger().removeHandler(handler)
    handler.close()


def _hide_expected_tracebacks_on_console() -> None:
    """Filters on the root logger's console handlers: the command line's own and Prefect's."""
    from prefect.logging.handlers import PrefectConsoleHandler

    from flows.cli_errors import HideExpectedTracebacks, RedactSecrets

    for handler in logging.getLogger().handlers:
        # Exact types: a file handler keeps every record, and so do test harnesses' handlers.
        if type(handler) is not logging.StreamHandler and not isinstance(
            handler, PrefectConsoleHandler
        ):
            continue
        kinds = {type(f) for f in handler.filters}
        if HideExpectedTracebacks not in kinds:
            handler.addFilter(HideExpectedTracebacks())
        if RedactSecrets not in kinds:
            handler.addFilter(RedactSecrets())


def _local_output(output_uri: str | None) -> Path | None:
    """The output folder when it is local and exists (the run wrote into it)."""
    if not output_uri:
        return None
    from storage import LocalStorage, open_storage

    try:
        storage = open_storage(output_uri)
    except ValueError:
        return None
    if isinstance(storage, LocalStorage) and storage.root.is_dir():
        return storage.root
    return None


@contextmanager
def prefect_api(output_uri: str | None, verbose: bool = False) -> Iterator[RunLogs]:
    """Run the block against a Prefect API, with the run's logs kept in files.

    Args:
        output_uri: the command's output root; its ``logs/`` folder receives the logs at the end
            when it is a local folder that exists then.
        verbose: keep the root logger at DEBUG (``-v``) after Prefect configures logging.

    Yields:
        Where the logs are being written.
    """
    import prefect  # noqa: F401  (sets up Prefect's logging before the filters go on)
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        get_current_settings,
        temporary_settings,
    )

    _hide_expected_tracebacks_on_console()
    if verbose:
        logging.getLogger().setLevel(logging.DEBUG)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(os.environ.get("PREFECT_HOME") or get_current_settings().home).expanduser()
    home = base / "cli-runs" / f"{stamp}-{os.getpid()}"
    home.mkdir(parents=True, exist_ok=True)
    logs = RunLogs(home, None, home / "run.log")
    handler = _add_run_log(logs.run_log)
    process = None
    try:
        if get_current_settings().api.url:
            yield logs
        else:
            logs.server_log = home / "server.log"
            process, api_url = _start_server(home, logs.server_log)
            _wait_healthy(process, api_url, logs.server_log)
            logger.info("temporary Prefect API at %s (home %s)", api_url, home)
            # The environment too: worker processes (a local Dask cluster) inherit it.
            saved = {name: os.environ.get(name) for name in ("PREFECT_API_URL", "PREFECT_HOME")}
            os.environ.update(PREFECT_API_URL=api_url, PREFECT_HOME=str(home))
            try:
                with temporary_settings(
                    updates={PREFECT_API_URL: api_url, PREFECT_HOME: str(home)}
                ):
                    try:
                        yield logs
                    finally:
                        _drain_prefect_workers()
            finally:
                for name, value in saved.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value
    finally:
        _remove_run_log(handler)
        if process is not None:
            _stop(process)
        for name in ("prefect.db", "prefect.db-wal", "prefect.db-shm"):
            (home / name).unlink(missing_ok=True)
        moved = _move_logs(home, _local_output(output_uri), stamp)
        if moved is not None:
            logs.folder = moved


def _move_logs(home: Path, local_out: Path | None, stamp: str) -> Path | None:
    """Move the logs under ``{out}/logs/`` and drop the private home, when the output is local.

    Returns:
        The folder holding the logs now: ``{out}/logs``, or None when they stay in ``home``
        (no local output, or one that cannot take them: then a line on stderr says so).
    """
    from storage.errors import StorageError, os_errors_translated

    if local_out is None:
        return None
    target = local_out / "logs"
    try:
        with os_errors_translated("create", target):
            target.mkdir(exist_ok=True)
        # The run's own log last: if the volume fills up meanwhile, it is the one kept whole.
        for name in ("server.log", "run.log"):
            source = home / name
            if source.exists():
                _move_file(source, target / f"{stamp}-{os.getpid()}-{name}")
    except StorageError as exc:
        print(f"full log: {home / 'run.log'} (not moved: {exc})", file=sys.stderr, flush=True)
        return None
    shutil.rmtree(home, ignore_errors=True)
    return target


def _move_file(source: Path, destination: Path) -> None:
    """Move a file; across volumes by a copy that appears complete or not at all.

    Raises:
        StorageError: the destination cannot take it (``source`` is then left where it was).
    """
    from storage.errors import os_errors_translated, storage_error_from_os

    try:
        os.replace(source, destination)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise storage_error_from_os(exc, "write", destination) from exc
    partial = destination.with_name(f".{destination.name}.partial")
    try:
        with os_errors_translated("write", destination):
            shutil.copyfile(source, partial)
            os.replace(partial, destination)
    except BaseException:
        try:
            partial.unlink(missing_ok=True)
        except OSError:  # a read-only volume: nothing was written there either
            pass
        raise
    source.unlink()
