"""pipeline.toml: parse, validate and plan addresses.

Everything here runs before any process starts, so every mistake in a file is
reported as a ConfigError naming the file, the stage and the field.
"""

from __future__ import annotations

import math
import os
import re
import reprlib
import sys
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .deploy.resources import Resources, parse_resources, parse_volumes
from .errors import ConfigError
from .replica.batching import Batching, parse_batch

DEFAULT_HWM = 100
DEFAULT_GRACE = 5.0
DEFAULT_STARTUP_TIMEOUT = 60.0

# -- limits ---------------------------------------------------------------------------------
# Every value past these either breaks something below zpipe (C ints in ZeroMQ,
# Unix socket paths, routing ids) or asks one host for more than it can give;
# from_dict refuses it with a message that states the limit.

# Pipeline and stage names: a replica's name (NAME-R) is its ZeroMQ routing id
# (at most 255 bytes), the pipeline's name is part of the runtime folder's path
# (which must leave room under MAX_IPC_PATH), and stage names are passed on
# command lines and printed before every output line.
MAX_NAME_LENGTH = 64
# Every replica is a process; the launcher holds a few file descriptors per
# replica and a replica connects to every replica of the next stage. 256 per
# stage and 1024 in all is far past what one host runs usefully.
MAX_REPLICAS = 256
MAX_TOTAL_REPLICAS = 1024
# SNDHWM/RCVHWM are C ints in ZeroMQ (2**31 overflows), and a link may hold
# about hwm x 64 kB: a million messages is already far more than memory holds.
MAX_HWM = 1_000_000
# ZMQ_MAXMSGSIZE is an int64; a terabyte per frame is past any real item.
MAX_MESSAGE_SIZE = 2**40
# Seconds are used as deadlines and ZeroMQ timeouts in milliseconds (C ints:
# about 24 days) and thread waits; a week is past any sensible drain or start.
MAX_SECONDS = 7 * 24 * 3600.0
# The supervisor sees items move only through each replica's heartbeat, sent
# once a second (runtime.HEARTBEAT_INTERVAL): a shorter inactivity_timeout
# would fire while items flow.
MIN_INACTIVITY_TIMEOUT = 2.0
# A Unix socket path (sun_path) holds 108 bytes on Linux, 104 elsewhere,
# including the final NUL; ZeroMQ refuses a longer ipc path.
MAX_IPC_PATH = 107 if sys.platform.startswith("linux") else 103
# tempfile.mkdtemp appends this many random characters to its prefix.
MKDTEMP_RANDOM_CHARS = 8
MAX_HOST_LENGTH = 253  # a DNS name

NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
NAME_RULE = (f"must use letters, digits, '-' and '_', not start with '-', and have at most "
             f"{MAX_NAME_LENGTH} characters")
RUN_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
# Hosts: a DNS name or IPv4 address (with {replica}), or an IPv6 address in
# brackets. ASCII digits only in ports ("\d" would take other scripts' digits).
TCP_RE = re.compile(r"tcp://(?P<host>[A-Za-z0-9._{}-]+|\[[0-9A-Za-z:.%]+\]):(?P<port>[0-9]{1,5})")

REPLICA = "{replica}"
PIPELINE_KEYS = {"name", "hwm", "grace", "control", "startup_timeout", "inactivity_timeout",
                 "keys", "max_message_size", "dead_letters", "service"}
STAGE_KEYS = {"name", "run", "params", "replicas", "hwm", "stream", "address", "ordered",
              "max_message_size", "restart", "max_restarts", "restart_window", "on_error",
              "max_errors", "item_timeout", "total", "resources", "volumes", "batch", "input",
              "concurrency", "gpus"}

