"""`resources` and `volumes` of a stage: checked in pipeline.toml, turned into each engine's terms."""

from __future__ import annotations

import pytest

from zpipe import ConfigError
from zpipe.config import from_dict
from zpipe.deploy.resources import (
    Resources,
    parse_resources,
    parse_volumes,
    volume_name,
)


def stage_with(**fields) -> dict:
    return {"pipeline": {"name": "p"},
            "stages": [{"name": "a", "run": "m:f"}, {"name": "b", "run": "m:g", **fields}]}


def test_resources_and_volumes_are_read_from_the_stage():
    spec = from_dict(stage_with(resources={"cpu": "2", "memory": "4Gi", "gpu": 1},
                                volumes=["out", "logs/run"]))
    assert spec.stages[1].resources == Resources(cpu="2", memory="4Gi", gpu=1)
    assert spec.stages[1].volumes == ("out", "logs/run")
    assert spec.stages[0].resources is None and spec.stages[0].volumes == ()


@pytest.mark.parametrize("resources, message", [
    ("lots", "field 'resources' must be a table"),
    ({"cpus": 2}, "unknown key(s) cpus (known: cpu, memory, gpu)"),
    ({"cpu": "two"}, "field 'resources.cpu' must be cores"),
    ({"cpu": 0}, "more than zero"),
    ({"cpu": float("inf")}, "field 'resources.cpu'"),
    ({"memory": "4GB"}, "field 'resources.memory' must be bytes with a unit"),
    ({"memory": True}, "field 'resources.memory'"),
    ({"gpu": -1}, "field 'resources.gpu' must be a whole number of GPUs from 0 to 64"),
    ({"gpu": 1.5}, "field 'resources.gpu'"),
])
def test_bad_resources_are_refused_naming_the_stage_and_field(resources, message):
    with pytest.raises(ConfigError) as caught:
        from_dict(stage_with(resources=resources))
    assert "stage 'b'" in str(caught.value) and message in str(caught.value)


@pytest.mark.parametrize("volumes, message", [
    ("out", "must be a list"),
    (["/data"], "'/data' is not a folder inside the pipeline's folder"),
    (["../up"], "'../up' is not a folder inside"),
    ([""], "'' is not a folder inside"),
    (["."], "'.' is not a folder inside"),
    (["out", "out/"], "names 'out/' twice"),
    ([3], "3 is not a folder inside"),
])
def test_bad_volumes_are_refused_naming_the_stage(volumes, message):
    with pytest.raises(ConfigError) as caught:
        from_dict(stage_with(volumes=volumes))
    assert "stage 'b'" in str(caught.value) and message in str(caught.value)


def test_service_must_be_true_or_false():
    data = stage_with()
    data["pipeline"]["service"] = "yes"
    with pytest.raises(ConfigError, match="field 'service' must be true or false"):
        from_dict(data)
    data["pipeline"]["service"] = True
    assert from_dict(data).service is True


def test_kubernetes_terms_set_requests_equal_to_limits_and_gpus_as_limits():
    assert Resources(cpu="500m", memory="1Gi", gpu=2).kubernetes() == {
        "requests": {"cpu": "500m", "memory": "1Gi"},
        "limits": {"cpu": "500m", "memory": "1Gi", "nvidia.com/gpu": 2}}
    assert Resources(gpu=1).kubernetes() == {"limits": {"nvidia.com/gpu": 1}}
    assert Resources().kubernetes() == {}


def test_compose_terms_are_cores_and_whole_bytes():
    assert parse_resources({"cpu": "250m", "memory": "1.5Gi"}, "s").compose() == {
        "limits": {"cpus": "0.25", "memory": f"{3 * 2**29}b"}}
    assert parse_resources({"cpu": 0.5, "memory": 1000}, "s").compose() == {
        "limits": {"cpus": "0.5", "memory": "1000b"}}


def test_volume_names_are_engine_safe():
    assert volume_name("store", "out") == "store-out"
    assert volume_name("Post_Process", "Out/Masks v2") == "post-process-out-masks-v2"
    assert parse_volumes(["a/b/"], "s") == ("a/b",)
