"""Checks the command line makes before any compute, so a doomed run fails in seconds.

Each raises an expected error (see :mod:`flows.cli_errors`) with a one-line message and writes
nothing: the output location is reachable and writable, the inputs exist and are of the right
kind, the Dask scheduler answers and its workers can reach the run's Prefect API, and the images
are the size the model takes.

They come in two kinds. The *argument checks* (``check_*_arguments``, :func:`check_required`,
the path checks) read only the raw fields of a command (its flags merged over its ``--config``
file) and import nothing but :mod:`storage` (and Prefect's settings for a Dask scheduler
elsewhere): they run first, within a second or two of the command starting, before the typed
config (and with it torch) is imported. The rest need the typed config or a model registry
and run after it, still before the Prefect API starts. A raw field of the wrong type is left
alone here: the typed config reports it.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from flows.cli_errors import FieldErrors
from storage import LocalStorage, Storage, join_uri, layout, open_file, open_storage

if TYPE_CHECKING:
    from flows.runners import RunnerConfig

#: Seconds to wait for a TCP connection to a Dask scheduler.
SCHEDULER_TIMEOUT = 5.0
#: Seconds to wait for a TCP connection to an existing Prefect API (``serve --api-url``).
API_TIMEOUT = 5.0


def _no_such(what: str, where: str) -> FileNotFoundError:
    # The OS's own words, as rsync and git print them: "No such file or directory".
    return FileNotFoundError(f"{what} {where}: {os.strerror(errno.ENOENT)}")


def check_output(uri: str) -> None:
    """The output root can be written: a reachable, permitted location that is not a file.

    Raises:
        StorageError: the bucket is missing, the credentials are refused, the endpoint does not
            answer, or a local path is a file or not writable.
        ValueError: the URI is not a supported storage URI.
    """
    open_storage(uri).check_writable()


def check_folder(uri: str, what: str = "input folder") -> Storage:
    """A folder to read exists: on disk a readable folder; in an object store, a reachable one.

    An object store has no folders, only keys: there the bucket, endpoint and credentials are
    checked, and what the folder must hold is for the caller to look up.

    Args:
        uri: the folder's URI.
        what: how the message names it, e.g. ``"input folder"``.

    Returns:
        The folder's storage.

    Raises:
        FileNotFoundError: a local folder that does not exist.
        NotADirectoryError: a local path that is a file.
        PermissionError: a local folder this user cannot read.
        StorageError: the bucket is missing, the credentials are refused, the endpoint is down.
    """
    storage = open_storage(uri)
    if isinstance(storage, LocalStorage):
        root = storage.root
        if not root.exists():
            raise _no_such(what, storage.uri)
        if not root.is_dir():
            raise NotADirectoryError(f"{what} {storage.uri} is a file, not a folder")
        if not os.access(root, os.R_OK | os.X_OK):
            raise PermissionError(f"{what} {storage.uri}: {os.strerror(errno.EACCES)}")
    else:
        storage.check_readable()
    return storage


def check_file(uri: str, what: str = "file") -> None:
    """One object to read exists (a local file, or an object in a reachable bucket).

    Raises:
        FileNotFoundError: nothing there (``IsADirectoryError`` for a local folder).
        StorageError: the bucket is missing, the credentials are refused, the endpoint is down.
        ValueError: the URI names a folder or a bucket, not an object.
    """
    storage, key = open_file(uri)
    if storage.exists(key):
        return
    if isinstance(storage, LocalStorage) and (storage.root / key).is_dir():
        raise IsADirectoryError(f"{what} {storage.root / key} is a folder, not a file")
    raise _no_such(what, _shown(storage, key, uri))


def check_checkpoint(uri: str, what: str = "checkpoint") -> None:
    """A checkpoint exists: a weights file, or a run folder holding ``model.safetensors``.

    Raises:
        FileNotFoundError: neither is there.
        StorageError: the bucket is missing, the credentials are refused, the endpoint is down.
    """
    text = str(uri).rstrip("/")
    storage, key = open_file(text)
    if storage.exists(key):
        return
    inside, model_key = open_file(join_uri(text, layout.MODEL_FILE))
    if inside.exists(model_key):
        return
    if isinstance(storage, LocalStorage) and (storage.root / key).is_dir():
        raise FileNotFoundError(
            f"{what} {storage.root / key} is a folder without {layout.MODEL_FILE}"
        )
    raise _no_such(what, _shown(storage, key, text))


def _shown(storage: Storage, key: str, uri: str) -> str:
    """How a message names an object: its absolute path when local, else its URI."""
    return str(storage.root / key) if isinstance(storage, LocalStorage) else uri


def check_image_folder(uri: str, what: str = "input folder") -> None:
    """An ImageFolder exists and, on disk, holds at least one class sub-folder with a file.

    Whether those files are images is found when planning lists the folder; this only stops at
    the first class folder that holds a file, so it is quick on a folder of any size.

    Raises:
        FileNotFoundError: the folder is missing, or has no class folder with a file in it.
        NotADirectoryError: the path is a file.
        StorageError: an object store cannot be reached.
    """
    storage = check_folder(uri, what)
    if not isinstance(storage, LocalStorage):
        return
    if not _holds_a_file(str(storage.root), depth=1):
        raise FileNotFoundError(
            f"no image files under {storage.uri}: an image folder holds one sub-folder of "
            "images per class (e.g. n01440764/a.jpg)"
        )


def _holds_a_file(path: str, depth: int = 0) -> bool:
    """Whether a folder holds a visible file at least ``depth`` folders down (a hidden name,
    as the ImageFolder listing ignores them, does not count); stops at the first one found."""
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                # Not into linked folders: the listing (os.walk) does not follow them either.
                if entry.is_dir(follow_symlinks=False):
                    if _holds_a_file(entry.path, max(0, depth - 1)):
                        return True
                elif depth == 0 and entry.is_file():
                    return True
    except OSError:  # an unreadable sub-folder: planning reports what it can read
        return False
    return False


def check_shards(uri: str, name: str | None, split: str, what: str = "input folder") -> None:
    """A dataset folder holds complete shards ``{name}-{split}-*.tar`` (any name when None).

    Only the completion markers are listed (one folder), never the shards themselves.

    Raises:
        FileNotFoundError: the folder is missing or holds no complete shard of the split.
        StorageError: an object store cannot be reached.
    """
    storage = check_folder(uri, what)
    if layout.shards_of(storage.completed(), name, split):
        return
    pattern = f"{name or '*'}-{split}-*.tar"
    raise FileNotFoundError(f"no complete shards {pattern} under {storage.uri}")


def check_required(fields: Mapping[str, Any], options: Mapping[str, str | None]) -> None:
    """Every required field is given: one ``field: required`` line per missing one.

    Args:
        fields: the command's raw fields (flags merged over its config file).
        options: each required field and the flag that gives it (None: the config file only).

    Raises:
        FieldErrors: the missing fields, in the form pydantic's own errors print in.
    """
    missing = [
        f"{name}: required ({flag} or {name!r} in --config)" if flag else f"{name}: required"
        for name, flag in options.items()
        if fields.get(name) is None
    ]
    if missing:
        raise FieldErrors(missing)


def _text(fields: Mapping[str, Any], name: str) -> str | None:
    """A field's value when it is a string; anything else is the typed config's to report."""
    value = fields.get(name)
    return value if isinstance(value, str) and value else None


#: Fields of a build without a default, and the flag that gives each.
BUILD_REQUIRED = {"name": "--name", "input_uri": "--input", "output_uri": "--out"}


def check_build_arguments(fields: Mapping[str, Any], dask_address: str | None = None) -> None:
    """The arguments of ``build-dataset`` name inputs that exist and an output that can be written.

    What needs no I/O comes first (required fields, the WebDataset name, whether a Dask
    cluster's workers can reach the run's Prefect API), then the locations, then the scheduler.

    Args:
        fields: BuildConfig fields, flags merged over the config file.
        dask_address: ``--dask-address``, if given.

    Raises:
        FieldErrors: a required field is missing.
        ValueError: WebDataset input without ``input_name``; a remote Dask cluster without a
            Prefect API its workers reach.
        FileNotFoundError: the input, class names file or checkpoint is missing.
        StorageError: a location cannot be reached or written.
        OSError: the Dask scheduler does not answer.
    """
    check_required(fields, BUILD_REQUIRED)
    kind = fields.get("input_kind", "synthetic")
    if kind == "webdataset" and fields.get("input_name") is None:
        raise ValueError(
            "webdataset input needs --input-name (input_name: the dataset name of the "
            "shards, NAME in NAME-SPLIT-000000.tar)"
        )
    check_dask_address("dask", dask_address)
    source = _text(fields, "input_uri")
    if kind == "imagefolder" and source:
        check_image_folder(source)
        if names := _text(fields, "class_names_file"):
            check_file(names, "class names file")
    elif kind == "webdataset" and source and (name := _text(fields, "input_name")):
        split = _text(fields, "input_split") or _text(fields, "split") or "train"
        check_shards(source, name, split)
    if checkpoint := _text(fields, "checkpoint"):
        check_checkpoint(checkpoint)
    if output := _text(fields, "output_uri"):
        check_output(output)
    if dask_address:
        check_scheduler(dask_address)


#: Fields of a fine-tuning without a default, and the flag that gives each.
FINETUNE_REQUIRED = {"domain": "--domain", "mode": "--mode", "data": "--data"}


def check_finetune_arguments(fields: Mapping[str, Any], out: str) -> None:
    """The arguments of ``finetune`` name data with shards, a base that exists, a writable output.

    Raises:
        FieldErrors: a required field is missing.
        FileNotFoundError: the data has no complete shard of its split, or the base is missing.
        StorageError: a location cannot be reached or written.
    """
    check_required(fields, FINETUNE_REQUIRED)
    name = _text(fields, "data_name")
    if data := _text(fields, "data"):
        check_shards(data, name, _text(fields, "split") or "train", "training data")
    if val := _text(fields, "val_data"):
        # The validation split is read under the only name it has (tasks.data.stream).
        check_shards(val, None, _text(fields, "val_split") or "val", "validation data")
    if base := _text(fields, "base"):
        check_checkpoint(base, "base model")
    check_output(out)


#: The ``base`` of a pipeline that means the packaged base model (``tasks.pretrain.SHIPPED``,
#: spelled out here so that the argument checks import no torch).
SHIPPED_BASE = "shipped"


def check_pipeline_arguments(fields: Mapping[str, Any], out: str) -> None:
    """The arguments of ``demo`` and ``run``: the domains' folders and the base exist.

    What each domain must hold (splits, classes) is checked from listings after the typed
    config (:func:`flows.pipeline.check_domains`); here only what a path alone says.

    Args:
        fields: PipelineConfig fields from the config file.
        out: the output root.

    Raises:
        ValueError: a remote Dask cluster without a Prefect API its workers reach.
        FileNotFoundError: a domain's folder, a class names file or the base is missing.
        StorageError: a location cannot be reached or written.
        OSError: the Dask scheduler does not answer.
    """
    runner = fields.get("runner")
    address = _text(runner, "address") if isinstance(runner, Mapping) else None
    if isinstance(runner, Mapping):
        check_dask_address(runner.get("kind"), address)
    targets = fields.get("targets")
    domains = [fields.get("source"), *(targets if isinstance(targets, list) else [])]
    for domain in domains:
        if not isinstance(domain, Mapping) or domain.get("kind") not in (
            "imagefolder",
            "webdataset",
        ):
            continue
        if uri := _text(domain, "uri"):
            check_folder(uri, f"domain {domain.get('name')!r}: folder")
        if names := _text(domain, "class_names_file"):
            check_file(names, f"domain {domain.get('name')!r}: class names file")
    base = _text(fields, "base")
    if base and base != SHIPPED_BASE:
        check_checkpoint(base, "base model")
    check_output(out)
    if address and runner.get("kind") == "dask":
        check_scheduler(address)


#: Fields of a sweep without a default (all from its config file).
SWEEP_REQUIRED = {"name": None, "vector": None, "targets": None, "output_uri": None}


def check_sweep_arguments(fields: Mapping[str, Any]) -> None:
    """The fields of a sweep's config name a vector, models and references that exist.

    Raises:
        FieldErrors: a required field is missing.
        FileNotFoundError: the vector, a target's model, reference or accuracy data is missing.
        StorageError: a location cannot be reached or written.
    """
    check_required(fields, SWEEP_REQUIRED)
    if vector := _text(fields, "vector"):
        check_file(vector, "vector")
    targets = fields.get("targets")
    for target in targets if isinstance(targets, list) else []:
        if not isinstance(target, Mapping):
            continue
        who = f"target {target.get('domain')!r}:"
        if model := _text(target, "model"):
            check_checkpoint(model, f"{who} model")
        for field in ("val_reference", "test_reference", "accuracy_data"):
            if folder := _text(target, field):
                check_folder(folder, f"{who} {field}")
    if output := _text(fields, "output_uri"):
        check_output(output)


def check_synthetic_domain(name: str) -> None:
    """``name`` is a built-in synthetic domain (imports the domains: after the argument checks).

    Raises:
        ValueError: it is not, with the built-in names.
    """
    from tasks.data.synthetic import SYNTHETIC_DOMAINS

    if name not in SYNTHETIC_DOMAINS:
        raise ValueError(
            f"unknown synthetic domain {name!r}; available: {', '.join(sorted(SYNTHETIC_DOMAINS))}"
        )


def _host_port(address: str, what: str, default_scheme: str) -> tuple[str, int]:
    parts = urlsplit(address if "://" in address else f"{default_scheme}://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ValueError(f"bad {what} address {address!r}: {exc}") from None
    if port is None and parts.scheme in ("http", "https"):
        port = 443 if parts.scheme == "https" else 80
    if not host or not port:
        raise ValueError(f"bad {what} address {address!r}: expected {default_scheme}://host:port")
    return host, port


def _connect(host: str, port: int, timeout: float, what: str, address: str) -> None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OSError(
            f"cannot reach the {what} at {address} within {timeout:g} s ({reason})"
        ) from None


def check_scheduler(address: str, timeout: float = SCHEDULER_TIMEOUT) -> None:
    """A Dask scheduler accepts TCP connections at ``address`` (``tcp://host:port``).

    Raises:
        ValueError: the address has no host or port.
        OSError: nothing accepts a connection there within ``timeout`` seconds.
    """
    host, port = _host_port(address, "Dask scheduler", "tcp")
    _connect(host, port, timeout, "Dask scheduler", address)


def check_api(url: str, timeout: float = API_TIMEOUT) -> None:
    """An existing Prefect API accepts TCP connections (``serve --api-url``).

    Raises:
        ValueError: the URL has no host.
        OSError: nothing accepts a connection there within ``timeout`` seconds.
    """
    host, port = _host_port(url, "Prefect API", "http")
    _connect(host, port, timeout, "Prefect API", url)


def check_port_free(port: int, host: str = "127.0.0.1") -> None:
    """Nothing listens on ``host:port`` yet, so a server can bind it (0: any port, always free).

    Raises:
        OSError: the port is taken (another server, an earlier ``serve`` still running).
    """
    if port == 0:
        return
    with socket.socket() as sock:
        # As servers bind: a port left in TIME_WAIT by a stopped server is free to them.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise OSError(
                f"cannot serve on {host}:{port} ({reason}): another server holds it; "
                "stop it or give --port"
            ) from None


def check_dask_api(runner: RunnerConfig) -> None:
    """The workers of an existing Dask cluster can reach the Prefect API this run will use.

    That API is ``PREFECT_API_URL`` when set (environment or profile), else the private
    temporary one the command starts on 127.0.0.1 (:mod:`flows.cli_prefect`), which only
    workers on this machine reach.

    Raises:
        ValueError: the scheduler is not on loopback and the API is private or on loopback.
    """
    from prefect.settings import get_current_settings

    from flows.runners import check_workers_reach_api

    check_workers_reach_api(runner, get_current_settings().api.url)


def check_dask_address(kind: Any, address: str | None) -> None:
    """:func:`check_dask_api` from a runner's raw ``kind`` and ``address`` (no typed config).

    Prefect's settings are imported only for a scheduler that may be elsewhere: one at a
    loopback address has its workers here, which reach any API of this machine
    (:func:`flows.runners.check_workers_reach_api` lets it pass too).
    """
    if kind != "dask" or not address:
        return
    host = urlsplit(address if "://" in address else f"tcp://{address}").hostname or ""
    try:
        if host == "localhost" or ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:  # a host name: resolved by the full check
        pass
    from flows.runners import RunnerConfig

    check_dask_api(RunnerConfig(kind="dask", address=address))


def check_image_size(model_name: str, image_size: int) -> None:
    """The images are resized to the model's input size.

    Raises:
        ValueError: the model is unknown, or takes another image size.
    """
    from tasks.model.names import model_image_size

    expected = model_image_size(model_name)
    if image_size != expected:
        raise ValueError(
            f"image size {image_size} does not match model {model_name}, which takes "
            f"{expected}x{expected} images (set --image-size {expected})"
        )