# Resilience (README: "When replicas fail").
RESTART_POLICIES = ("no", "on-failure")
ERROR_POLICIES = ("fail", "skip", "dead-letter")
DEFAULT_MAX_RESTARTS = 5
DEFAULT_RESTART_WINDOW = 60.0
MAX_RESTARTS_LIMIT = 10_000
DEFAULT_DEAD_LETTERS = "dead-letters"  # next to pipeline.toml
MAX_TOTAL = 2**63 - 1  # a source's total: any count msgpack carries

# Stage execution (README: "Batches, latest frames, concurrency, GPUs").
INPUT_POLICIES = ("all", "latest")
ENV_GPU = "CUDA_VISIBLE_DEVICES"  # set per replica of a stage with gpus (launcher, zpipe.run)
MAX_CONCURRENCY = 1024  # items in flight in one replica (threads or tasks)
MAX_GPUS_LISTED = 256
GPU_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9:._-]*")  # an index, a UUID or a MIG id


@dataclass(frozen=True)
class StageSpec:
    """One stage as declared: what to run and how many replicas."""

    name: str
    run: str
    params: dict[str, Any] = field(default_factory=dict)
    replicas: int = 1
    hwm: int = DEFAULT_HWM
    stream: bool | None = None
    address: str | None = None
    ordered: bool = False
    max_message_size: int | None = None  # bytes per frame this stage accepts (ZMQ_MAXMSGSIZE)
    restart: str = "no"              # "on-failure": a replica that dies is started again
    max_restarts: int = DEFAULT_MAX_RESTARTS   # ... at most this often within restart_window
    restart_window: float = DEFAULT_RESTART_WINDOW
    on_error: str = "fail"           # what an item whose call raises does: fail, skip, dead-letter
    max_errors: int | None = None    # skipped or dead-lettered items beyond this fail the run
    item_timeout: float | None = None  # a call on one item running longer is a stuck call
    total: int | None = None         # a source's count of items (the live view's progress)
    # Deployment only (deploy/resources.py): what a replica asks of its machine,
    # and the folders it writes that should outlive its container.
    resources: Resources | None = None
    volumes: tuple[str, ...] = ()
    # How a replica drives its callable (replica/batching.py and README): lists
    # of waiting items, only the newest input, several calls at once, a GPU each.
    batch: Batching | None = None
    input: str = "all"               # "latest": older waiting inputs are dropped, and counted
    concurrency: int = 1
    gpus: tuple[int | str, ...] = ()  # replica i sees gpus[i % len(gpus)] (CUDA_VISIBLE_DEVICES)

    def gpu_of(self, replica: int) -> str | None:
        """The CUDA_VISIBLE_DEVICES of one replica, or None for a stage without gpus."""
        return str(self.gpus[replica % len(self.gpus)]) if self.gpus else None
    # The callable itself, for pipelines declared in Python (zpipe.Task);
    # ``run`` is then only a label.
    target: Any = field(default=None, compare=False, repr=False)

    def replica_name(self, replica: int) -> str:
        return f"{self.name}-{replica}"

    @property
    def reliable(self) -> bool:
        """Whether a replica of this stage may die without failing the run: it is
        restarted, or siblings take its work. Its input then needs at-least-once
        delivery (see delivery.py)."""
        return self.restart == "on-failure" or self.replicas > 1


