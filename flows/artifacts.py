"""Prefect artifacts the flows publish: progress, tables, markdown summaries and images."""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)


def artifact_key(*parts: str) -> str:
    """An artifact key from free text: lowercase letters, digits and dashes only (Prefect's rule)."""
    text = "-".join(parts).lower()
    key = "".join(c if c.isalnum() and c.isascii() else "-" for c in text)
    while "--" in key:
        key = key.replace("--", "-")
    return key.strip("-")[:100]


class Progress:
    """A Prefect progress artifact updated as units of work finish."""

    def __init__(
        self,
        total: int,
        description: str,
        key: str | None = None,
        artifact_id: UUID | None = None,
    ) -> None:
        """Create the artifact (at 0%), or continue one created elsewhere (``artifact_id``)."""
        self.total = max(total, 1)
        self.done = 0
        self.id: UUID = artifact_id or create_progress_artifact(
            progress=0.0, key=key, description=description
        )

    def advance(self, n: int = 1) -> None:
        self.done += n
        update_progress_artifact(self.id, progress=100.0 * min(self.done, self.total) / self.total)


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 4)
    return value


def publish_table(rows: Sequence[Mapping[str, Any]], key: str, description: str) -> None:
    """A table artifact (NaN shown empty, floats rounded to 4 digits)."""
    clean = [{k: _cell(v) for k, v in row.items()} for row in rows]
    create_table_artifact(table=clean, key=artifact_key(key), description=description)


def publish_markdown(markdown: str, key: str, description: str) -> None:
    create_markdown_artifact(markdown=markdown, key=artifact_key(key), description=description)


def publish_png(png: bytes, key: str, description: str) -> None:
    """An image artifact carrying the PNG itself as a data URL (no extra hosting needed)."""
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    create_image_artifact(image_url=url, key=artifact_key(key), description=description)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A GitHub-flavoured markdown table of rows (the keys of the first row are the columns)."""
    if not rows:
        return "_(no rows)_"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            value = _cell(row.get(column))
            cells.append("" if value is None else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
