"""Every mistake the command line can see in its arguments is one line, within seconds.

Each scenario runs the real command in a fresh interpreter (``python -m flows.cli``) and times
it: exactly one ``error:`` line on stderr, exit status 2, the line within 3 s of the start and
the process gone within 2 s of the line, nothing written.

The time bounds are relative to the machine: each test first times ``explain-transfer --help``
(an interpreter that imports the command line and does nothing), and the bounds are the
issue's 3 s and 2 s on an idle machine, where ``--help`` takes :data:`IDLE_HELP_SECONDS`,
stretched by how much slower ``--help`` ran just now. On a 2-core machine shared with other
test runs a fixed bound would fail for the load, not for the code; measured idle, every
argument error here takes about 0.4 s, as long as ``--help`` itself.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from reliability_helpers import REPO_ROOT, start_cli

#: Seconds ``explain-transfer --help`` takes on an idle 2-core machine (measured: 0.39-0.42 s).
IDLE_HELP_SECONDS = 0.5
#: The issue's bounds on an idle machine: the error line after the start, the exit after it.
ERROR_WITHIN = 3.0
EXIT_WITHIN = 2.0


def cli_env(cwd: Path, **extra: str) -> dict[str, str]:
    """The environment of a user's shell: no AWS or Prefect API settings, a private home."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PREFECT_API"))},
        "PYTHONPATH": str(REPO_ROOT),
        "PREFECT_HOME": str(cwd / "prefect-home"),
        "AWS_CONFIG_FILE": "/nonexistent/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
        "AWS_EC2_METADATA_DISABLED": "true",
        **extra,
    }


@dataclass
class TimedRun:
    """A finished command: its output, and when each stderr line and the exit came."""

    returncode: int
    stdout: str
    stderr: str
    lines: list[tuple[float, str]]  # (seconds after the start, line), stderr in order
    exited: float  # seconds after the start

    def error_lines(self) -> list[tuple[float, str]]:
        return [(t, line) for t, line in self.lines if line.startswith("error:")]