@dataclass(frozen=True)
class PipelineSpec:
    """A whole pipeline: stages in flow order plus pipeline-wide settings."""

    name: str
    stages: tuple[StageSpec, ...]
    hwm: int = DEFAULT_HWM
    grace: float = DEFAULT_GRACE
    control: str | None = None
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT
    inactivity_timeout: float | None = None
    keys: Path | None = None  # CurveZMQ keys folder (zpipe keys): encrypt and authenticate links
    dead_letters: Path | None = None  # where on_error = "dead-letter" appends items
    base_dir: Path | None = None
    path: Path | None = None
    # The source never ends (a camera, a queue): deployed as services that are
    # kept running, not as jobs that complete (deploy/kubernetes.py).
    service: bool = False

    def leased(self, index: int) -> bool:
        """Whether the link into stage ``index`` acknowledges each message (delivery.py).

        From the input of the first reliable stage on, every link is leased:
        a replica may acknowledge an input only once its outputs are
        acknowledged in turn, so the links after a reliable stage must carry
        acknowledgements too (a sink's come as its calls return).
        """
        # A source's replicas each make their own share: a sibling cannot take
        # over a lost one's, so only restart makes a source reliable.
        return index > 0 and any(
            stage.restart == "on-failure" or (position > 0 and stage.replicas > 1)
            for position, stage in enumerate(self.stages[:index + 1]))

    def stage(self, name: str) -> StageSpec:
        for stage in self.stages:
            if stage.name == name:
                return stage
        known = ", ".join(s.name for s in self.stages)
        raise ConfigError(f"{self.where}: no stage named {name!r} (stages: {known})")

    def index(self, name: str) -> int:
        return self.stages.index(self.stage(name))

    @property
    def where(self) -> str:
        return str(self.path) if self.path else f"pipeline {self.name!r}"


@dataclass(frozen=True)
class Addresses:
    """Every endpoint of a pipeline: the supervisor's and each replica's input."""

    control: str
    inputs: dict[str, tuple[str, ...]]  # stage name -> one address per replica; () for the source


def load(path: str | Path) -> PipelineSpec:
    """Read and validate a pipeline.toml (syntax and fields; imports are checked elsewhere)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:  # a NUL byte in the path
        raise ConfigError(f"{path!r}: cannot read: {exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(f"{path}: not UTF-8, as a TOML file must be: byte "
                          f"0x{raw[exc.start]:02x} at line {line}, column {column}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively.
        raise ConfigError(f"{path}: invalid TOML: arrays or inline tables nested too deeply "
                          f"for the parser") from None
    except Exception as exc:  # noqa: BLE001 - tomllib's other failures, e.g. ValueError
        # for an integer of more than 4300 digits: still the file's fault.
        detail = "an integer too long to read" if "digits" in str(exc) else \
            f"{type(exc).__name__}: {exc}"
        raise ConfigError(f"{path}: invalid TOML: {detail}") from None
    return from_dict(data, where=str(path), base_dir=path.resolve().parent, path=path)


def from_dict(data: dict[str, Any], where: str = "pipeline", base_dir: Path | None = None,
              path: Path | None = None, targets: list[Any] | None = None) -> PipelineSpec:
    """Validate an already parsed pipeline description.

    ``targets``, one per stage, are the callables themselves for a pipeline
    declared in Python; each stage's ``run`` is then only a label.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a pipeline is a table with [pipeline] and [[stages]] "
                          f"(got {type(data).__name__})")
    _check_keys(data, {"pipeline", "stages"}, where)
    pipeline = data.get("pipeline")
    if not isinstance(pipeline, dict):
        raise ConfigError(f"{where}: missing [pipeline] table (with at least name = \"...\")")
    _check_keys(pipeline, PIPELINE_KEYS, f"{where}: [pipeline]")
    name = pipeline.get("name")
    if not _good_name(name):
        raise ConfigError(f"{where}: [pipeline] name is required and {NAME_RULE} "
                          f"({_got_name(name)})")
    at = f"{where}: [pipeline]"
    hwm = _whole_number(pipeline, "hwm", DEFAULT_HWM, at, MAX_HWM)
    max_size = pipeline.get("max_message_size")
    if max_size is not None:
        max_size = _whole_number(pipeline, "max_message_size", 0, at, MAX_MESSAGE_SIZE)
    grace = _seconds(pipeline, "grace", DEFAULT_GRACE, at)
    startup = _seconds(pipeline, "startup_timeout", DEFAULT_STARTUP_TIMEOUT, at)
    inactivity = pipeline.get("inactivity_timeout")
    if inactivity is not None:
        inactivity = _seconds(pipeline, "inactivity_timeout", 0, at, MIN_INACTIVITY_TIMEOUT)
    control = pipeline.get("control")
    if control is not None:
        _check_tcp(control, f"{where}: [pipeline] control")
    keys = pipeline.get("keys")
    if keys is not None:
        keys = _keys_folder(keys, base_dir, at)
    dead_letters = pipeline.get("dead_letters")
    if dead_letters is not None and (not isinstance(dead_letters, str) or not dead_letters):
        raise ConfigError(f"{at} field 'dead_letters' must be a folder (got "
                          f"{_shown(dead_letters)})")

    service = pipeline.get("service", False)
    if not isinstance(service, bool):
        raise ConfigError(f"{at} field 'service' must be true or false (got {_shown(service)})")

    raw_stages = data.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise ConfigError(f"{where}: no stages: add at least one [[stages]] table")
    if len(raw_stages) > MAX_TOTAL_REPLICAS:  # every stage has at least one replica
        raise ConfigError(f"{where}: {len(raw_stages)} stages, more than the limit of "
                          f"{MAX_TOTAL_REPLICAS} replicas in a pipeline")
    stages = []
    seen: set[str] = set()
    for position, raw in enumerate(raw_stages, start=1):
        target = targets[position - 1] if targets else None
        stage = _stage(raw, position, hwm, where, target, max_size)
        if stage.name in seen:
            raise ConfigError(f"{where}: stage {stage.name!r}: duplicate name "
                              f"(stage #{position} reuses it)")
        seen.add(stage.name)
        stages.append(stage)
    total = sum(stage.replicas for stage in stages)
    if total > MAX_TOTAL_REPLICAS:
        largest = sorted(stages, key=lambda s: -s.replicas)[:3]
        raise ConfigError(f"{where}: {total} replicas in all, more than the limit of "
                          f"{MAX_TOTAL_REPLICAS} replicas in a pipeline (largest: "
                          + ", ".join(f"{s.name!r} {s.replicas}" for s in largest) + ")")
    check_order(stages, where)
    if dead_letters is not None or any(s.on_error == "dead-letter" for s in stages):
        dead_letters = (base_dir or Path.cwd()) / (dead_letters or DEFAULT_DEAD_LETTERS)
    return PipelineSpec(name=name, stages=tuple(stages), hwm=hwm, grace=grace, control=control,
                        startup_timeout=startup, inactivity_timeout=inactivity, keys=keys,
                        dead_letters=dead_letters, base_dir=base_dir, path=path,
                        service=service)


