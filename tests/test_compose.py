"""`zpipe export compose`: the committed docker-compose.yml is what the exporter writes, and valid."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import GPU_PIPELINE

from zpipe import load
from zpipe.deploy.compose import compose

ROOT = Path(__file__).resolve().parent.parent
ZPIPE = [sys.executable, "-m", "zpipe"]
needs_compose = pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="docker-compose (Debian package) not installed; .ci/run installs it")



def export(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ZPIPE, "export", "compose", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def exported() -> str:
    result = export("services/pipeline.toml")
    assert result.returncode == 0, result.stderr
    return result.stdout


def gpu_services(tmp_path: Path) -> dict:
    path = tmp_path / "pipeline.toml"
    path.write_text(GPU_PIPELINE)
    return yaml.safe_load(compose(load(path), path, "img", context=tmp_path))


def test_committed_compose_file_is_the_export_of_the_example():
    assert (ROOT / "docker-compose.yml").read_text() == exported(), \
        "regenerate: zpipe export compose services/pipeline.toml -o docker-compose.yml"


def test_the_path_in_the_containers_is_inside_the_image_whatever_path_was_given(tmp_path):
    by_absolute_path = export(str(ROOT / "services" / "pipeline.toml"))
    from_elsewhere = export(f"{ROOT.name}/services/pipeline.toml", "--context", ROOT.name,
                            cwd=ROOT.parent)
    assert by_absolute_path.returncode == 0, by_absolute_path.stderr
    assert by_absolute_path.stdout == from_elsewhere.stdout == exported()
    assert str(ROOT) not in by_absolute_path.stdout


def test_a_file_outside_the_build_context_is_refused_and_nothing_is_written(tmp_path):
    target = tmp_path / "docker-compose.yml"
    result = export(str(ROOT / "services" / "pipeline.toml"), "-o", str(target), cwd=tmp_path)
    assert result.returncode == 2
    assert "not inside the build context" in result.stderr and "--context" in result.stderr
    assert not target.exists()


def test_one_service_per_replica_and_a_supervisor_started_last_stopped_first():
    spec = load(ROOT / "services" / "pipeline.toml")
    services = yaml.safe_load(exported())["services"]
    names = [s.replica_name(i) for s in spec.stages for i in range(s.replicas)]
    assert list(services) == [*names, "supervisor"]
    supervisor = services["supervisor"]
    # Compose starts a service after what it depends on and stops it before:
    # SIGTERM reaches the supervisor first, which is the ordered drain.
    assert supervisor["depends_on"] == {n: {"condition": "service_started"} for n in names}
    assert supervisor["command"] == ["zpipe", "supervise", "--health-port", "8080",
                                     "services/pipeline.toml"]
    for name in names:
        service = services[name]
        stage, replica = name.rsplit("-", 1)
        assert service["command"] == ["zpipe", "stage", "--replica", replica, "--health-port",
                                      "8080", "--", "services/pipeline.toml", stage]
        assert service["hostname"] == name and service["restart"] == "no"
        assert service["stop_grace_period"] == f"{int(spec.grace) + 10}s"
        assert service["environment"]["ZPIPE_ADDRESS_DETECTOR"] == "tcp://detector-{replica}:5555"
        assert service["environment"]["ZPIPE_CONTROL"] == "tcp://supervisor:5600"
        # The healthcheck asks readiness: taking work, not merely alive.
        assert service["healthcheck"]["test"] == ["CMD", "zpipe", "probe", "8080", "--ready"]


def test_a_stage_s_volumes_are_named_volumes_at_its_folder_in_the_image():
    document = yaml.safe_load(exported())
    assert document["services"]["store-0"]["volumes"] == ["store-out:/app/services/out"]
    assert "volumes" not in document["services"]["tracker-0"]
    assert document["volumes"] == {"store-out": {}}


def test_resources_become_limits_and_a_gpu_reservation(tmp_path):
    document = gpu_services(tmp_path)
    infer = document["services"]["infer-1"]
    assert infer["deploy"]["resources"] == {
        "limits": {"cpus": "2", "memory": f"{4 * 2**30}b"},
        "reservations": {"devices": [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]}}
    assert document["services"]["sink-0"]["deploy"]["resources"] == {
        "limits": {"cpus": "0.5", "memory": "512000000b"}}
    assert "deploy" not in document["services"]["frames-0"]
    assert infer["restart"] == "on-failure" and document["services"]["sink-0"]["restart"] == "no"
    assert infer["volumes"] == ["infer-out-masks:/app/out/masks", "infer-logs:/app/logs"]
    assert document["volumes"] == {"infer-out-masks": {}, "infer-logs": {}}


@needs_compose
def test_compose_files_are_valid_compose(tmp_path):
    def check(text: str) -> subprocess.CompletedProcess[str]:
        (tmp_path / "docker-compose.yml").write_text(text)
        return subprocess.run(["docker-compose", "config", "-q"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)

    result = check(exported())
    assert result.returncode == 0, result.stderr
    gpu = tmp_path / "gpu"
    gpu.mkdir()
    result = check(yaml.safe_dump(gpu_services(gpu), sort_keys=False))
    assert result.returncode == 0, result.stderr
    # The check can fail: a misspelt key is refused.
    result = check(exported().replace("    image:", "    imagex:", 1))
    assert result.returncode != 0 and "imagex" in result.stderr
