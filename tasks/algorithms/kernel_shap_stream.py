"""Kernel SHAP over a stream of batches, with sampling, model and solve overlapped.

Explaining a batch takes three steps of different kinds (:mod:`tasks.algorithms.kernel_shap`):
drawing the coalitions (:func:`plan_coalitions`: CPU, numpy), the forward passes
(:func:`evaluate_coalitions`: the model's device) and the float64 regressions
(:func:`solve_coalitions`: CPU, ``torch.linalg``). One after the other, the model idles while
the other two run. :func:`kernel_shap_stream` runs them as a pipeline over a stream of batches:

```
requests ──► model thread: evaluate batch i ──► solver thread: solve batch i-1 ──► consumer
                 ▲ (pulls the requests)
   sampler thread: coalitions of batch i+1
```

- While batch ``i``'s forwards run, batch ``i + 1``'s coalitions are drawn
  (:func:`tasks.data.prefetch.map_ahead`, one thread) and batch ``i - 1`` is solved
  (:class:`tasks.data.prefetch.RunAhead`, one thread), and the consumer handles what is
  before (writing it, say) from a bounded queue. The values reach the host by one non-blocking
  copy per batch into pinned memory (on CUDA); only the solver waits for it, never the model.
- The requests are consumed in the model thread, a batch or two ahead, so whatever prepares a
  request (reading it, moving it to the device, a classifier forward to choose the classes) is
  the model thread's own work and never races with the forwards.
- Results are those of :func:`kernel_shap_explain` on each batch, bit for bit: the same three
  steps run on the same data; only where and when they run differs.
- Every step is bounded (``depth`` batches), and closing the stream (or an error on any side)
  stops every thread and joins it: nothing is left running.

``overlap=False`` runs the three steps inline in the consumer's thread, batch after batch (the
schedule the labeller had before), for comparisons. Either way :attr:`KernelShapStream.stats`
says where the time went (:class:`LabellerStats`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from tasks.algorithms.kernel_shap import (
    DEFAULT_BATCH_ROWS,
    CoalitionPlan,
    CoalitionValues,
    KernelShapConfig,
    KernelShapResult,
    _seeds,
    check_batch,
    evaluate_coalitions,
    model_device,
    plan_coalitions,
    solve_coalitions,
)
from tasks.data.prefetch import RunAhead, map_ahead

#: Batches each step may run ahead of the next.
DEFAULT_DEPTH = 2


@dataclass(frozen=True)
class ExplainRequest:
    """One batch to explain.

    Attributes:
        images: ``[N, 3, H, W]`` model inputs (on the model's device, or pinned for it).
        classes: ``[N]`` or ``[N, k]`` classes to explain (on any device).
        seeds: one seed per image (sequence or tensor), or one for all.
        context: anything; handed back with the result, unchanged (the input samples, say).
    """

    images: Tensor
    classes: Tensor
    seeds: int | Sequence[int] | Tensor
    context: Any = None


@dataclass
class LabellerStats:
    """Where a stream's time went. Each field is written by one thread only.

    Attributes:
        batches: batches explained.
        images: images explained.
        rows: forward rows (model evaluations).
        forward_seconds: the model busy with the forwards: device time between CUDA events on a
            GPU, the evaluation's time in its thread on the CPU.
        forward_host_seconds: the evaluations' time in the model thread (on a GPU: queueing).
        request_seconds: the model thread pulling the next request (the caller's preparation
            of a batch, input waits included).
        sample_seconds: drawing coalitions (sampler thread, or inline).
        sample_wait_seconds: the model thread waiting for a batch's coalitions.
        handoff_wait_seconds: the model thread blocked handing values over (the solver or
            the consumer behind).
        copy_wait_seconds: the solver waiting for the values' device-to-host copy.
        solve_seconds: placing the values and solving the regressions.
        wall_seconds: from the stream's start to its end (its last result, or closing it).
    """

    batches: int = 0
    images: int = 0
    rows: int = 0
    forward_seconds: float = 0.0
    forward_host_seconds: float = 0.0
    request_seconds: float = 0.0
    sample_seconds: float = 0.0
    sample_wait_seconds: float = 0.0
    handoff_wait_seconds: float = 0.0
    copy_wait_seconds: float = 0.0
    solve_seconds: float = 0.0
    wall_seconds: float = 0.0

    @property
    def model_wait_seconds(self) -> float:
        """Wall time in which the model did not run a forward: it waited for something else."""
        return max(0.0, self.wall_seconds - self.forward_seconds)

    @property
    def model_wait_share(self) -> float:
        """:attr:`model_wait_seconds` over :attr:`wall_seconds` (0 before any time passed)."""
        return self.model_wait_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        """The fields and the derived wait figures, JSON-able."""
        out: dict[str, float] = asdict(self)
        out["model_wait_seconds"] = self.model_wait_seconds
        out["model_wait_share"] = self.model_wait_share
        return out


class KernelShapStream:
    """An iterator of ``(request, KernelShapResult)`` in request order; see the module doc.

    Use it as a context manager (or call :meth:`close`): leaving it stops and joins its
    threads and closes the requests iterator, also when the consumer stops early or fails.
    An error of any step is raised by the consumer's ``next`` at its batch, after the
    results before it.

    Attributes:
        config: the labelling settings.
        stats: where the time went so far (complete once the stream has ended or is closed).
    """

    def __init__(
        self,
        model: Callable[[Tensor], Tensor],
        requests: Iterable[ExplainRequest],
        config: KernelShapConfig,
        *,
        overlap: bool = True,
        depth: int = DEFAULT_DEPTH,
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.config = config
        self.stats = LabellerStats()
        self._model = model
        self._requests = iter(requests)
        self._device = model_device(model, torch.device("cpu"))
        self._depth = depth
        self._ended = False
        self._started = time.perf_counter()
        self._results: Iterator[tuple[ExplainRequest, KernelShapResult]]
        if overlap:
            self._results = RunAhead(self._solved, depth=depth, name="kernel-shap-solve")
        else:
            self._results = self._inline()

    def __iter__(self) -> KernelShapStream:
        return self

    def __next__(self) -> tuple[ExplainRequest, KernelShapResult]:
        try:
            return next(self._results)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop every step, join its threads, close the requests; the stats are then final."""
        close = getattr(self._results, "close", None)
        if close is not None:
            close()
        self._close_requests()
        if not self._ended:
            self._ended = True
            self.stats.wall_seconds = time.perf_counter() - self._started

    def __enter__(self) -> KernelShapStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _close_requests(self) -> None:
        close = getattr(self._requests, "close", None)
        if close is not None:
            close()

    def _next_request(self) -> Iterator[ExplainRequest]:
        """The requests, with the time spent getting each one counted."""
        while True:
            asked = time.perf_counter()
            try:
                request = next(self._requests)
            except StopIteration:
                return
            finally:
                self.stats.request_seconds += time.perf_counter() - asked
            if not isinstance(request, ExplainRequest):
                raise TypeError(f"requests must be ExplainRequest, got {type(request).__name__}")
            yield request

    def _plan(self, request: ExplainRequest) -> tuple[ExplainRequest, CoalitionPlan]:
        started = time.perf_counter()
        check_batch(request.images, request.classes)
        seeds = _seeds(request.seeds, request.images.shape[0])
        plan = plan_coalitions(self.config, seeds, pin_memory=self._device.type == "cuda")
        self.stats.sample_seconds += time.perf_counter() - started
        return request, plan

    def _evaluate(self, request: ExplainRequest, plan: CoalitionPlan) -> CoalitionValues:
        evaluated = evaluate_coalitions(
            self._model, self.config, plan, request.images, request.classes
        )
        self.stats.forward_host_seconds += evaluated.host_seconds
        return evaluated

    def _solve(self, evaluated: CoalitionValues) -> KernelShapResult:
        asked = time.perf_counter()
        evaluated.wait()
        started = time.perf_counter()
        self.stats.copy_wait_seconds += started - asked
        device_seconds = evaluated.device_seconds
        self.stats.forward_seconds += (
            evaluated.host_seconds if device_seconds is None else device_seconds
        )
        result = solve_coalitions(self.config, evaluated)
        self.stats.solve_seconds += time.perf_counter() - started
        self.stats.batches += 1
        self.stats.images += len(evaluated.plan.seeds)
        self.stats.rows += len(evaluated.plan.row_masks)
        return result

    def _inline(self) -> Iterator[tuple[ExplainRequest, KernelShapResult]]:
        for request in self._next_request():
            request, plan = self._plan(request)
            yield request, self._solve(self._evaluate(request, plan))

    def _forwarded(self) -> Iterator[tuple[ExplainRequest, CoalitionValues]]:
        """The model thread: pull requests, evaluate them as their coalitions arrive."""
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)  # the current device is per thread
        requests = self._next_request()
        planned = map_ahead(self._plan, requests, ahead=self._depth, name="kernel-shap-sample")
        try:
            while True:
                asked = time.perf_counter()
                pulled = self.stats.request_seconds
                item = next(planned, None)
                waited = time.perf_counter() - asked - (self.stats.request_seconds - pulled)
                self.stats.sample_wait_seconds += max(0.0, waited)
                if item is None:
                    return
                request, plan = item
                evaluated = self._evaluate(request, plan)
                handed = time.perf_counter()
                yield request, evaluated
                self.stats.handoff_wait_seconds += time.perf_counter() - handed
        finally:
            planned.close()
            requests.close()
            self._close_requests()

    def _solved(self) -> Iterator[tuple[ExplainRequest, KernelShapResult]]:
        """The solver thread: solve each evaluated batch while the model runs the next."""
        with RunAhead(self._forwarded, depth=self._depth, name="kernel-shap-model") as forwarded:
            for request, evaluated in forwarded:
                yield request, self._solve(evaluated)


