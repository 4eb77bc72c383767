"""Deployments: the registry file, and the served stack on a real Prefect server.

The stack tests share one ``explain-transfer serve`` process and one miniature run
(tests/e2e/conftest.py): together about a minute on a 2-core machine, most of it the server's
start.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from deployments.registry import (
    PREFECT_YAML,
    DeploymentSpec,
    load_deployment_specs,
    resolve_placeholders,
)

DATA_ENV = {"EXPLAIN_TRANSFER_DATA": "/srv/explain-transfer"}


def _next_cron_time(cron: str, after: datetime) -> datetime:
    """The first time after ``after`` that matches ``"M H * * D"`` (D a day of week or ``*``).

    Written here, independently of Prefect's scheduler, to check what it computed.
    """
    minute, hour, day, month, weekday = cron.split()
    assert (day, month) == ("*", "*"), "only minute/hour/day-of-week crons are checked here"
    t = after.replace(second=0, microsecond=0) + timedelta(minutes=1)
    while True:
        cron_weekday = (t.weekday() + 1) % 7  # cron counts from Sunday = 0
        if (
            t.minute == int(minute)
            and t.hour == int(hour)
            and (weekday == "*" or cron_weekday == int(weekday))
        ):
            return t
        t += timedelta(minutes=1)


def test_prefect_yaml_is_valid_for_prefect_deploy() -> None:
    from prefect.cli.deploy._models import PrefectYamlModel

    document = yaml.safe_load(PREFECT_YAML.read_text())
    model = PrefectYamlModel.model_validate(document)
    pools = {d.work_pool.name for d in model.deployments}
    assert pools == {"gpu", "cpu"}
    for deployment in model.deployments:
        path, _, function = deployment.entrypoint.partition(":")
        assert (Path(__file__).resolve().parents[2] / path).is_file(), deployment.entrypoint


def test_registry_loads_every_flow_with_resolved_parameters() -> None:
    specs = load_deployment_specs(env=DATA_ENV)
    names = {spec.full_name for spec in specs}
    for stage in (
        "build-explanation-dataset/regenerate-weekly",
        "explain-transfer-pipeline/nightly-sweep",
        "pretrain-base/on-demand",
        "finetune/on-demand",
        "compute-vector/on-demand",
        "transfer-sweep/on-demand",
    ):
        assert stage in names
    text = repr([spec.parameters for spec in specs])
    assert "{{" not in text and "/srv/explain-transfer/" in text
    crons = {spec.full_name: [s.cron for s in spec.schedules] for spec in specs if spec.schedules}
    assert crons == {
        "build-explanation-dataset/regenerate-weekly": ["0 3 * * 0"],
        "explain-transfer-pipeline/nightly-sweep": ["0 2 * * *"],
    }
    # The deployment runs the very flow object the command line runs.
    from flows.build_dataset import build_explanation_dataset

    build = next(s for s in specs if s.name == "regenerate-weekly")
    assert build.load_flow() is build_explanation_dataset
    assert build.to_runner_deployment().entrypoint == (
        "flows.build_dataset.build_explanation_dataset"
    )


def test_unset_data_root_and_bad_entrypoints_are_refused() -> None:
    with pytest.raises(ValueError, match="EXPLAIN_TRANSFER_DATA"):
        load_deployment_specs(env={})
    assert resolve_placeholders({"a": ["{{ $X }}/y", 3]}, {"X": "s3://b"}) == {"a": ["s3://b/y", 3]}
    with pytest.raises(ValueError, match="path/to/module.py"):
        DeploymentSpec(name="x", entrypoint="flows.build_dataset:build").load_flow()


@pytest.mark.slow
def test_build_run_completes_with_artifacts_and_shards(stack, build_run) -> None:
    assert build_run.state.type.value == "COMPLETED"
    run = stack.api("GET", f"/flow_runs/{build_run.id}")
    assert run["name"] == "build-shapes-x-val"
    assert run["state"]["name"] == "Completed"

    # The shard tasks run in the "label-shards" subflow (its task runner is chosen at run time).
    runs_filter = {"flow_runs": {"name": {"any_": ["label-shards-shapes-x-val"]}}}
    task_runs = stack.api("POST", "/task_runs/filter", json=runs_filter)
    names = {t["name"] for t in task_runs}
    assert {"label-shard-00000", "label-shard-00001"} <= names
    assert all(t["state"]["type"] == "COMPLETED" for t in task_runs)

    artifacts = stack.api(
        "POST",
        "/artifacts/filter",
        json={"artifacts": {"flow_run_id": {"any_": [str(build_run.id)]}}},
    )
    by_type: dict[str, list[dict]] = {}
    for artifact in artifacts:
        by_type.setdefault(artifact["type"], []).append(artifact)
    summary = next(a for a in by_type["markdown"] if a["key"] == "x-dataset-shapes-x-val")
    assert "shards complete: 2 / 2" in summary["data"]
    assert [a["data"] for a in by_type["progress"]] == [100.0]

    # The shards are in the stack's data root, and the task results beside them.
    versions = list((stack.data_root / "xdata" / "shapes-x").glob("v-*"))
    assert len(versions) == 1
    assert sorted(p.name for p in versions[0].glob("*.tar")) == [
        "shapes-x-val-000000.tar",
        "shapes-x-val-000001.tar",
    ]
    assert any((stack.data_root / "prefect-results").iterdir())


@pytest.mark.slow
def test_gpu_concurrency_limit_exists(stack) -> None:
    from deployments.serve import default_gpu_limit

    # Served without --gpu-limit: one shard task at a time per GPU of the serving host.
    limit = stack.api("GET", "/concurrency_limits/tag/gpu")
    assert limit["tag"] == "gpu" and limit["concurrency_limit"] == default_gpu_limit()


def test_the_default_gpu_limit_is_the_hosts_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from deployments.serve import default_gpu_limit
    from flows.serve_cli import add_serve_arguments

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert default_gpu_limit() == 8
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert default_gpu_limit() == 1  # on CPU one shard at a time already uses every core
    parser = add_serve_arguments(argparse.ArgumentParser())
    assert parser.parse_args([]).gpu_limit is None  # resolved by serve_stack
    assert parser.parse_args(["--gpu-limit", "16"]).gpu_limit == 16
    with pytest.raises(SystemExit):
        parser.parse_args(["--gpu-limit", "0"])


@pytest.mark.slow
def test_a_given_gpu_limit_is_set_and_a_default_one_keeps_an_existing_limit(stack) -> None:
    """An operator's limit survives a restart of ``serve``; ``--gpu-limit N`` replaces it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.serve import ensure_tag_concurrency_limit

    tag = "gpu-limit-test"
    with temporary_settings(updates={PREFECT_API_URL: stack.api_url}):
        assert ensure_tag_concurrency_limit(tag, 8) is True  # missing: created
        assert ensure_tag_concurrency_limit(tag, 2) is False  # the default: kept
        assert stack.api("GET", f"/concurrency_limits/tag/{tag}")["concurrency_limit"] == 8
        assert ensure_tag_concurrency_limit(tag, 4, replace=True) is True  # given: set
        assert ensure_tag_concurrency_limit(tag, 4, replace=True) is False  # already so
    assert stack.api("GET", f"/concurrency_limits/tag/{tag}")["concurrency_limit"] == 4


