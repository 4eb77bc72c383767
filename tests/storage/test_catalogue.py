"""The X-dataset catalogue (list, show, gc) on versions the real build stage wrote.

The versions are built once per module by the build stage itself (plan, label, finalize) on a
tiny synthetic input, then copied object by object, oldest first, into each test's root: a local
folder or a prefix of a loopback S3 bucket. So the layout is the real one and the creation order
is known.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from flows.datasets_cli import add_parser, human_age, human_size, main
from storage import Storage, layout, open_storage
from storage.catalogue import (
    apply_gc,
    deletion_phases,
    list_objects,
    list_versions,
    plan_gc,
    show_version,
)
from storage.local import LocalStorage

#: The versions the module builds, oldest first: (id, name, domain, budget, labelled shards or
#: None for all, finalized). C lost its second shard; E was planned and never labelled.
BUILDS = (
    ("A", "toy-x", "shapes", 12, None, True),
    ("B", "toy-x", "shapes", 14, None, True),
    ("C", "toy-x", "shapes", 16, [0], True),
    ("E", "toy-x", "shapes", 18, [], False),
    ("D", "other-x", "glyphs", 12, None, True),
)
#: A folder an interrupted gc left: D's files without its config.json.
ORPHAN = "v-00000000halfgone"


@dataclass
class Built:
    """One version as the build stage reported it."""

    name: str
    version: str
    folder: Path
    model_fingerprint: str
    label: dict[str, Any]
    shards_expected: int
    done: list[str]
    missing: list[str]
    samples: int
    status: str
    objects: dict[str, bytes] = field(default_factory=dict)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    """The versions of :data:`BUILDS`, built by the real stage into a local folder."""
    from tasks.build_dataset import (
        BuildConfig,
        LabelConfig,
        finalize_build,
        label_shard,
        plan_build,
    )

    out = tmp_path_factory.mktemp("catalogue-source") / "xdata"
    found = {}
    for ident, name, domain, budget, labelled, finalized in BUILDS:
        config = BuildConfig(
            name=name,
            split="val",
            input_kind="synthetic",
            input_uri=domain,
            synthetic_per_class=1,
            num_shards=2,
            output_uri=str(out),
            device="cpu",
            label=LabelConfig(grid_h=3, grid_w=3, budget=budget, top_k=0, images_per_batch=8),
        )
        plan = plan_build(config)
        shards = range(plan.output_shards) if labelled is None else labelled
        outcomes = [label_shard(plan, index) for index in shards]
        summary = finalize_build(plan) if finalized else None
        done = [outcome.shard for outcome in outcomes]
        planned = [plan.shard_key(index) for index in range(plan.output_shards)]
        folder = Path(plan.dataset_uri)
        status = "complete" if done == planned else "failed" if finalized else "incomplete"
        found[ident] = Built(
            name=name,
            version=plan.version,
            folder=folder,
            model_fingerprint=plan.model_fingerprint,
            label=config.label.to_dict(),
            shards_expected=plan.output_shards,
            done=done,
            missing=[shard for shard in planned if shard not in done],
            samples=summary["samples"] if summary else 0,
            status=status,
            objects={
                path.relative_to(folder).as_posix(): path.read_bytes()
                for path in sorted(folder.rglob("*"))
                if path.is_file()
            },
        )
        assert (summary is None) or summary["samples"] == sum(o.samples for o in outcomes)
    return found


def _tick(storage: Storage) -> None:
    """Wait until the store's clock can tell the next write from the last (S3: seconds)."""
    time.sleep(0.02 if isinstance(storage, LocalStorage) else 1.05)


def _install(built: dict[str, Built], uri: str, prefix: str = "xdata/") -> Storage:
    """Copy the built versions under ``uri`` + ``prefix``, oldest first, config.json first."""
    root = open_storage(uri)
    for ident, *_ in BUILDS:
        version = built[ident]
        folder = root.child(f"{prefix}{version.name}/{version.version}")
        for key in sorted(version.objects, key=lambda k: k != layout.DATASET_CONFIG_FILE):
            folder.write_bytes(key, version.objects[key])
        _tick(root)
    orphan = root.child(f"{prefix}other-x/{ORPHAN}")
    for key, data in built["D"].objects.items():
        if key != layout.DATASET_CONFIG_FILE:
            orphan.write_bytes(key, data)
    return root