# The fields of a loaded spec that zpipe.run may change (``with_overrides``).
OVERRIDABLE = ("grace", "startup_timeout", "inactivity_timeout")


def with_overrides(spec: PipelineSpec, **changes: Any) -> PipelineSpec:
    """``spec`` with some [pipeline] settings changed, validated as the file's would be.

    For ``zpipe.run(spec, grace=..., inactivity_timeout=...)``: a bare
    ``dataclasses.replace`` would let nan, inf or a too short
    inactivity_timeout past the checks of from_dict. ``inactivity_timeout=None``
    turns it off. Unknown field names are a TypeError (a programming error),
    bad values a ConfigError naming the field, the value and the limit.
    """
    unknown = sorted(set(changes) - set(OVERRIDABLE))
    if unknown:
        raise TypeError(f"with_overrides: cannot change {', '.join(unknown)} "
                        f"(only {', '.join(OVERRIDABLE)})")
    at = f"{spec.where}: [pipeline]"
    values: dict[str, Any] = {}
    for key, value in changes.items():
        if key == "inactivity_timeout":
            values[key] = None if value is None else _seconds(changes, key, 0, at,
                                                              MIN_INACTIVITY_TIMEOUT)
        else:
            values[key] = _seconds(changes, key, 0, at)
    return replace(spec, **values) if values else spec


