"""The deployments of the pipeline, read from ``deployments/prefect.yaml``.

``prefect.yaml`` is the one registry: ``prefect deploy --prefect-file deployments/prefect.yaml
--all`` registers its deployments on work pools, and ``explain-transfer serve`` reads the same
entries to serve them in one process. Adding a flow is one entry in that file.

Parameters may name the data root as ``{{ $EXPLAIN_TRANSFER_DATA }}`` (Prefect's own
environment-variable placeholder), resolved when the deployments are registered. A trigger's
``parameters`` are templates of the triggering event (``{{ event.payload.uri }}``), rendered by
the server when the event arrives; as ``prefect deploy`` does, they are left as written.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.events import DeploymentTriggerTypes
from prefect.flows import Flow
from prefect.utilities.templating import PLACEHOLDER_CAPTURE_REGEX
from pydantic import TypeAdapter

logger = logging.getLogger(__name__)

#: The registry file, shipped as package data beside this module.
PREFECT_YAML = Path(__file__).with_name("prefect.yaml")

#: Environment variable naming the root URI every deployment reads and writes under.
DATA_ROOT_ENV = "EXPLAIN_TRANSFER_DATA"

#: Validates a ``triggers:`` entry as ``prefect deploy`` does.
_TRIGGER = TypeAdapter(DeploymentTriggerTypes)


@dataclass(frozen=True)
class ScheduleSpec:
    """One cron schedule of a deployment (``timezone`` is an IANA name)."""

    cron: str
    timezone: str = "UTC"
    active: bool = True


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment entry of ``prefect.yaml``.

    Attributes:
        name: the deployment name (Prefect shows ``{flow name}/{name}``).
        entrypoint: ``path/to/module.py:flow_function``, relative to the repository root.
        work_pool: the work pool a worker picks it up from (``gpu`` or ``cpu``).
        parameters: default flow parameters (placeholders resolved).
        schedules: cron schedules (none: runs only when triggered).
        tags: tags shown in the UI and usable in filters.
        description: shown in the UI (default: the flow's docstring).
        triggers: deployment triggers (``prefect.yaml``'s ``triggers:`` entries): events that
            start a run, with parameters templated from the event.
    """

    name: str
    entrypoint: str
    work_pool: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    schedules: tuple[ScheduleSpec, ...] = ()
    tags: tuple[str, ...] = ()
    description: str | None = None
    triggers: tuple[dict[str, Any], ...] = ()

    @property
    def module_path(self) -> str:
        """The entrypoint as an importable ``package.module:function``."""
        path, _, function = self.entrypoint.partition(":")
        if not path.endswith(".py") or not function:
            raise ValueError(
                f"deployment {self.name!r}: entrypoint {self.entrypoint!r} is not "
                "'path/to/module.py:flow_function'"
            )
        return path[: -len(".py")].replace("/", ".") + ":" + function

    def load_flow(self) -> Flow:
        """Import the flow the entrypoint names (the same object the command line runs)."""
        module_name, function = self.module_path.split(":")
        flow = getattr(importlib.import_module(module_name), function)
        if not isinstance(flow, Flow):
            raise TypeError(f"{self.entrypoint} is not a Prefect flow")
        return flow

    @property
    def full_name(self) -> str:
        """``{flow name}/{deployment name}``, as ``run_deployment`` and the UI name it."""
        return f"{self.load_flow().name}/{self.name}"

    def to_runner_deployment(self) -> RunnerDeployment:
        """The deployment ``prefect.serve`` runs: the flow itself, loaded by module path."""
        flow = self.load_flow()
        # Schedules are passed as Prefect schedule objects so each keeps its timezone.
        from prefect.schedules import Cron

        return flow.to_deployment(
            name=self.name,
            parameters=self.parameters,
            schedules=[Cron(s.cron, timezone=s.timezone, active=s.active) for s in self.schedules]
            or None,
            tags=list(self.tags) or None,
            description=self.description,
            triggers=self.deployment_triggers() or None,
            entrypoint_type=EntrypointType.MODULE_PATH,
        )

    def deployment_triggers(self) -> list[Any]:
        """The triggers as Prefect objects (``DeploymentEventTrigger`` for ``type: event``).

        Unnamed ones are named ``{deployment}__automation_{i}``, as ``prefect deploy`` and
        ``prefect.serve`` name them, so either registers the same automations.
        """
        triggers = []
        for i, spec in enumerate(self.triggers, start=1):
            spec = {"name": f"{self.name}__automation_{i}", **spec}
            triggers.append(_TRIGGER.validate_python(spec))
        return triggers


def _schedules(raw: list[Mapping[str, Any]] | None, name: str) -> tuple[ScheduleSpec, ...]:
    specs = []
    for item in raw or []:
        if "cron" not in item:
            raise ValueError(f"deployment {name!r}: only cron schedules are used here, got {item}")
        specs.append(
            ScheduleSpec(
                cron=item["cron"],
                timezone=item.get("timezone", "UTC"),
                active=bool(item.get("active", True)),
            )
        )
    return tuple(specs)


def resolve_placeholders(value: Any, env: Mapping[str, str]) -> Any:
    """Replace ``{{ $VAR }}`` placeholders from ``env``, as ``prefect deploy`` does.

    Other placeholders (``{{ prefect.variables.x }}``, step outputs) are left as they are.

    Raises:
        ValueError: a placeholder names a variable ``env`` does not set.
    """
    if isinstance(value, dict):
        return {k: resolve_placeholders(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_placeholders(v, env) for v in value]
    if not isinstance(value, str):
        return value
    for full_match, name in PLACEHOLDER_CAPTURE_REGEX.findall(value):
        if not name.startswith("$"):
            continue
        variable = name[1:]
        if variable not in env:
            raise ValueError(
                f"prefect.yaml uses the environment variable {variable} but it is not set"
            )
        value = value.replace(full_match, env[variable])
    return value


def load_deployment_specs(
    path: str | Path = PREFECT_YAML, env: Mapping[str, str] | None = None
) -> list[DeploymentSpec]:
    """Read the deployments of a ``prefect.yaml``, placeholders resolved from ``env``.

    Args:
        path: the ``prefect.yaml`` file.
        env: values of the ``{{ $VAR }}`` placeholders (default: the process environment).

    Returns:
        One :class:`DeploymentSpec` per entry, in file order.
    """
    document = yaml.safe_load(Path(path).read_text())
    entries = document.get("deployments") or []
    # Deployment names are unique per flow ("build-explanation-dataset/regenerate-weekly").
    names = [(entry["entrypoint"], entry["name"]) for entry in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{path}: duplicate deployments {duplicates}")
    env = dict(os.environ if env is None else env)
    specs = []
    for entry in entries:
        # Trigger parameters are event templates, rendered when the event arrives.
        triggers = [
            {
                **resolve_placeholders({k: v for k, v in t.items() if k != "parameters"}, env),
                **({"parameters": t["parameters"]} if "parameters" in t else {}),
            }
            for t in entry.get("triggers") or []
        ]
        entry = resolve_placeholders({k: v for k, v in entry.items() if k != "triggers"}, env)
        pool = entry.get("work_pool") or {}
        specs.append(
            DeploymentSpec(
                name=entry["name"],
                entrypoint=entry["entrypoint"],
                work_pool=pool.get("name"),
                parameters=dict(entry.get("parameters") or {}),
                schedules=_schedules(entry.get("schedules"), entry["name"]),
                tags=tuple(entry.get("tags") or ()),
                description=entry.get("description"),
                triggers=tuple(triggers),
            )
        )
    return specs
