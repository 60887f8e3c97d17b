"""What a stage asks of the machine it runs on: CPU, memory and GPUs, and the folders it writes.

``[[stages]] resources = { cpu = "2", memory = "4Gi", gpu = 1 }`` is written in
Kubernetes' quantities, the one notation both engines can be given: the
exporters turn it into a pod's requests and limits (``nvidia.com/gpu`` for
GPUs) and into Compose's ``deploy.resources`` (``cpus``, ``memory`` in bytes, a
device reservation for GPUs). ``volumes = ["out"]`` names folders, relative to
pipeline.toml's, that a stage writes what it makes into: each becomes a volume,
so the output outlives the container.

Nothing here changes how ``zpipe launch`` runs a pipeline on one host.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import StageSpec

RESOURCE_KEYS = ("cpu", "memory", "gpu")
MAX_GPUS = 64  # per replica; more than any one machine holds
# Kubernetes' quantity grammar for the two units that matter here.
CPU_RE = re.compile(r"(?P<number>[0-9]+(\.[0-9]+)?)(?P<milli>m?)")
MEMORY_RE = re.compile(r"(?P<number>[0-9]+(\.[0-9]+)?)(?P<unit>Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?")
MEMORY_UNITS = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
                "E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
                "Ei": 2**60}
MAX_VOLUMES = 16


@dataclass(frozen=True)
class Resources:
    """One replica's share: ``cpu`` and ``memory`` as Kubernetes quantities, ``gpu`` a count."""

    cpu: str | None = None
    memory: str | None = None
    gpu: int = 0

    def kubernetes(self) -> dict[str, Any]:
        """A container's ``resources``: requests equal to limits, so the scheduler
        reserves what the stage is given and the pod is not evicted first."""
        amounts: dict[str, Any] = {}
        if self.cpu is not None:
            amounts["cpu"] = self.cpu
        if self.memory is not None:
            amounts["memory"] = self.memory
        out: dict[str, Any] = {}
        if amounts:
            out["requests"] = dict(amounts)
        limits = dict(amounts)
        if self.gpu:
            limits["nvidia.com/gpu"] = self.gpu  # extended resources are set as limits
        if limits:
            out["limits"] = limits
        return out

    def compose(self, device: str | None = None) -> dict[str, Any]:
        """A service's ``deploy.resources``: limits, and a GPU reservation: ``device``
        (one replica's of a stage with gpus), else a count."""
        out: dict[str, Any] = {}
        limits: dict[str, Any] = {}
        if self.cpu is not None:
            limits["cpus"] = _cpus(self.cpu)
        if self.memory is not None:
            limits["memory"] = _bytes(self.memory)
        if limits:
            out["limits"] = limits
        reservation: dict[str, Any] = {"driver": "nvidia"}
        if device is not None:
            reservation["device_ids"] = [device]  # inside, the container sees it as GPU 0
        elif self.gpu:
            reservation["count"] = self.gpu
        if len(reservation) > 1:
            out["reservations"] = {"devices": [{**reservation, "capabilities": ["gpu"]}]}
        return out


def stage_resources(stage: StageSpec) -> Resources:
    """What one replica of ``stage`` asks for: its ``resources``, and with ``gpus``
    one GPU (config refuses ``gpus`` beside ``resources.gpu``)."""
    resources = stage.resources or Resources()
    return replace(resources, gpu=1) if stage.gpus else resources


def parse_resources(raw: Any, where: str) -> Resources | None:
    """``resources = {...}`` of one stage, checked; ``where`` names the stage."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: field 'resources' must be a table such as "
                          f'{{ cpu = "2", memory = "4Gi", gpu = 1 }} (got {type(raw).__name__})')
    unknown = sorted(set(raw) - set(RESOURCE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: field 'resources' has unknown key(s) {', '.join(unknown)} "
                          f"(known: {', '.join(RESOURCE_KEYS)})")
    cpu = raw.get("cpu")
    if cpu is not None:
        cpu = _quantity(cpu, CPU_RE, f"{where}: field 'resources.cpu'",
                        'cores, as "2", "0.5" or "500m"')
    memory = raw.get("memory")
    if memory is not None:
        memory = _quantity(memory, MEMORY_RE, f"{where}: field 'resources.memory'",
                           'bytes with a unit, as "4Gi", "512Mi" or "1G"')
    gpu = raw.get("gpu", 0)
    if isinstance(gpu, bool) or not isinstance(gpu, int) or not 0 <= gpu <= MAX_GPUS:
        raise ConfigError(f"{where}: field 'resources.gpu' must be a whole number of GPUs "
                          f"from 0 to {MAX_GPUS} (got {gpu!r})")
    return Resources(cpu=cpu, memory=memory, gpu=gpu)


def _quantity(value: Any, pattern: re.Pattern[str], where: str, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{where} must be {what} (got {type(value).__name__})")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} must be {what} (got {value!r})")
    text = value if isinstance(value, str) else format(Decimal(str(value)), "f")
    match = pattern.fullmatch(text)
    if match is None or Decimal(match.group("number")) <= 0:
        raise ConfigError(f"{where} must be {what}, more than zero (got {value!r})")
    return text


def _cpus(cpu: str) -> str:
    match = CPU_RE.fullmatch(cpu)
    assert match is not None  # parse_resources checked it
    cores = Decimal(match.group("number")) / (1000 if match.group("milli") else 1)
    return format(cores.normalize(), "f")


def _bytes(memory: str) -> str:
    """Compose reads "4g" as 4 GiB and "1000m" as 1000 MiB; whole bytes say it exactly."""
    match = MEMORY_RE.fullmatch(memory)
    assert match is not None
    amount = Decimal(match.group("number")) * MEMORY_UNITS[match.group("unit")]
    return f"{int(amount)}b"


def parse_volumes(raw: Any, where: str) -> tuple[str, ...]:
    """``volumes = ["out", ...]``: folders relative to pipeline.toml's, inside it."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_VOLUMES:
        raise ConfigError(f"{where}: field 'volumes' must be a list of at most {MAX_VOLUMES} "
                          f'folders, as ["out"] (got {_kind(raw)})')
    folders: list[str] = []
    for entry in raw:
        path = PurePosixPath(entry) if isinstance(entry, str) and entry else None
        if path is None or path.is_absolute() or ".." in path.parts or "\\" in entry \
                or str(path) == ".":
            raise ConfigError(f"{where}: field 'volumes': {entry!r} is not a folder inside the "
                              f"pipeline's folder (give a relative path such as \"out\")")
        if str(path) in folders:
            raise ConfigError(f"{where}: field 'volumes' names {entry!r} twice")
        folders.append(str(path))
    return tuple(folders)


def volume_name(stage: str, folder: str) -> str:
    """The engine's name for a stage's folder: ``store`` and ``out`` make ``store-out``."""
    slug = re.sub(r"[^a-z0-9]+", "-", folder.lower()).strip("-")
    return f"{stage.lower().replace('_', '-')}-{slug}"


def _kind(value: Any) -> str:
    return f"a list of {len(value)}" if isinstance(value, list) else type(value).__name__