def check_order(stages: list[StageSpec], where: str) -> None:
    """``ordered`` restores input order after a replicated stage; say where it cannot."""
    for index, stage in enumerate(stages):
        if not stage.ordered:
            continue
        label = f"{where}: stage {stage.name!r}: field 'ordered'"
        if index == 0:
            raise ConfigError(f"{label}: the first stage has no input order to keep")
        if index == len(stages) - 1:
            raise ConfigError(f"{label}: the last stage sends nothing on, so there is no "
                              f"output order to keep")
        if stages[index - 1].replicas > 1:
            raise ConfigError(f"{label}: input order is defined only when the stage before "
                              f"({stages[index - 1].name!r}) has one replica")
        if stages[index + 1].replicas > 1:
            raise ConfigError(f"{label}: the next stage ({stages[index + 1].name!r}) has "
                              f"{stages[index + 1].replicas} replicas, which would mix the "
                              f"order again; give it one replica")


def _stage(raw: Any, position: int, default_hwm: int, where: str, target: Any,
           default_max_size: int | None = None) -> StageSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: stage #{position} must be a table ([[stages]])")
    name = raw.get("name")
    label = f"stage {name!r}" if isinstance(name, str) and len(name) <= MAX_NAME_LENGTH \
        else f"stage #{position}"
    if not _good_name(name):
        raise ConfigError(f"{where}: {label}: field 'name' is required and {NAME_RULE} "
                          f"({_got_name(name)})")
    _check_keys(raw, STAGE_KEYS, f"{where}: {label}")
    run = raw.get("run")
    if target is None and (not isinstance(run, str) or not RUN_RE.fullmatch(run)):
        raise ConfigError(f"{where}: {label}: field 'run' must be \"module:attribute\", "
                          f"for example \"stages:square\" (got {_shown(run)})")
    params = raw.get("params", {})
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: {label}: field 'params' must be a table of keyword "
                          f"arguments (got {type(params).__name__})")
    replicas = _whole_number(raw, "replicas", 1, f"{where}: {label}", MAX_REPLICAS)
    hwm = _whole_number(raw, "hwm", default_hwm, f"{where}: {label}", MAX_HWM)
    stream = raw.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ConfigError(f"{where}: {label}: field 'stream' must be true or false "
                          f"(got {_shown(stream)})")
    max_size = raw.get("max_message_size", default_max_size)
    if max_size is not None:
        max_size = _whole_number({"max_message_size": max_size}, "max_message_size", 0,
                                 f"{where}: {label}", MAX_MESSAGE_SIZE)
    ordered = raw.get("ordered", False)
    if not isinstance(ordered, bool):
        raise ConfigError(f"{where}: {label}: field 'ordered' must be true or false "
                          f"(got {_shown(ordered)})")
    address = raw.get("address")
    if address is not None:
        _check_tcp(address, f"{where}: {label}: field 'address'", replicas)
        if position == 1:
            raise ConfigError(f"{where}: {label}: field 'address' is the address a stage "
                              f"receives on; the first stage receives nothing")
    label = f"{where}: {label}"
    restart = _choice(raw, "restart", RESTART_POLICIES, label)
    max_restarts = _count_field(raw, "max_restarts", DEFAULT_MAX_RESTARTS, label,
                                MAX_RESTARTS_LIMIT)
    restart_window = _seconds(raw, "restart_window", DEFAULT_RESTART_WINDOW, label)
    on_error = _choice(raw, "on_error", ERROR_POLICIES, label)
    max_errors = raw.get("max_errors")
    if max_errors is not None:
        max_errors = _count_field(raw, "max_errors", 0, label, MAX_RESTARTS_LIMIT * 100)
    item_timeout = raw.get("item_timeout")
    if item_timeout is not None:
        item_timeout = _seconds(raw, "item_timeout", 0, label)
    total = raw.get("total")
    if total is not None:
        if position != 1:
            raise ConfigError(f"{label}: field 'total' counts the items a source sends; only "
                              f"the first stage has one")
        total = _count_field(raw, "total", 0, label, MAX_TOTAL)
    resources = parse_resources(raw.get("resources"), label)
    volumes = parse_volumes(raw.get("volumes"), label)
    batch = parse_batch(raw.get("batch"), label)
    input_policy = _choice(raw, "input", INPUT_POLICIES, label)
    concurrency = _whole_number(raw, "concurrency", 1, label, MAX_CONCURRENCY)
    if position == 1:
        for key, default in (("batch", None), ("input", "all"), ("concurrency", 1)):
            if raw.get(key, default) != default:
                raise ConfigError(f"{label}: field {key!r} is about how a stage takes its "
                                  f"input; the first stage has none")
    if batch is not None and concurrency > 1:
        raise ConfigError(f"{label}: fields 'batch' and 'concurrency' together: a batched "
                          f"call already takes many items at once; choose one")
    gpus = _gpus(raw.get("gpus"), label)
    if gpus and resources is not None and resources.gpu:
        raise ConfigError(f"{label}: fields 'gpus' and 'resources.gpu' together: 'gpus' gives "
                          f"each replica one device of its list, 'resources.gpu' asks for a "
                          f"number of any; choose one")
    return StageSpec(name=name, run=run, params=params, replicas=replicas, hwm=hwm,
                     stream=stream, address=address, ordered=ordered, target=target,
                     max_message_size=max_size, restart=restart, max_restarts=max_restarts,
                     restart_window=restart_window, on_error=on_error, max_errors=max_errors,
                     item_timeout=item_timeout, total=total, resources=resources,
                     volumes=volumes, batch=batch, input=input_policy, concurrency=concurrency,
                     gpus=gpus)


