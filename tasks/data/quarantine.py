"""What a reader or an export skipped, converted and counted: the quarantine report."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuarantineEntry:
    """A skipped input: its key (or path), why, and at which stage (``read`` or ``export``)."""

    key: str
    reason: str
    stage: str

    @property
    def category(self) -> str:
        """The reason without its details (``"too large: 9000x9000"`` -> ``"too large"``)."""
        return self.reason.split(":", 1)[0]


@dataclass(frozen=True)
class ConversionEntry:
    """A kept input whose stored form differs from the original: ``source`` -> ``target``."""

    key: str
    source: str
    target: str


@dataclass
class QuarantineReport:
    """What a source or an export skipped, converted and counted.

    Counters used here: ``read`` (inputs looked at by a source), ``yielded`` (samples a source
    passed on), ``ignored`` (files without an image extension), ``renamed`` (keys changed to stay
    unique), ``received`` / ``written`` / ``skipped`` (samples given to an export, written by it,
    or passed over because their shard was already complete), ``bad_shards``.

    Every input of a source is either yielded or quarantined, and every sample an export receives
    is written, quarantined or skipped, so ``read == yielded + quarantined(read)`` and
    ``received == written + skipped + quarantined(export)``.
    """

    counts: Counter[str] = field(default_factory=Counter)
    quarantined: list[QuarantineEntry] = field(default_factory=list)
    converted: list[ConversionEntry] = field(default_factory=list)

    def count(self, what: str, n: int = 1) -> None:
        """Add ``n`` to counter ``what``."""
        self.counts[what] += n

    def quarantine(self, key: str, reason: str, *, stage: str) -> None:
        """Record a skipped input."""
        logger.warning("quarantined %s at %s: %s", key, stage, reason)
        self.quarantined.append(QuarantineEntry(key=key, reason=reason, stage=stage))

    def convert(self, key: str, source: str, target: str) -> None:
        """Record a kept input whose stored form was converted."""
        logger.info("converted %s from %s to %s", key, source, target)
        self.converted.append(ConversionEntry(key=key, source=source, target=target))

    def num_quarantined(self, stage: str | None = None) -> int:
        """Number of quarantined inputs, at one stage or in all."""
        return sum(1 for entry in self.quarantined if stage is None or entry.stage == stage)

    def reasons(self) -> dict[str, int]:
        """Quarantined inputs per reason category, e.g. ``{"not an image": 2}``."""
        return dict(sorted(Counter(entry.category for entry in self.quarantined).items()))

    def merge(self, other: QuarantineReport) -> None:
        """Add another report's counts and entries to this one."""
        self.counts.update(other.counts)
        self.quarantined.extend(other.quarantined)
        self.converted.extend(other.converted)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary with every entry."""
        return {
            "counts": dict(sorted(self.counts.items())),
            "num_quarantined": len(self.quarantined),
            "num_converted": len(self.converted),
            "reasons": self.reasons(),
            "quarantined": [asdict(entry) for entry in self.quarantined],
            "converted": [asdict(entry) for entry in self.converted],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuarantineReport:
        """Rebuild a report from :meth:`to_dict` output."""
        return cls(
            counts=Counter({k: int(v) for k, v in data.get("counts", {}).items()}),
            quarantined=[QuarantineEntry(**entry) for entry in data.get("quarantined", [])],
            converted=[ConversionEntry(**entry) for entry in data.get("converted", [])],
        )
