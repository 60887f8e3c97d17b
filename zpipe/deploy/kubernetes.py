"""`zpipe export k8s`: Kubernetes manifests a cluster runs as they are.

What each object is for:

* **ConfigMap** ``PIPELINE-pipeline``: the pipeline.toml, mounted over the
  image's copy in every pod, so a changed param is ``kubectl apply``, not a
  rebuild.
* per stage and for the supervisor, a **headless Service** (no cluster IP,
  ``publishNotReadyAddresses``): it gives replica i of stage NAME the stable
  DNS name ``NAME-i.NAME`` from the moment its pod exists, ready or not. A
  replica is ready only once the supervisor has started the run, so names
  must resolve before that.
* per stage and for the supervisor, the workload:

  - a pipeline whose source ends: an **Indexed Job** per stage (``subdomain``
    plus the Service above; the completion index is the replica). Its pods
    complete and stay completed: a finished pipeline does not start over.
    A stage with ``restart = "on-failure"`` gets ``restartPolicy: OnFailure``,
    so kubelet starts a dead replica again in the same pod, under the same
    name, and it rejoins (supervision/recovery.py); the others fail the Job.
  - a pipeline whose source never ends (``[pipeline] service = true``): a
    **StatefulSet** per stage, whose pods are kept running; the pod index
    label (Kubernetes 1.28 and later) is the replica.

* a **PersistentVolumeClaim** per folder a stage names in ``volumes``.

Every container runs as a non-root user, pulls its image only if the node
lacks it, is probed on ``/livez`` and ``/readyz`` (watch/health.py), and gets
the ``resources`` its stage asks for (deploy/resources.py); a stage with
``gpus`` asks for one GPU per pod, which the device plugin picks (pods of one
template cannot each name theirs).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..config import PipelineSpec, StageSpec
from ..errors import ConfigError
from .export import (
    APP_DIR,
    APP_UID,
    CONTROL_PORT,
    DATA_PORT,
    HEALTH_PORT,
    SUPERVISOR,
    environment,
    header,
    in_image,
    stop_grace,
    to_yaml,
)
from .resources import stage_resources, volume_name

# Names of Services and pod hostnames are DNS labels (RFC 1035).
DNS_LABEL_RE = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
MAX_DNS_LABEL = 63
VOLUME_SIZE = "1Gi"  # what a claim asks for; edit it for larger outputs
# Where the replica's number comes from: the Job controller's completion index,
# the StatefulSet controller's pod index.
JOB_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
POD_INDEX = "metadata.labels['apps.kubernetes.io/pod-index']"


def kubernetes(spec: PipelineSpec, file: str | Path, image: str, context: str | Path = ".",
               namespace: str | None = None) -> str:
    """The manifests of a pipeline, as one multi-document YAML text."""
    inside = in_image(file, context)
    _check_names(spec, namespace)
    text = Path(file).read_text(encoding="utf-8")
    config_name = f"{spec.name.lower().replace('_', '-')}-pipeline"
    env = environment(spec, host="{name}-{replica}.{name}",
                      control=f"{SUPERVISOR}-0.{SUPERVISOR}")
    docs: list[dict[str, Any]] = [_object("v1", "ConfigMap", config_name, namespace,
                                          _labels(spec, config_name, "config"),
                                          data={"pipeline.toml": text})]
    mounts = [{"name": "pipeline", "mountPath": str(APP_DIR / inside),
               "subPath": "pipeline.toml", "readOnly": True}]
    volumes: list[dict[str, Any]] = [{"name": "pipeline", "configMap": {"name": config_name}}]
    for stage in spec.stages:
        for folder in stage.volumes:
            claim = volume_name(stage.name, folder)
            docs.append(_claim(spec, stage, claim, namespace))
    for stage in spec.stages:
        stage_mounts, stage_volumes = list(mounts), list(volumes)
        for number, folder in enumerate(stage.volumes):
            claim = volume_name(stage.name, folder)
            stage_volumes.append({"name": f"data-{number}",
                                  "persistentVolumeClaim": {"claimName": claim}})
            stage_mounts.append({"name": f"data-{number}",
                                 "mountPath": str(APP_DIR / inside.parent / folder)})
        command = ["zpipe", "stage", "--health-port", str(HEALTH_PORT), "--", str(inside),
                   stage.name]
        container = _container(stage.name, image, command, env, stage_mounts,
                               DATA_PORT if stage is not spec.stages[0] else None, spec.service)
        resources = stage_resources(stage).kubernetes()
        if resources:
            container["resources"] = resources
        docs += _unit(spec, stage.name, "stage", stage.replicas, stage.restart, container,
                      stage_volumes, namespace)
    container = _container(SUPERVISOR, image, ["zpipe", "supervise", "--health-port",
                                               str(HEALTH_PORT), str(inside)],
                           env, mounts, CONTROL_PORT, None)
    docs += _unit(spec, SUPERVISOR, "supervisor", 1, "no", container, volumes, namespace)
    kind = "StatefulSet" if spec.service else "Indexed Job"
    return header(f"zpipe export k8s {inside}",
                  f"Pipeline {spec.name!r}: its pipeline.toml in a ConfigMap; per stage and "
                  f"for the supervisor",
                  f"a headless Service and a{'n' if kind[0] in 'AEIOU' else ''} {kind}.") \
        + to_yaml(*docs)


def _check_names(spec: PipelineSpec, namespace: str | None) -> None:
    where = spec.where
    if namespace is not None and not _dns_label(namespace):
        raise ConfigError(f"--namespace {namespace!r}: a Kubernetes namespace is a DNS label: "
                          f"lowercase letters, digits and '-', starting with a letter, at most "
                          f"{MAX_DNS_LABEL} characters")
    for stage in spec.stages:
        # The longest name a pod gets: NAME-I for the last replica.
        longest = stage.replica_name(stage.replicas - 1)
        if stage.name == SUPERVISOR or not _dns_label(stage.name) \
                or len(longest) > MAX_DNS_LABEL:
            raise ConfigError(f"{where}: stage {stage.name!r}: on Kubernetes a stage's name "
                              f"names its Service and pods ({longest}), so it must be a DNS "
                              f"label: lowercase letters, digits and '-', starting with a "
                              f"letter, with room for '-{stage.replicas - 1}' within "
                              f"{MAX_DNS_LABEL} characters, and not {SUPERVISOR!r}")


def _dns_label(name: str) -> bool:
    return len(name) <= MAX_DNS_LABEL and DNS_LABEL_RE.fullmatch(name) is not None


def _labels(spec: PipelineSpec, name: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/instance": spec.name,
            "app.kubernetes.io/component": component, "app.kubernetes.io/part-of": spec.name,
            "app.kubernetes.io/managed-by": "zpipe"}


def _selector(spec: PipelineSpec, name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/instance": spec.name}


def _object(api: str, kind: str, name: str, namespace: str | None, labels: dict[str, str],
            **body: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    metadata["labels"] = labels
    return {"apiVersion": api, "kind": kind, "metadata": metadata, **body}


def _container(name: str, image: str, command: list[str], env: dict[str, str],
               mounts: list[dict[str, Any]], port: int | None,
               service: bool | None) -> dict[str, Any]:
    env_list: list[dict[str, Any]] = []
    if service is not None:  # a stage: which replica this pod is
        env_list.append({"name": "ZPIPE_REPLICA", "valueFrom": {"fieldRef": {
            "fieldPath": POD_INDEX if service else JOB_INDEX}}})
    env_list += [{"name": key, "value": value} for key, value in env.items()]
    ports = [{"name": "zpipe", "containerPort": port}] if port is not None else []
    ports.append({"name": "health", "containerPort": HEALTH_PORT})
    return {
        "name": name, "image": image,
        # A locally built or preloaded image: never pull a :latest tag from a registry.
        "imagePullPolicy": "IfNotPresent",
        "command": command, "env": env_list, "ports": ports,
        # Alive: restarted if its heartbeat stops (a frozen process); ready:
        # taking work (watch/health.py).
        "livenessProbe": _probe("/livez", 30),
        "readinessProbe": _probe("/readyz", 5),
        "volumeMounts": mounts,
        "securityContext": {"allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]}},
    }


def _probe(path: str, period: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": "health"}, "periodSeconds": period,
            "timeoutSeconds": 5, "failureThreshold": 3}


def _unit(spec: PipelineSpec, name: str, component: str, replicas: int, restart: str,
          container: dict[str, Any], volumes: list[dict[str, Any]],
          namespace: str | None) -> list[dict[str, Any]]:
    """The headless Service and the workload of one stage (or of the supervisor)."""
    labels = _labels(spec, name, component)
    ports = [{"name": p["name"], "port": p["containerPort"]} for p in container["ports"]]
    service = _object("v1", "Service", name, namespace, labels, spec={
        "clusterIP": "None", "publishNotReadyAddresses": True,
        "selector": _selector(spec, name), "ports": ports})
    pod: dict[str, Any] = {
        "terminationGracePeriodSeconds": stop_grace(spec),
        "securityContext": {"runAsNonRoot": True, "runAsUser": APP_UID, "runAsGroup": APP_UID,
                            "fsGroup": APP_UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": volumes,
    }
    template = {"metadata": {"labels": labels}, "spec": pod}
    if spec.service:
        workload = _object("apps/v1", "StatefulSet", name, namespace, labels, spec={
            "serviceName": name, "replicas": replicas, "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": _selector(spec, name)}, "template": template})
    else:
        again = restart == "on-failure"
        pod["subdomain"] = name  # with the Service: NAME-I.NAME
        pod["restartPolicy"] = "OnFailure" if again else "Never"
        stage = spec.stage(name) if component == "stage" else None
        workload = _object("batch/v1", "Job", name, namespace, labels, spec={
            "completionMode": "Indexed", "completions": replicas, "parallelism": replicas,
            # Without restarts, one failed replica fails the run, as under
            # `zpipe launch`; with them, as many as the stage allows.
            "backoffLimit": stage.max_restarts * replicas if again and stage else 0,
            "template": template})
    return [service, workload]


def _claim(spec: PipelineSpec, stage: StageSpec, name: str,
           namespace: str | None) -> dict[str, Any]:
    # Replicas of one stage share the folder, perhaps from several nodes.
    mode = "ReadWriteMany" if stage.replicas > 1 else "ReadWriteOnce"
    return _object("v1", "PersistentVolumeClaim", name, namespace,
                   _labels(spec, stage.name, "stage"),
                   spec={"accessModes": [mode],
                         "resources": {"requests": {"storage": VOLUME_SIZE}}})