def _gpus(raw: Any, where: str) -> tuple[int | str, ...]:
    """``gpus = [0, 1]``: device indexes (or UUIDs) the replicas take in turn."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_GPUS_LISTED:
        raise ConfigError(f"{where}: field 'gpus' must be a list of 1 to {MAX_GPUS_LISTED} GPU "
                          f"indexes, as [0, 1] (got {_shown(raw)})")
    for gpu in raw:
        if isinstance(gpu, bool) or not (
                (isinstance(gpu, int) and 0 <= gpu < 2**31) or
                (isinstance(gpu, str) and len(gpu) <= MAX_NAME_LENGTH * 2
                 and GPU_ID_RE.fullmatch(gpu))):
            raise ConfigError(f"{where}: field 'gpus': {_shown(gpu)} is not a GPU index (a "
                              f"whole number >= 0) or id (such as \"GPU-8f3c...\" or "
                              f"\"MIG-...\")")
    return tuple(raw)


def _choice(table: dict[str, Any], key: str, choices: tuple[str, ...], where: str) -> str:
    value = table.get(key, choices[0])
    if value not in choices:
        raise ConfigError(f"{where}: field {key!r} must be one of "
                          f"{', '.join(repr(c) for c in choices)} (got {_shown(value)})")
    return value


def _count_field(table: dict[str, Any], key: str, default: int, where: str, limit: int) -> int:
    """A whole number from 0 to ``limit``."""
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise ConfigError(f"{where}: field {key!r} must be a whole number from 0 to "
                          f"{limit:,} (got {_shown(value)})")
    return value


def _good_name(name: Any) -> bool:
    return isinstance(name, str) and len(name) <= MAX_NAME_LENGTH and \
        NAME_RE.fullmatch(name) is not None


def _got_name(name: Any) -> str:
    if isinstance(name, str) and len(name) > MAX_NAME_LENGTH:
        return f"got {len(name)} characters: {_shown(name)}"
    return f"got {_shown(name)}"


_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 80
_SHOWN.maxlevel = 3


def _shown(value: Any) -> str:
    """A value for a message: cut short, whatever its size or depth (the file may be hostile)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        # repr() of an int of more than 4300 digits raises; past 39 digits, the size says it.
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    try:
        return _SHOWN.repr(value)
    except Exception:  # noqa: BLE001 - a message must never fail
        return f"a {type(value).__name__}"


