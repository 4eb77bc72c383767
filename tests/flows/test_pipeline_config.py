"""PipelineConfig at ImageNet scale: accuracy floors, launch fields, reference shards, wiring.

The wiring tests run the real parent flow on the Prefect test API with every stage replaced by
a recorder, so they check what the flow asks of each stage (order, configs) without compute.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import flows.pipeline as pipeline
from flows.cli_errors import EXPECTED_ERRORS, AccuracyFloorError
from flows.pipeline import (
    PipelineConfig,
    _check_accuracy,
    _finetune_config,
    check_domains,
    describe_floors,
    floor_warnings,
    reference_shards,
)
from flows.runners import RunnerConfig
from tasks.data.domains import DomainPlan
from tasks.finetune import FinetuneConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _imagenet_fields(**changes: Any) -> dict[str, Any]:
    fields = json.loads((CONFIGS / "imagenet-vit-b-32.json").read_text())
    fields.update(changes)
    return fields


def _result(accuracy: float, uri: str = "s3://b/models/m/model.safetensors") -> dict[str, Any]:
    return {"uri": uri, "metrics": [{"val_accuracy": 0.2}, {"val_accuracy": accuracy}]}


def _plans(config: PipelineConfig, classes: dict[str, int]) -> dict[str, DomainPlan]:
    """Plans as check_domains finds them, without the real folders (class counts only)."""
    return {
        spec.name: DomainPlan(
            spec=spec,
            class_names=tuple(f"{spec.name}-{i}" for i in range(classes[spec.name])),
            units={},
        )
        for spec in config.domain_specs()
    }


IMAGENET_CLASSES = {"imagenet": 1000, "pets": 37, "food101": 101, "eurosat": 10}


def test_a_floor_per_domain_passes_a_sensible_imagenet_run_and_stops_one_that_learnt_nothing():
    real = PipelineConfig(**_imagenet_fields())
    # ViT-B/32 fine-tuned on ImageNet reaches ~0.76: the shipped config's floor lets it pass...
    _check_accuracy(_result(0.76), real, "imagenet")
    _check_accuracy(_result(0.91), real, "eurosat")
    # ... and a model at chance (1 in 1,000) still stops the run, naming the floor to change.
    with pytest.raises(RuntimeError, match=r"of domain imagenet reaches val accuracy 0\.001, "):
        _check_accuracy(_result(0.001), real, "imagenet")
    with pytest.raises(RuntimeError, match=r"below min_accuracy\['eurosat'\] 0\.9: .* lower "):
        _check_accuracy(_result(0.5), real, "eurosat")
    # Without a floor of its own, ImageNet is held to the synthetic domains' 0.9 (the issue).
    unset = PipelineConfig(**_imagenet_fields(min_accuracy={}))
    with pytest.raises(RuntimeError, match=r"below min_target_accuracy 0\.9"):
        _check_accuracy(_result(0.76), unset, "imagenet")


def test_the_embedded_default_keeps_its_floor_of_0_9_on_every_domain():
    default = PipelineConfig(out_uri="x")
    assert default.min_accuracy == {}
    for spec in default.domain_specs():
        assert default.accuracy_floor(spec.name) == 0.9
        _check_accuracy(_result(0.93), default, spec.name)
        with pytest.raises(RuntimeError, match="below min_target_accuracy 0.9"):
            _check_accuracy(_result(0.89), default, spec.name)
    assert floor_warnings(default, check_domains(default)) == []


def test_floors_must_name_domains_of_the_run_and_be_accuracies():
    with pytest.raises(ValueError, match=r"min_accuracy names domains \['imagenet'\] that are"):
        PipelineConfig(out_uri="x", min_accuracy={"imagenet": 0.7})
    with pytest.raises(ValueError, match=r"floors are val accuracies in \[0, 1\], got \{'glyphs'"):
        PipelineConfig(out_uri="x", min_accuracy={"glyphs": 75})
    assert PipelineConfig(out_uri="x", min_accuracy={"shapes": 0.5}).accuracy_floor("shapes") == 0.5


def test_a_real_domain_on_the_default_floor_is_named_before_any_compute():
    unset = PipelineConfig(**_imagenet_fields(min_accuracy={}))
    warnings = floor_warnings(unset, _plans(unset, IMAGENET_CLASSES))
    assert len(warnings) == 4 and warnings[0].startswith(
        "domain imagenet (imagefolder, 1000 classes) is held to the default val accuracy "
        "floor 0.9, the synthetic domains'; set min_accuracy {'imagenet': ...}"
    )
    # A floor given per domain, or one chosen for every domain, is the config's own choice.
    real = PipelineConfig(**_imagenet_fields())
    assert floor_warnings(real, _plans(real, IMAGENET_CLASSES)) == []
    chosen = PipelineConfig(**_imagenet_fields(min_accuracy={}, min_target_accuracy=0.5))
    assert floor_warnings(chosen, _plans(chosen, IMAGENET_CLASSES)) == []
    assert describe_floors(real, _plans(real, IMAGENET_CLASSES)).startswith(
        "imagenet 0.65 (chance 0.001), pets 0.8 (chance 0.027)"
    )


def test_the_launch_fields_reach_every_finetune_config():
    config = PipelineConfig(
        out_uri="s3://bucket/run",
        nproc_per_node=2,
        nnodes=2,
        rdzv_endpoint="10.0.0.1:29400",
        rdzv_id="run-7",
        checkpoint_every=500,
        checkpoint_minutes=2.5,
    )
    plans = check_domains(config)
    finetune = _finetune_config(config, plans["shapes"], "P", "base.safetensors", "s3://b/d")
    assert (finetune.nproc_per_node, finetune.nnodes, finetune.world_size) == (2, 2, 4)
    assert (finetune.rdzv_endpoint, finetune.rdzv_id) == ("10.0.0.1:29400", "run-7")
    assert (finetune.checkpoint_every, finetune.checkpoint_minutes) == (500, 2.5)
    # The number of processes fixes the data order, so it is part of the model's fingerprint;
    # where it saves is not.
    single = _finetune_config(
        PipelineConfig(out_uri="s3://bucket/run"),
        plans["shapes"],
        "P",
        "base.safetensors",
        "s3://b/d",
    )
    assert finetune.resume_fingerprint() != single.resume_fingerprint()
    assert (
        single.resume_fingerprint()
        == single.model_copy(
            update={"checkpoint_every": 7, "checkpoint_minutes": 1.0}
        ).resume_fingerprint()
    )


def test_a_launch_that_cannot_start_is_refused_with_the_config():
    with pytest.raises(ValueError, match="batch_size 32 is not divisible by the 3 fine-tuning"):
        PipelineConfig(out_uri="x", nproc_per_node=3)
    with pytest.raises(ValueError, match="nnodes 2 needs rdzv_endpoint"):
        PipelineConfig(out_uri="x", nnodes=2, nproc_per_node=2)
    real = PipelineConfig(**_imagenet_fields())
    assert (real.nproc_per_node, real.nnodes, real.batch_size % real.nproc_per_node) == (8, 1, 0)
    # Checkpoints every 10 minutes of training (and at each epoch end), whatever the step rate.
    assert (real.checkpoint_minutes, real.checkpoint_every) == (10.0, None)


def test_the_embedded_default_models_keep_their_configs_and_fingerprints():
    """At their defaults the launch fields give the FinetuneConfigs the pipeline made before it
    had them, field for field, so every model keeps its fingerprint and output folder; the
    source's P and X take the default's lr and theta_X its game-consistency term, the targets
    ``target_lr``, the lr every target model was trained with before."""
    config = PipelineConfig(out_uri="s3://bucket/run")
    plans = check_domains(config)
    runs = [("shapes", "P", None), ("shapes", "X", None)]
    runs += [(t.name, "P", config.target_epochs) for t in config.target_specs]
    assert config.target_lr == 1e-4  # the lr of every target model before the default moved
    for domain, mode, epochs in runs:
        target = domain != "shapes"
        data = f"s3://bucket/run/data/{domain}" if mode == "P" else "s3://bucket/run/xdata/v-0"
        made = _finetune_config(
            config, plans[domain], mode, "base.safetensors", data, target=target
        )
        before = FinetuneConfig(
            domain=domain,
            mode=mode,
            model_name=config.model_name,
            base="base.safetensors",
            data=data,
            data_name=domain if mode == "P" else None,
            class_names=None,
            templates=plans[domain].spec.templates,
            val_data=f"s3://bucket/run/data/{domain}",
            epochs=epochs or config.epochs,
            batch_size=config.batch_size,
            lr=config.target_lr if target else config.lr,
            beta=config.beta,
            game_consistency=config.game_consistency if mode == "X" else 0.0,
            grid=config.label.grid_h,
            seed=config.seed,
            device=config.device,
            image_size=config.image_size,
            loader_workers=config.loader_workers,
            eval_every=config.eval_every,
        )
        assert made == before
        assert made.resume_fingerprint() == before.resume_fingerprint()


def test_a_reference_has_shards_in_proportion_to_its_images():
    real = PipelineConfig(**_imagenet_fields(out_uri="s3://bucket/run"))
    plans = _plans(real, IMAGENET_CLASSES)
    # ImageNet: 1 image per class of 1,000 classes, 16 a shard (63, under num_shards 64).
    assert reference_shards(real, plans["imagenet"], "test", 1) == 63
    # Pets: 3 per class asked, 37 classes; EuroSAT: 3 of its 20 val images per class.
    assert reference_shards(real, plans["pets"], "test", 3) == 7
    assert reference_shards(real, plans["eurosat"], "val", 3) == 2
    # The split's own cap bounds it: EuroSAT keeps 20 val images a class, whatever is asked.
    assert reference_shards(real, plans["eurosat"], "val", 1000) == 13
    # At least one shard, at most num_shards.
    few = real.model_copy(update={"num_shards": 4})
    assert reference_shards(few, plans["imagenet"], "test", 1) == 4
    tiny = PipelineConfig(out_uri="x", targets=("glyphs",), per_class={"val": 1, "test": 1})
    assert reference_shards(tiny, check_domains(tiny)["glyphs"], "val", 1) == 1
    # The embedded default's references (30 val and 100 test images) keep their 2 shards.
    default = PipelineConfig(out_uri="x")
    for name, plan in check_domains(default).items():
        for split in ("val", "test"):
            per_class = pipeline.reference_per_class(default, split, len(plan.class_names))
            assert reference_shards(default, plan, split, per_class) == 2, (name, split)


class _Recorder:
    """Stands in for every stage of the parent flow and records what each was asked."""

    def __init__(self, accuracy: dict[str, float] | None = None) -> None:
        self.events: list[tuple[str, ...]] = []
        self.finetunes: list[FinetuneConfig] = []
        self.builds: list[Any] = []
        self.accuracy = accuracy or {}

    def install(self, monkeypatch: pytest.MonkeyPatch, plans: dict[str, DomainPlan]) -> None:
        monkeypatch.setattr(pipeline, "check_domains", lambda config: plans)
        monkeypatch.setattr(pipeline, "export_planned_domain", lambda *a, **k: None)
        monkeypatch.setattr(pipeline, "finetune_flow", self.finetune)
        monkeypatch.setattr(pipeline, "build_explanation_dataset", self.build)
        monkeypatch.setattr(pipeline, "compute_vector_flow", self.vector)
        monkeypatch.setattr(pipeline, "transfer_sweep", self.sweep)

    def finetune(
        self, config: FinetuneConfig, out_uri: str, announce: bool = True
    ) -> dict[str, Any]:
        self.events.append(("finetune", config.domain, config.mode))
        self.finetunes.append(config)
        uri = f"{out_uri}/models/{config.domain}-{config.mode}/model.safetensors"
        accuracy = self.accuracy.get(config.domain, 0.99)
        return {**_result(accuracy, uri), "fingerprint": f"{config.domain}{config.mode}" * 4}

    def build(self, config: Any, runner: RunnerConfig, **_: Any) -> dict[str, Any]:
        self.events.append(("build", config.name, config.split))
        self.builds.append(config)
        return {"missing": [], "dataset_uri": f"{config.output_uri}/{config.name}/{config.split}"}

    def vector(self, source: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.events.append(("vector", source))
        return {"uri": f"vectors/{source}.safetensors", "norm": 1.0}

    def sweep(self, config: Any) -> dict[str, Any]:
        self.events.append(("sweep", config.name))
        chosen = {t.domain: 1.0 for t in config.targets}
        return {"chosen": chosen, "table_uri": "results.parquet", "plot_uri": "sweep.png"}


def _real_run(tmp_path: Path, **changes: Any) -> PipelineConfig:
    fields = _imagenet_fields(out_uri=str(tmp_path / "run"), runner={"kind": "thread"})
    fields.update(changes)
    return PipelineConfig(**fields)


@pytest.mark.slow
def test_the_real_config_fans_out_8_gpu_finetunes_and_small_references(tmp_path, monkeypatch):
    config = _real_run(tmp_path)
    recorder = _Recorder()
    recorder.install(monkeypatch, _plans(config, IMAGENET_CLASSES))
    pipeline.explain_transfer_pipeline(config)

    assert {(c.nproc_per_node, c.nnodes, c.world_size) for c in recorder.finetunes} == {(8, 1, 8)}
    # Every prediction-only model, and its floor check, comes before the first labelling.
    first_build = next(i for i, e in enumerate(recorder.events) if e[0] == "build")
    p_models = [i for i, e in enumerate(recorder.events) if e[0] == "finetune" and e[2] == "P"]
    assert len(p_models) == 4 and max(p_models) < first_build
    shards = {(b.name, b.split): (b.num_shards, b.max_per_class) for b in recorder.builds}
    assert shards == {
        ("imagenet-x", "train"): (64, None),  # the X-dataset: 64 tasks over whole shards of P
        ("pets-ref", "val"): (3, 1),
        ("pets-ref", "test"): (7, 3),
        ("food101-ref", "val"): (7, 1),
        ("food101-ref", "test"): (7, 1),
        ("eurosat-ref", "val"): (2, 3),
        ("eurosat-ref", "test"): (7, 10),
        ("imagenet-xref", "test"): (63, 1),
    }


def test_a_target_below_its_floor_stops_the_run_before_any_labelling(tmp_path, monkeypatch):
    config = _real_run(tmp_path)
    recorder = _Recorder(accuracy={"eurosat": 0.11})  # chance on EuroSAT's 10 classes
    recorder.install(monkeypatch, _plans(config, IMAGENET_CLASSES))
    with pytest.raises(
        AccuracyFloorError, match=r"of domain eurosat reaches val accuracy 0\.110"
    ) as info:
        pipeline.explain_transfer_pipeline(config)
    # The command line reports it in one line (exit 2), not as a traceback.
    assert isinstance(info.value, EXPECTED_ERRORS)
    assert not any(event[0] == "build" for event in recorder.events)
    assert recorder.events[-1] == ("finetune", "eurosat", "P")


def test_a_remote_dask_cluster_without_a_reachable_api_stops_the_run_at_its_start(
    tmp_path, monkeypatch
):
    """The shipped config's cluster (tcp://scheduler:8786) on the test's loopback API."""
    config = _real_run(tmp_path, runner=_imagenet_fields()["runner"])
    recorder = _Recorder()
    recorder.install(monkeypatch, _plans(config, IMAGENET_CLASSES))
    with pytest.raises(ValueError, match=r"tcp://scheduler:8786 \(not on loopback\) cannot reach"):
        pipeline.explain_transfer_pipeline(config)
    assert recorder.events == []


@pytest.mark.slow
def test_the_run_states_every_floor_and_warns_of_default_ones_at_its_start(
    tmp_path, monkeypatch, caplog
):
    config = _real_run(tmp_path, min_accuracy={"imagenet": 0.65})
    recorder = _Recorder()
    recorder.install(monkeypatch, _plans(config, IMAGENET_CLASSES))
    with caplog.at_level("INFO"):
        pipeline.explain_transfer_pipeline(config)
    floors = [r.getMessage() for r in caplog.records if "floors" in r.getMessage()]
    assert floors == [
        "val accuracy floors: imagenet 0.65 (chance 0.001), pets 0.9 (chance 0.027), "
        "food101 0.9 (chance 0.0099), eurosat 0.9 (chance 0.1)"
    ]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert [w.split(" (")[0] for w in warned] == ["domain pets", "domain food101", "domain eurosat"]