def run_timed(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> TimedRun:
    """``explain-transfer ARGV`` in a fresh interpreter, each stderr line timestamped."""
    started = time.monotonic()
    process = start_cli(argv, cwd, env)
    lines: list[tuple[float, str]] = []
    err = io.StringIO()
    out: list[str] = []

    def read_stderr() -> None:
        for line in process.stderr:
            lines.append((time.monotonic() - started, line.rstrip("\n")))
            err.write(line)

    readers = [
        threading.Thread(target=read_stderr, daemon=True),
        threading.Thread(target=lambda: out.append(process.stdout.read()), daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        process.wait(timeout=timeout)
    finally:
        process.kill()
    exited = time.monotonic() - started
    for reader in readers:
        reader.join(timeout=10)
    return TimedRun(process.returncode, "".join(out), err.getvalue(), lines, exited)


def slowdown(cwd: Path) -> float:
    """How many times slower than idle this machine runs ``explain-transfer --help`` now."""
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "flows.cli", "--help"],
        cwd=cwd,
        env=cli_env(cwd),
        capture_output=True,
        check=True,
        timeout=120,
    )
    return max(1.0, (time.monotonic() - started) / IDLE_HELP_SECONDS)


def assert_quick_one_line_error(run: TimedRun, needle: str, factor: float) -> None:
    """Status 2, one ``error:`` line holding ``needle`` and nothing else, within the bounds."""
    assert run.returncode == 2, (run.returncode, run.stderr[-3000:])
    assert len(run.lines) == len(run.error_lines()) == 1, (
        f"expected exactly one line, an error: {run.stderr[-3000:]!r}"
    )
    [(at, line)] = run.error_lines()
    assert needle in line, line
    assert at <= ERROR_WITHIN * factor, (
        f"the error line came {at:.2f} s after the start, over {ERROR_WITHIN * factor:.2f} s "
        f"({ERROR_WITHIN} s idle x {factor:.2f}, the slowdown of --help now): {line}"
    )
    assert run.exited - at <= EXIT_WITHIN * factor, (
        f"the process exited {run.exited - at:.2f} s after its error line, over "
        f"{EXIT_WITHIN * factor:.2f} s ({EXIT_WITHIN} s idle x {factor:.2f}): {line}"
    )


def _png(path: Path, colour: tuple[int, int, int]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)


def _build(*extra: str) -> list[str]:
    return ["build-dataset", "--name", "bad-x", *extra]


# Each scenario: a setup writing what it needs under the test folder, giving (argv, needle).
Scenario = Callable[[Path], tuple[list[str], str]]


def _file(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _shards_folder(tmp: Path) -> Path:
    """A dataset folder with one complete shard of ``shapes``/train, as far as markers tell."""
    _file(tmp / "data" / "_completions" / "shapes-train-000000.tar.json", "{}")
    return tmp / "data"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _sweep_config(tmp: Path) -> Path:
    config = {
        "name": "s",
        "vector": str(tmp / "vectors" / "missing.safetensors"),
        "targets": [
            {"domain": "glyphs", "model": "m", "val_reference": "v", "test_reference": "t"}
        ],
        "output_uri": str(tmp / "out"),
    }
    return _file(tmp / "sweep.json", json.dumps(config))


def _demo_config(tmp: Path) -> Path:
    config = {"targets": ["glyphs", {"name": "pets", "kind": "imagefolder", "uri": "pets"}]}
    return _file(tmp / "demo.json", json.dumps(config))


SCENARIOS: dict[str, Scenario] = {
    "build: input folder missing": lambda t: (
        _build("--input-kind", "imagefolder", "--input", "./nope", "--out", "out"),
        f"input folder {t / 'nope'}: No such file or directory",
    ),
    "build: input folder is a file": lambda t: (
        _build("--input-kind", "imagefolder", "--input", str(_file(t / "f")), "--out", "out"),
        "is a file, not a folder",
    ),
    "build: input folder without class folders": lambda t: (
        _build("--input-kind", "imagefolder", "--input", str(_file(t / "flat" / "a.png").parent))
        + ["--out", "out"],
        f"no image files under {t / 'flat'}",
    ),
    "build: class names file missing": lambda t: (
        _build("--input-kind", "imagefolder", "--input", str(_file(t / "imgs/a/x.png").parents[1]))
        + ["--class-names", "names.txt", "--out", "out"],
        f"class names file {t / 'names.txt'}: No such file or directory",
    ),
    "build: webdataset without --input-name": lambda t: (
        _build("--input-kind", "webdataset", "--input", ".", "--out", "out"),
        "webdataset input needs --input-name",
    ),
    "build: webdataset folder without shards": lambda t: (
        _build("--input-kind", "webdataset", "--input", ".", "--input-name", "shapes")
        + ["--out", "out"],
        f"no complete shards shapes-train-*.tar under {t}",
    ),
    "build: checkpoint missing": lambda t: (
        _build("--input", "shapes", "--checkpoint", "model.safetensors", "--out", "out"),
        f"checkpoint {t / 'model.safetensors'}: No such file or directory",
    ),
    "build: --out missing": lambda t: (
        _build("--input", "shapes"),
        "output_uri: required (--out or 'output_uri' in --config)",
    ),
    "build: --out under a file": lambda t: (
        _build("--input", "shapes", "--out", str(_file(t / "f") / "sub")),
        "is a file, not a folder",
    ),
    "build: config file missing": lambda t: (
        _build("--config", "nope.json", "--input", "shapes", "--out", "out"),
        "cannot read config nope.json",
    ),
    "build: config file not JSON": lambda t: (
        _build("--config", str(_file(t / "c.json", "{oops")), "--input", "shapes")
        + ["--out", "out"],
        "cannot read config",
    ),
    "build: no Dask scheduler there": lambda t: (
        _build("--input", "shapes", "--out", "out", "--dask-address")
        + [f"tcp://127.0.0.1:{_closed_port()}"],
        "cannot reach the Dask scheduler",
    ),
    "build: an option that does not exist": lambda t: (
        _build("--input", "shapes", "--out", "out", "--shardz", "2"),
        "unrecognized arguments: --shardz 2",
    ),
    "finetune: --data missing": lambda t: (
        ["finetune", "--domain", "shapes", "--mode", "P", "--out", "out"],
        "data: required (--data or 'data' in --config)",
    ),
    "finetune: data without shards": lambda t: (
        ["finetune", "--domain", "shapes", "--mode", "P", "--data", ".", "--out", "out"],
        f"no complete shards *-train-*.tar under {t}",
    ),
    "finetune: data folder missing": lambda t: (
        ["finetune", "--domain", "shapes", "--mode", "P", "--data", "nodata", "--out", "out"],
        f"training data {t / 'nodata'}: No such file or directory",
    ),
    "finetune: base missing": lambda t: (
        ["finetune", "--domain", "shapes", "--mode", "P", "--data", str(_shards_folder(t))]
        + ["--base", "base.safetensors", "--out", "out"],
        f"base model {t / 'base.safetensors'}: No such file or directory",
    ),
    "vector: theta_x missing": lambda t: (
        ["vector", "--source", "shapes", "--theta-x", "x.safetensors", "--theta-p", "p"]
        + ["--out", "out"],
        f"theta_x {t / 'x.safetensors'}: No such file or directory",
    ),
    "sweep: vector missing": lambda t: (
        ["sweep", "--config", str(_sweep_config(t))],
        f"vector {t / 'vectors' / 'missing.safetensors'}: No such file or directory",
    ),
    "demo: a domain's folder missing": lambda t: (
        ["demo", "--config", str(_demo_config(t)), "--out", "out"],
        f"domain 'pets': folder {t / 'pets'}: No such file or directory",
    ),
    "demo: --out under a file": lambda t: (
        ["demo", "--out", str(_file(t / "f") / "sub")],
        "is a file, not a folder",
    ),
    "demo: --seeds 0": lambda t: (["demo", "--seeds", "0"], "--seeds: must be at least 1, got 0"),
    "pretrain: --out under a file": lambda t: (
        ["pretrain", "--out", str(_file(t / "f") / "sub")],
        "is a file, not a folder",
    ),
    "export: negative count": lambda t: (
        ["export", "--domain", "shapes", "--out", "out", "--train", "-1"],
        "--train: must be at least 0, got -1",
    ),
    "results: no demo output": lambda t: (
        ["results", "--out", "nope"],
        f"output folder {t / 'nope'}: No such file or directory",
    ),
    # Values only the typed configs judge: read from torch-free modules, as quick as paths.
    "build: budget not above the players": lambda t: (
        _build("--input", "shapes", "--budget", "10", "--out", "out"),
        "label: budget 10 is not larger than the number of players 49",
    ),
    "build: unknown synthetic domain": lambda t: (
        _build("--input", "nope", "--out", "out"),
        "unknown synthetic domain 'nope'; available: colours, glyphs, scenes, shapes, textures",
    ),
    "build: image size of another model": lambda t: (
        _build("--input", "shapes", "--image-size", "64", "--out", "out"),
        "image size 64 does not match model tiny-vit-56, which takes 56x56 images",
    ),
    "build: unknown model": lambda t: (
        _build("--input", "shapes", "--model", "ViT-Q-99", "--out", "out"),
        "unknown model 'ViT-Q-99'; available: ",
    ),
    "build: unknown config field": lambda t: (
        _build("--config", str(_file(t / "c.json", '{"colour": 1}')), "--input", "shapes")
        + ["--out", "out"],
        "colour: unknown field",
    ),
    "finetune: epochs 0": lambda t: (
        ["finetune", "--domain", "shapes", "--mode", "P", "--data", str(_shards_folder(t))]
        + ["--epochs", "0", "--out", "out"],
        "epochs: must be >= 1 (got 0)",
    ),
    "demo: unknown config field": lambda t: (
        ["demo", "--config", str(_file(t / "c.json", '{"colour": 1}')), "--out", "out"],
        "colour: unknown field",
    ),
    "demo: a target twice": lambda t: (
        ["demo", "--config", str(_file(t / "c.json", '{"targets": ["glyphs", "glyphs"]}'))]
        + ["--out", "out"],
        "targets: domain names must be unique",
    ),
    "pretrain: batch of one": lambda t: (
        ["pretrain", "--config", str(_file(t / "c.json", '{"batch_size": 1}')), "--out", "out"],
        "batch_size: must be >= 2 (got 1)",
    ),
    "serve: no API at --api-url": lambda t: (
        ["serve", "--out", "serve", "--api-url", f"http://127.0.0.1:{_closed_port()}/api"],
        "cannot reach the Prefect API at http://127.0.0.1:",
    ),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_each_argument_mistake_is_one_line_within_seconds(name: str, tmp_path: Path) -> None:
    factor = slowdown(tmp_path)
    argv, needle = SCENARIOS[name](tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    run = run_timed(argv, tmp_path, cli_env(tmp_path), timeout=120)
    assert_quick_one_line_error(run, needle, factor)
    # Nothing written: no output folder, no Prefect home (no API was started).
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_serve_on_a_port_already_taken_is_one_line(tmp_path: Path) -> None:
    factor = slowdown(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        run = run_timed(
            ["serve", "--out", "serve", "--port", str(port)], tmp_path, cli_env(tmp_path)
        )
    assert_quick_one_line_error(run, f"cannot serve on 127.0.0.1:{port}", factor)
    assert not (tmp_path / "serve").exists()


def test_s3_output_in_a_missing_bucket_is_one_line_within_seconds(
    faulty_s3, tmp_path: Path
) -> None:
    from reliability_helpers import aws_env

    factor = slowdown(tmp_path)
    env = cli_env(tmp_path, **aws_env(faulty_s3.server.endpoint_url))
    argv = _build("--input", "shapes", "--out", "s3://no-such-bucket-here/x")
    run = run_timed(argv, tmp_path, env, timeout=120)
    assert_quick_one_line_error(run, "bucket not found", factor)


def test_argument_checks_import_neither_torch_nor_prefect(tmp_path: Path) -> None:
    """What keeps them quick: a mistake in a path or a config value is found before the heavy
    imports (the configs live in modules that import neither)."""
    cases = [
        _build("--input", "shapes", "--budget", "10", "--out", "out"),
        _build("--input", "shapes", "--image-size", "64", "--out", "out"),
        ["finetune", "--domain", "shapes", "--mode", "P", "--data", str(_shards_folder(tmp_path))]
        + ["--epochs", "0", "--out", "out"],
        ["demo", "--config", str(_file(tmp_path / "c.json", '{"colour": 1}')), "--out", "out"],
        ["pretrain", "--config", str(_file(tmp_path / "p.json", '{"epochs": 0}')), "--out", "o"],
        _build("--input-kind", "imagefolder", "--input", "nope", "--out", "out"),
        _build("--input-kind", "webdataset", "--input", ".", "--out", "out"),
        ["finetune", "--domain", "shapes", "--mode", "P", "--data", "nope", "--out", "out"],
        ["vector", "--source", "s", "--theta-x", "x", "--theta-p", "p", "--out", "out"],
        ["demo", "--config", str(_demo_config(tmp_path)), "--out", "out"],
        ["results", "--out", "nope"],
    ]
    code = (
        "import json, sys\n"
        "from flows.cli import main\n"
        "codes = [main(argv) for argv in json.loads(sys.argv[1])]\n"
        "heavy = ('torch', 'prefect', 'open_clip', 'dask', 'boto3')\n"
        "print(json.dumps([codes, [m for m in heavy if m in sys.modules]]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(cases)],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    codes, heavy = json.loads(done.stdout)
    assert codes == [2] * len(cases), done.stderr
    assert heavy == [], f"the argument checks imported {heavy}"


def test_the_required_fields_checked_early_are_the_configs_own() -> None:
    """The argument checks name the required fields themselves (to stay free of torch):
    they must be exactly the typed configs' fields without a default."""
    from flows.cli_checks import BUILD_REQUIRED, FINETUNE_REQUIRED, SHIPPED_BASE, SWEEP_REQUIRED
    from tasks.build_dataset import BuildConfig
    from tasks.finetune import FinetuneConfig
    from tasks.pretrain import SHIPPED
    from tasks.sweep import SweepConfig

    for table, config in (
        (BUILD_REQUIRED, BuildConfig),
        (FINETUNE_REQUIRED, FinetuneConfig),
        (SWEEP_REQUIRED, SweepConfig),
    ):
        required = {name for name, field in config.model_fields.items() if field.is_required()}
        assert set(table) == required, config.__name__
    assert SHIPPED_BASE == SHIPPED


# Progress off a terminal.


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_off_a_terminal_is_a_line_every_10_percent_or_30_s() -> None:
    from flows.progress import ProgressLines

    stream, clock = io.StringIO(), FakeClock()
    lines = ProgressLines(200, "labelling x", "shard", stream, clock=clock)
    for n in range(201):
        clock.now = n * 0.1
        lines.update_to(n)
    lines.close()
    text = stream.getvalue()
    assert "\r" not in text
    written = text.splitlines()
    assert len(written) == 10, written  # 10 %, 20 %, ... 100 %: not 200 redraws
    assert written[0] == "labelling x: 20/200 shards (10%), 0:02 elapsed, about 0:18 left"
    assert written[-1] == "labelling x: 200/200 shards (100%), 0:20 elapsed"

    # Nothing finishing: a heartbeat every 30 s, and no line at all before the first one.
    stream, clock = io.StringIO(), FakeClock()
    lines = ProgressLines(4, "labelling y", "shard", stream, clock=clock)
    for second in range(0, 95, 5):
        clock.now = second
        lines.update_to(0)
    assert stream.getvalue().splitlines() == [
        f"labelling y: 0/4 shards (0%), {t} elapsed" for t in ("0:30", "1:00", "1:30")
    ]
    lines.close()  # the count did not move since the last line: nothing more
    assert len(stream.getvalue().splitlines()) == 3


def test_console_progress_is_a_bar_on_a_terminal_lines_elsewhere_and_nothing_when_quiet() -> None:
    from flows import progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(progress.console_progress(3, "x", stream=Terminal()), progress._Bar)
    assert isinstance(
        progress.console_progress(3, "x", stream=io.StringIO()), progress.ProgressLines
    )
    progress.set_quiet(True)
    try:
        assert progress.console_progress(3, "x", stream=Terminal()) is None
    finally:
        progress.set_quiet(False)


def test_training_progress_off_a_terminal_is_a_few_lines(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What fine-tuning and pretraining report (a step at a time) reaches a log as lines."""
    from flows import artifacts, progress

    class NoArtifact:
        def __init__(self, *args: object) -> None:
            pass

        def advance(self, steps: int) -> None:
            pass

    monkeypatch.setattr(artifacts, "Progress", NoArtifact)
    monkeypatch.setattr(progress, "_console_progress", True)
    report = progress.StepProgress("fine-tuning shapes (P)")
    for step in range(1, 501):
        report(step, 500)
    err = capsys.readouterr().err
    assert "\r" not in err and len(err.splitlines()) == 10, err
    assert err.splitlines()[-1].startswith("fine-tuning shapes (P): 500/500 steps (100%)")

    monkeypatch.setattr(progress, "_quiet", True)
    report = progress.StepProgress("fine-tuning shapes (X)")
    for step in range(1, 501):
        report(step, 500)
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_an_error_inside_the_flow_exits_at_once_and_the_fixed_rerun_completes(
    tmp_path: Path,
) -> None:
    """An input whose files are not images is found by planning, inside the flow: Prefect's
    records of it go to the run's log file, the console shows one line, and the process (its
    private Prefect API, threads and imports) is gone within the bound of that line. With
    images added the same command completes, its progress a few plain lines in a log that is
    not a terminal; ``-q`` leaves stderr empty."""
    factor = slowdown(tmp_path)
    images = tmp_path / "images"
    _file(images / "a" / "readme.txt", "not an image")
    config = _file(tmp_path / "build.json", json.dumps({"label": {"grid_h": 3, "grid_w": 3}}))
    argv = ["build-dataset", "--config", str(config), "--name", "pets-x", "--split", "val"]
    argv += ["--input-kind", "imagefolder", "--input", str(images), "--budget", "20"]
    argv += ["--shards", "2", "--out", str(tmp_path / "out")]
    env = cli_env(tmp_path)

    run = run_timed(argv, tmp_path, env)
    assert run.returncode == 2, run.stderr[-3000:]
    [(at, line)] = run.error_lines()
    assert line == f"error: no image files under {images}"
    assert [text for _, text in run.lines] == [line], run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    assert run.exited - at <= EXIT_WITHIN * factor, (
        f"the process exited {run.exited - at:.2f} s after its error line, over "
        f"{EXIT_WITHIN * factor:.2f} s ({EXIT_WITHIN} s idle x {factor:.2f})"
    )
    # The output folder was never made: the run's full log stays in its private Prefect home.
    [log] = (tmp_path / "prefect-home" / "cli-runs").glob("*/run.log")
    assert "no image files under" in log.read_text()

    for name, colour in (("a/one.png", (200, 30, 30)), ("b/two.png", (30, 30, 200))):
        _png(images / name, colour)
    run = run_timed(argv, tmp_path, env)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout)
    assert summary["missing"] == [] and summary["samples"] == 2
    assert "\r" not in run.stderr
    progress = [text for _, text in run.lines if text.startswith("labelling pets-x: ")]
    assert progress and progress[-1].startswith("labelling pets-x: 2/2 shards (100%)"), run.stderr
    assert len(progress) <= 4, run.stderr  # 1/2, 2/2, and heartbeats of a slow machine

    run = run_timed(["-q", *argv], tmp_path, env)
    assert run.returncode == 0 and run.stderr == "", run.stderr
