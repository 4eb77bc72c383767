"""The transfer sweep on a miniature: two synthetic targets, two lambdas, tiny ViT on CPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from storage import open_storage
from storage.checkpoints import save_state_dict
from storage.layout import shard_name
from storage.shards import ShardWriter
from tasks.algorithms.metrics import accuracy
from tasks.algorithms.vectors import ExplainabilityVector, VectorMeta
from tasks.build_dataset import BuildConfig, LabelConfig, finalize_build, label_shard, plan_build
from tasks.data.images import sample_to_tensor
from tasks.data.synthetic import SYNTHETIC_DOMAINS, make_split
from tasks.finetune import FinetuneConfig, finetune
from tasks.model import DEFAULT_MODEL, load_clip, load_sem, model_fingerprint
from tasks.sweep import (
    TABLE_SCHEMA,
    SweepConfig,
    SweepResult,
    TargetSpec,
    assemble_sweep,
    evaluate_kernel_shap,
    evaluate_sem,
    load_reference,
    load_sweep,
    load_target,
    load_vector,
    select_lambda,
    split_baseline,
    sweep_target,
    target_fingerprint,
    validate_sweep,
)
from tasks.sweep.evaluation import evaluate_edited_agreement, evaluate_edited_kernel_shap
from tasks.sweep.inputs import head_alignment
from tasks.sweep.statistics import standard_error

DOMAINS = ("shapes", "scenes")
REFERENCE_BUDGET = 120


def build_world(root: Path, domains: tuple[str, ...] = DOMAINS) -> dict:
    """theta_T per domain (one fine-tuning step from a shared random base), Kernel SHAP
    references of theta_T on val and test (2 images per class), and a vector on that base."""
    torch.manual_seed(0)
    store = open_storage(str(root))
    base = load_clip(DEFAULT_MODEL)
    save_state_dict(store, "base/model.safetensors", base.state_dict(), {})
    base_fingerprint = model_fingerprint(base)
    targets = []
    for domain in domains:
        data = store.child(f"data/{domain}")
        with ShardWriter(data, shard_name(domain, "train", 0)) as writer:
            for sample in make_split(domain, "train", per_class=1):
                writer.write({k: sample[k] for k in ("__key__", "png", "cls")})
        finetuned = finetune(
            FinetuneConfig(
                domain=domain,
                mode="P",
                base=store.url("base/model.safetensors"),
                data=data.uri,
                epochs=1,
                batch_size=8,
                max_steps=1,
                lr=1e-3,
                device="cpu",
            ),
            store,
            f"targets/{domain}",
        )
        references = {}
        for split in ("val", "test"):
            plan = plan_build(
                BuildConfig(
                    name=f"{domain}-ref",
                    split=split,
                    input_uri=domain,
                    synthetic_per_class=2,
                    checkpoint=finetuned["uri"],
                    label=LabelConfig(budget=REFERENCE_BUDGET, top_k=0, seed=7),
                    num_shards=1,
                    output_uri=store.url("references"),
                    device="cpu",
                )
            )
            label_shard(plan, 0)
            finalize_build(plan)
            references[split] = plan.dataset_uri
        targets.append(
            TargetSpec(
                domain=domain,
                model=finetuned["uri"],
                val_reference=references["val"],
                test_reference=references["test"],
                related=SYNTHETIC_DOMAINS[domain].related,
            )
        )
    # theta_X and theta_P: two perturbed copies of the base, as two fine-tunings would be.
    state = base.state_dict()
    theta_x = {
        k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()
    }
    vector = ExplainabilityVector.from_models(
        theta_x, state, base_fingerprint=base_fingerprint, source_domain="glyphs"
    )
    vector.save(store, "vectors/tau.safetensors")
    return {
        "root": store.uri,
        "targets": tuple(targets),
        "vector": store.url("vectors/tau.safetensors"),
        "vector_object": vector,
    }


def sweep_config(world: dict, **changes) -> SweepConfig:
    fields = dict(
        name="mini",
        vector=world["vector"],
        targets=world["targets"],
        lambdas=(0.0, 1.0),
        kernel_shap_budgets=(25, 100),
        # Insertion/deletion in 7 steps of 7 cells: 16 forward passes per image instead of 100.
        auc_steps=7,
        heatmap_images=3,
        device="cpu",
        output_uri=world["root"],
    )
    fields.update(changes)
    return SweepConfig(**fields)


def run_sweep(config: SweepConfig, *, overwrite: bool = False) -> SweepResult:
    """The stage steps in the order ``flows.sweep.transfer_sweep`` runs them, without Prefect:
    a done sweep is read back; else validate, every target, assemble."""
    stored = None if overwrite else load_sweep(config)
    if stored is not None:
        return stored
    validate_sweep(config)
    vector = load_vector(config.vector)
    outcomes = [
        sweep_target(config, spec.domain, vector=vector, overwrite=overwrite)
        for spec in config.targets
    ]
    return assemble_sweep(config, outcomes)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return build_world(tmp_path_factory.mktemp("sweep-world"))


@pytest.fixture(scope="module")
def swept(world: dict):
    return run_sweep(sweep_config(world))


def _same_rows(a: list[dict], b: list[dict]) -> bool:
    """Row lists equal in the table's columns, NaN equal to NaN (Kernel SHAP rows have no lambda).

    ``per_image`` (kept beside the table, not in it) is left out.
    """

    def key(value):
        return "nan" if isinstance(value, float) and math.isnan(value) else value

    return [{k: key(v) for k, v in r.items() if k != "per_image"} for r in a] == [
        {k: key(v) for k, v in r.items() if k != "per_image"} for r in b
    ]


def _accuracy_of_theta_t(world: dict, domain: str, split: str) -> float:
    """theta_T's accuracy computed without the sweep: loader, synthetic images, one pass."""
    spec = next(t for t in world["targets"] if t.domain == domain)
    sem = load_sem(spec.model).sem
    samples = list(make_split(domain, split, per_class=2))
    images = torch.stack([sample_to_tensor(s, 56) for s in samples])
    labels = torch.tensor([s["cls"] for s in samples])
    with torch.no_grad():
        logits, _ = sem(images)
    return accuracy(logits, labels)


