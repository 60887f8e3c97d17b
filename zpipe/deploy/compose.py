"""`zpipe export compose`: a docker-compose.yml with one service per replica and the supervisor.

Compose starts a service after those it depends on and stops it before them,
so the supervisor depends on every stage: it starts last, once every replica
is listening, and is stopped first, which is zpipe's ordered drain (SIGTERM
to the supervisor); the stages then finish in flow order and exit on their
own. The dependency is ``service_started``, not ``service_healthy``: a
replica is ready only once the supervisor has started the run, so waiting
for the stages' health before starting the supervisor would wait forever.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import PipelineSpec
from .export import (
    APP_DIR,
    HEALTH_PORT,
    SUPERVISOR,
    environment,
    header,
    in_image,
    stop_grace,
    to_yaml,
)
from .resources import stage_resources, volume_name

# Ready, not only alive: `docker ps` then tells a replica that drains (or has
# not been started by the supervisor yet) from one that takes work.
HEALTHCHECK = {"test": ["CMD", "zpipe", "probe", str(HEALTH_PORT), "--ready"],
               "interval": "10s", "timeout": "5s", "retries": 3, "start_period": "30s"}


def compose(spec: PipelineSpec, file: str | Path, image: str, context: str | Path = ".") -> str:
    """docker-compose.yml text: one service per replica plus the supervisor."""
    inside = in_image(file, context)
    env = environment(spec)
    grace = f"{stop_grace(spec)}s"
    services: dict[str, Any] = {}
    volumes: dict[str, Any] = {}
    for stage in spec.stages:
        mounts = []
        for folder in stage.volumes:
            name = volume_name(stage.name, folder)
            volumes[name] = {}
            mounts.append(f"{name}:{APP_DIR / inside.parent / folder}")
        for replica in range(stage.replicas):
            name = stage.replica_name(replica)
            service: dict[str, Any] = {
                "image": image,
                "command": ["zpipe", "stage", "--replica", str(replica),
                            "--health-port", str(HEALTH_PORT), "--", str(inside), stage.name],
                "hostname": name,
                "environment": env,
                # restart = "on-failure": the engine starts a dead replica again and
                # it rejoins under its name (recovery.py); otherwise one that dies
                # is reported, and restarting it would only hide that.
                "restart": "on-failure" if stage.restart == "on-failure" else "no",
                "stop_grace_period": grace,
                "healthcheck": HEALTHCHECK,
            }
            resources = stage_resources(stage).compose(stage.gpu_of(replica))
            if resources:
                service["deploy"] = {"resources": resources}
            if mounts:
                service["volumes"] = mounts
            services[name] = service
    services[SUPERVISOR] = {
        "image": image,
        "build": ".",
        "command": ["zpipe", "supervise", "--health-port", str(HEALTH_PORT), str(inside)],
        "hostname": SUPERVISOR,
        "environment": env,
        "depends_on": {name: {"condition": "service_started"} for name in services},
        "restart": "no",
        "stop_grace_period": grace,
        "healthcheck": HEALTHCHECK,
    }
    document: dict[str, Any] = {"services": services}
    if volumes:
        document["volumes"] = volumes
    return header(f"zpipe export compose {inside}",
                  f"One service per replica of pipeline {spec.name!r}, all from one image.") \
        + to_yaml(document)