def _reference_model(root: Storage, data_uri: str) -> str:
    """A fine-tuned model's sidecar, written as the fine-tuning stage writes it, reading
    ``data_uri``; returns the sidecar's key."""
    import torch

    from storage.checkpoints import save_state_dict
    from tasks.finetune import FinetuneConfig

    config = FinetuneConfig(domain="shapes", mode="X", data=data_uri, device="cpu")
    run = layout.finetune_key(config.domain, config.mode, config.resume_fingerprint())
    save_state_dict(
        root.child(run),
        "model.safetensors",
        {"weight": torch.zeros(2)},
        metadata={
            "kind": "finetuned",
            "domain": config.domain,
            "mode": config.mode,
            "model_name": config.model_name,
            "fingerprint": "0" * 16,
            "base_fingerprint": "1" * 16,
            "config": config.to_dict(),
            "metrics": [],
            "step": 1,
        },
    )
    return f"{run}/model.json"


def _reference_sweep(root: Storage, test_reference: str) -> str:
    """A sweep's summary.json, in the sweep stage's format, whose target reads
    ``test_reference``; returns its key."""
    from tasks.sweep.config import SweepConfig, TargetSpec

    config = SweepConfig(
        name="toy-sweep",
        vector=f"{root.uri}/vectors/toy.safetensors",
        targets=(
            TargetSpec(
                domain="glyphs",
                model=f"{root.uri}/models/glyphs-P-0/model.safetensors",
                val_reference=f"{root.uri}/xdata/glyphs-ref/v-0123",
                test_reference=test_reference,
            ),
        ),
        output_uri=root.uri,
    )
    key = f"{layout.sweep_key(config.name)}/{layout.SWEEP_SUMMARY_FILE}"
    root.write_json(key, {"name": config.name, "chosen": {}, "config": config.to_dict()})
    return key


def _by_version(versions: list[Any]) -> dict[str, Any]:
    return {version.version: version for version in versions}


def test_list_reports_what_each_version_was_built_with(built, storage_uri):
    root = _install(built, storage_uri)
    versions = list_versions(storage_uri)

    # By name, newest first: the orphan has no creation time of its own but its oldest file.
    toy = [v.version for v in versions if v.name == "toy-x"]
    assert toy == [built[i].version for i in ("E", "C", "B", "A")]
    listed = _by_version(versions)
    assert set(listed) == {b.version for b in built.values()} | {ORPHAN}
    for ident, expected in built.items():
        version = listed[expected.version]
        assert (version.name, version.split, version.status) == (
            expected.name,
            "val",
            expected.status,
        ), ident
        assert version.model_fingerprint == expected.model_fingerprint
        assert version.model_name == "tiny-vit-56" and version.checkpoint is None
        assert version.label == expected.label
        assert version.labelling == f"3x3 budget={expected.label['budget']} mean/logit top_k=0"
        assert version.shards_expected == expected.shards_expected
        assert version.shards_done == len(expected.done)
        assert list(version.missing_shards) == expected.missing
        assert version.shards_failed == (
            len(expected.missing) if expected.status == "failed" else 0
        )
        assert version.samples == expected.samples
        assert version.bytes == sum(len(data) for data in expected.objects.values())
        assert version.objects == len(expected.objects)
        assert version.uri == root.url(f"xdata/{expected.name}/{expected.version}")
        assert version.created is not None and version.created <= version.updated
        assert version.references == ()
    assert listed[built["C"].version].samples > 0 and listed[built["C"].version].shards_failed == 1
    assert listed[built["E"].version].shards_done == 0
    order = [listed[built[i].version].created for i in ("A", "B", "C", "E")]
    assert order == sorted(order) and len(set(order)) == 4
    orphan = listed[ORPHAN]
    assert orphan.status == "orphaned" and orphan.split is None and orphan.samples == 0

    # show: the same facts from the version's URI, through the root or its xdata folder.
    b = built["B"]
    shown = show_version(f"{storage_uri}/xdata/{b.name}/{b.version}")
    assert shown.to_dict() == listed[b.version].to_dict()
    assert show_version(f"{storage_uri}/{b.name}/{b.version}/").to_dict() == shown.to_dict()
    # The xdata folder itself lists the same versions.
    assert [v.to_dict() for v in list_versions(f"{storage_uri}/xdata")] == [
        v.to_dict() for v in versions
    ]
    with pytest.raises(FileNotFoundError, match="no X-dataset version toy-x/v-missing"):
        show_version(f"{storage_uri}/xdata/toy-x/v-missing")
    with pytest.raises(ValueError, match="NAME/v-HASH"):
        show_version(f"{storage_uri}/xdata/toy-x")


