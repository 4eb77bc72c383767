"""Event-driven regeneration on the served stack: publish a theta, a build starts, a version lands.

The stack (tests/e2e/conftest.py) serves ``regenerate-on-publish`` with the triggers of
``deployments/prefect.yaml``. The test labels a small X-dataset with one model (in this
process, no Prefect), publishes a second model of the same domain and mode with the real
command (``python -m flows.models_cli publish-model``, ``PREFECT_API_URL`` set to the stack)
and waits: the server's trigger must create a run of the deployment (created by the
automation, not by this test), the served process must run it, and a new version labelled by
the new model must appear beside the old one. About 40 s on 2 cores once the stack is up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
REGENERATE_DEPLOYMENT = ("regenerate-explanation-datasets", "regenerate-on-publish")


def _checkpoint(folder: Path, noise: float) -> str:
    """The shipped base's weights (``noise`` added to one tensor) saved as a shapes/P model."""
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
    sidecar.update(kind="finetuned", domain="shapes", mode="P")
    save_state_dict(open_storage(folder), "model.safetensors", state, metadata=sidecar)
    return str(folder / "model.safetensors")


def _label_in_process(root: Path, checkpoint: str) -> str:
    """A 2-shard X-dataset of a few shapes images on a 3x3 grid (seconds); its version."""
    from tasks.build_dataset import BuildConfig, LabelConfig, finalize_build, plan_build
    from tasks.build_dataset.stage import label_task

    config = BuildConfig(
        name="shapes-x",
        split="val",
        input_kind="synthetic",
        input_uri="shapes",
        synthetic_per_class=2,
        num_shards=2,
        checkpoint=checkpoint,
        output_uri=str(root / "xdata"),
        label=LabelConfig(grid_h=3, grid_w=3, budget=40, images_per_batch=8),
    )
    plan = plan_build(config)
    for index in range(plan.num_tasks):
        list(label_task(plan, index))
    assert not finalize_build(plan)["missing"]
    return plan.version


def _publish(stack, source: str, root: Path) -> dict[str, Any]:
    """``explain-transfer publish-model`` in its own process, talking to the stack's API."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_API_URL=stack.api_url,
        PREFECT_HOME=str(stack.out / "client-home"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    command = [sys.executable, "-m", "flows.models_cli", "publish-model", source]
    command += ["--out", str(root), "--domain", "shapes", "--mode", "P", "--json"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _deployment_id(stack) -> str:
    flow_name, name = REGENERATE_DEPLOYMENT
    return stack.api("GET", f"/deployments/name/{flow_name}/{name}")["id"]


def _runs_of_deployment(stack, deployment_id: str) -> list[dict[str, Any]]:
    query = {"deployments": {"id": {"any_": [deployment_id]}}, "sort": "START_TIME_DESC"}
    return stack.api("POST", "/flow_runs/filter", json=query)


def _when(text: str | None) -> float:
    return datetime.fromisoformat(text).timestamp() if text else float("nan")


@pytest.mark.slow
def test_the_trigger_is_registered_from_prefect_yaml(stack) -> None:
    automations = stack.api("POST", "/automations/filter", json={})
    by_name = {a["name"]: a for a in automations}
    trigger = by_name["regenerate-on-publish__automation_1"]["trigger"]
    assert trigger["expect"] == ["explain-transfer.checkpoint.published"]
    [action] = by_name["regenerate-on-publish__automation_1"]["actions"]
    assert action["type"] == "run-deployment"
    assert (
        "explain-transfer.labelling-config.published"
        in (by_name["regenerate-on-publish__automation_2"]["trigger"]["expect"])
    )


@pytest.mark.slow
def test_publishing_a_theta_starts_a_build_that_writes_a_new_version(stack, tmp_path: Path) -> None:
    root = stack.data_root / "published"
    first = _publish_quietly(stack, _checkpoint(tmp_path / "v1", 0.0), root)
    old_version = _label_in_process(root, first["uri"])
    deployment_id = _deployment_id(stack)
    before = {run["id"] for run in _runs_of_deployment(stack, deployment_id)}

    started = time.time()
    published = _publish(stack, _checkpoint(tmp_path / "v2", 1e-3), root)
    assert published["event_id"] and published["copied"]
    published_at = time.time()

    # The server's trigger creates the run; the served process picks it up and runs it. On a
    # loaded 2-core machine the SQLite-backed server can leave one poll unanswered for longer
    # than its timeout while the run writes its states: a poll that times out is retried
    # until the deadline (the deadline, not one poll, is what the test bounds).
    run = None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            runs = _runs_of_deployment(stack, deployment_id)
        except httpx.TimeoutException:
            continue
        new = [r for r in runs if r["id"] not in before]
        if new and new[0]["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            run = new[0]
            break
        time.sleep(1.0)
    assert run is not None, f"no regeneration run finished:\n{stack.log_tail()}"
    assert run["state"]["type"] == "COMPLETED", stack.log_tail()
    assert run["parameters"]["checkpoint"] == published["uri"]
    assert run["parameters"]["root"] == str(root)
    # Started by the automation of the trigger, not by a client.
    assert run["created_by"]["type"] == "AUTOMATION", run["created_by"]

    versions = sorted(p.name for p in (root / "xdata" / "shapes-x").glob("v-*"))
    assert old_version in versions and len(versions) == 2
    [new_version] = [v for v in versions if v != old_version]
    folder = root / "xdata" / "shapes-x" / new_version
    config = json.loads((folder / "config.json").read_text())
    assert config["config"]["checkpoint"] == published["uri"]
    assert (folder / "manifest.parquet").exists()
    assert sorted(p.name for p in folder.glob("*.tar")) == [
        "shapes-x-val-000000.tar",
        "shapes-x-val-000001.tar",
    ]

    events = stack.api(
        "POST",
        "/events/filter",
        json={"filter": {"id": {"id": [published["event_id"]]}}, "limit": 1},
    )["events"]
    timeline = {
        "event emitted": _when(events[0]["occurred"]) - started if events else float("nan"),
        "command returned": published_at - started,
        "run created": _when(run["created"]) - started,
        "run started": _when(run["start_time"]) - started,
        "version complete": (folder / "manifest.parquet").stat().st_mtime - started,
        "run finished": _when(run["end_time"]) - started,
    }
    print(
        "trigger timeline (s after the publish command started): "
        + json.dumps({k: round(v, 1) for k, v in timeline.items()})
    )


def _publish_quietly(stack, source: str, root: Path) -> dict[str, Any]:
    """The first model, copied without an event (an earlier fine-tuning, as it were)."""
    from flows.events import publish_model

    return publish_model(source, str(root), "shapes", "P", emit=False)
