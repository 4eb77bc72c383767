"""Assets and events of the flows, on the session's Prefect API (tests/flows/conftest.py).

The lineage of a whole pipeline run is checked in tests/e2e/test_lineage.py; here the pieces:
asset keys from storage URIs, a stage task turned materialising at call time (its options kept,
its upstream assets and metadata in the event the API records), the published-checkpoint
event, and which X-datasets a new model or labelling config supersedes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.assets import (
    asset_key,
    materializing,
    read_lineage,
    stage_asset,
    upstream_assets,
)


def _wait_for(read: Any, ready: Any, timeout: float = 60.0) -> Any:
    """Poll ``read()`` until ``ready(value)``: events reach the API a moment after they happen."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if ready(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


@pytest.mark.slow
def test_asset_keys_are_uris_of_the_storage_locations(tmp_path: Path, monkeypatch) -> None:
    assert asset_key("s3://bucket/run/xdata/shapes-x/v-1") == "s3://bucket/run/xdata/shapes-x/v-1"
    assert asset_key(str(tmp_path / "models")) == f"file://{tmp_path}/models"
    assert asset_key(f"file://{tmp_path}/a") == f"file://{tmp_path}/a"
    monkeypatch.chdir(tmp_path)
    assert asset_key("data/shapes") == f"file://{tmp_path}/data/shapes"  # made absolute
    # Prefect refuses spaces and '%' in keys: such an output is written without lineage.
    assert stage_asset(str(tmp_path / "with space"), "domain", "d") is None
    assert stage_asset(str(tmp_path / "ok"), "domain", "d").key == f"file://{tmp_path}/ok"
    with pytest.raises(ValueError, match="kind"):
        stage_asset(str(tmp_path), "table", "t")
    # Names of generators and missing inputs are not assets; duplicates are one.
    keys = [a.key for a in upstream_assets(["shapes", None, "s3://b/k", "s3://b/k"])]
    assert keys == ["s3://b/k"]


@task(name="write-output", task_run_name="write-{name}", retries=2, cache_policy=NO_CACHE)
def write_output(path: str, name: str) -> dict[str, Any]:
    Path(path).write_text(name)
    return {"bytes": len(name), "fingerprint": "f" * 16}