def kernel_shap_stream(
    model: Callable[[Tensor], Tensor],
    requests: Iterable[ExplainRequest],
    *,
    grid: tuple[int, int] = (7, 7),
    budget: int = 150,
    baseline: str | Tensor = "mean",
    output: str = "logit",
    batch_size: int | None = None,
    masking: str = "auto",
    sampler: str = "leverage",
    error_estimate: bool = False,
    precision: str = "auto",
    shrinkage: float | None = None,
    front_load: bool = False,
    overlap: bool = True,
    depth: int = DEFAULT_DEPTH,
) -> KernelShapStream:
    """Explain a stream of batches, each as :func:`kernel_shap_explain` would, overlapped.

    The settings are checked here, before any thread starts; a request's shapes are checked
    when its turn comes. With ``overlap`` the requests iterator is consumed in the model thread
    (see the module doc); it is closed when the stream ends.

    Args:
        model: see :func:`kernel_shap_explain`.
        requests: the batches, as :class:`ExplainRequest`.
        grid, budget, baseline, output, batch_size, masking, sampler, error_estimate,
            precision, shrinkage, front_load: as for :func:`kernel_shap_explain` (a ``"mean"`` baseline is each
            batch's own mean).
        overlap: run sampling, model and solve on their own threads, overlapped (``False``:
            one after the other in the consumer's thread).
        depth: batches each step may run ahead of the next (memory: a few batches).

    Returns:
        A :class:`KernelShapStream` of ``(request, result)`` in request order.
    """
    config = KernelShapConfig(
        grid=grid,
        budget=budget,
        baseline=baseline,
        output=output,
        batch_size=batch_size or DEFAULT_BATCH_ROWS,
        masking=masking,
        sampler=sampler,
        error_estimate=error_estimate,
        precision=precision,
        shrinkage=shrinkage,
        front_load=front_load,
    )
    return KernelShapStream(model, requests, config, overlap=overlap, depth=depth)
