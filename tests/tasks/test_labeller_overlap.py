"""The overlapped labeller: same results as batch-by-batch, steps concurrent, nothing left over.

Overlap is asserted by the order of events, never by timing: a model that will not finish
batch i's forwards until batch i+1's coalitions have been drawn (or batch i-1 solved) can only
finish if those steps run concurrently with it; run one after the other, it would wait forever
(a generous timeout turns that into a failure instead of a hang).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tasks.algorithms.kernel_shap_stream as stream_module
from tasks.algorithms.kernel_shap import kernel_shap_explain
from tasks.algorithms.kernel_shap_stream import ExplainRequest, kernel_shap_stream
from tasks.data.prefetch import THREAD_PREFIX

SIZE = 14
#: How long a step waits for one it should overlap with before the test calls it a failure.
DEADLOCK_SECONDS = 60


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.LazyLinear(16), nn.GELU()
    )
    net = nn.Sequential(net, nn.Linear(16, 4))
    net(torch.zeros(1, 3, SIZE, SIZE))
    return net.eval()


class CellTokens(nn.Module):
    """A token-maskable model: mean colour of each cell as its token, then a nonlinear head."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_grid = (7, 7)
        torch.manual_seed(1)
        self.head = nn.Sequential(nn.Linear(3 * 49, 8), nn.Tanh(), nn.Linear(8, 4))

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images, self.patch_grid).flatten(2).transpose(1, 2)

    def forward_from_patches(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(tokens.flatten(1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_from_patches(self.embed_patches(images))


def _batches(count: int, images: int = 3, k: int = 2) -> list[ExplainRequest]:
    generator = torch.Generator().manual_seed(7)
    return [
        ExplainRequest(
            images=torch.rand(images, 3, SIZE, SIZE, generator=generator),
            classes=torch.randint(0, 4, (images, k), generator=generator),
            seeds=[100 * b + i for i in range(images)],
            context=f"batch-{b}",
        )
        for b in range(count)
    ]


def _assert_same(result, expected) -> None:
    for field in ("phi", "v_empty", "v_full", "classes", "evaluations", "phi_err"):
        got, want = getattr(result, field), getattr(expected, field)
        assert (got is None) == (want is None), field
        if got is not None:
            assert torch.equal(got, want), field
    for field in ("seeds", "budget", "grid", "baseline", "output", "masking", "sampler"):
        assert getattr(result, field) == getattr(expected, field), field


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize(
    ("model_kind", "settings"),
    [
        ("pixels", {"budget": 60}),
        ("pixels", {"budget": 60, "sampler": "kernel", "baseline": "blur"}),
        ("tokens", {"budget": 80, "error_estimate": True, "output": "prob"}),
    ],
)
def test_the_stream_gives_each_batch_the_results_of_kernel_shap_explain(
    overlap, model_kind, settings
):
    model = _net() if model_kind == "pixels" else CellTokens().eval()
    requests = _batches(5)
    settings = {"batch_size": 50, **settings}  # several model calls per batch
    with kernel_shap_stream(model, iter(requests), overlap=overlap, **settings) as stream:
        results = list(stream)
    assert [request.context for request, _ in results] == [r.context for r in requests]
    for (_, result), request in zip(results, requests, strict=True):
        expected = kernel_shap_explain(
            model, request.images, request.classes, seed=request.seeds, **settings
        )
        _assert_same(result, expected)
    stats = stream.stats
    assert (stats.batches, stats.images) == (5, 15)
    assert stats.rows == sum(int(r.evaluations.sum()) for _, r in results)
    assert _prefetch_threads() == []


class _Recorder:
    """Thread-safe log of (event, batch) and an event per entry, to wait on."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.log: list[tuple[str, int]] = []
        self.events: dict[tuple[str, int], threading.Event] = {}
        self.threads: dict[str, set[str]] = {}

    def event(self, name: str, batch: int) -> threading.Event:
        with self.lock:
            return self.events.setdefault((name, batch), threading.Event())

    def record(self, name: str, batch: int) -> None:
        with self.lock:
            self.log.append((name, batch))
            self.threads.setdefault(name.split()[0], set()).add(threading.current_thread().name)
        self.event(name, batch).set()


class _WaitingModel(nn.Module):
    """A stand-in for a GPU model: batch i's forward ends only once ``until(i)`` has happened."""

    def __init__(self, recorder: _Recorder, until=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4))
        self.recorder = recorder
        self.until = until
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch = self.calls  # one model call per batch (batch_size covers its rows)
        self.calls += 1
        self.recorder.record("forward start", batch)
        if self.until is not None and (awaited := self.until(batch)) is not None:
            waited = awaited.wait(DEADLOCK_SECONDS)
            self.recorder.record(f"forward {'waited' if waited else 'gave up'}", batch)
        self.recorder.record("forward end", batch)
        return images.mean(dim=(2, 3)) @ self.weight


def _instrument(monkeypatch: pytest.MonkeyPatch, recorder: _Recorder, until=None) -> None:
    """Log the start and end of each batch's sampling and solve (the batch: seed // 100).

    ``until(step, batch)`` may name an event that the step waits for before it starts.
    """
    plan, solve = stream_module.plan_coalitions, stream_module.solve_coalitions

    def wait(step: str, batch: int) -> None:
        if until is not None and (awaited := until(step, batch)) is not None:
            waited = awaited.wait(DEADLOCK_SECONDS)
            recorder.record(f"{step} {'waited' if waited else 'gave up'}", batch)

    def planned(config, seeds, **kwargs):
        batch = seeds[0] // 100
        wait("sample", batch)
        recorder.record("sample start", batch)
        out = plan(config, seeds, **kwargs)
        recorder.record("sample end", batch)
        return out

    def solved(config, evaluated):
        batch = evaluated.plan.seeds[0] // 100
        wait("solve", batch)
        recorder.record("solve start", batch)
        out = solve(config, evaluated)
        recorder.record("solve end", batch)
        return out

    monkeypatch.setattr(stream_module, "plan_coalitions", planned)
    monkeypatch.setattr(stream_module, "solve_coalitions", solved)


def test_next_coalitions_and_previous_solve_run_while_the_model_works(monkeypatch):
    # Batch 1's sampling starts only once batch 0's forward has started, and that forward ends
    # only once batch 1's sampling has ended: both can finish only if they overlap. Likewise
    # batch 1's solve and batch 2's forward.
    recorder = _Recorder()
    awaited = {
        ("sample", 1): ("forward start", 0),
        ("forward", 0): ("sample end", 1),
        ("solve", 1): ("forward start", 2),
        ("forward", 2): ("solve end", 1),
    }

    def until(step: str, batch: int) -> threading.Event | None:
        name = awaited.get((step, batch))
        return None if name is None else recorder.event(*name)

    _instrument(monkeypatch, recorder, until)
    model = _WaitingModel(recorder, lambda batch: until("forward", batch)).eval()
    with kernel_shap_stream(model, iter(_batches(4)), budget=40, batch_size=1000) as stream:
        results = list(stream)
    assert len(results) == 4
    log = recorder.log
    assert not [entry for entry in log if entry[0].endswith("gave up")], log
    for step, batch in awaited:
        assert (f"{step} waited", batch) in log
    assert log.index(("forward start", 0)) < log.index(("sample end", 1))
    assert log.index(("sample end", 1)) < log.index(("forward end", 0))
    assert log.index(("forward start", 2)) < log.index(("solve end", 1))
    assert log.index(("solve end", 1)) < log.index(("forward end", 2))
    # each step on its own thread, none of them the consumer's
    consumer = threading.current_thread().name
    assert all(consumer not in names for names in recorder.threads.values())
    assert recorder.threads["sample"].isdisjoint(recorder.threads["forward"])
    assert recorder.threads["solve"].isdisjoint(recorder.threads["forward"])
    assert _prefetch_threads() == []


def test_without_overlap_the_steps_run_one_after_the_other_in_the_consumers_thread(monkeypatch):
    recorder = _Recorder()
    _instrument(monkeypatch, recorder)
    model = _WaitingModel(recorder).eval()
    with kernel_shap_stream(
        model, iter(_batches(3)), budget=40, batch_size=1000, overlap=False
    ) as stream:
        assert len(list(stream)) == 3
    expected = [
        (name, batch)
        for batch in range(3)
        for name in (
            "sample start",
            "sample end",
            "forward start",
            "forward end",
            "solve start",
            "solve end",
        )
    ]
    assert recorder.log == expected
    assert set().union(*recorder.threads.values()) == {threading.current_thread().name}
    stats = stream.stats
    assert stats.batches == 3
    assert 0 < stats.forward_seconds <= stats.wall_seconds
    assert stats.model_wait_share == pytest.approx(1 - stats.forward_seconds / stats.wall_seconds)
    assert stats.sample_wait_seconds == stats.handoff_wait_seconds == 0.0


class _FailingModel(nn.Module):
    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4))
        self.fail_at = fail_at
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at + 1:
            raise RuntimeError("device lost")
        return images.mean(dim=(2, 3)) @ self.weight