def _keys_folder(keys: Any, base_dir: Path | None, at: str) -> Path:
    if not isinstance(keys, str) or not keys:
        raise ConfigError(f"{at} field 'keys' must be a folder (got {_shown(keys)})")
    folder = (base_dir or Path.cwd()) / keys
    try:
        missing = [n for n in ("server.key_secret", "client.key_secret")
                   if not (folder / n).is_file()]
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte
        raise ConfigError(f"{at} field 'keys': cannot use {_shown(str(folder))}: {exc}") from None
    if missing:
        raise ConfigError(f"{at} field 'keys': {folder} lacks {', '.join(missing)}"
                          f" (make them with `zpipe keys {folder}`)")
    return folder


def _check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed, key=str)
    if unknown:
        raise ConfigError(f"{where}: unknown field {_shown(unknown[0])} "
                          f"(allowed: {', '.join(sorted(allowed))})")


def _whole_number(table: dict[str, Any], key: str, default: int, where: str,
                  limit: int) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise ConfigError(f"{where}: field {key!r} must be a whole number >= 1 and at most "
                          f"{limit:,} (got {_shown(value)})")
    return value


def _seconds(table: Mapping[str, Any], key: str, default: float, where: str,
             minimum: float = 0.0) -> float:
    """A finite number of seconds above 0 (at least ``minimum`` if given), at most MAX_SECONDS."""
    value = table.get(key, default)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    # Compare before float(): an int too large for a float would raise OverflowError,
    # and nan fails every comparison, so "not in range" catches it.
    if not number or not (value > 0 and value >= minimum and value <= MAX_SECONDS):
        low = f">= {minimum:g}" if minimum else "> 0"
        why = ("; the supervisor sees progress only through the replicas' heartbeats, once "
               "a second, so a shorter timeout would fire while items flow"
               if number and 0 < value < minimum else "")
        raise ConfigError(f"{where}: field {key!r} must be a number of seconds {low} and at "
                          f"most {MAX_SECONDS:g} (a week) (got {_shown(value)}){why}")
    return float(value)


def _check_tcp(address: Any, where: str, replicas: int = 1) -> None:
    match = TCP_RE.fullmatch(address) if isinstance(address, str) else None
    if not match or not 0 < int(match["port"]) < 65536:
        raise ConfigError(f"{where} must be \"tcp://HOST:PORT\" (got {_shown(address)})")
    host = match["host"]
    if len(host) > MAX_HOST_LENGTH:
        raise ConfigError(f"{where}: the host has {len(host)} characters, more than the "
                          f"{MAX_HOST_LENGTH} of a DNS name (got {_shown(address)})")
    if "{" in host.replace(REPLICA, "") or "}" in host.replace(REPLICA, ""):
        raise ConfigError(f"{where}: the only placeholder a host may hold is {REPLICA} "
                          f"(got {_shown(address)})")
    if REPLICA not in host and int(match["port"]) + replicas - 1 > 65535:
        raise ConfigError(f"{where}: replica i uses port PORT+i, and {replicas} replicas from "
                          f"port {match['port']} go past 65535")