def test_gc_removes_superseded_versions_no_record_uses(built, storage_uri):
    root = _install(built, storage_uri)
    a, b, c, d, e = (built[i] for i in "ABCDE")
    plan = plan_gc(storage_uri, keep=1)
    # The newest complete toy-x (B) and the newer failed and running builds (C, E) stay; the
    # older complete one and the half-deleted folder go.
    assert [x.version.version for x in plan.remove] == [ORPHAN, a.version]
    reasons = {decision.version.version: decision.reason for decision in plan.kept}
    assert reasons == {
        d.version: "newest complete (1 of 1)",
        e.version: "incomplete, newer than the kept complete versions",
        c.version: "failed, newer than the kept complete versions",
        b.version: "newest complete (1 of 1)",
    }
    assert plan.bytes == sum(len(x) for x in a.objects.values()) + sum(
        len(x) for k, x in d.objects.items() if k != layout.DATASET_CONFIG_FILE
    )
    assert [x.version.version for x in plan_gc(storage_uri, keep=2).remove] == [ORPHAN]
    with pytest.raises(ValueError, match="at least 1"):
        plan_gc(storage_uri, keep=0)

    # A fine-tuned model trained on A and a sweep reading the orphan protect both.
    a_uri = root.url(f"xdata/toy-x/{a.version}")
    model_key = _reference_model(root, a_uri)
    sweep_key = _reference_sweep(root, root.url(f"xdata/other-x/{ORPHAN}"))
    protected = plan_gc(storage_uri, keep=1)
    assert protected.remove == ()
    reasons = {decision.version.version: decision.reason for decision in protected.kept}
    assert reasons[a.version] == f"used by {root.url(model_key)} (config.data)"
    assert reasons[ORPHAN] == f"used by {root.url(sweep_key)} (config.targets[0].test_reference)"
    used = _by_version(list_versions(storage_uri))[a.version].references
    assert [(ref.kind, ref.field) for ref in used] == [("model", "config.data")]

    # The first plan, applied now: A is used since it was made, so only the orphan goes.
    root.delete(sweep_key)
    before = {v.version: v for v in list_versions(storage_uri)}
    result = apply_gc(plan)
    assert [v.version for v in result.removed] == [ORPHAN]
    assert [(s.version.version, s.reason) for s in result.skipped] == [
        (a.version, f"used by {root.url(model_key)} since the plan")
    ]
    orphan_objects = len(built["D"].objects) - 1
    assert result.objects == orphan_objects
    assert root.list(f"xdata/other-x/{ORPHAN}/") == []
    after = {v.version: v for v in list_versions(storage_uri)}
    assert set(after) == set(before) - {ORPHAN}
    assert all(after[v].to_dict() == before[v].to_dict() for v in after)

    # Without the model, A is superseded and goes; everything else is untouched.
    root.delete(model_key)
    again = plan_gc(storage_uri, keep=1)
    assert [x.version.version for x in again.remove] == [a.version]
    assert [v.version for v in apply_gc(again).removed] == [a.version]
    assert {v.version for v in list_versions(storage_uri)} == set(before) - {ORPHAN, a.version}
    assert root.list(f"xdata/toy-x/{a.version}/") == []
    if isinstance(root, LocalStorage):  # no empty folders left behind
        assert not os.path.exists(root.url(f"xdata/toy-x/{a.version}"))