def _tracked(requests: list[ExplainRequest], state: dict[str, bool]) -> Iterator[ExplainRequest]:
    try:
        yield from requests
    finally:
        state["closed"] = True


@pytest.mark.parametrize("overlap", [True, False])
def test_a_model_failure_is_raised_at_its_batch_and_leaves_no_thread(overlap):
    state = {"closed": False}
    stream = kernel_shap_stream(
        _FailingModel(fail_at=2).eval(),
        _tracked(_batches(6), state),
        budget=40,
        batch_size=1000,
        overlap=overlap,
    )
    contexts = []
    with pytest.raises(RuntimeError, match="device lost"), stream:
        for request, _ in stream:
            contexts.append(request.context)
    assert contexts == ["batch-0", "batch-1"]
    assert state["closed"]
    assert _prefetch_threads() == []


def test_a_failing_request_source_is_raised_after_the_batches_before_it():
    def requests() -> Iterator[ExplainRequest]:
        yield from _batches(2)
        raise OSError("input shard unreadable")

    contexts = []
    with (
        pytest.raises(OSError, match="unreadable"),
        kernel_shap_stream(_net(), requests(), budget=40) as stream,
    ):
        for request, _ in stream:
            contexts.append(request.context)
    assert contexts == ["batch-0", "batch-1"]
    assert _prefetch_threads() == []


