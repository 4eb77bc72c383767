"""Training progress shown as Prefect progress artifacts and, on the command line, tqdm bars."""

from __future__ import annotations

from typing import Any

from flows.artifacts import Progress

_console_progress = False


def enable_console_progress(enabled: bool = True) -> None:
    """Also show training progress as tqdm bars (the command line turns this on)."""
    global _console_progress
    _console_progress = enabled


class StepProgress:
    """Forwards ``progress(step, total)`` to a Prefect progress artifact in ~5% increments,
    and to a tqdm bar on the terminal when :func:`enable_console_progress` is on."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.artifact: Progress | None = None
        self.bar: Any = None
        self.reported = 0

    def __call__(self, step: int, total: int) -> None:
        if self.artifact is None:
            self.artifact = Progress(total, self.description)
            if _console_progress:
                import sys

                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=self.description, unit="step", file=sys.stderr)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if step == total:
                self.bar.close()
        if step == total or step - self.reported >= max(1, total // 20):
            self.artifact.advance(step - self.reported)
            self.reported = step