@pytest.mark.slow
def test_schedules_registered_with_their_next_run_times(stack) -> None:
    specs = [s for s in load_deployment_specs(env=DATA_ENV) if s.schedules]
    assert specs
    for spec in specs:
        flow_name, name = spec.full_name.split("/")
        deployment = stack.api("GET", f"/deployments/name/{flow_name}/{name}")
        assert deployment["work_pool_name"] is None  # served by the stack, not a worker
        [schedule] = deployment["schedules"]
        assert schedule["active"] is True
        assert schedule["schedule"]["cron"] == spec.schedules[0].cron
        assert schedule["schedule"]["timezone"] == "UTC"

        # The server's scheduler fills the next runs of a new deployment within seconds.
        query = {
            "deployments": {"id": {"any_": [deployment["id"]]}},
            "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
            "sort": "EXPECTED_START_TIME_ASC",
            "limit": 3,
        }
        deadline = time.monotonic() + 90
        while not (runs := stack.api("POST", "/flow_runs/filter", json=query)):
            assert time.monotonic() < deadline, f"no scheduled runs of {spec.full_name}"
            time.sleep(2)
        created = datetime.fromisoformat(deployment["created"])
        expected = _next_cron_time(spec.schedules[0].cron, created.astimezone(timezone.utc))
        starts = [datetime.fromisoformat(r["expected_start_time"]) for r in runs]
        assert starts[0] == expected, (spec.full_name, starts)
        if len(starts) > 1:
            period = (
                timedelta(days=7) if spec.schedules[0].cron.endswith(" 0") else timedelta(days=1)
            )
            assert starts[1] - starts[0] == period


@pytest.mark.slow
def test_pipeline_deployment_runs_every_stage_to_completion(stack, pipeline_run) -> None:
    assert pipeline_run.state.type.value == "COMPLETED", stack.log_tail()
    run = stack.api("GET", f"/flow_runs/{pipeline_run.id}")
    assert run["name"] == "pipeline-miniature"

    # Every stage ran as a subflow of this run and completed.
    subflows = stack.api(
        "POST",
        "/flow_runs/filter",
        json={"flow_runs": {"parent_task_run_id": {"is_null_": False}}, "limit": 200},
    )
    names = {f["name"]: f["state"]["type"] for f in subflows}
    expected = {
        "pretrain-base",
        "finetune-shapes-P",
        "build-shapes-x-train",
        "finetune-shapes-X",
        "vector-shapes",
        "finetune-glyphs-P",
        "build-glyphs-ref-test",
        "sweep-miniature",
    }
    assert expected <= names.keys()
    assert all(names[name] == "COMPLETED" for name in expected)
    # Domains are exported by tasks of this run from the listings it checked (one listing per
    # domain and run; a subflow would need the listing as a parameter).
    tasks = stack.api(
        "POST",
        "/task_runs/filter",
        json={"task_runs": {"flow_run_id": {"any_": [str(pipeline_run.id)]}}, "limit": 200},
    )
    exports = {t["name"]: t["state"]["type"] for t in tasks if t["name"].startswith("export-")}
    assert {"export-shapes", "export-glyphs"} <= exports.keys(), sorted(exports)
    assert all(state == "COMPLETED" for state in exports.values())

    artifacts = stack.api(
        "POST",
        "/artifacts/filter",
        json={"artifacts": {"key": {"any_": ["pipeline-miniature", "sweep-miniature-table"]}}},
    )
    by_key = {a["key"]: a for a in artifacts}
    assert {"pipeline-miniature", "sweep-miniature-table"} <= by_key.keys()
    assert by_key["pipeline-miniature"]["flow_run_id"] == str(pipeline_run.id)
    table = by_key["sweep-miniature-table"]["data"]
    rows = json.loads(table) if isinstance(table, str) else table
    targets = {row["target"] for row in rows}
    # The two targets, and the source's theta_X scored in domain.
    assert targets == {"glyphs", "scenes", "shapes"}

    sweep = stack.data_root / "miniature" / "sweeps" / "miniature"
    assert (sweep / "results.parquet").stat().st_size > 0 and (sweep / "sweep.png").exists()
