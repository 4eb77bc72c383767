"""The whole pipeline as one parent flow; each stage is a subflow that skips completed work.

```
base model ──► fine-tune P (source) ──► label X (source, Kernel SHAP) ──► fine-tune X (source)
     │                                                                          │
     ├──► fine-tune P (each target) ──► label X (target val/test, reference)    ▼
     │                                                      vector tau_X = theta_X - theta_P
     └──────────────────────────────────────────────► sweep targets x lambda ◄──┘
```
"""

from __future__ import annotations

import logging
import math
import time
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.settings import get_current_settings

from flows.artifacts import artifact_key, markdown_table, publish_markdown, publish_png
from flows.assets import ancestors, asset_key, draw_lineage, lineage_rows, read_lineage
from flows.build_dataset import build_explanation_dataset
from flows.cli_errors import AccuracyFloorError
from flows.export import export_planned_domain
from flows.finetune import finetune_flow
from flows.pipeline_config import PipelineConfig as PipelineConfig  # no torch; re-exported
from flows.pipeline_config import check_domains as check_domains
from flows.pretrain import pretrain_base_flow
from flows.runners import check_workers_reach_api
from flows.sweep import transfer_sweep
from flows.vector import compute_vector_flow
from storage import layout, open_storage
from tasks.build_dataset import BuildConfig, LabelConfig
from tasks.data.domains import DomainPlan
from tasks.finetune import FinetuneConfig
from tasks.pretrain import resolve_base
from tasks.sweep import SweepConfig, TargetSpec


def _data_uri(config: PipelineConfig, domain: str) -> str:
    return open_storage(config.out_uri).url(layout.data_key(domain, config.data_seed))


def describe_floors(config: PipelineConfig, plans: dict[str, DomainPlan]) -> str:
    """Each domain's val accuracy floor and chance level, for the log at the start of a run."""
    return ", ".join(
        f"{name} {config.accuracy_floor(name):g} (chance {1 / len(plan.class_names):.3g})"
        for name, plan in plans.items()
    )


def floor_warnings(config: PipelineConfig, plans: dict[str, DomainPlan]) -> list[str]:
    """One line per domain of real data held to the synthetic domains' floor by default.

    ``min_target_accuracy``'s default, 0.9, is what the embedded default's models reach on
    their synthetic domains; a domain of stored images that no floor names may never reach
    it (ViT-B/32 on ImageNet stays near 0.76), and would stop the run only after its model
    has trained. Said at the start of the run, before any compute.
    """
    if "min_target_accuracy" in config.model_fields_set:
        return []  # a floor the config chose for every domain it does not name
    return [
        f"domain {name} ({plan.spec.kind}, {len(plan.class_names)} classes) is held to the "
        f"default val accuracy floor {config.min_target_accuracy:g}, the synthetic domains'; "
        f"set min_accuracy {{{name!r}: ...}} to what its fine-tuned model reaches"
        for name, plan in plans.items()
        if plan.spec.kind != "synthetic" and name not in config.min_accuracy
    ]


def _finetune_config(
    config: PipelineConfig,
    plan: DomainPlan,
    mode: str,
    base: str,
    data: str,
    *,
    target: bool = False,
) -> FinetuneConfig:
    """The fine-tuning of ``plan``'s domain: the source's P or X, or (``target``) a target's P,
    which trains ``target_epochs`` at ``target_lr`` (each None: the source's)."""
    domain = plan.spec.name
    epochs, lr = config.epochs, config.lr
    if target:
        epochs, lr = config.target_epochs or epochs, config.target_lr or lr
    # Built-in domains name their own classes: their configs (and fingerprints) stay as before.
    builtin = plan.spec.kind == "synthetic"
    return FinetuneConfig(
        domain=domain,
        mode=mode,
        model_name=config.model_name,
        base=base,
        data=data,
        data_name=domain if mode == "P" else None,
        class_names=None if builtin else plan.class_names,
        templates=plan.spec.templates,
        val_data=_data_uri(config, domain),
        epochs=epochs,
        batch_size=config.batch_size,
        lr=lr,
        beta=config.beta,
        x_loss=config.x_loss if mode == "X" else "labels",
        game_consistency=config.game_consistency if mode == "X" else 0.0,
        trainable_blocks=None if target else config.trainable_blocks,
        common_map=config.common_map if mode == "X" else 0.0,
        grid=config.label.grid_h,
        seed=config.seed,
        device=config.device,
        image_size=config.image_size,
        loader_workers=config.loader_workers,
        eval_every=config.eval_every,
        checkpoint_minutes=config.checkpoint_minutes,
        checkpoint_every=config.checkpoint_every,
        nproc_per_node=config.nproc_per_node,
        nnodes=config.nnodes,
        rdzv_endpoint=config.rdzv_endpoint,
        rdzv_id=config.rdzv_id,
    )


