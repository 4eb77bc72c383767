"""Progress of long steps: Prefect progress artifacts, and on the command line a bar or lines.

On a terminal the command line draws tqdm bars. When stderr is not a terminal (a scheduler's
log, ``nohup``, a pipe into a file) a bar would write every redraw, carriage returns and all;
there progress is a plain line each :data:`LINE_PERCENT` % or :data:`LINE_SECONDS` s, whichever
comes first (:class:`ProgressLines`). ``explain-transfer -q`` silences both (:func:`set_quiet`).
Nothing here imports Prefect until an artifact is made, so the command line's checks stay quick.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from flows.artifacts import Progress

#: Off a terminal, a progress line each time another this many percent are done...
LINE_PERCENT = 10
#: ... or when this many seconds have passed since the last line, whichever comes first.
LINE_SECONDS = 30.0

_console_progress = False
_quiet = False


def enable_console_progress(enabled: bool = True) -> None:
    """Also show training progress on the console (the command line turns this on)."""
    global _console_progress
    _console_progress = enabled


def set_quiet(quiet: bool = True) -> None:
    """Show no progress at all on the console (``explain-transfer -q``)."""
    global _quiet
    _quiet = quiet


class ConsoleProgress(Protocol):
    """What the command line's progress displays offer: move to a count, then close."""

    def update_to(self, n: int) -> None: ...

    def close(self) -> None: ...


def _interval(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``, as tqdm writes elapsed times."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressLines:
    """Progress as plain lines, for a log that is not a terminal.

    A line is written when the count crosses another ``percent`` % of ``total``, when
    ``seconds`` have passed since the last line (a heartbeat while nothing finishes), and at
    :meth:`close` when the count moved since the last line. Nothing is written at the start, so
    a command that fails before any progress prints its error alone.

    Args:
        total: units of work (at least 1 is assumed).
        description: what is counted, e.g. ``"labelling imagenet-x"``.
        unit: one unit's name (``"shard"``); lines say ``3/8 shards``.
        stream: where the lines go.
        percent: percent of ``total`` between lines.
        seconds: longest time between lines.
        clock: monotonic seconds (tests pass a fake one).
    """

    def __init__(
        self,
        total: int,
        description: str,
        unit: str = "it",
        stream: IO[str] | None = None,
        percent: float = LINE_PERCENT,
        seconds: float = LINE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = max(int(total), 1)
        self.description = description
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.percent = percent
        self.seconds = seconds
        self.clock = clock
        self.n = 0
        self._started = self._last_time = clock()
        self._last_n = 0
        self._closed = False
        self._lock = threading.Lock()

    def _step(self, n: int) -> int:
        return int(100 * n / self.total // self.percent)

    def update_to(self, n: int) -> None:
        """Move the count to ``n``; write a line when a step or the interval is reached."""
        with self._lock:
            if self._closed:
                return
            self.n = max(0, min(int(n), self.total))
            now = self.clock()
            if (
                self._step(self.n) > self._step(self._last_n)
                or now - self._last_time >= self.seconds
            ):
                self._write(now)

    def close(self) -> None:
        """Write the last count if no line said it yet; later updates are ignored."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.n != self._last_n:
                self._write(self.clock())

    def _write(self, now: float) -> None:
        elapsed = now - self._started
        line = (
            f"{self.description}: {self.n}/{self.total} {self.unit}s "
            f"({100 * self.n // self.total}%), {_interval(elapsed)} elapsed"
        )
        if 0 < self.n < self.total:
            line += f", about {_interval(elapsed * (self.total - self.n) / self.n)} left"
        self.stream.write(line + "\n")
        self.stream.flush()
        self._last_n, self._last_time = self.n, now


class _Bar:
    """A tqdm bar behind the :class:`ConsoleProgress` methods (a terminal redraws it)."""

    def __init__(self, total: int, description: str, unit: str, stream: IO[str]) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=description, unit=unit, file=stream)

    def update_to(self, n: int) -> None:
        self.bar.update(max(0, min(n, self.bar.total) - self.bar.n))

    def close(self) -> None:
        self.bar.close()


def console_progress(
    total: int, description: str, unit: str = "it", stream: IO[str] | None = None
) -> ConsoleProgress | None:
    """The console display of a count: a bar on a terminal, lines elsewhere, None when quiet.

    Args:
        total: units of work.
        description: what is counted.
        unit: one unit's name.
        stream: where it is written (default: stderr, looked up at the call).
    """
    if _quiet:
        return None
    stream = stream if stream is not None else sys.stderr
    try:
        interactive = stream.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream is not a terminal
        interactive = False
    if interactive:
        return _Bar(total, description, unit, stream)
    return ProgressLines(total, description, unit, stream)


class PolledProgress:
    """A console display of ``count()``, polled every ``interval`` s in a background thread.

    Used as a context manager around work that runs elsewhere (Prefect tasks, Dask workers);
    on exit the thread is joined and the display shows the final count.
    """

    def __init__(
        self,
        total: int,
        description: str,
        count: Callable[[], int],
        unit: str = "it",
        interval: float = 1.0,
    ) -> None:
        self.display = console_progress(total, description, unit)
        self.count = count
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="console-progress", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._update()

    def _update(self) -> None:
        try:
            done = self.count()
        except Exception:  # a storage hiccup only delays the display
            return
        if self.display is not None:
            self.display.update_to(done)

    def __enter__(self) -> PolledProgress:
        if self.display is not None:
            self._thread.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self.display is None:
            return
        self._stop.set()
        self._thread.join()
        if exc_type is None:  # after a failure the count would only delay the error line
            self._update()
        self.display.close()


class StepProgress:
    """Forwards ``progress(step, total)`` to a Prefect progress artifact in ~5% increments,
    and to the console (:func:`console_progress`) when :func:`enable_console_progress` is on."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.artifact: Progress | None = None
        self.display: Any = None
        self.reported = 0

    def __call__(self, step: int, total: int) -> None:
        if self.artifact is None:
            from flows.artifacts import Progress

            self.artifact = Progress(total, self.description)
            if _console_progress:
                self.display = console_progress(total, self.description, unit="step")
        if self.display is not None:
            self.display.update_to(step)
            if step == total:
                self.display.close()
                self.display = None
        if step == total or step - self.reported >= max(1, total // 20):
            self.artifact.advance(step - self.reported)
            self.reported = step
