"""Prefect flows run against a real temporary Prefect API, started once per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """A temporary Prefect server (SQLite) for every flow test of the session (~20 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(autouse=True)
def _use_prefect_api(prefect_api: None) -> None:
    """Every test in tests/flows runs its flows on that API."""