def reference_per_class(config: PipelineConfig, split: str, num_classes: int) -> int | None:
    """Images per class in a target's reference of ``split``: ``reference_images`` rounded up
    to whole classes (None: the whole split)."""
    images = config.reference_images.get(split)
    return None if images is None else math.ceil(images / num_classes)


def reference_shards(config: PipelineConfig, plan: DomainPlan, split: str, per_class: int) -> int:
    """Shards of a reference of the first ``per_class`` images of each class of ``split``.

    Proportional to the images it can hold (``per_class`` times the classes, within the split's
    own cap per class): ``ceil(images / reference_shard_images)``, at least 1, at most
    ``num_shards``, so a reference of a few hundred images is not cut into hundreds of shards.
    """
    cap = (plan.spec.per_class or {}).get(split)
    if cap is None and plan.spec.kind == "synthetic":
        cap = config.per_class.get(split)
    images = min(per_class, cap or per_class) * len(plan.class_names)
    return max(1, min(config.num_shards, math.ceil(images / config.reference_shard_images)))


def _build_config(
    config: PipelineConfig,
    domain: str,
    name: str,
    split: str,
    checkpoint: str,
    label: LabelConfig,
    max_per_class: int | None = None,
    num_shards: int | None = None,
) -> BuildConfig:
    return BuildConfig(
        name=name,
        split=split,
        input_kind="webdataset",
        input_uri=_data_uri(config, domain),
        input_name=domain,
        image_size=config.image_size,
        model_name=config.model_name,
        checkpoint=checkpoint,
        label=label,
        num_shards=num_shards or config.num_shards,
        max_per_class=max_per_class,
        # X streams its shards in P's order only when they share P's layout (a reference of
        # the first images of each class has no such reader and cannot keep whole shards).
        preserve_layout=max_per_class is None,
        output_uri=open_storage(config.out_uri).url(layout.XDATA_PREFIX),
        device=config.device,
        decode=config.decode,
    )


def _build(build: BuildConfig, config: PipelineConfig) -> dict[str, Any]:
    summary = build_explanation_dataset(config=build, runner=config.runner)
    if summary["missing"]:
        raise RuntimeError(
            f"explanation dataset {build.name}/{build.split}: shards failed after retries: "
            f"{summary['missing']} (rerun to fill them; completed shards are kept)"
        )
    return summary


def _reference(
    config: PipelineConfig,
    plan: DomainPlan,
    name: str,
    split: str,
    checkpoint: str,
    label: LabelConfig,
) -> str:
    """Build a Kernel SHAP reference of ``split`` (its first images of each class, or the whole
    split); returns its dataset URI."""
    domain = plan.spec.name
    per_class = reference_per_class(config, split, len(plan.class_names))
    shards = None if per_class is None else reference_shards(config, plan, split, per_class)
    build = _build_config(
        config, domain, name, split, checkpoint, label, max_per_class=per_class, num_shards=shards
    )
    return _build(build, config)["dataset_uri"]


def _finetune(
    config: PipelineConfig, finetune: FinetuneConfig, logger: logging.LoggerAdapter
) -> dict[str, Any]:
    """Run one fine-tuning of the pipeline; a multi-node one says how the other nodes join."""
    if finetune.nnodes > 1:
        logger.info(
            "fine-tuning %s %s on %d nodes: on each other node run `explain-transfer finetune "
            "--out %s --config FILE` with this FinetuneConfig and its node_rank: %s",
            finetune.domain,
            finetune.mode,
            finetune.nnodes,
            config.out_uri,
            finetune.model_dump_json(),
        )
    # No checkpoint event: this run labels its own X-datasets with the new model, and a
    # triggered regeneration would build the same versions a second time, concurrently.
    return finetune_flow(finetune, config.out_uri, announce=False)


