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
from pydantic import Field, field_validator, model_validator

from flows.artifacts import artifact_key, markdown_table, publish_markdown, publish_png
from flows.assets import ancestors, asset_key, draw_lineage, lineage_rows, read_lineage
from flows.build_dataset import build_explanation_dataset
from flows.export import export_planned_domain
from flows.finetune import finetune_flow
from flows.pretrain import pretrain_base_flow
from flows.runners import RunnerConfig, check_workers_reach_api
from flows.sweep import transfer_sweep
from flows.vector import compute_vector_flow
from storage import layout, open_storage
from tasks.build_dataset import BuildConfig, LabelConfig
from tasks.config import Device, StageConfig
from tasks.data.domains import DomainPlan, DomainSpec, as_domain_spec, check_domain
from tasks.finetune import FinetuneConfig
from tasks.pretrain import SHIPPED, SHIPPED_PRETRAIN, PretrainConfig, resolve_base
from tasks.sweep import SweepConfig, TargetSpec


class PipelineConfig(StageConfig):
    """The whole pipeline: domains, model, training, labelling and sweep settings.

    The defaults are the embedded default: synthetic domains, the tiny ViT pretrained here,
    local storage, CPU. Real runs set ``base`` to real CLIP weights (a file or s3:// URI).
    """

    out_uri: str
    source: str | DomainSpec = "shapes"
    targets: tuple[str | DomainSpec, ...] = ("glyphs", "colours", "textures", "scenes")
    model_name: str = "tiny-vit-56"
    base: str | None = Field(
        SHIPPED,
        description="pretrained weights URI; 'shipped': the packaged base; None pretrains one",
    )
    pretrain: PretrainConfig = SHIPPED_PRETRAIN
    # Every prediction-only model of the demo, source and targets, reaches 0.9 on val with the
    # shipped base (docs/results.md); references of a model below it would describe noise.
    min_target_accuracy: float = Field(
        0.9,
        ge=0,
        le=1,
        description="val accuracy every prediction-only model must reach, unless min_accuracy "
        "gives its domain its own floor",
    )
    # A real domain's floor follows what its model can reach (ViT-B/32 fine-tuned on ImageNet:
    # about 0.76), not the synthetic domains' 0.9: each is set per domain by name.
    min_accuracy: dict[str, float] = Field(
        {},
        description="val accuracy floor per domain name (source or target), instead of "
        "min_target_accuracy for the domains named",
    )
    # Accuracy is measured on every val and test image (forward passes only): 100 per class.
    # Synthetic images depend only on (domain, split, index), so the first 20 per class of test
    # are the 20 per class of earlier defaults.
    per_class: dict[str, int] = {"train": 64, "val": 100, "test": 100}
    reference_images: dict[str, int] = Field(
        {"val": 30, "test": 100},
        description="images per target in the Kernel SHAP references of each split, rounded "
        "up to whole classes (the first ceil(n / classes) of each class); a split not named "
        "is labelled whole",
    )
    image_size: int = 56
    data_seed: int = 0
    epochs: int = Field(12, ge=1)
    target_epochs: int | None = Field(
        4,
        ge=1,
        description="epochs of the targets' prediction-only models (None: ``epochs``, as the "
        "source's P and X). The embedded default trains them 4: the shipped base already "
        "classifies every built-in domain (docs/results.md); a config of real data sets its own "
        "(configs/digits.json, configs/imagenet-vit-b-32.json: null)",
    )
    eval_every: int = Field(
        4,
        ge=1,
        description="fine-tuning evaluates on val after every this many epochs and after the "
        "last (the floor reads the last); on the demo each evaluation costs as much as an epoch",
    )
    loader_workers: int = Field(
        0,
        ge=0,
        description="decoding processes of each fine-tuning's training stream; 0 decodes in the "
        "training process, which on the demo's few hundred small images saves the workers' "
        "start-up at every epoch (about 5 s per demo fine-tuning; 4 s an epoch in a cold "
        "process); give a real dataset several",
    )
    batch_size: int = Field(32, ge=1, description="global batch of every fine-tuning")
    lr: float = Field(1e-4, gt=0)
    beta: float = Field(1.0, ge=0)
    # Every fine-tuning of the pipeline launches the same way; at these defaults (FinetuneConfig's
    # own) each trains in the flow's process, and the models' fingerprints are those of a config
    # without these fields.
    nproc_per_node: int = Field(
        1,
        ge=1,
        description="fine-tuning processes on the pipeline's node, one per GPU (more than 1: "
        "data-parallel under torch.distributed.run); part of each model's fingerprint",
    )
    nnodes: int = Field(
        1,
        ge=1,
        description="nodes of every fine-tuning; the pipeline's node is rank 0 and each other "
        "node joins each fine-tuning at rdzv_endpoint (docs/orchestration.md)",
    )
    rdzv_endpoint: str | None = Field(
        None, description="host:port of the multi-node rendezvous (c10d), on the pipeline's node"
    )
    rdzv_id: str = Field("finetune", description="rendezvous id shared by the nodes of a run")
    checkpoint_minutes: float | None = Field(
        10.0,
        gt=0,
        description="minutes of training between resumable fine-tuning checkpoints, besides one "
        "at every epoch end (None: epochs and checkpoint_every only); not fingerprinted",
    )
    checkpoint_every: int | None = Field(
        None, ge=1, description="steps between resumable checkpoints too (None: by time only)"
    )
    seed: int = 0
    # 256 masked images per model call: on CPU the tiny model runs ~1.4x faster than at 2048
    # (cache-sized batches; docs/benchmarks.md); the sweep uses the same setting.
    label: LabelConfig = LabelConfig(forward_batch_size=256)
    reference_budget: int = Field(400, ge=2)
    num_shards: int = Field(2, ge=1, description="most shards of a Kernel SHAP reference")
    # A shard is the unit of parallelism and retry: 16 images at the reference budget are 6,400
    # forward passes (seconds on a GPU), so a reference of 1,000 ImageNet images spreads over 63
    # shards, and the embedded default's references (30 and 100 images) keep their 2.
    reference_shard_images: int = Field(
        16,
        ge=1,
        description="images per shard of a reference of the first images of each class: "
        "ceil(images / this) shards, at most num_shards",
    )
    # Fine near 1-2, where the targets' optima and accuracy cliffs lie on the shipped base, and
    # out to 4, where every target loses accuracy: the tolerance, not the grid, bounds lambda*.
    lambdas: tuple[float, ...] = (0.0, 1.0, 1.5, 2.0, 3.0, 4.0)
    # 150: the paper's comparison; 400 (the reference budget, another seed): the reference's
    # reliability, the ceiling of agreement scores. 25, 50 and 100 told nothing the two do not
    # (docs/results.md).
    kernel_shap_budgets: tuple[int, ...] = (150, 400)
    kernel_shap_images: int | None = Field(
        24,
        ge=1,
        description="Kernel SHAP rows (the budget curve, the ceiling, the edited model) on the "
        "first this many test reference images of each target (None: all); the SEM rows and "
        "the lambda differences always use every reference image",
    )
    edited_kernel_shap_budget: int | None = Field(
        150,
        ge=2,
        description="Kernel SHAP of theta_T + lambda* tau at this budget, the yardstick of the "
        "SEM pass's insertion/deletion at lambda* (None: not run)",
    )
    accuracy_tolerance: float = Field(1.0, ge=0)
    auc_steps: int | None = Field(8, ge=1, description="insertion/deletion steps (None: per cell)")
    sweep_name: str = "embedded-default"
    runner: RunnerConfig = RunnerConfig()
    device: Device = "auto"

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str | DomainSpec) -> str | DomainSpec:
        as_domain_spec(value)
        return value

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, value: tuple[str | DomainSpec, ...]) -> tuple[str | DomainSpec, ...]:
        if not value:
            raise ValueError("targets: give at least one target domain")
        names = [as_domain_spec(t).name for t in value]
        if len(set(names)) != len(names):
            raise ValueError(f"targets: domain names must be unique, got {names}")
        return value

    @field_validator("min_accuracy")
    @classmethod
    def _floors_are_accuracies(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {name: floor for name, floor in value.items() if not 0 <= floor <= 1}
        if bad:
            raise ValueError(f"min_accuracy: floors are val accuracies in [0, 1], got {bad}")
        return value

    @model_validator(mode="after")
    def _one_spec_per_name(self) -> PipelineConfig:
        source = as_domain_spec(self.source)
        for target in self.target_specs:
            if target.name == source.name and target != source:
                raise ValueError(f"domain {source.name!r} is given two different specs")
        names = [spec.name for spec in self.domain_specs()]
        unknown = sorted(set(self.min_accuracy) - set(names))
        if unknown:
            raise ValueError(f"min_accuracy names domains {unknown} that are not in {names}")
        return self

    @model_validator(mode="after")
    def _launchable_finetuning(self) -> PipelineConfig:
        processes = self.nproc_per_node * self.nnodes
        if self.batch_size % processes:
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by the {processes} fine-tuning "
                f"processes (nproc_per_node {self.nproc_per_node} x nnodes {self.nnodes})"
            )
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(
                f"nnodes {self.nnodes} needs rdzv_endpoint: the host:port of the pipeline's "
                "node that every node reaches (c10d rendezvous)"
            )
        return self

    def accuracy_floor(self, domain: str) -> float:
        """The val accuracy the prediction-only model of ``domain`` must reach."""
        return self.min_accuracy.get(domain, self.min_target_accuracy)

    @property
    def source_spec(self) -> DomainSpec:
        """The source domain as a spec (a bare name is a built-in synthetic domain)."""
        return as_domain_spec(self.source)

    @property
    def target_specs(self) -> tuple[DomainSpec, ...]:
        """The target domains as specs, in order."""
        return tuple(as_domain_spec(t) for t in self.targets)

    def domain_specs(self) -> list[DomainSpec]:
        """Every domain once: the source, then the targets that are not the source."""
        source = self.source_spec
        return [source, *[t for t in self.target_specs if t.name != source.name]]

    @classmethod
    def miniature(cls, out_uri: str, **changes: Any) -> PipelineConfig:
        """A tiny pipeline (two targets, two lambdas) that runs in a minute or two: for tests."""
        fields: dict[str, Any] = dict(
            out_uri=out_uri,
            targets=("glyphs", "scenes"),
            base=None,
            pretrain=PretrainConfig(per_class=8, val_per_class=4, epochs=1, batch_size=32),
            min_target_accuracy=0.0,
            per_class={"train": 4, "val": 2, "test": 2},
            reference_images={},
            epochs=1,
            target_epochs=None,
            batch_size=8,
            label=LabelConfig(budget=60, images_per_batch=16),
            reference_budget=80,
            lambdas=(0.0, 1.0),
            kernel_shap_budgets=(60,),
            auc_steps=8,
            sweep_name="miniature",
        )
        fields.update(changes)
        return cls(**fields)


def _data_uri(config: PipelineConfig, domain: str) -> str:
    return open_storage(config.out_uri).url(layout.data_key(domain, config.data_seed))


def check_domains(config: PipelineConfig) -> dict[str, DomainPlan]:
    """Check every domain of the pipeline from listings alone, before any compute.

    Raises:
        ValueError: one line naming the domain and what is wrong (missing path, unknown
            classes, empty split).
    """
    return {spec.name: check_domain(spec) for spec in config.domain_specs()}


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
    epochs: int | None = None,
) -> FinetuneConfig:
    domain = plan.spec.name
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
        epochs=epochs or config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        beta=config.beta,
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
        raise RuntimeError(
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
            _finetune_config(
                config, plans[target], "P", base, target_data, epochs=config.target_epochs
            ),
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
            edited_kernel_shap_budget=config.edited_kernel_shap_budget,
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
