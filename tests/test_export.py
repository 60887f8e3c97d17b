"""`zpipe export compose`: the committed docker-compose.yml is what the exporter writes, and valid."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from zpipe import load
from zpipe.deploy.export import compose

ROOT = Path(__file__).resolve().parent.parent


def exported() -> str:
    result = subprocess.run([sys.executable, "-m", "zpipe", "export", "compose",
                             "services/pipeline.toml"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_committed_compose_file_is_the_export_of_the_example():
    assert (ROOT / "docker-compose.yml").read_text() == exported(), \
        "regenerate: zpipe export compose services/pipeline.toml > docker-compose.yml"


def test_one_service_per_replica_and_a_supervisor_stopped_first():
    spec = load(ROOT / "services" / "pipeline.toml")
    text = compose(spec, "services/pipeline.toml", "img")
    names = [s.replica_name(i) for s in spec.stages for i in range(s.replicas)]
    for name in names + ["supervisor"]:
        assert f"\n  {name}:\n" in text
    supervisor = text.split("\n  supervisor:\n")[1]
    assert all(f'      - "{name}"' in supervisor for name in names)  # depends_on: every replica
    assert f'stop_grace_period: "{int(spec.grace) + 10}s"' in text
    assert '"ZPIPE_ADDRESS_DETECTOR: ' not in text
    assert 'ZPIPE_ADDRESS_DETECTOR: "tcp://detector-{replica}:5555"' in text
    assert 'restart: "no"' in text


@pytest.mark.skipif(shutil.which("docker-compose") is None,
                    reason="docker-compose (Debian package) not installed; .ci/run installs it")
def test_compose_file_is_valid_compose(tmp_path):
    (tmp_path / "docker-compose.yml").write_text(exported())
    result = subprocess.run(["docker-compose", "config", "-q"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    broken = exported().replace("    image:", "    imagex:", 1)
    (tmp_path / "docker-compose.yml").write_text(broken)
    result = subprocess.run(["docker-compose", "config", "-q"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "imagex" in result.stderr


def test_kubernetes_manifests_give_every_replica_a_stable_name():
    import yaml
    result = subprocess.run([sys.executable, "-m", "zpipe", "export", "k8s",
                             "services/pipeline.toml"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    docs = list(yaml.safe_load_all(result.stdout))
    spec = load(ROOT / "services" / "pipeline.toml")
    units = [s.name for s in spec.stages] + ["supervisor"]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    sets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "StatefulSet"}
    assert sorted(services) == sorted(sets) == sorted(units)
    for stage in spec.stages:
        service, workload = services[stage.name], sets[stage.name]
        assert service["spec"]["clusterIP"] == "None"  # headless: NAME-i.NAME resolves
        assert workload["spec"]["serviceName"] == stage.name
        assert workload["spec"]["replicas"] == stage.replicas
        assert workload["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
        pod = workload["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] == int(spec.grace) + 10
        command = pod["containers"][0]["command"][-1]
        assert command.startswith("exec zpipe stage --replica ")
        assert command.endswith(f"--health-port 8080 -- services/pipeline.toml {stage.name}")
        container = pod["containers"][0]
        # Probes on the health port (health.py): alive, and ready for work.
        assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "health"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
        assert {"containerPort": 8080, "name": "health"} in container["ports"]
        env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
        assert env["ZPIPE_CONTROL"] == "tcp://supervisor-0.supervisor:5600"
        assert env["ZPIPE_ADDRESS_TRACKER"] == "tcp://tracker-{replica}.tracker:5555"


def test_compose_restarts_the_stages_that_ask_for_it(tmp_path):
    from zpipe.config import load
    from zpipe.deploy.export import compose

    path = tmp_path / "pipeline.toml"
    path.write_text('[pipeline]\nname = "p"\n[[stages]]\nname = "a"\nrun = "m:f"\n'
                    '[[stages]]\nname = "b"\nrun = "m:g"\nreplicas = 2\nrestart = "on-failure"\n'
                    '[[stages]]\nname = "c"\nrun = "m:h"\n')
    import yaml
    services = yaml.safe_load(compose(load(path), "pipeline.toml", "img"))["services"]
    assert services["b-0"]["restart"] == services["b-1"]["restart"] == "on-failure"
    assert services["a-0"]["restart"] == services["c-0"]["restart"] == "no"