def _check_accuracy(
    result: dict[str, Any], config: PipelineConfig, domain: str | None = None
) -> None:
    """Stop the run when a prediction-only model is below its domain's accuracy floor.

    The floor is ``config.min_accuracy[domain]`` when the config names the domain, else
    ``config.min_target_accuracy``. References of a model that has not learnt its task
    describe noise: nothing downstream of it could show a transfer either way.
    """
    last = result["metrics"][-1] if result.get("metrics") else {}
    accuracy = last.get("val_accuracy")
    own = domain is not None and domain in config.min_accuracy
    floor = config.min_accuracy[domain] if own else config.min_target_accuracy
    if accuracy is not None and accuracy < floor:
        setting = f"min_accuracy[{domain!r}]" if own else "min_target_accuracy"
        which = f"model {result['uri']}" + (f" of domain {domain}" if domain else "")
        raise AccuracyFloorError(
            f"{which} reaches val accuracy {accuracy:.3f}, below {setting} {floor:g}: train "
            f"it longer or from a better base, or lower {setting} to run anyway"
        )


def publish_lineage(
    config: PipelineConfig, sweep: dict[str, Any], since: datetime, timeout: float = 30.0
) -> None:
    """The run's lineage as artifacts: a drawing and a table, from the API's asset events.

    Everything the sweep table was made from, transitively (data, X-datasets, models, vector),
    as the materialization events of this API record it: what Prefect Cloud draws as its asset
    graph, drawn here for a self-hosted server's UI too. The events reach the API a moment after
    their tasks complete, so this waits (at most ``timeout`` seconds) for the table's; a lineage
    that cannot be read is logged, never a failed run.
    """
    logger = get_run_logger()
    root = asset_key(open_storage(config.out_uri).uri)
    table = asset_key(sweep["table_uri"])
    deadline = time.monotonic() + timeout
    try:
        while True:
            records = read_lineage(root + "/")
            record = records.get(table)
            fresh = record is not None and (sweep["skipped"] or record.occurred >= since)
            if fresh or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        if record is None:
            logger.info("no asset event of the sweep table %s yet: no lineage artifact", table)
            return
        graph = ancestors(records, table)
        publish_png(
            draw_lineage(graph, root),
            artifact_key("pipeline", config.sweep_name, "lineage"),
            f"pipeline {config.sweep_name}: what the sweep table was made from (asset events)",
        )
        publish_markdown(
            f"# Lineage of `{config.sweep_name}`\n\nFrom the `prefect.asset.materialization."
            f"succeeded` events of this API ({len(graph)} assets under `{root}`).\n\n"
            + markdown_table(lineage_rows(graph)),
            artifact_key("pipeline", config.sweep_name, "lineage-table"),
            f"pipeline {config.sweep_name}: every asset, what it was made from, its metadata",
        )
    except Exception as exc:  # lineage is a view of the run, not part of its result
        logger.warning("lineage not published: %s", exc)