def test_closing_early_stops_every_step_and_closes_the_requests():
    state = {"closed": False}
    pulled = []

    def requests() -> Iterator[ExplainRequest]:
        for request in _tracked(_batches(50), state):
            pulled.append(request.context)
            yield request

    stream = kernel_shap_stream(_net(), requests(), budget=40, depth=2)
    first, _ = next(stream)
    assert first.context == "batch-0"
    stream.close()
    assert state["closed"]
    assert _prefetch_threads() == []
    assert len(pulled) < 50  # bounded: it did not run through the whole source
    assert stream.stats.wall_seconds > 0


def test_settings_are_checked_before_any_thread_and_requests_when_their_turn_comes():
    with pytest.raises(ValueError, match="sampler"):
        kernel_shap_stream(_net(), iter(_batches(1)), sampler="uniform")
    with pytest.raises(ValueError, match="depth"):
        kernel_shap_stream(_net(), iter(_batches(1)), depth=0)
    assert _prefetch_threads() == []
    bad = ExplainRequest(torch.rand(2, 3, SIZE, SIZE), torch.tensor([0, 1, 2]), [1, 2])
    with pytest.raises(ValueError, match="classes"), kernel_shap_stream(_net(), iter([bad])) as s:
        list(s)
    with (
        pytest.raises(TypeError, match="ExplainRequest"),
        kernel_shap_stream(_net(), iter([("not", "a", "request")])) as s,
    ):
        list(s)
    assert _prefetch_threads() == []