def test_apply_skips_a_version_changed_since_the_plan(built, tmp_path):
    root = _install(built, str(tmp_path / "out"))
    plan = plan_gc(root.uri, keep=1)
    a = built["A"]
    # A rerun of A's build writes into its folder after the plan: gc leaves it alone.
    root.write_json(f"xdata/toy-x/{a.version}/reports/late.json", {})
    result = apply_gc(plan)
    assert [s.version.version for s in result.skipped] == [a.version]
    assert "changed since the plan" in result.skipped[0].reason
    assert a.version in {v.version for v in list_versions(root.uri)}


def test_deletion_never_leaves_a_version_that_looks_usable(built, tmp_path, monkeypatch):
    root = _install(built, str(tmp_path / "out"))
    a = built["A"]
    phases = deletion_phases(a.objects)
    assert phases[0] == [layout.DATASET_CONFIG_FILE] and phases[1] == [layout.MANIFEST_FILE]
    assert phases[2] and all(key.startswith("_completions/") for key in phases[2])
    assert any(key.endswith(".tar") for key in phases[3])

    # A crash right after the first phase: the folder is no version any more (nothing reads a
    # version without its config.json), and the next gc finishes the job.
    deleted: list[str] = []
    original = LocalStorage.delete

    def crash_after_config(self: LocalStorage, key: str) -> None:
        if deleted and deleted[-1] == layout.DATASET_CONFIG_FILE:
            raise OSError("disk went away")
        original(self, key)
        deleted.append(key)

    monkeypatch.setattr(LocalStorage, "delete", crash_after_config)
    plan = plan_gc(root.uri, keep=1)
    assert [x.version.version for x in plan.remove] == [ORPHAN, a.version]
    with pytest.raises(OSError, match="disk went away"):
        apply_gc(plan)
    monkeypatch.setattr(LocalStorage, "delete", original)
    state = {v.version: v for v in list_versions(root.uri)}
    assert state[a.version].status == "orphaned" and state[a.version].samples == 0
    # The orphan went first, whole; A lost its config.json and nothing else.
    assert deleted[0] != layout.DATASET_CONFIG_FILE and deleted[-1] == layout.DATASET_CONFIG_FILE
    assert len(root.list(f"xdata/toy-x/{a.version}/")) == len(a.objects) - 1
    finish = plan_gc(root.uri, keep=1)
    assert [(x.version.version, x.reason) for x in finish.remove] == [
        (a.version, "half-deleted: no config.json")
    ]
    apply_gc(finish)
    assert a.version not in {v.version for v in list_versions(root.uri)}
    assert root.list(f"xdata/toy-x/{a.version}/") == []


def test_list_objects_gives_sizes_and_times(storage_uri):
    storage = open_storage(storage_uri)
    storage.write_bytes("a/one.bin", b"x" * 5)
    storage.write_bytes("b.bin", b"")
    listed = list_objects(storage)
    assert [(o.key, o.size) for o in listed] == [("a/one.bin", 5), ("b.bin", 0)]
    assert all(o.modified is not None and o.modified.tzinfo is not None for o in listed)
    assert [o.key for o in list_objects(storage, "a/")] == ["a/one.bin"]


