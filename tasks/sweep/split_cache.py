"""A split's decoded batches kept between a sweep's passes over it (one pass per lambda).

Shared by the Kernel SHAP reference (:class:`tasks.sweep.inputs.EvalData`) and the accuracy data
(:class:`tasks.sweep.accuracy.AccuracyData`); it imports neither, so both can import it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from tasks.data.stream import Batch


def cached_batches(
    cache: dict[int, list[Batch]],
    size: int,
    loader: Callable[[], Iterable[Batch]],
    *,
    keep: bool,
) -> Iterator[Batch]:
    """A split's batches of ``size``: from ``cache`` when kept, else streamed from ``loader()``
    and, when ``keep`` (a small split), kept in ``cache`` for the sweep's next pass.

    A pass that stops early keeps nothing, so a later pass never reads a truncated split.
    """
    if size in cache:
        yield from cache[size]
        return
    if not keep:
        yield from loader()
        return
    kept = []
    for batch in loader():
        kept.append(batch)
        yield batch
    cache[size] = kept
