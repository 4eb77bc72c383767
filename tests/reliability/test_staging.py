"""A SIGKILLed shard writer leaves its partial tar behind; the next writer sweeps it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from reliability_helpers import REPO_ROOT

from storage import open_storage
from storage.layout import shard_name
from storage.shards import STAGING_DIRNAME, ShardWriter, sweep_stale_partials

KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from storage import open_storage
    from storage.shards import ShardWriter
    with ShardWriter(open_storage(sys.argv[1]), "dead-train-000000.tar") as writer:
        writer.write({"__key__": "k0", "txt": b"x" * 100_000})
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_partials_of_a_killed_writer_are_swept_by_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "PYTHONPATH": str(REPO_ROOT)}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path / "out")], env=env, timeout=120
    )
    assert killed.returncode == -signal.SIGKILL
    [left] = list(scratch.rglob("*.partial"))
    assert left.stat().st_size > 0 and left.parent.name == STAGING_DIRNAME

    # A file of a live process and a file this module did not name are kept.
    live = left.parent / f"other-train-000000.tar.pid{os.getpid()}.abc.partial"
    foreign = left.parent / "notes.partial"
    live.write_bytes(b"busy")
    foreign.write_bytes(b"mine")

    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr("storage.shards._swept", set())
    with ShardWriter(open_storage(tmp_path / "out"), shard_name("next", "train", 0)) as writer:
        writer.write({"__key__": "k0", "txt": b"y"})
    assert not left.exists()
    assert live.exists() and foreign.exists()
    assert sorted(p.name for p in scratch.rglob("*.partial")) == sorted([live.name, foreign.name])


def test_old_partials_are_stale_whatever_their_process(tmp_path: Path) -> None:
    old = tmp_path / f"a-train-000000.tar.pid{os.getpid()}.x.partial"
    old.write_bytes(b"")
    os.utime(old, (0, 0))
    assert sweep_stale_partials(str(tmp_path)) == [str(old)]
