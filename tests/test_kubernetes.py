"""`zpipe export k8s`: manifests that pass the API's schemas strictly and behave on a cluster:
Indexed Jobs that complete (StatefulSets for a service), a ConfigMap, probes, resources."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import GPU_PIPELINE
from kubernetes_validate.utils import validate

from zpipe import load

ROOT = Path(__file__).resolve().parent.parent
ZPIPE = [sys.executable, "-m", "zpipe"]
# The oldest release whose downward API gives a StatefulSet pod its index
# (apps.kubernetes.io/pod-index), and the newest the validator knows.
KUBERNETES_VERSIONS = ["1.28.0", "1.37.0"]



def export(file: Path | str, *args: str, cwd: Path = ROOT) -> list[dict]:
    result = subprocess.run([*ZPIPE, "export", "k8s", str(file), *args], cwd=cwd,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return list(yaml.safe_load_all(result.stdout))


def example(*args: str) -> list[dict]:
    return export("services/pipeline.toml", *args)


def gpu(tmp_path: Path, service: bool = False) -> list[dict]:
    text = GPU_PIPELINE.replace('name = "gpu-pipe"', 'name = "gpu-pipe"\nservice = true') \
        if service else GPU_PIPELINE
    (tmp_path / "pipeline.toml").write_text(text)
    return export("pipeline.toml", cwd=tmp_path)


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def container(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("which", ["example", "gpu", "gpu-service", "namespaced"])
def test_every_object_passes_strict_validation(tmp_path, which, version):
    docs = {"example": example, "namespaced": lambda: example("-n", "video"),
            "gpu": lambda: gpu(tmp_path), "gpu-service": lambda: gpu(tmp_path, True)}[which]()
    assert len(docs) > 5
    for doc in docs:
        validate(doc, version, strict=True)  # raises ValidationError naming the field


def test_strict_validation_can_fail():
    from kubernetes_validate.utils import ValidationError
    job = by_kind(example(), "Job")["detector"]
    container(job)["imagePullPolicy"] = "Sometimes"
    job["spec"]["completionsMode"] = "Indexed"
    with pytest.raises(ValidationError):
        validate(job, KUBERNETES_VERSIONS[0], strict=True)


def test_a_pipeline_whose_source_ends_runs_as_indexed_jobs_that_stay_completed():
    docs = example()
    spec = load(ROOT / "services" / "pipeline.toml")
    jobs, services = by_kind(docs, "Job"), by_kind(docs, "Service")
    assert not by_kind(docs, "StatefulSet")
    assert sorted(jobs) == sorted(services) == sorted([s.name for s in spec.stages]
                                                      + ["supervisor"])
    for stage in [*spec.stages, None]:
        name, replicas = (stage.name, stage.replicas) if stage else ("supervisor", 1)
        job = jobs[name]["spec"]
        assert job["completionMode"] == "Indexed"
        assert job["completions"] == job["parallelism"] == replicas
        # No restarts asked for: one failed replica fails the run, as under launch.
        assert job["backoffLimit"] == 0
        assert "ttlSecondsAfterFinished" not in job  # completed Jobs stay, with their logs
        pod = job["template"]["spec"]
        assert pod["restartPolicy"] == "Never"
        # Hostname NAME-I plus subdomain NAME under the headless Service: NAME-I.NAME.
        assert pod["subdomain"] == name
        service = services[name]["spec"]
        assert service["clusterIP"] == "None" and service["publishNotReadyAddresses"] is True
        assert service["selector"] == {k: v for k, v in job["template"]["metadata"]["labels"]
                                       .items() if k in service["selector"]}
        assert pod["terminationGracePeriodSeconds"] == int(spec.grace) + 10
    env = {e["name"]: e for e in container(jobs["detector"])["env"]}
    assert env["ZPIPE_CONTROL"]["value"] == "tcp://supervisor-0.supervisor:5600"
    assert env["ZPIPE_ADDRESS_TRACKER"]["value"] == "tcp://tracker-{replica}.tracker:5555"
    # The completion index is the replica, through the downward API.
    assert env["ZPIPE_REPLICA"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert container(jobs["detector"])["command"] == [
        "zpipe", "stage", "--health-port", "8080", "--", "services/pipeline.toml", "detector"]
    assert container(jobs["supervisor"])["command"] == [
        "zpipe", "supervise", "--health-port", "8080", "services/pipeline.toml"]
    assert "ZPIPE_REPLICA" not in {e["name"] for e in container(jobs["supervisor"])["env"]}


def test_a_stage_that_restarts_is_started_again_in_its_pod(tmp_path):
    jobs = by_kind(gpu(tmp_path), "Job")
    infer = jobs["infer"]["spec"]
    # kubelet starts the container again in the same pod: same name, and the
    # replica rejoins; exit 0 still completes it.
    assert infer["template"]["spec"]["restartPolicy"] == "OnFailure"
    assert infer["backoffLimit"] == 4 * 3
    assert jobs["sink"]["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_a_service_pipeline_runs_as_statefulsets(tmp_path):
    docs = gpu(tmp_path, service=True)
    assert not by_kind(docs, "Job")
    sets = by_kind(docs, "StatefulSet")
    assert sorted(sets) == ["frames", "infer", "sink", "supervisor"]
    infer = sets["infer"]["spec"]
    assert infer["replicas"] == 3 and infer["serviceName"] == "infer"
    assert infer["podManagementPolicy"] == "Parallel"
    assert infer["selector"]["matchLabels"] == by_kind(docs, "Service")["infer"]["spec"]["selector"]
    env = {e["name"]: e for e in container(sets["infer"])["env"]}
    assert env["ZPIPE_REPLICA"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['apps.kubernetes.io/pod-index']"


def test_the_pipeline_file_is_a_config_map_mounted_into_every_pod():
    docs = example()
    config = by_kind(docs, "ConfigMap")["video-analytics-pipeline"]
    assert config["data"]["pipeline.toml"] == (ROOT / "services" / "pipeline.toml").read_text()
    workloads = [d for d in docs if d["kind"] in ("Job", "StatefulSet")]
    assert len(workloads) == 6
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        volume = next(v for v in pod["volumes"] if v["name"] == "pipeline")
        assert volume["configMap"] == {"name": "video-analytics-pipeline"}
        assert {"name": "pipeline", "mountPath": "/app/services/pipeline.toml",
                "subPath": "pipeline.toml", "readOnly": True} in container(workload)["volumeMounts"]


def test_every_container_is_probed_pulls_only_if_missing_and_runs_as_non_root():
    for workload in [d for d in example() if d["kind"] == "Job"]:
        pod = workload["spec"]["template"]["spec"]
        box = container(workload)
        assert box["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "health"}
        assert box["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
        assert {"name": "health", "containerPort": 8080} in box["ports"]
        assert box["imagePullPolicy"] == "IfNotPresent"
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001
        assert box["securityContext"] == {"allowPrivilegeEscalation": False,
                                          "capabilities": {"drop": ["ALL"]}}
        labels = workload["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "video-analytics"
        assert labels["app.kubernetes.io/managed-by"] == "zpipe"


def test_resources_gpus_and_volumes_reach_the_pods(tmp_path):
    docs = gpu(tmp_path)
    jobs = by_kind(docs, "Job")
    assert container(jobs["infer"])["resources"] == {
        "requests": {"cpu": "2", "memory": "4Gi"},
        "limits": {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": 1}}
    assert container(jobs["sink"])["resources"] == {
        "requests": {"cpu": "500m", "memory": "512M"}, "limits": {"cpu": "500m", "memory": "512M"}}
    assert "resources" not in container(jobs["frames"])
    claims = by_kind(docs, "PersistentVolumeClaim")
    assert sorted(claims) == ["infer-logs", "infer-out-masks"]
    # Three replicas share each folder, perhaps from several nodes.
    assert claims["infer-out-masks"]["spec"]["accessModes"] == ["ReadWriteMany"]
    mounts = container(jobs["infer"])["volumeMounts"]
    assert {"name": "data-0", "mountPath": "/app/out/masks"} in mounts
    assert {"name": "data-1", "mountPath": "/app/logs"} in mounts
    pod = jobs["infer"]["spec"]["template"]["spec"]
    assert {"name": "data-0", "persistentVolumeClaim": {"claimName": "infer-out-masks"}} \
        in pod["volumes"]


def test_namespace_is_set_on_every_object():
    docs = example("--namespace", "video")
    assert {d["metadata"].get("namespace") for d in docs} == {"video"}
    assert {d["metadata"].get("namespace") for d in example()} == {None}


@pytest.mark.parametrize("name, replicas", [("post_process", 1), ("Upper", 1),
                                            ("supervisor", 1), ("x" * 62, 12)])
def test_names_kubernetes_cannot_take_are_refused_naming_the_stage(tmp_path, name, replicas):
    (tmp_path / "pipeline.toml").write_text(
        f'[pipeline]\nname = "p"\n[[stages]]\nname = "a"\nrun = "m:f"\n'
        f'[[stages]]\nname = "{name}"\nrun = "m:g"\nreplicas = {replicas}\n')
    result = subprocess.run([*ZPIPE, "export", "k8s", "pipeline.toml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert f"stage {name!r}: on Kubernetes" in result.stderr and "DNS label" in result.stderr


def test_a_bad_namespace_is_refused():
    result = subprocess.run([*ZPIPE, "export", "k8s", "services/pipeline.toml", "-n", "Video"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--namespace 'Video'" in result.stderr


def test_a_replica_takes_its_number_from_zpipe_replica(tmp_path):
    (tmp_path / "pipeline.toml").write_text(
        '[pipeline]\nname = "p"\n[[stages]]\nname = "a"\nrun = "m:f"\nreplicas = 2\n')
    result = subprocess.run([*ZPIPE, "stage", "pipeline.toml", "a"], cwd=tmp_path,
                            env={"ZPIPE_REPLICA": "5", "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "--replica (or $ZPIPE_REPLICA) must be 0 to 1 (got 5)" in result.stderr
