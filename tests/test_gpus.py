"""`gpus = [...]`: replica i of a stage sees gpus[i % len(gpus)] through CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import yaml
from kubernetes_validate.utils import validate

import zpipe
from zpipe import ConfigError
from zpipe.config import from_dict

STAGES = """
import json, os
from typing import Iterable

def numbers(count):
    yield from range(count)

def device(item):
    # Seen by this replica's process: what a CUDA runtime in it would read.
    return {"pid": os.getpid(), "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}

def record(items: Iterable[dict], path):
    with open(path, "w") as out:
        for item in items:
            out.write(json.dumps(item) + "\\n")
"""

PIPELINE = """
[pipeline]
name = "gpus"
[[stages]]
name = "numbers"
run = "stages:numbers"
params = { count = 60 }
[[stages]]
name = "infer"
run = "stages:device"
replicas = 3
gpus = [1, "GPU-7f3a"]
[[stages]]
name = "record"
run = "stages:record"
params = { path = "seen.jsonl" }
"""


def devices_by_process(lines: list[str]) -> Counter:
    seen = {}
    for line in lines:
        item = json.loads(line)
        seen[item["pid"]] = item["gpu"]
    return Counter(seen.values())


def test_each_replica_launched_sees_its_own_device(project):
    project.pipeline(PIPELINE, STAGES)
    result = project.launch("-q")
    assert result.returncode == 0, result.stderr
    lines = project.lines("seen.jsonl")
    assert len(lines) == 60
    # Three replica processes: 0 -> "1", 1 -> "GPU-7f3a", 2 -> "1".
    assert devices_by_process(lines) == Counter({"1": 2, "GPU-7f3a": 1})


def test_zpipe_run_sets_it_in_each_forked_replica(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    out = tmp_path / "seen.jsonl"
    namespace: dict = {}
    exec(STAGES, namespace)
    outcome = zpipe.run([zpipe.Task(namespace["numbers"], params={"count": 40}),
                         zpipe.Task(namespace["device"], replicas=2, gpus=[3, 5]),
                         zpipe.Task(namespace["record"], params={"path": str(out)})])
    assert outcome.exit_code == 0
    assert devices_by_process(out.read_text().splitlines()) == Counter({"3": 1, "5": 1})
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # the caller's own is untouched


def test_thread_mode_refuses_gpus():
    with pytest.raises(ConfigError, match="'device': gpus give each replica its own device"):
        zpipe.run([zpipe.Task(range, params={"stop": 3}),
                   zpipe.Task(str, name="device", gpus=[0])], mode="thread")


@pytest.mark.parametrize("gpus, message", [
    ([], "must be a list of 1 to 256"),
    ("0", "must be a list"),
    ([-1], "-1 is not a GPU index"),
    ([True], "True is not a GPU index"),
    (["a b"], "'a b' is not a GPU index"),
])
def test_bad_gpus_are_refused_naming_the_stage(gpus, message):
    with pytest.raises(ConfigError) as caught:
        from_dict({"pipeline": {"name": "p"}, "stages": [
            {"name": "a", "run": "m:f"}, {"name": "b", "run": "m:g", "gpus": gpus}]})
    assert "stage 'b'" in str(caught.value) and message in str(caught.value)


def test_gpus_and_a_gpu_count_together_are_refused():
    with pytest.raises(ConfigError, match="'gpus' and 'resources.gpu' together"):
        from_dict({"pipeline": {"name": "p"}, "stages": [
            {"name": "a", "run": "m:f"},
            {"name": "b", "run": "m:g", "gpus": [0], "resources": {"gpu": 1}}]})


def export(project, kind: str) -> list[dict]:
    project.pipeline(PIPELINE, STAGES)
    result = project.run("export", kind, "pipeline.toml")
    assert result.returncode == 0, result.stderr
    return list(yaml.safe_load_all(result.stdout))


def test_compose_reserves_each_replica_its_device(project):
    services = export(project, "compose")[0]["services"]
    for replica, device in [(0, "1"), (1, "GPU-7f3a"), (2, "1")]:
        devices = services[f"infer-{replica}"]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "device_ids": [device],
                            "capabilities": ["gpu"]}]
    assert "deploy" not in services["record-0"]
    # The engine gives the container that one device; zpipe sets nothing in it.
    assert "CUDA_VISIBLE_DEVICES" not in services["infer-0"]["environment"]


def test_kubernetes_asks_one_gpu_per_pod(project):
    docs = export(project, "k8s")
    job = next(d for d in docs if d["kind"] == "Job" and d["metadata"]["name"] == "infer")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    for doc in docs:
        validate(doc, "1.37.0", strict=True)
