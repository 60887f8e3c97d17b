"""Unit tests of zpipe.config: parsing, validation and address planning."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from zpipe import config
from zpipe.config import DEFAULT_GRACE, DEFAULT_HWM, PipelineSpec, StageSpec
from zpipe.errors import ConfigError

HEAD = '[pipeline]\nname = "demo"\n'
SOURCE = '[[stages]]\nname = "source"\nrun = "stages:numbers"\n'
SINK = '[[stages]]\nname = "sink"\nrun = "stages:total"\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str) -> PipelineSpec:
    return config.load(write(tmp_path, text))


def config_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    return str(info.value)


# --- valid files ---------------------------------------------------------------------------

def test_minimal_file_gets_defaults(tmp_path):
    path = write(tmp_path, HEAD + SOURCE + SINK)
    spec = config.load(path)
    assert spec.name == "demo"
    assert spec.hwm == DEFAULT_HWM == 100
    assert spec.grace == DEFAULT_GRACE
    assert spec.grace > 0
    assert spec.control is None
    assert spec.path == path
    assert spec.base_dir == tmp_path.resolve()
    assert [s.name for s in spec.stages] == ["source", "sink"]
    for stage in spec.stages:
        assert stage.replicas == 1
        assert stage.hwm == 100
        assert stage.params == {}
        assert stage.stream is None
        assert stage.address is None


def test_full_file(tmp_path):
    spec = load_text(tmp_path, """\
        [pipeline]
        name = "numbers"
        hwm = 7
        grace = 2.5
        startup_timeout = 30
        control = "tcp://127.0.0.1:6000"

        [[stages]]
        name = "source"
        run = "stages:numbers"
        params = { count = 1000, label = "x", nested = { a = [1, 2] } }

        [[stages]]
        name = "square_2"
        run = "pkg.mod:Cls.method"
        replicas = 3
        hwm = 50
        stream = true
        address = "tcp://127.0.0.1:7000"

        [[stages]]
        name = "Sink-1"
        run = "stages:total"
        stream = false
        """)
    assert spec.hwm == 7
    assert spec.grace == 2.5
    assert isinstance(spec.grace, float)
    assert spec.startup_timeout == 30.0
    assert spec.control == "tcp://127.0.0.1:6000"
    source, middle, sink = spec.stages
    assert source.params == {"count": 1000, "label": "x", "nested": {"a": [1, 2]}}
    assert source.hwm == 7  # the pipeline's hwm is every link's default
    assert middle == StageSpec(name="square_2", run="pkg.mod:Cls.method", params={}, replicas=3,
                               hwm=50, stream=True, address="tcp://127.0.0.1:7000")
    assert sink.stream is False
    assert sink.hwm == 7
    assert spec.stage("square_2") is middle
    assert spec.index("Sink-1") == 2
    assert middle.replica_name(2) == "square_2-2"


def test_single_stage_is_allowed(tmp_path):
    spec = load_text(tmp_path, HEAD + SOURCE)
    assert len(spec.stages) == 1


def test_stage_lookup_of_unknown_name(tmp_path):
    spec = load_text(tmp_path, HEAD + SOURCE + SINK)
    with pytest.raises(ConfigError, match="no stage named 'nope'"):
        spec.stage("nope")


def test_from_dict_without_file():
    spec = config.from_dict({"pipeline": {"name": "p"},
                             "stages": [{"name": "a", "run": "m:f"}]})
    assert spec.path is None and spec.base_dir is None
    assert spec.where == "pipeline 'p'"


# --- bad input: every message names where and what ----------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "absent.toml")


def test_malformed_toml_names_line_and_column(tmp_path):
    message = config_error(tmp_path, '[pipeline]\nname = "demo"\n[[stages]\nname = "a"\n')
    assert "pipeline.toml" in message
    assert "invalid TOML" in message
    assert "line 3" in message
    assert "column" in message


def test_malformed_toml_value(tmp_path):
    message = config_error(tmp_path, '[pipeline]\nname = demo\n')
    assert "line 2" in message and "column" in message


def test_unknown_top_level_key(tmp_path):
    message = config_error(tmp_path, HEAD + 'colour = "red"\n' + SOURCE)
    assert "unknown field 'colour'" in message


def test_unknown_top_level_table(tmp_path):
    message = config_error(tmp_path, HEAD + SOURCE + '[extra]\nx = 1\n')
    assert "unknown field 'extra'" in message


def test_unknown_pipeline_key(tmp_path):
    message = config_error(tmp_path, '[pipeline]\nname = "demo"\nhwmm = 3\n' + SOURCE)
    assert "[pipeline]" in message
    assert "unknown field 'hwmm'" in message


def test_unknown_stage_key_names_stage(tmp_path):
    message = config_error(tmp_path, HEAD + SOURCE + SINK + 'replica = 2\n')
    assert "stage 'sink'" in message
    assert "unknown field 'replica'" in message
    assert "replicas" in message  # the allowed fields are listed


def test_duplicate_stage_names(tmp_path):
    message = config_error(tmp_path, HEAD + SOURCE + SINK
                           + '[[stages]]\nname = "sink"\nrun = "stages:other"\n')
    assert "stage 'sink'" in message
    assert "duplicate" in message


@pytest.mark.parametrize("value", ["0", "-1", "1.5", '"2"', "true", "false", "[1]"])
def test_bad_replicas(tmp_path, value):
    message = config_error(tmp_path, HEAD + SOURCE + SINK + f"replicas = {value}\n")
    assert "stage 'sink'" in message
    assert "'replicas'" in message


@pytest.mark.parametrize("value", ["0", "-5", "2.0", '"10"', "true"])
def test_bad_stage_hwm(tmp_path, value):
    message = config_error(tmp_path, HEAD + SOURCE + SINK + f"hwm = {value}\n")
    assert "stage 'sink'" in message
    assert "'hwm'" in message


@pytest.mark.parametrize("value", ["0", "-1", '"x"', "false"])
def test_bad_pipeline_hwm(tmp_path, value):
    message = config_error(tmp_path, f'[pipeline]\nname = "demo"\nhwm = {value}\n' + SOURCE)
    assert "[pipeline]" in message
    assert "'hwm'" in message


@pytest.mark.parametrize("key", ["grace", "startup_timeout"])
@pytest.mark.parametrize("value", ["0", "-1.5", '"5"', "true"])
def test_bad_pipeline_seconds(tmp_path, key, value):
    message = config_error(tmp_path, f'[pipeline]\nname = "demo"\n{key} = {value}\n' + SOURCE)
    assert "[pipeline]" in message
    assert f"'{key}'" in message


@pytest.mark.parametrize("run", ["stages", "stages:", ":numbers", "stages::numbers",
                                 "1stages:numbers", "stages:1numbers", "sta ges:numbers",
                                 "stages/x:numbers", "stages:num-bers", ""])
def test_bad_run_string(tmp_path, run):
    message = config_error(tmp_path, HEAD + SOURCE
                           + f'[[stages]]\nname = "sink"\nrun = "{run}"\n')
    assert "stage 'sink'" in message
    assert "field 'run'" in message
    assert "module:attribute" in message


def test_run_must_be_a_string(tmp_path):
    message = config_error(tmp_path, HEAD + SOURCE + '[[stages]]\nname = "sink"\nrun = 3\n')
    assert "stage 'sink'" in message and "field 'run'" in message


def test_missing_run(tmp_path):
    message = config_error(tmp_path, HEAD + SOURCE + '[[stages]]\nname = "sink"\n')
    assert "stage 'sink'" in message and "field 'run'" in message


@pytest.mark.parametrize("name", ["has space", "dot.ted", "slash/y", "colon:x", "", "é"])
def test_bad_stage_name_characters(tmp_path, name):
    message = config_error(tmp_path, HEAD + f'[[stages]]\nname = "{name}"\nrun = "m:f"\n')
    assert "stage" in message
    assert "field 'name'" in message


def test_missing_stage_name_names_position(tmp_path):
    message = config_error(tmp_path, HEAD + SOURCE + '[[stages]]\nrun = "m:f"\n')
    assert "stage #2" in message
    assert "field 'name'" in message


def test_non_string_stage_name_names_position(tmp_path):
    message = config_error(tmp_path, HEAD + '[[stages]]\nname = 5\nrun = "m:f"\n')
    assert "stage #1" in message and "field 'name'" in message


def test_stage_name_with_trailing_newline_rejected(tmp_path):
    config_error(tmp_path, HEAD + '[[stages]]\nname = "a\\n"\nrun = "m:f"\n')


def test_bad_params_type(tmp_path):
    message = config_error(tmp_path, HEAD + SOURCE + SINK + 'params = 3\n')
    assert "stage 'sink'" in message and "field 'params'" in message


@pytest.mark.parametrize("value", ["1", '"yes"'])
def test_bad_stream(tmp_path, value):
    message = config_error(tmp_path, HEAD + SOURCE + SINK + f"stream = {value}\n")
    assert "stage 'sink'" in message and "field 'stream'" in message


@pytest.mark.parametrize("address", ["ipc:///tmp/x", "tcp://127.0.0.1", "tcp://127.0.0.1:0",
                                     "tcp://127.0.0.1:65536", "tcp://:5555", "tcp://h:55x",
                                     "127.0.0.1:5555", "udp://h:5555", 5555])
def test_bad_stage_address(tmp_path, address):
    value = f'"{address}"' if isinstance(address, str) else address
    message = config_error(tmp_path, HEAD + SOURCE + SINK + f"address = {value}\n")
    assert "stage 'sink'" in message
    assert "field 'address'" in message
    assert "tcp://HOST:PORT" in message


def test_address_on_first_stage_rejected(tmp_path):
    message = config_error(tmp_path, HEAD + SOURCE + 'address = "tcp://127.0.0.1:5555"\n')
    assert "stage 'source'" in message and "field 'address'" in message


def test_bad_control_address(tmp_path):
    message = config_error(tmp_path, HEAD + 'control = "ipc:///tmp/c"\n' + SOURCE)
    assert "[pipeline] control" in message


@pytest.mark.parametrize("address", ["tcp://localhost:5555", "tcp://10.0.0.1:1",
                                     "tcp://[::1]:65535", "tcp://host-a.example:6000"])
def test_good_stage_address(tmp_path, address):
    spec = load_text(tmp_path, HEAD + SOURCE + SINK + f'address = "{address}"\n')
    assert spec.stages[1].address == address


def test_missing_pipeline_table(tmp_path):
    message = config_error(tmp_path, SOURCE)
    assert "[pipeline]" in message and "name" in message


def test_missing_pipeline_name(tmp_path):
    message = config_error(tmp_path, '[pipeline]\nhwm = 5\n' + SOURCE)
    assert "[pipeline] name is required" in message


@pytest.mark.parametrize("name", ['"has space"', '""', "3"])
def test_bad_pipeline_name(tmp_path, name):
    message = config_error(tmp_path, f"[pipeline]\nname = {name}\n" + SOURCE)
    assert "[pipeline] name" in message


def test_no_stages(tmp_path):
    message = config_error(tmp_path, HEAD)
    assert "no stages" in message


def test_stages_not_an_array_of_tables(tmp_path):
    message = config_error(tmp_path, 'stages = 3\n' + HEAD)
    assert "no stages" in message


def test_stage_not_a_table(tmp_path):
    message = config_error(tmp_path, 'stages = [1]\n' + HEAD)
    assert "stage #1" in message


# --- plan_addresses ------------------------------------------------------------------------

def test_plan_addresses_ipc_default(tmp_path):
    spec = load_text(tmp_path, HEAD + SOURCE
                     + '[[stages]]\nname = "square"\nrun = "m:f"\nreplicas = 3\n' + SINK)
    runtime = tmp_path / "run"
    addresses = config.plan_addresses(spec, runtime)
    assert addresses.control == f"ipc://{runtime / 'control'}"
    assert addresses.inputs["source"] == ()
    assert addresses.inputs["square"] == tuple(f"ipc://{runtime / f'square-{i}'}"
                                               for i in range(3))
    assert addresses.inputs["sink"] == (f"ipc://{runtime / 'sink-0'}",)
    every = [a for stage in addresses.inputs.values() for a in stage] + [addresses.control]
    assert len(set(every)) == len(every)


def test_plan_addresses_tcp_with_replicas(tmp_path):
    spec = load_text(tmp_path, '[pipeline]\nname = "demo"\ncontrol = "tcp://127.0.0.1:5999"\n'
                     + SOURCE
                     + '[[stages]]\nname = "square"\nrun = "m:f"\nreplicas = 3\n'
                       'address = "tcp://127.0.0.1:6000"\n'
                     + SINK + 'address = "tcp://[::1]:7000"\n')
    addresses = config.plan_addresses(spec, tmp_path)
    assert addresses.control == "tcp://127.0.0.1:5999"
    assert addresses.inputs["square"] == ("tcp://127.0.0.1:6000", "tcp://127.0.0.1:6001",
                                          "tcp://127.0.0.1:6002")
    assert addresses.inputs["sink"] == ("tcp://[::1]:7000",)


def test_plan_addresses_mixes_tcp_and_ipc(tmp_path):
    spec = load_text(tmp_path, HEAD + SOURCE
                     + '[[stages]]\nname = "mid"\nrun = "m:f"\naddress = "tcp://h:6000"\n'
                     + SINK + 'replicas = 2\n')
    addresses = config.plan_addresses(spec, str(tmp_path))
    assert addresses.inputs["mid"] == ("tcp://h:6000",)
    assert addresses.inputs["sink"] == (f"ipc://{tmp_path / 'sink-0'}",
                                        f"ipc://{tmp_path / 'sink-1'}")


def test_tcp_port_range_of_replicas_checked(tmp_path):
    config_error(tmp_path, HEAD + SOURCE + SINK
                 + 'replicas = 2\naddress = "tcp://127.0.0.1:65535"\n')