def plan_addresses(spec: PipelineSpec, runtime_dir: str | Path) -> Addresses:
    """Compute every endpoint; ipc in ``runtime_dir`` unless the file names tcp ones.

    A stage with ``address = "tcp://HOST:PORT"`` gives replica i port PORT + i;
    with ``"tcp://NAME-{replica}:PORT"`` replica i is host NAME-i, port PORT.
    An ipc socket is named by the stage's index and the replica (``RUNTIME/3-1``),
    never by the stage's name, so that the path's length depends only on the
    runtime folder (a Unix socket path holds at most MAX_IPC_PATH bytes).
    """
    runtime_dir = Path(runtime_dir)
    control = spec.control or f"ipc://{runtime_dir / 'control'}"
    inputs: dict[str, tuple[str, ...]] = {}
    for position, stage in enumerate(spec.stages):
        if position == 0:
            inputs[stage.name] = ()
        elif stage.address:
            match = TCP_RE.fullmatch(stage.address)
            assert match is not None
            host, port = match["host"], int(match["port"])
            if REPLICA in host:  # a host per replica (containers): square-0, square-1, ...
                inputs[stage.name] = tuple(f"tcp://{host.replace(REPLICA, str(i))}:{port}"
                                           for i in range(stage.replicas))
            else:
                inputs[stage.name] = tuple(f"tcp://{host}:{port + i}"
                                           for i in range(stage.replicas))
        else:
            inputs[stage.name] = tuple(f"ipc://{runtime_dir / f'{position}-{i}'}"
                                       for i in range(stage.replicas))
    return Addresses(control=control, inputs=inputs)


def placeholder_runtime_dir(name: str) -> str:
    """A stand-in for the runtime folder `zpipe launch` makes, exactly as long as it will be.

    The launcher's folder is ``tempfile.mkdtemp(prefix=f"zpipe-{name}-")``:
    the temporary folder, the prefix and MKDTEMP_RANDOM_CHARS random characters.
    `zpipe validate` plans with this one, so that it refuses the same too long
    ipc paths as launch would.
    """
    return os.path.join(tempfile.gettempdir(), f"zpipe-{name}-" + "X" * MKDTEMP_RANDOM_CHARS)


def check_ipc_paths(spec: PipelineSpec, runtime_dir: str | Path) -> None:
    """Raise ConfigError when an ipc address of the plan is longer than a Unix socket path may be.

    Call it with the runtime folder the pipeline will use (before binding):
    ZeroMQ would otherwise fail deep inside a replica with "File name too long".
    """
    addresses = plan_addresses(spec, runtime_dir)
    every = [("the supervisor", addresses.control)] + [
        (f"stage {name!r}", address) for name, stage_addresses in addresses.inputs.items()
        for address in stage_addresses]
    for owner, address in every:
        if not address.startswith("ipc://"):
            continue
        path = address[len("ipc://"):]
        size = len(os.fsencode(path))
        if size > MAX_IPC_PATH:
            raise ConfigError(
                f"{spec.where}: the ipc socket of {owner}, {path}, is {size} bytes long, more "
                f"than the {MAX_IPC_PATH} bytes a Unix socket path may have: the runtime folder "
                f"{runtime_dir} is too long; set TMPDIR to a shorter folder (TMPDIR=/tmp), or "
                f"give [pipeline] control and every stage after the first a tcp address")


ENV_CONTROL = "ZPIPE_CONTROL"
ENV_ADDRESS_PREFIX = "ZPIPE_ADDRESS_"


def address_variable(stage_name: str) -> str:
    """The environment variable that overrides a stage's address: ZPIPE_ADDRESS_SQUARE."""
    return ENV_ADDRESS_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", stage_name).upper()


def apply_environment(spec: PipelineSpec, environ: Mapping[str, str]) -> PipelineSpec:
    """The spec with addresses overridden from the environment (as containers set them).

    ZPIPE_CONTROL replaces [pipeline] control; ZPIPE_ADDRESS_<STAGE> a stage's
    address (same forms as in the file).
    """
    where = f"{spec.where} (environment)"
    control = environ.get(ENV_CONTROL) or spec.control
    if control != spec.control:
        _check_tcp(control, f"{where}: {ENV_CONTROL}")
    stages = []
    for index, stage in enumerate(spec.stages):
        address = environ.get(address_variable(stage.name))
        if address and index > 0:
            _check_tcp(address, f"{where}: {address_variable(stage.name)}", stage.replicas)
            stage = replace(stage, address=address)
        stages.append(stage)
    return replace(spec, control=control, stages=tuple(stages))