def test_config_validation() -> None:
    spec = TargetSpec(domain="shapes", model="m", val_reference="v", test_reference="t")
    config = SweepConfig(name="s", vector="v.safetensors", targets=(spec,), output_uri="o")
    assert config.lambdas == (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
    assert config.kernel_shap_budgets == (25, 50, 100, 150, 300)
    for bad in [(0.5, 1.0), (0.0, 1.0, 0.5), (0.0, math.inf), (0.0, 0.0), ()]:
        with pytest.raises(ValidationError, match="lambdas"):
            SweepConfig(name="s", vector="v", targets=(spec,), output_uri="o", lambdas=bad)
    with pytest.raises(ValidationError, match="repeat domains"):
        SweepConfig(name="s", vector="v", targets=(spec, spec), output_uri="o")
    with pytest.raises(ValidationError, match="topk"):
        SweepConfig(name="s", vector="v", targets=(spec,), output_uri="o", grid=2, topk=5)


def test_select_lambda_respects_the_accuracy_tolerance() -> None:
    rows = [
        {"lambda": 0.0, "accuracy": 0.80, "pearson": 0.10},
        {"lambda": 0.5, "accuracy": 0.795, "pearson": 0.40},  # -0.5 points: allowed
        {"lambda": 1.0, "accuracy": 0.78, "pearson": 0.90},  # -2 points: too much
        {"lambda": 2.0, "accuracy": 0.85, "pearson": math.nan},
    ]
    assert select_lambda(rows, tolerance=1.0) == 0.5
    assert select_lambda(rows, tolerance=2.0) == 1.0
    assert select_lambda(rows, tolerance=0.0) == 0.0
    # Lower deletion AUC is better; ties go to the smaller edit.
    rows = [
        {"lambda": 0.0, "accuracy": 0.5, "deletion_auc": 0.3},
        {"lambda": 0.5, "accuracy": 0.5, "deletion_auc": 0.2},
        {"lambda": 1.0, "accuracy": 0.5, "deletion_auc": 0.2},
    ]
    assert select_lambda(rows, metric="deletion_auc") == 0.5
    with pytest.raises(ValueError, match="lambda = 0"):
        select_lambda(rows[1:])


def test_sem_and_kernel_shap_evaluations_measure_agreement_with_the_reference(world) -> None:
    spec = world["targets"][0]
    target = load_target(spec, grid=7)
    data = load_reference(spec.test_reference)
    assert len(data) == 10 and data.grid == (7, 7) and data.has_masks
    baseline = split_baseline(data, "mean")
    common = dict(baseline=baseline, auc_output="prob", auc_steps=7)

    # Against its own maps, the SEM agrees perfectly: the label class is the one compared.
    own_batches = []
    with torch.no_grad():
        for batch in data.batches(4):
            _, maps = target.sem(batch.images)
            label_maps = maps[torch.arange(len(batch.keys)), batch.labels]
            own_batches.append(batch._replace(targets=label_maps))
    data.batches = lambda size: iter(own_batches)
    own = evaluate_sem(target.sem, data, **common, batch_size=4)
    assert own["pearson"] == pytest.approx(1.0) and own["topk"] == pytest.approx(1.0)
    assert 0.0 <= own["insertion_auc"] <= 1.0 and 0.0 <= own["deletion_auc"] <= 1.0
    assert 0.0 <= own["pointing"] <= 1.0 and own["images"] == 10

    # Kernel SHAP with the reference's seed and budget reproduces the reference (same baseline,
    # same coalitions); any other seed gives an estimate that only approximates it.
    data = load_reference(spec.test_reference)
    same = evaluate_kernel_shap(target.sem, data, REFERENCE_BUDGET, seed=7, **common)
    other = evaluate_kernel_shap(target.sem, data, REFERENCE_BUDGET, seed=8, **common)
    assert same["pearson"] == pytest.approx(1.0, abs=1e-5)
    assert 0.0 < other["pearson"] < same["pearson"] - 1e-4
    assert same["accuracy"] == pytest.approx(_accuracy_of_theta_t(world, spec.domain, "test"))


def test_sweep_writes_table_plot_heatmaps_and_summary(world, swept) -> None:
    table = swept.table
    assert set(TABLE_SCHEMA.names) <= set(table.column_names)
    # Per target: 2 lambdas x 2 splits of SEM rows, 2 Kernel SHAP budgets on test.
    assert table.num_rows == 2 * (2 * 2 + 2)
    out = open_storage(world["root"]).child("sweeps/mini")
    assert _same_rows(out.read_parquet("results.parquet").to_pylist(), swept.rows)
    for key in ["sweep.png", *(f"heatmaps-{d}.png" for d in DOMAINS)]:
        assert out.read_bytes(key)[:8] == b"\x89PNG\r\n\x1a\n", key
    summary = out.read_json("summary.json")
    assert summary["chosen"] == swept.chosen and set(swept.chosen) == set(DOMAINS)
    report = out.read_bytes("report.md").decode()
    assert all(f"| {d} |" in report for d in DOMAINS) and "paired bootstrap" in report
    assert "### At the largest lambda" in report and "accuracy images" in report
    for domain in DOMAINS:
        per_image = out.read_json(f"targets/{domain}-per-image.json")
        rows = [r for r in swept.rows if r["target"] == domain]
        assert [p["pearson"] for p in per_image] == [r["per_image"]["pearson"] for r in rows]
        assert all(
            len(p["correct"]) == r["accuracy_images"] == r["images"]
            for p, r in zip(per_image, rows, strict=True)
        )
    assert out.is_complete("results")

    for row in swept.rows:
        assert row["method"] in ("sem", "kernel_shap") and row["split"] in ("val", "test")
        if row["method"] == "sem":
            assert row["inferences"] == 1 and row["lambda"] in (0.0, 1.0)
        else:
            assert math.isnan(row["lambda"]) and row["inferences"] in (25, 100)
            assert row["split"] == "test" and not row["chosen"]
        assert -1.0 <= row["pearson"] <= 1.0 and 0.0 <= row["topk"] <= 1.0
        assert 0.0 <= row["insertion_auc"] <= 1.0 and 0.0 <= row["pointing"] <= 1.0


def test_lambda_zero_reproduces_the_target_models_accuracy_exactly(world, swept) -> None:
    for domain in DOMAINS:
        for split in ("val", "test"):
            [row] = [
                r
                for r in swept.rows
                if (r["target"], r["method"], r["split"], r["lambda"])
                == (domain, "sem", split, 0.0)
            ]
            assert row["accuracy"] == _accuracy_of_theta_t(world, domain, split)
        shap_rows = [
            r for r in swept.rows if r["target"] == domain and r["method"] == "kernel_shap"
        ]
        test_zero = [
            r for r in swept.rows if (r["target"], r["split"], r["lambda"]) == (domain, "test", 0.0)
        ]
        assert {r["accuracy"] for r in shap_rows} == {test_zero[0]["accuracy"]}


def test_chosen_lambda_is_the_best_within_the_tolerance_on_validation(swept) -> None:
    for domain in DOMAINS:
        sem = [r for r in swept.rows if r["target"] == domain and r["method"] == "sem"]
        val = [r for r in sem if r["split"] == "val"]
        chosen = swept.chosen[domain]
        assert chosen == select_lambda(val, metric="pearson", tolerance=1.0)
        at_zero = next(r for r in val if r["lambda"] == 0.0)
        picked = next(r for r in val if r["lambda"] == chosen)
        assert picked["accuracy"] >= at_zero["accuracy"] - 0.01
        allowed = [r for r in val if r["accuracy"] >= at_zero["accuracy"] - 0.01]
        best = max(allowed, key=lambda r: r["pearson"])
        # One-standard-error rule: nothing allowed beats the pick by more than the best's SE,
        # and no smaller edit is within it.
        error = standard_error(best["per_image"]["pearson"])
        assert best["pearson"] - picked["pearson"] <= error + 1e-12
        for row in allowed:
            if abs(row["lambda"]) < abs(chosen):
                assert row["pearson"] < best["pearson"] - error
        # Marked on its val and test rows, and only there.
        assert sorted((r["split"], r["lambda"]) for r in sem if r["chosen"]) == [
            ("test", chosen),
            ("val", chosen),
        ]


def test_a_complete_sweep_is_not_recomputed(world, swept) -> None:
    out = open_storage(world["root"]).child("sweeps/mini")
    before = out.read_bytes("results.parquet")
    again = run_sweep(sweep_config(world))
    assert again.skipped and again.chosen == swept.chosen
    assert _same_rows(again.rows, swept.rows) and out.read_bytes("results.parquet") == before
    with pytest.raises(ValueError, match="other settings"):
        run_sweep(sweep_config(world, lambdas=(0.0, 0.5)))


def test_stored_rows_are_tied_to_the_vectors_content_not_only_its_uri(world, tmp_path) -> None:
    store = open_storage(str(tmp_path))
    world["vector_object"].save(store, "tau.safetensors")
    config = sweep_config(world, vector=store.url("tau.safetensors"))
    before = target_fingerprint(config, "shapes")
    assert target_fingerprint(config, "shapes") == before
    (2.0 * world["vector_object"]).save(store, "tau.safetensors")
    assert target_fingerprint(config, "shapes") != before


def test_a_target_is_skipped_only_while_its_vector_is_unchanged(world, tmp_path) -> None:
    store = open_storage(str(tmp_path))
    world["vector_object"].save(store, "tau.safetensors")
    config = sweep_config(
        world,
        name="redo",
        vector=store.url("tau.safetensors"),
        targets=world["targets"][:1],
        kernel_shap_budgets=(25,),
        max_images=2,
        heatmap_images=0,
    )
    first = sweep_target(config, "shapes")
    again = sweep_target(config, "shapes")
    assert not first.skipped and again.skipped and _same_rows(again.rows, first.rows)

    # Rewritten in place under the same URI: the stored rows no longer hold, they are redone.
    (2.0 * world["vector_object"]).save(store, "tau.safetensors")
    redone = sweep_target(config, "shapes")
    assert not redone.skipped

    def at(rows: list[dict], coef: float) -> list[dict]:
        return [r for r in rows if r["method"] == "sem" and r["lambda"] == coef]

    assert _same_rows(at(redone.rows, 0.0), at(first.rows, 0.0))
    assert not _same_rows(at(redone.rows, 1.0), at(first.rows, 1.0))


def test_a_vector_from_another_base_or_with_other_shapes_is_refused(world, tmp_path) -> None:
    vector = world["vector_object"]
    store = open_storage(str(tmp_path))
    other_base = ExplainabilityVector(
        vector.deltas, VectorMeta.from_dict({**vector.meta.to_dict(), "base_fingerprint": "0" * 16})
    )
    other_base.save(store, "other-base.safetensors")
    config = sweep_config(world, name="refused", vector=store.url("other-base.safetensors"))
    with pytest.raises(ValueError, match="cannot be applied to 'shapes'.*built on base"):
        run_sweep(config)
    assert not open_storage(world["root"]).list("sweeps/refused")
    # The explicit override lets it through.
    validate_sweep(config.model_copy(update={"allow_different_base": True}))

    deltas = dict(vector.deltas)
    deltas["visual.proj"] = torch.zeros(3, 3, dtype=torch.float64)
    ExplainabilityVector(deltas, vector.meta).save(store, "other-shape.safetensors")
    config = sweep_config(world, name="refused", vector=store.url("other-shape.safetensors"))
    with pytest.raises(ValueError, match="shape mismatch.*visual.proj"):
        run_sweep(config)


def test_a_reference_of_another_model_is_refused(world) -> None:
    shapes, scenes = world["targets"]
    wrong = shapes.model_copy(update={"test_reference": scenes.test_reference})
    config = sweep_config(world, name="wrong-reference", targets=(wrong,))
    with pytest.raises(ValueError, match="reference explains model"):
        sweep_target(config, "shapes")


ACCURACY_PER_CLASS = 6


def _accuracy_data(world: dict, domain: str) -> str:
    """The target's labelled val and test splits, 6 images per class in two shards each: the
    reference's 2 per class are their first images (class ``index % C`` at ``index``)."""
    data = open_storage(world["root"]).child(f"accuracy/{domain}")
    for split in ("val", "test"):
        samples = list(make_split(domain, split, per_class=ACCURACY_PER_CLASS))
        half = len(samples) // 2
        for index, part in enumerate((samples[:half], samples[half:])):
            if data.is_complete(shard_name(domain, split, index)):
                continue
            with ShardWriter(data, shard_name(domain, split, index)) as writer:
                for sample in part:
                    writer.write({k: sample[k] for k in ("__key__", "png", "cls")})
    return data.uri


def _direct_accuracy(sem, domain: str, split: str) -> tuple[float, int]:
    """Accuracy over the whole split by one plain forward pass, without the sweep's reader."""
    samples = list(make_split(domain, split, per_class=ACCURACY_PER_CLASS))
    images = torch.stack([sample_to_tensor(s, 56) for s in samples])
    labels = torch.tensor([s["cls"] for s in samples])
    with torch.no_grad():
        logits, _ = sem(images)
    correct = int((logits.argmax(dim=1) == labels).sum())
    return correct / len(samples), len(samples)


def test_accuracy_is_measured_on_the_whole_split_of_the_accuracy_data(world, tmp_path) -> None:
    spec = world["targets"][0]
    with_data = spec.model_copy(
        update={"accuracy_data": _accuracy_data(world, spec.domain), "accuracy_name": spec.domain}
    )
    config = sweep_config(
        world,
        name="accuracy",
        targets=(with_data,),
        kernel_shap_budgets=(25,),
        heatmap_images=0,
    )
    plain = sweep_config(world, name="accuracy", targets=(spec,), kernel_shap_budgets=(25,))
    assert target_fingerprint(config, spec.domain) != target_fingerprint(plain, spec.domain)
    classes = len(SYNTHETIC_DOMAINS[spec.domain].class_names)
    outcome = sweep_target(config, spec.domain)

    target = load_target(spec, grid=7)
    for row in outcome.rows:
        # Explanation metrics on the reference (2 per class), accuracy on all 6 per class.
        assert row["images"] == 2 * classes
        assert row["accuracy_images"] == ACCURACY_PER_CLASS * classes
        assert len(row["per_image"]["correct"]) == row["accuracy_images"]
        assert len(row["per_image"]["pearson"]) == row["images"]
        assert row["accuracy"] == pytest.approx(
            sum(row["per_image"]["correct"]) / row["accuracy_images"], abs=1e-12
        )
        coef = 0.0 if row["method"] == "kernel_shap" else row["lambda"]
        target.load_lambda(world["vector_object"], coef)
        expected, images = _direct_accuracy(target.sem, spec.domain, row["split"])
        assert images == row["accuracy_images"]
        assert row["accuracy"] == pytest.approx(expected, abs=1e-12), row
    assert outcome.rows[0]["method"] == "kernel_shap"

    # Without accuracy data, accuracy stays on the reference's images.
    [kernel_shap] = [
        r
        for r in run_sweep(sweep_config(world)).rows
        if r["target"] == spec.domain and r["method"] == "kernel_shap" and r["inferences"] == 25
    ]
    assert kernel_shap["accuracy_images"] == kernel_shap["images"] == 2 * classes


def test_a_target_without_a_val_reference_is_refused_but_a_source_needs_none(world) -> None:
    spec = world["targets"][0]
    with pytest.raises(ValidationError, match="val_reference is required"):
        TargetSpec(domain=spec.domain, model=spec.model, test_reference=spec.test_reference)
    source = TargetSpec(
        domain=spec.domain, model=spec.model, test_reference=spec.test_reference, role="source"
    )
    assert source.splits == ("test",) and source.lambdas((0.0, 1.0, 2.0)) == (0.0,)


def _target_and_source(world: dict) -> tuple[TargetSpec, TargetSpec]:
    """The world's first target, and its second standing in for a source in domain."""
    target, stand_in = world["targets"]
    source = TargetSpec(
        domain=stand_in.domain,
        model=stand_in.model,
        test_reference=stand_in.test_reference,
        role="source",
    )
    return target, source


def test_the_source_role_is_evaluated_in_domain_at_lambda_0_and_reported_apart(
    world, tmp_path
) -> None:
    """theta_X of the source (here a theta_T stands in) is scored at lambda 0 on test only,
    against Kernel SHAP of the same model: the paper's in-domain claim, in its own table."""
    target, source = _target_and_source(world)
    config = sweep_config(
        world, targets=(target, source), kernel_shap_budgets=(25, 150), output_uri=str(tmp_path)
    )
    assert config.evaluations_per_target(source.domain) == 1 + 2
    assert config.evaluations_per_target(target.domain) == 2 * 2 + 2
    result = run_sweep(config)
    rows = [r for r in result.rows if r["target"] == source.domain]
    assert {(r["method"], r["split"], r["inferences"]) for r in rows} == {
        ("sem", "test", 1),
        ("kernel_shap", "test", 25),
        ("kernel_shap", "test", 150),
    }
    [sem] = [r for r in rows if r["method"] == "sem"]
    assert sem["lambda"] == 0.0 and sem["chosen"] and sem["role"] == "source"
    # No vector is added at lambda 0: the same numbers as the target's own lambda-0 test row.
    [own] = [
        r
        for r in run_sweep(sweep_config(world)).rows
        if (r["target"], r["method"], r["split"], r["lambda"])
        == (source.domain, "sem", "test", 0.0)
    ]
    assert sem["pearson"] == pytest.approx(own["pearson"])
    assert sem["accuracy"] == own["accuracy"]
    assert result.chosen[source.domain] == 0.0
    report = open_storage(str(tmp_path)).child("sweeps/mini").read_bytes("report.md").decode()
    main_table, in_domain = report.split("### In domain")
    assert f"| {source.domain} |" not in main_table.split("### Every row")[0]
    assert f"| {target.domain} |" in main_table
    in_domain = in_domain.split("### Every row")[0]
    [line] = [x for x in in_domain.splitlines() if x.startswith(f"| {source.domain} |")]
    assert "[" in line  # SEM - KS-b carries a paired interval
    # alpha: the target's class embeddings against the source head's mean direction.
    heads = {
        spec.domain: load_target(spec, config.grid).sem.class_embeddings
        for spec in (target, source)
    }
    s = torch.nn.functional.normalize(heads[source.domain].mean(dim=0), dim=0)
    alpha = result.summary["head_alignment"]
    assert alpha.keys() == {target.domain}
    assert alpha[target.domain] == pytest.approx(float((heads[target.domain] @ s).mean()), abs=1e-6)
    assert -1.0 <= alpha[target.domain] <= 1.0
    assert f"{alpha[target.domain]:.3f} |" in main_table.split("### At the largest lambda")[1]
    # Without a source there is nothing to read s from: no alpha.
    assert head_alignment(sweep_config(world)) == {}


def test_edited_kernel_shap_at_lambda_0_reuses_the_theta_t_row(world) -> None:
    """At lambda* 0 the edited model is theta_T: its Kernel SHAP row at that budget is the one
    already measured (same images, same seed), taken without touching the model again; another
    lambda, or a budget not measured, computes it."""
    config = sweep_config(world, edited_kernel_shap_budget=25, kernel_shap_budgets=(25, 60))
    spec = config.targets[0]
    measured = {
        "target": spec.domain,
        "method": "kernel_shap",
        "lambda": math.nan,
        "inferences": 25,
        "split": "test",
        "images": 4,
        "pearson": 0.5,
        "chosen": False,
    }
    other_budget = {**measured, "inferences": 60, "pearson": 0.7}
    val = {**measured, "split": "val", "pearson": 0.1}
    rows = [val, other_budget, measured]
    # No model, vector or data: reusing the row must not need them.
    edited = evaluate_edited_kernel_shap(config, spec, None, None, None, 0.0, rows)
    assert edited == {**measured, "method": "kernel_shap_edited", "lambda": 0.0}
    assert measured["method"] == "kernel_shap"  # the measured row is left as it was
    with pytest.raises(AttributeError):  # lambda 1 explains a new model: it needs one
        evaluate_edited_kernel_shap(config, spec, None, None, None, 1.0, rows)
    with pytest.raises(AttributeError):  # the budget was not measured on test
        evaluate_edited_kernel_shap(config, spec, None, None, None, 0.0, [val, other_budget])


def test_the_source_may_pair_its_in_domain_rows_over_more_images_than_the_targets(
    world, tmp_path
) -> None:
    """``source_kernel_shap_images`` sets the source's Kernel SHAP images alone: the targets'
    rows (and their fingerprints) are those of ``kernel_shap_images``."""
    target, source = _target_and_source(world)
    common = dict(targets=(target, source), kernel_shap_budgets=(25,), kernel_shap_images=2)
    plain = sweep_config(world, **common, output_uri=str(tmp_path / "plain"))
    more = sweep_config(
        world, **common, source_kernel_shap_images=4, output_uri=str(tmp_path / "more")
    )
    assert more.result_fingerprint(target=target.domain) == plain.result_fingerprint(
        target=target.domain
    )
    assert more.result_fingerprint(target=source.domain) != plain.result_fingerprint(
        target=source.domain
    )
    images = {
        (r["target"], r["method"]): r["images"]
        for r in run_sweep(more).rows
        if r["method"] in ("kernel_shap", "sem") and r["split"] == "test"
    }
    assert images[source.domain, "kernel_shap"] == 4
    assert images[target.domain, "kernel_shap"] == 2
    assert images[source.domain, "sem"] > 4


def test_kernel_shap_images_limits_the_baseline_to_the_first_reference_images(
    world, tmp_path
) -> None:
    """Kernel SHAP rows on the first 4 test images: their per-image scores are the full run's
    first 4 (per-image seeds do not depend on the batch); the SEM rows keep every image. The
    edited model's Kernel SHAP row explains theta_T + lambda* tau on those 4 images."""
    config = sweep_config(
        world,
        kernel_shap_images=4,
        edited_kernel_shap_budget=25,
        output_uri=str(tmp_path / "limited"),
    )
    every = sweep_config(world, output_uri=str(tmp_path / "every"))
    assert config.result_fingerprint() != every.result_fingerprint()
    first = world["targets"][0].domain
    assert config.evaluations_per_target(first) == every.evaluations_per_target(first) + 1
    limited, swept = run_sweep(config), run_sweep(every)
    edited = [r for r in limited.rows if r["method"] == "kernel_shap_edited"]
    assert {r["target"] for r in edited} == set(limited.chosen)
    for row in edited:
        chosen = limited.chosen[row["target"]]
        assert row["lambda"] == chosen and row["images"] == 4 and row["inferences"] == 25
        # Its accuracy is the edited model's, as the SEM row at lambda* measured it.
        [sem] = [
            r
            for r in limited.rows
            if (r["target"], r["method"], r["split"]) == (row["target"], "sem", "test")
            and r["lambda"] == chosen
        ]
        assert (row["accuracy"], row["accuracy_images"]) == (
            sem["accuracy"],
            sem["accuracy_images"],
        )
        [plain] = [
            r
            for r in limited.rows
            if (r["target"], r["method"], r["inferences"]) == (row["target"], "kernel_shap", 25)
        ]
        # At lambda 0 the edited model is theta_T itself: the same explanation, to the bit.
        same = row["per_image"]["deletion_auc"] == plain["per_image"]["deletion_auc"]
        assert same == (chosen == 0.0)
    report = open_storage(str(tmp_path / "limited")).child("sweeps/mini").read_bytes("report.md")
    assert "Kernel SHAP of the same edited model" in report.decode()
    for row in (r for r in limited.rows if r["method"] != "kernel_shap_edited"):
        [full] = [
            r
            for r in swept.rows
            if all(
                _same(r[k], row[k]) for k in ("target", "method", "split", "lambda", "inferences")
            )
        ]
        if row["method"] == "kernel_shap":
            assert row["images"] == 4 and full["images"] == 10
            assert row["per_image"]["pearson"] == full["per_image"]["pearson"][:4]
        else:
            assert row["images"] == full["images"] == 10
            assert row["pearson"] == pytest.approx(full["pearson"])


def _same(a, b) -> bool:
    return (isinstance(a, float) and math.isnan(a) and math.isnan(b)) or a == b


def test_load_target_keeps_theta_t_on_the_cpu_apart_from_the_sem(world, monkeypatch) -> None:
    """The model (and its head's text tower) goes to the sweep's device; the state the vector
    is applied to is a CPU copy that editing the SEM leaves as theta_T."""
    import tasks.sweep.inputs as inputs

    spec = world["targets"][0]
    devices: list[object] = []
    original = inputs.load_sem

    def recording(*args, **kwargs):
        devices.append(kwargs.get("device"))
        return original(*args, **kwargs)

    monkeypatch.setattr(inputs, "load_sem", recording)
    target = load_target(spec, grid=7, device="cpu")
    assert devices == [torch.device("cpu")]
    before = {k: v.clone() for k, v in target.state.items()}
    vector = load_vector(world["vector"])
    target.load_lambda(vector, 1.0)
    edited = target.sem.clip.state_dict()
    assert all(v.device.type == "cpu" for v in target.state.values())
    assert all(torch.equal(target.state[k], before[k]) for k in before)
    assert any(not torch.equal(edited[k], before[k]) for k in vector.keys())


def test_edited_agreement_scores_the_edited_model_on_its_own_reference(world, tmp_path) -> None:
    """The SEM pass at lambda* and Kernel SHAP of the same edited model are scored against a
    reference of that edited model: at lambda 0 it is theta_T's own reference (same budget, seed
    and baseline), so the SEM's per-image Pearson is the lambda-0 row's; at lambda 1 the model,
    hence the reference, moved; the report says which budget the pass matches."""
    config = sweep_config(
        world,
        kernel_shap_images=4,
        edited_agreement_budgets=(60, 25),
        output_uri=str(tmp_path / "agreement"),
    )
    assert config.edited_agreement_budgets == (25, 60)
    first = world["targets"][0]
    plain = sweep_config(world, kernel_shap_images=4, output_uri=str(tmp_path / "plain"))
    assert (
        config.evaluations_per_target(first.domain)
        == plain.evaluations_per_target(first.domain) + 2 + 2
    )
    assert config.result_fingerprint() != plain.result_fingerprint()
    result = run_sweep(config)
    data = load_reference(first.test_reference)
    model = load_target(first, config.grid, "cpu")
    vector = world["vector_object"]
    at_zero = evaluate_edited_agreement(config, first, model, vector, data, 0.0)
    assert [(r["method"], r["inferences"], r["images"]) for r in at_zero] == [
        ("sem_vs_edited", 1, 4),
        ("kernel_shap_vs_edited", 25, 4),
        ("kernel_shap_vs_edited", 60, 4),
    ]
    [sem_zero] = [
        r
        for r in result.rows
        if (r["target"], r["method"], r["split"], r["lambda"]) == (first.domain, "sem", "test", 0)
    ]
    assert at_zero[0]["per_image"]["pearson"] == pytest.approx(
        sem_zero["per_image"]["pearson"][:4], abs=1e-4
    )
    [ks_zero] = [
        r
        for r in result.rows
        if (r["target"], r["method"], r["inferences"]) == (first.domain, "kernel_shap", 25)
    ]
    assert at_zero[1]["per_image"]["pearson"] == pytest.approx(
        ks_zero["per_image"]["pearson"], abs=1e-4
    )
    at_one = evaluate_edited_agreement(config, first, model, vector, data, 1.0)
    assert at_one[0]["per_image"]["pearson"] != pytest.approx(
        sem_zero["per_image"]["pearson"][:4], abs=1e-3
    )
    for target, chosen in result.chosen.items():
        found = [
            r for r in result.rows if r["target"] == target and r["method"].endswith("_vs_edited")
        ]
        assert [(r["method"], r["inferences"], r["lambda"]) for r in found] == [
            ("sem_vs_edited", 1, chosen),
            ("kernel_shap_vs_edited", 25, chosen),
            ("kernel_shap_vs_edited", 60, chosen),
        ]
    report = open_storage(str(tmp_path / "agreement")).child("sweeps/mini").read_bytes("report.md")
    section = report.decode().split("same edited model (test, Pearson)")[1].split("###")[0]
    for target in result.chosen:
        [line] = [x for x in section.splitlines() if x.startswith(f"| {target} |")]
        assert line.rstrip(" |").rsplit("| ", 1)[1].strip() in {
            "< KS-25",
            "KS-25",
            "KS-60",
            "> KS-60",
        }


def test_the_matched_budget_reads_the_paired_intervals() -> None:
    from tasks.sweep.markdown import _matched_budget
    from tasks.sweep.statistics import Interval

    def iv(low: float, high: float) -> Interval:
        return Interval((low + high) / 2, low, high, 24)

    assert _matched_budget({50: iv(0.1, 0.2), 150: iv(0.01, 0.1)}) == "> KS-150"
    assert _matched_budget({50: iv(0.1, 0.2), 150: iv(-0.1, 0.1)}) == "KS-150"
    assert _matched_budget({50: iv(-0.05, 0.1), 150: iv(-0.3, -0.1)}) == "KS-50"
    assert _matched_budget({50: iv(-0.2, -0.1), 150: iv(-0.3, -0.1)}) == "< KS-50"
    assert _matched_budget({50: None}) == "n/a"