def test_errors_are_one_line_for_a_missing_or_empty_root(tmp_path, capsys, s3_env):
    assert main(["datasets", "list", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err == (
        f"error: no X-dataset versions under {tmp_path / 'missing'}: no such folder\n"
    )
    open_storage(str(tmp_path / "empty")).write_bytes("data/x.txt", b"")
    assert main(["datasets", "gc", str(tmp_path / "empty"), "--keep", "1"]) == 2
    assert capsys.readouterr().err == f"error: no X-dataset versions under {tmp_path / 'empty'}\n"
    assert main(["datasets", "list", s3_env.uri("nothing-here")]) == 2
    assert capsys.readouterr().err.startswith("error: no X-dataset versions under s3://")
    assert main(["datasets", "list", "s3://no-such-bucket-for-catalogue/x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "bucket" in err


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    captured = capsys.readouterr()
    assert captured.err == "" or code != 0, captured.err
    return code, captured.out


@pytest.fixture
def local_root(built, tmp_path) -> Iterator[Storage]:
    yield _install(built, str(tmp_path / "out"))


def test_cli_list_show_and_gc(built, local_root, tmp_path, capsys):
    root = local_root
    uri = root.uri
    a, b = built["A"], built["B"]

    code, out = _run(["datasets", "list", uri], capsys)
    assert code == 0
    lines = out.splitlines()
    header = lines[0].split()
    assert header[:5] == ["NAME", "SPLIT", "VERSION", "MODEL", "LABELLING"]
    assert len(lines) == 1 + len(built) + 1  # the header, each version, the orphan
    column = lines[0].index("VERSION")
    size_end = lines[0].index("SIZE") + len("SIZE")
    for ident, expected in built.items():
        (row,) = [line for line in lines if expected.version in line]
        assert row.index(expected.version) == column, ident  # aligned
        assert row[:size_end].endswith(" KiB")  # sizes for people, right-aligned
        assert f"{len(expected.done)}/2" in row and expected.status in row
        assert expected.model_fingerprint in row and "ago" in row
    code, out = _run(["datasets", "list", uri, "--json"], capsys)
    records = json.loads(out)
    assert [r["version"] for r in records] == [v.version for v in list_versions(uri)]
    first = next(r for r in records if r["version"] == a.version)
    assert first["samples"] == a.samples and first["label"] == a.label
    assert first["bytes"] == sum(len(x) for x in a.objects.values())
    assert first["created"].endswith("+00:00")

    code, out = _run(["datasets", "show", f"{uri}/xdata/toy-x/{b.version}"], capsys)
    assert code == 0
    assert f"version:        {b.version}" in out
    assert "shards:         2 of 2 done, 0 failed" in out
    assert "used by:        nothing under the root" in out
    code, out = _run(["datasets", "show", f"{uri}/xdata/toy-x/{b.version}", "--json"], capsys)
    assert json.loads(out)["model_fingerprint"] == b.model_fingerprint

    # A run elsewhere trained on A (through another URI of the same version): --refs-from
    # makes it count.
    other = open_storage(str(tmp_path / "other-run"))
    _reference_model(other, f"s3://elsewhere/out/xdata/toy-x/{a.version}")
    code, out = _run(["datasets", "gc", uri, "--keep", "1", "--refs-from", other.uri], capsys)
    assert code == 0 and out.startswith(f"would remove 1 of 6 version(s) under {uri}")
    removal = out.split("\n\nkept")[0]
    assert ORPHAN in removal and a.version not in removal and "dry run" in removal
    assert "used by" in out.split("\n\nkept")[1]

    code, out = _run(["datasets", "gc", uri, "--keep", "1", "--json"], capsys)
    dry = json.loads(out)
    assert dry["dry_run"] is True
    assert sorted(r["version"] for r in dry["remove"]) == sorted([ORPHAN, a.version])
    assert {v.version for v in list_versions(uri)} >= {ORPHAN, a.version}  # nothing deleted

    code, out = _run(["datasets", "gc", uri, "--keep", "1", "--yes"], capsys)
    assert code == 0 and out.startswith("removed 2 version(s)")
    assert {v.version for v in list_versions(uri)} == {x.version for x in built.values()} - {
        a.version
    }


def test_add_parser_registers_the_commands_on_any_parser():
    import argparse

    parser = argparse.ArgumentParser(prog="explain-transfer")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["datasets", "gc", "out", "--keep", "3", "--delete"])
    assert (args.uri, args.keep, args.yes, args.json, args.refs_from) == ("out", 3, True, False, [])
    assert callable(args.func)
    with pytest.raises(SystemExit):
        parser.parse_args(["datasets", "gc", "out", "--keep", "0"])
    with pytest.raises(SystemExit):
        parser.parse_args(["datasets", "gc", "out"])  # --keep is the user's choice, not a default


def test_human_sizes_and_ages():
    from datetime import UTC, datetime, timedelta

    assert [human_size(n) for n in (0, 1023, 1024, 5 * 1024**2 + 1, 3 * 1024**4)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "5.0 MiB",
        "3.0 TiB",
    ]
    now = datetime(2025, 1, 2, tzinfo=UTC)
    ages = [timedelta(seconds=5), timedelta(minutes=3), timedelta(hours=5), timedelta(days=40)]
    assert [human_age(now - age, now) for age in ages] == ["5s ago", "3m ago", "5h ago", "40d ago"]
    assert human_age(None) == "-"