@flow(name="explain-transfer-pipeline", flow_run_name="pipeline-{config.sweep_name}")
def explain_transfer_pipeline(config: PipelineConfig) -> dict[str, Any]:
    """Run every stage: data, base, the P models (source, then targets), source X-dataset,
    source X, vector, the targets' references, sweep.

    Every stage reads and writes under ``config.out_uri`` and skips what is already complete,
    so a rerun after a crash continues where the first run stopped. What can be checked without
    compute (domains, the Dask cluster's Prefect API) is checked first, and every P model meets
    its accuracy floor before the Kernel SHAP labelling starts.

    Returns:
        The URIs of everything produced and the sweep summary.
    """
    logger = get_run_logger()
    started = datetime.now(UTC)
    plans = check_domains(config)
    # Workers of a Dask cluster elsewhere must reach this run's Prefect API: refused now, not
    # at the first labelling, after the fine-tunings.
    check_workers_reach_api(config.runner, get_current_settings().api.url)
    logger.info("val accuracy floors: %s", describe_floors(config, plans))
    for line in floor_warnings(config, plans):
        logger.warning(line)
    # The listings just checked are exported as they are: each domain is listed once per run.
    for spec in config.domain_specs():
        export_planned_domain(
            plans[spec.name],
            _data_uri(config, spec.name),
            per_class=dict(config.per_class),
            image_size=config.image_size,
            seed=config.data_seed,
        )
    source = config.source_spec.name

    base = resolve_base(config.base) or pretrain_base_flow(
        config.pretrain.model_copy(update={"model_name": config.model_name}), config.out_uri
    )
    source_data = _data_uri(config, source)
    theta_p = _finetune(
        config, _finetune_config(config, plans[source], "P", base, source_data), logger
    )
    _check_accuracy(theta_p, config, source)
    # Every prediction-only model is trained and checked against its floor before the Kernel
    # SHAP labelling, the longest stage: a target that cannot learn its task stops the run
    # before the labelling, not after it.
    target_models = {}
    for target_spec in config.target_specs:
        target = target_spec.name
        target_data = _data_uri(config, target)
        target_models[target] = _finetune(
            config,
            _finetune_config(config, plans[target], "P", base, target_data, target=True),
            logger,
        )
        _check_accuracy(target_models[target], config, target)

    x_data = _build(
        _build_config(config, source, f"{source}-x", "train", theta_p["uri"], config.label),
        config,
    )
    theta_x = _finetune(
        config, _finetune_config(config, plans[source], "X", base, x_data["dataset_uri"]), logger
    )
    vector = compute_vector_flow(
        source,
        theta_x["uri"],
        theta_p["uri"],
        config.out_uri,
        key=layout.vector_key(source, theta_x["fingerprint"], theta_p["fingerprint"]),
    )

    reference_label = config.label.model_copy(
        update={"budget": config.reference_budget, "top_k": 0, "seed": config.label.seed + 1000}
    )
    targets = []
    for target_spec in config.target_specs:
        target = target_spec.name
        theta_t = target_models[target]
        references = {
            split: _reference(
                config, plans[target], f"{target}-ref", split, theta_t["uri"], reference_label
            )
            for split in ("val", "test")
        }
        targets.append(
            TargetSpec(
                domain=target,
                model=theta_t["uri"],
                val_reference=references["val"],
                test_reference=references["test"],
                related=target_spec.is_related,
                # Accuracy on the whole split theta_T was validated on, not on the references.
                accuracy_data=_data_uri(config, target),
                accuracy_name=target,
            )
        )

    # The paper's in-domain claim: theta_X's single pass against Kernel SHAP of theta_X itself
    # (a sweep names each domain once: skipped when the source is also swept as a target).
    if source not in {t.domain for t in targets}:
        source_reference = _reference(
            config, plans[source], f"{source}-xref", "test", theta_x["uri"], reference_label
        )
        targets.append(
            TargetSpec(
                domain=source,
                model=theta_x["uri"],
                test_reference=source_reference,
                role="source",
                accuracy_data=source_data,
                accuracy_name=source,
            )
        )
    sweep = transfer_sweep(
        SweepConfig(
            name=config.sweep_name,
            vector=vector["uri"],
            targets=tuple(targets),
            lambdas=config.lambdas,
            kernel_shap_budgets=config.kernel_shap_budgets,
            kernel_shap_images=config.kernel_shap_images,
            source_kernel_shap_images=config.source_kernel_shap_images,
            edited_kernel_shap_budget=config.edited_kernel_shap_budget,
            edited_agreement_budgets=config.edited_agreement_budgets,
            accuracy_tolerance=config.accuracy_tolerance,
            auc_steps=config.auc_steps,
            grid=config.label.grid_h,
            baseline=config.label.baseline,
            output=config.label.output,
            seed=config.seed,
            device=config.device,
            output_uri=config.out_uri,
            reference_budget=config.reference_budget,
            forward_batch_size=config.label.forward_batch_size,
        )
    )
    logger.info("pipeline %s complete under %s", config.sweep_name, config.out_uri)
    chosen = ", ".join(f"{t}: {lam:g}" for t, lam in sweep["chosen"].items())
    publish_markdown(
        f"# Pipeline `{config.sweep_name}`\n\n"
        f"- base model: `{base}`\n- theta_P ({source}): `{theta_p['uri']}`\n"
        f"- X-dataset: `{x_data['dataset_uri']}`\n- theta_X: `{theta_x['uri']}`\n"
        f"- vector: `{vector['uri']}` (norm {vector['norm']:.4f})\n"
        + "".join(f"- theta_T ({t.domain}): `{t.model}`\n" for t in targets if t.role == "target")
        + f"- sweep table: `{sweep['table_uri']}`\n- plot: `{sweep['plot_uri']}`\n"
        f"- chosen lambda per target: {chosen}\n",
        key=artifact_key("pipeline", config.sweep_name),
        description=f"pipeline {config.sweep_name}: where every output is",
    )
    publish_lineage(config, sweep, started)
    return {
        "base": base,
        "theta_p": theta_p["uri"],
        "x_dataset": x_data["dataset_uri"],
        "theta_x": theta_x["uri"],
        "vector": vector["uri"],
        "targets": [t.to_dict() for t in targets if t.role == "target"],
        "sweep": sweep,
    }
