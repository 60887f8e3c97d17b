"""pipeline.toml: parse, validate and plan addresses.

Everything here runs before any process starts, so every mistake in a file is
reported as a ConfigError naming the file, the stage and the field.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError

DEFAULT_HWM = 100
DEFAULT_GRACE = 5.0
DEFAULT_STARTUP_TIMEOUT = 60.0

NAME_RE = re.compile(r"[A-Za-z0-9_-]+")
RUN_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
TCP_RE = re.compile(r"tcp://(?P<host>[^:/]+|\[[0-9a-fA-F:]+\]):(?P<port>\d+)")

REPLICA = "{replica}"
PIPELINE_KEYS = {"name", "hwm", "grace", "control", "startup_timeout", "inactivity_timeout",
                 "keys", "max_message_size"}
STAGE_KEYS = {"name", "run", "params", "replicas", "hwm", "stream", "address", "ordered",
              "max_message_size"}


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
    # The callable itself, for pipelines declared in Python (zpipe.Task);
    # ``run`` is then only a label.
    target: Any = field(default=None, compare=False, repr=False)

    def replica_name(self, replica: int) -> str:
        return f"{self.name}-{replica}"


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
    base_dir: Path | None = None
    path: Path | None = None

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
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return from_dict(data, where=str(path), base_dir=path.resolve().parent, path=path)


def from_dict(data: dict[str, Any], where: str = "pipeline", base_dir: Path | None = None,
              path: Path | None = None, targets: list[Any] | None = None) -> PipelineSpec:
    """Validate an already parsed pipeline description.

    ``targets``, one per stage, are the callables themselves for a pipeline
    declared in Python; each stage's ``run`` is then only a label.
    """
    _check_keys(data, {"pipeline", "stages"}, where)
    pipeline = data.get("pipeline")
    if not isinstance(pipeline, dict):
        raise ConfigError(f"{where}: missing [pipeline] table (with at least name = \"...\")")
    _check_keys(pipeline, PIPELINE_KEYS, f"{where}: [pipeline]")
    name = pipeline.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ConfigError(f"{where}: [pipeline] name is required and must use letters, digits, "
                          f"'-' and '_' (got {name!r})")
    hwm = _positive_int(pipeline, "hwm", DEFAULT_HWM, f"{where}: [pipeline]")
    max_size = pipeline.get("max_message_size")
    if max_size is not None:
        max_size = _positive_int(pipeline, "max_message_size", 0, f"{where}: [pipeline]")
    grace = _positive_number(pipeline, "grace", DEFAULT_GRACE, f"{where}: [pipeline]")
    startup = _positive_number(pipeline, "startup_timeout", DEFAULT_STARTUP_TIMEOUT,
                               f"{where}: [pipeline]")
    inactivity = pipeline.get("inactivity_timeout")
    if inactivity is not None:
        inactivity = _positive_number(pipeline, "inactivity_timeout", 0, f"{where}: [pipeline]")
    control = pipeline.get("control")
    if control is not None:
        _check_tcp(control, f"{where}: [pipeline] control")
    keys = pipeline.get("keys")
    if keys is not None:
        if not isinstance(keys, str):
            raise ConfigError(f"{where}: [pipeline] field 'keys' must be a folder (got {keys!r})")
        keys = (base_dir or Path.cwd()) / keys
        missing = [n for n in ("server.key_secret", "client.key_secret") if not (keys / n).exists()]
        if missing:
            raise ConfigError(f"{where}: [pipeline] field 'keys': {keys} lacks {', '.join(missing)}"
                              f" (make them with `zpipe keys {keys}`)")

    raw_stages = data.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise ConfigError(f"{where}: no stages: add at least one [[stages]] table")
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
    check_order(stages, where)
    return PipelineSpec(name=name, stages=tuple(stages), hwm=hwm, grace=grace, control=control,
                        startup_timeout=startup, inactivity_timeout=inactivity, keys=keys,
                        base_dir=base_dir, path=path)


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
    label = f"stage #{position}" if not isinstance(name, str) else f"stage {name!r}"
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ConfigError(f"{where}: {label}: field 'name' is required and must use letters, "
                          f"digits, '-' and '_' (got {name!r})")
    _check_keys(raw, STAGE_KEYS, f"{where}: {label}")
    run = raw.get("run")
    if target is None and (not isinstance(run, str) or not RUN_RE.fullmatch(run)):
        raise ConfigError(f"{where}: {label}: field 'run' must be \"module:attribute\", "
                          f"for example \"stages:square\" (got {run!r})")
    params = raw.get("params", {})
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: {label}: field 'params' must be a table of keyword "
                          f"arguments (got {type(params).__name__})")
    replicas = _positive_int(raw, "replicas", 1, f"{where}: {label}")
    hwm = _positive_int(raw, "hwm", default_hwm, f"{where}: {label}")
    stream = raw.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ConfigError(f"{where}: {label}: field 'stream' must be true or false "
                          f"(got {stream!r})")
    max_size = raw.get("max_message_size", default_max_size)
    if max_size is not None:
        max_size = _positive_int({"max_message_size": max_size}, "max_message_size", 0,
                                 f"{where}: {label}")
    ordered = raw.get("ordered", False)
    if not isinstance(ordered, bool):
        raise ConfigError(f"{where}: {label}: field 'ordered' must be true or false "
                          f"(got {ordered!r})")
    address = raw.get("address")
    if address is not None:
        _check_tcp(address, f"{where}: {label}: field 'address'", replicas)
        if position == 1:
            raise ConfigError(f"{where}: {label}: field 'address' is the address a stage "
                              f"receives on; the first stage receives nothing")
    return StageSpec(name=name, run=run, params=params, replicas=replicas, hwm=hwm,
                     stream=stream, address=address, ordered=ordered, target=target,
                     max_message_size=max_size)


def _check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r} "
                          f"(allowed: {', '.join(sorted(allowed))})")


def _positive_int(table: dict[str, Any], key: str, default: int, where: str) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: field {key!r} must be a whole number >= 1 (got {value!r})")
    return value


def _positive_number(table: dict[str, Any], key: str, default: float, where: str) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{where}: field {key!r} must be a number of seconds > 0 "
                          f"(got {value!r})")
    return float(value)


def _check_tcp(address: Any, where: str, replicas: int = 1) -> None:
    match = TCP_RE.fullmatch(address) if isinstance(address, str) else None
    if not match or not 0 < int(match["port"]) < 65536:
        raise ConfigError(f"{where} must be \"tcp://HOST:PORT\" (got {address!r})")
    if "{" in match["host"].replace(REPLICA, "") or "}" in match["host"].replace(REPLICA, ""):
        raise ConfigError(f"{where}: the only placeholder a host may hold is {REPLICA} "
                          f"(got {address!r})")
    if REPLICA not in match["host"] and int(match["port"]) + replicas - 1 > 65535:
        raise ConfigError(f"{where}: replica i uses port PORT+i, and {replicas} replicas from "
                          f"port {match['port']} go past 65535")


def plan_addresses(spec: PipelineSpec, runtime_dir: str | Path) -> Addresses:
    """Compute every endpoint; ipc in ``runtime_dir`` unless the file names tcp ones.

    A stage with ``address = "tcp://HOST:PORT"`` gives replica i port PORT + i;
    with ``"tcp://NAME-{replica}:PORT"`` replica i is host NAME-i, port PORT.
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
            inputs[stage.name] = tuple(f"ipc://{runtime_dir / stage.replica_name(i)}"
                                       for i in range(stage.replicas))
    return Addresses(control=control, inputs=inputs)


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