def test_a_materializing_stage_task_keeps_its_options_and_records_lineage(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    inputs = [str(tmp_path / "in"), "s3://bucket/base/model.safetensors"]
    asset = stage_asset(str(out), "vector", "tau_X test")
    made = materializing(write_output, asset, upstream_assets(inputs), dict)
    assert made.name == "write-output" and made.retries == 2
    assert made.task_run_name == "write-{name}"

    @flow
    def run() -> dict[str, Any]:
        return made(str(out), "hello")

    assert run() == {"bytes": 5, "fingerprint": "f" * 16}
    assert out.read_text() == "hello"
    records = _wait_for(lambda: read_lineage(asset.key), lambda r: asset.key in r)
    record = records[asset.key]
    assert record.kind == "vector" and record.name == "tau_X test"
    assert set(record.upstream) == {f"file://{tmp_path}/in", "s3://bucket/base/model.safetensors"}
    assert record.metadata == {"bytes": 5, "fingerprint": "f" * 16}
    assert record.flow_run_id is not None


def _tiny_checkpoint(folder: Path, domain: str, mode: str, noise: float) -> str:
    """The shipped base's weights (plus ``noise`` on one tensor) saved as a fine-tuned model."""
    import torch

    from storage import open_storage
    from storage.checkpoints import load_sidecar, load_state_dict, save_state_dict
    from tasks.pretrain import SHIPPED_BASE_FILE

    base = open_storage(SHIPPED_BASE_FILE.parent)
    state = load_state_dict(base, SHIPPED_BASE_FILE.name)
    if noise:
        name = next(k for k, v in state.items() if v.is_floating_point())
        state[name] = state[name] + noise * torch.ones_like(state[name])
    sidecar = load_sidecar(base, SHIPPED_BASE_FILE.name)
    sidecar.pop("state_fingerprint", None)
    sidecar.update(kind="finetuned", domain=domain, mode=mode)
    save_state_dict(open_storage(folder), "model.safetensors", state, metadata=sidecar)
    return str(folder / "model.safetensors")


def _build_in_process(config: Any) -> dict[str, Any]:
    """A build without Prefect (the stage functions the flow's tasks call)."""
    from tasks.build_dataset import finalize_build, plan_build
    from tasks.build_dataset.stage import label_task

    plan = plan_build(config)
    for index in range(plan.num_tasks):
        list(label_task(plan, index))
    return finalize_build(plan)


def test_publishing_a_model_emits_its_event_and_supersedes_its_slots_datasets(
    tmp_path: Path,
) -> None:
    from flows.build_dataset import plan_regeneration
    from flows.events import CHECKPOINT_PUBLISHED, publish_labelling_config, publish_model
    from tasks.build_dataset import BuildConfig, LabelConfig

    root = tmp_path / "root"
    old = _tiny_checkpoint(tmp_path / "old", "shapes", "P", 0.0)
    published_old = publish_model(old, str(root), "shapes", "P", emit=False)
    label = LabelConfig(grid_h=3, grid_w=3, budget=20, images_per_batch=8)
    common = dict(
        split="val",
        input_kind="synthetic",
        input_uri="shapes",
        synthetic_per_class=1,
        num_shards=1,
        output_uri=str(root / "xdata"),
        label=label,
    )
    built = _build_in_process(
        BuildConfig(name="shapes-x", checkpoint=published_old["uri"], **common)
    )
    _build_in_process(BuildConfig(name="by-base", checkpoint=None, **common))
    assert plan_regeneration(str(root), checkpoint=published_old["uri"]) == []  # its own

    since = time.time()
    new = _tiny_checkpoint(tmp_path / "new", "shapes", "P", 1e-3)
    published = publish_model(new, str(root), "shapes", "P")
    assert published["copied"] and published["fingerprint"] != published_old["fingerprint"]
    assert published["uri"].startswith(str(root / "models" / "shapes-P-"))
    assert published["event_id"] is not None
    # Only the dataset a shapes/P model labelled is relabelled, by the new model.
    [rebuild] = plan_regeneration(str(root), checkpoint=published["uri"])
    assert (rebuild.name, rebuild.checkpoint) == ("shapes-x", published["uri"])
    assert rebuild.label == label and rebuild.output_uri == str(root / "xdata")
    with pytest.raises(ValueError, match="sidecar"):
        plan_regeneration(str(root), checkpoint=str(tmp_path / "none" / "model.safetensors"))
    # A republished copy is found in place, and refused for another slot.
    assert publish_model(new, str(root), "shapes", "P", emit=False)["copied"] is False
    with pytest.raises(ValueError, match="domain"):
        publish_model(new, str(root), "glyphs", "P", emit=False)

    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter

    def events() -> list[Any]:
        with get_client(sync_client=True) as client:
            query = EventFilter(event=EventNameFilter(name=[CHECKPOINT_PUBLISHED]))
            return [
                e
                for e in client.read_events(filter=query, limit=50).events
                if str(e.id) == published["event_id"]
            ]

    [event] = _wait_for(events, bool)
    assert event.occurred.timestamp() >= since - 1
    assert event.resource.id == asset_key(published["uri"])
    assert event.payload == {
        "uri": published["uri"],
        "root": str(root),
        "fingerprint": published["fingerprint"],
        "domain": "shapes",
        "mode": "P",
        "published_by": "publish_model",
    }

    # New labelling settings relabel the named dataset's latest version, whatever its model.
    settings = publish_labelling_config(
        label.model_copy(update={"budget": 30}), str(root), "by-base"
    )
    [relabel] = plan_regeneration(str(root), label_config=settings["uri"], dataset="by-base")
    assert relabel.name == "by-base" and relabel.label.budget == 30
    assert built["samples"] > 0
