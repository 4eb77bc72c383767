"""The transfer-sweep flow on a real Prefect API: per-target tasks, outputs and artifacts."""

from __future__ import annotations

import base64
import importlib.util
from pathlib import Path

import pytest
from prefect.artifacts import Artifact

from flows.artifacts import artifact_key
from flows.sweep import transfer_sweep
from storage import open_storage

# The miniature (two targets, their references, a vector) is built by the task tests' helper.
_spec = importlib.util.spec_from_file_location(
    "sweep_world", Path(__file__).parents[1] / "tasks" / "test_sweep.py"
)
_world = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_world)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _world.build_world(tmp_path_factory.mktemp("sweep-flow-world"))


def _png_of(artifact: Artifact) -> bytes:
    prefix = "data:image/png;base64,"
    assert artifact.data.startswith(prefix)
    return base64.b64decode(artifact.data[len(prefix) :])


@pytest.mark.slow
def test_flow_runs_one_task_per_target_and_publishes_artifacts(world) -> None:
    config = _world.sweep_config(world, name="flow-mini", kernel_shap_budgets=(25,))
    result = transfer_sweep(config)
    assert set(result["chosen"]) == set(_world.DOMAINS) and not result["skipped"]
    assert result["rows"] == 2 * (2 * 2 + 1)
    out = open_storage(world["root"]).child("sweeps/flow-mini")
    assert result["table_uri"] == out.url("results.parquet")
    assert out.read_parquet("results.parquet").num_rows == result["rows"]
    for domain in _world.DOMAINS:
        assert out.is_complete(f"target-{domain}") and out.exists(f"targets/{domain}.parquet")

    table = Artifact.get(artifact_key("sweep", "flow-mini", "table"))
    assert table is not None and table.type == "table"
    assert "kernel_shap" in str(table.data) and "chosen" in str(table.data)
    summary = Artifact.get(artifact_key("sweep", "flow-mini", "summary"))
    assert summary is not None and summary.type == "markdown"
    for domain in _world.DOMAINS:
        assert f"| {domain} |" in summary.data
    assert (
        "SEM (1 inference) vs Kernel SHAP" in summary.data and result["table_uri"] in summary.data
    )
    plot = Artifact.get(artifact_key("sweep", "flow-mini", "plot"))
    assert _png_of(plot) == out.read_bytes("sweep.png")
    for domain in _world.DOMAINS:
        heatmaps = Artifact.get(artifact_key("sweep", "flow-mini", "heatmaps", domain))
        assert _png_of(heatmaps) == out.read_bytes(f"heatmaps-{domain}.png")

    # A rerun reads the complete sweep back and changes nothing.
    before = out.read_bytes("results.parquet")
    again = transfer_sweep(config)
    assert again["skipped"] and again["chosen"] == result["chosen"]
    assert out.read_bytes("results.parquet") == before


def test_flow_refuses_a_mismatched_vector_before_evaluating(world, tmp_path) -> None:
    vector = world["vector_object"]
    meta = _world.VectorMeta.from_dict({**vector.meta.to_dict(), "base_fingerprint": "f" * 16})
    store = open_storage(str(tmp_path))
    _world.ExplainabilityVector(vector.deltas, meta).save(store, "tau.safetensors")
    config = _world.sweep_config(world, name="flow-refused", vector=store.url("tau.safetensors"))
    with pytest.raises(ValueError, match="built on base"):
        transfer_sweep(config)
    assert not open_storage(world["root"]).list("sweeps/flow-refused")
