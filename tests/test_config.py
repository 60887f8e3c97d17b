"""Unit tests of zpipe.config: parsing, validation and address planning."""

from __future__ import annotations

import sys
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
    # Socket files are named by stage index and replica, not by stage name.
    assert addresses.inputs["square"] == tuple(f"ipc://{runtime / f'1-{i}'}"
                                               for i in range(3))
    assert addresses.inputs["sink"] == (f"ipc://{runtime / '2-0'}",)
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
    assert addresses.inputs["sink"] == (f"ipc://{tmp_path / '2-0'}",
                                        f"ipc://{tmp_path / '2-1'}")


def test_tcp_port_range_of_replicas_checked(tmp_path):
    config_error(tmp_path, HEAD + SOURCE + SINK
                 + 'replicas = 2\naddress = "tcp://127.0.0.1:65535"\n')


# --- limits: every one is refused, and the message states it ---------------------------------

# The limits the brief states; the tests pin them (a change must be deliberate).
NAME_LIMIT = 64
REPLICAS_LIMIT = 256
TOTAL_LIMIT = 1024
HWM_LIMIT = 1_000_000
IPC_LIMIT = 107 if sys.platform.startswith("linux") else 103  # sun_path, less its NUL


def test_limits_are_named_constants():
    assert (config.MAX_NAME_LENGTH, config.MAX_REPLICAS, config.MAX_TOTAL_REPLICAS,
            config.MAX_HWM, config.MAX_MESSAGE_SIZE, config.MIN_INACTIVITY_TIMEOUT,
            config.MAX_SECONDS) == (NAME_LIMIT, REPLICAS_LIMIT, TOTAL_LIMIT, HWM_LIMIT, 2**40,
                                    2.0, 7 * 24 * 3600)
    assert config.MAX_IPC_PATH == IPC_LIMIT


def stage_error(tmp_path: Path, field_line: str, stage: str = "sink") -> str:
    return config_error(tmp_path, HEAD + SOURCE + SINK.replace('"sink"', f'"{stage}"')
                        + field_line + "\n")


@pytest.mark.parametrize("length", [1, NAME_LIMIT])
def test_names_up_to_the_limit_are_fine(tmp_path, length):
    name = "n" * length
    spec = load_text(tmp_path, f'[pipeline]\nname = "{name}"\n' + SOURCE
                     + f'[[stages]]\nname = "{name}"\nrun = "stages:total"\n')
    assert spec.name == name and spec.stages[1].name == name


def test_stage_name_over_the_limit(tmp_path):
    name = "s" * (NAME_LIMIT + 1)
    message = config_error(tmp_path, HEAD + SOURCE + f'[[stages]]\nname = "{name}"\nrun = "m:f"\n')
    assert str(tmp_path / "pipeline.toml") in message
    assert "stage #2: field 'name'" in message
    assert f"at most {NAME_LIMIT} characters" in message
    assert f"got {NAME_LIMIT + 1} characters" in message


def test_pipeline_name_over_the_limit(tmp_path):
    message = config_error(tmp_path, f'[pipeline]\nname = "{"p" * 200}"\n' + SOURCE)
    assert "[pipeline] name" in message
    assert f"at most {NAME_LIMIT} characters" in message and "got 200" in message


@pytest.mark.parametrize("name", ["-h", "--replica", "-"])
def test_stage_name_starting_with_a_dash(tmp_path, name):
    # It would reach `zpipe stage FILE NAME` as an option.
    message = config_error(tmp_path, HEAD + SOURCE + f'[[stages]]\nname = "{name}"\nrun = "m:f"\n')
    assert f"stage {name!r}: field 'name'" in message
    assert "not start with '-'" in message


def test_pipeline_name_starting_with_a_dash(tmp_path):
    message = config_error(tmp_path, '[pipeline]\nname = "-p"\n' + SOURCE)
    assert "[pipeline] name" in message and "not start with '-'" in message


def test_names_with_dash_or_underscore_inside_are_fine(tmp_path):
    spec = load_text(tmp_path, '[pipeline]\nname = "_p-1"\n' + SOURCE
                     + '[[stages]]\nname = "a-"\nrun = "m:f"\n')
    assert spec.name == "_p-1" and spec.stages[1].name == "a-"


@pytest.mark.parametrize("value", [str(REPLICAS_LIMIT + 1), "5000", str(10**9),
                                   str(2**63 - 1)])
def test_replicas_over_the_limit(tmp_path, value):
    message = stage_error(tmp_path, f"replicas = {value}")
    assert "stage 'sink': field 'replicas'" in message
    assert f"at most {REPLICAS_LIMIT}" in message and value in message


def test_replicas_at_the_limit(tmp_path):
    spec = load_text(tmp_path, HEAD + SOURCE + SINK + f"replicas = {REPLICAS_LIMIT}\n")
    assert spec.stages[1].replicas == REPLICAS_LIMIT


def test_replicas_of_the_whole_pipeline_limited(tmp_path):
    stages = "".join(f'[[stages]]\nname = "s{i}"\nrun = "m:f"\nreplicas = 205\n'
                     for i in range(5))
    message = config_error(tmp_path, HEAD + SOURCE + stages)
    assert "1026 replicas in all" in message and "'s0' 205" in message
    assert f"limit of {TOTAL_LIMIT} replicas in a pipeline" in message
    exactly = "".join(f'[[stages]]\nname = "s{i}"\nrun = "m:f"\nreplicas = 256\n'
                      for i in range(3)) + '[[stages]]\nname = "s3"\nrun = "m:f"\nreplicas = 255\n'
    spec = load_text(tmp_path, HEAD + SOURCE + exactly)
    assert sum(s.replicas for s in spec.stages) == TOTAL_LIMIT


def test_number_of_stages_limited(tmp_path):
    stages = "".join(f'[[stages]]\nname = "s{i}"\nrun = "m:f"\n'
                     for i in range(TOTAL_LIMIT + 1))
    message = config_error(tmp_path, HEAD + stages)
    assert f"limit of {TOTAL_LIMIT} replicas" in message


@pytest.mark.parametrize("value", [HWM_LIMIT + 1, 2**31, 2**64])
def test_hwm_over_the_limit(tmp_path, value):
    message = stage_error(tmp_path, f"hwm = {value}")
    assert "stage 'sink': field 'hwm'" in message and "at most 1,000,000" in message
    message = config_error(tmp_path, f'[pipeline]\nname = "demo"\nhwm = {value}\n' + SOURCE)
    assert "[pipeline]: field 'hwm'" in message and "at most 1,000,000" in message


def test_hwm_at_the_limit(tmp_path):
    spec = load_text(tmp_path, f'[pipeline]\nname = "demo"\nhwm = {HWM_LIMIT}\n' + SOURCE)
    assert spec.hwm == HWM_LIMIT


def test_max_message_size_limit(tmp_path):
    spec = load_text(tmp_path, HEAD + SOURCE + SINK + f"max_message_size = {2**40}\n")
    assert spec.stages[1].max_message_size == 2**40
    message = stage_error(tmp_path, f"max_message_size = {2**40 + 1}")
    assert "field 'max_message_size'" in message and f"at most {2**40:,}" in message
    message = config_error(tmp_path, f'[pipeline]\nname = "demo"\nmax_message_size = {2**63}\n'
                           + SOURCE)
    assert "[pipeline]: field 'max_message_size'" in message


@pytest.mark.parametrize("key", ["grace", "startup_timeout", "inactivity_timeout"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "+nan", "1e400", "604801",
                                   "1" + "0" * 400])
def test_seconds_must_be_finite_and_at_most_a_week(tmp_path, key, value):
    message = config_error(tmp_path, f'[pipeline]\nname = "demo"\n{key} = {value}\n' + SOURCE)
    assert f"[pipeline]: field '{key}'" in message
    assert "at most 604800" in message


@pytest.mark.parametrize("value", ["0.5", "1", "1.99"])
def test_inactivity_timeout_below_the_heartbeat_resolution(tmp_path, value):
    message = config_error(tmp_path, f'[pipeline]\nname = "demo"\ninactivity_timeout = {value}\n'
                           + SOURCE)
    assert "field 'inactivity_timeout'" in message
    assert f">= {2.0:g}" in message and "heartbeat" in message
    assert f"got {value}" in message


def test_inactivity_timeout_at_the_minimum(tmp_path):
    spec = load_text(tmp_path, '[pipeline]\nname = "demo"\ninactivity_timeout = 2\n' + SOURCE)
    assert spec.inactivity_timeout == 2.0


def test_limits_hold_for_pipelines_from_python():
    # zpipe.Task and zpipe.run build their spec with from_dict.
    def stages(**extra):
        return {"pipeline": {"name": "p"},
                "stages": [{"name": "a", "run": "m:f"}, {"name": "b", "run": "m:f", **extra}]}
    for extra, word in (({"replicas": 10**9}, "'replicas'"), ({"hwm": 2**31}, "'hwm'"),
                        ({"name": "-b"}, "'name'"), ({"name": "b" * 65}, "'name'"),
                        ({"replicas": 10**5000}, "'replicas'")):
        with pytest.raises(ConfigError, match=word):
            config.from_dict(stages(**extra))
    for key, value in (("grace", float("nan")), ("inactivity_timeout", 1),
                       ("startup_timeout", float("inf")), ("grace", 10**400)):
        with pytest.raises(ConfigError, match=key):
            config.from_dict({"pipeline": {"name": "p", key: value},
                              "stages": [{"name": "a", "run": "m:f"}]})


# --- with_overrides: zpipe.run(spec, grace=..., inactivity_timeout=...) ---------------------------

def test_with_overrides_validates_like_the_file(tmp_path):
    spec = load_text(tmp_path, HEAD + SOURCE)
    changed = config.with_overrides(spec, grace=2, inactivity_timeout=30)
    assert (changed.grace, changed.inactivity_timeout) == (2.0, 30.0)
    assert (spec.grace, spec.inactivity_timeout) == (DEFAULT_GRACE, None)
    assert config.with_overrides(changed, inactivity_timeout=None).inactivity_timeout is None
    assert config.with_overrides(spec) is spec
    for key, value in (("grace", float("nan")), ("grace", 0), ("startup_timeout", float("inf")),
                       ("inactivity_timeout", 1), ("inactivity_timeout", float("nan")),
                       ("grace", "5"), ("grace", True), ("grace", 10**400)):
        with pytest.raises(ConfigError) as info:
            config.with_overrides(spec, **{key: value})
        assert str(tmp_path / "pipeline.toml") in str(info.value)
        assert f"field '{key}'" in str(info.value) and "604800" in str(info.value)
    with pytest.raises(TypeError, match="hwm"):
        config.with_overrides(spec, hwm=5)


# --- load: whatever the bytes, a ConfigError naming the file ---------------------------------

def test_invalid_utf8_names_file_line_and_column(tmp_path):
    path = tmp_path / "pipeline.toml"
    path.write_bytes(b'[pipeline]\nname = "d\xffmo"\n')
    with pytest.raises(ConfigError) as info:
        config.load(path)
    message = str(info.value)
    assert str(path) in message and "UTF-8" in message
    assert "0xff" in message and "line 2, column 10" in message


@pytest.mark.parametrize("opening, closing", [("{a = ", "}"), ("[", "]")])
def test_deeply_nested_toml(tmp_path, opening, closing):
    deep = opening * 2000 + "1" + closing * 2000
    message = config_error(tmp_path, HEAD + SOURCE + f"params = {{ x = {deep} }}\n")
    assert str(tmp_path / "pipeline.toml") in message
    assert "invalid TOML" in message and "nested too deeply" in message


def test_integer_too_long_to_read(tmp_path):
    message = config_error(tmp_path, HEAD + "hwm = " + "9" * 5000 + "\n" + SOURCE)
    assert "invalid TOML" in message and "integer too long" in message


def test_unreadable_paths(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path)  # a folder
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(str(tmp_path / "nul\0byte.toml"))
    with pytest.raises(ConfigError):
        config.load(tmp_path / ("x" * 5000))


@pytest.mark.parametrize("keys", ["k" * 5000, "k/" * 3000])
def test_unusable_keys_folder_name(tmp_path, keys):
    message = config_error(tmp_path, f'[pipeline]\nname = "demo"\nkeys = "{keys}"\n' + SOURCE)
    assert "[pipeline] field 'keys'" in message


@pytest.mark.parametrize("address", ["tcp://" + "h" * 300 + ":5555", "tcp://h:" + "9" * 5000,
                                     "tcp://h:\u0665\u0665\u0665\u0665", "tcp://a b:5555",
                                     "tcp://h\\u0000:5555"])
def test_hostile_addresses(tmp_path, address):
    message = config_error(tmp_path, HEAD + SOURCE + SINK + f'address = "{address}"\n')
    assert "stage 'sink': field 'address'" in message
    assert len(message) < 1000  # the value is cut short


def test_a_huge_value_is_cut_short_in_the_message(tmp_path):
    message = config_error(tmp_path, HEAD + SOURCE
                           + '[[stages]]\nname = "sink"\nrun = "' + "x" * 100_000 + '"\n')
    assert "field 'run'" in message and len(message) < 1000


# --- ipc paths: short, named by index, checked against the Unix limit --------------------------

def test_placeholder_runtime_dir_is_as_long_as_mkdtemp(tmp_path):
    import os
    import tempfile
    for name in ("p", "n" * NAME_LIMIT):
        real = tempfile.mkdtemp(prefix=f"zpipe-{name}-")
        try:
            placeholder = config.placeholder_runtime_dir(name)
            assert len(placeholder) == len(real)
            assert os.path.dirname(placeholder) == os.path.dirname(real)
        finally:
            os.rmdir(real)


def test_ipc_path_length_does_not_depend_on_stage_names(tmp_path):
    def longest(name: str) -> int:
        spec = load_text(tmp_path, HEAD + SOURCE
                         + f'[[stages]]\nname = "{name}"\nrun = "m:f"\nreplicas = 256\n')
        addresses = config.plan_addresses(spec, "/run")
        return max(len(a) for a in addresses.inputs[name])
    assert longest("s") == longest("s" * NAME_LIMIT) == len("ipc:///run/1-255")


def test_check_ipc_paths(tmp_path):
    spec = load_text(tmp_path, f'[pipeline]\nname = "{"p" * 64}"\n' + SOURCE
                     + '[[stages]]\nname = "mid"\nrun = "m:f"\nreplicas = 256\n' + SINK)
    # The longest name in the default temporary folder fits.
    config.check_ipc_paths(spec, config.placeholder_runtime_dir(spec.name))
    runtime = "/" + "r" * (IPC_LIMIT - len("/control") - 1)  # the longest socket
    config.check_ipc_paths(spec, runtime)  # exactly the limit
    with pytest.raises(ConfigError) as info:
        config.check_ipc_paths(spec, runtime + "r")
    message = str(info.value)
    assert str(tmp_path / "pipeline.toml") in message
    assert f"{IPC_LIMIT} bytes" in message
    assert "TMPDIR" in message and "tcp" in message


def test_max_ipc_path_is_what_zeromq_binds(tmp_path):
    import zmq
    room = IPC_LIMIT - len(str(tmp_path)) - 1
    if room < 1:
        pytest.skip("the temporary folder is too long to build the paths")
    context = zmq.Context()
    try:
        fits = context.socket(zmq.PULL)
        fits.bind(f"ipc://{tmp_path / ('s' * room)}")
        fits.close(linger=0)
        too_long = context.socket(zmq.PULL)
        with pytest.raises(zmq.ZMQError):
            too_long.bind(f"ipc://{tmp_path / ('s' * (room + 1))}")
        too_long.close(linger=0)
    finally:
        context.destroy(linger=0)


def test_check_ipc_paths_ignores_tcp(tmp_path):
    spec = load_text(tmp_path, '[pipeline]\nname = "demo"\ncontrol = "tcp://127.0.0.1:5999"\n'
                     + SOURCE + SINK + 'address = "tcp://127.0.0.1:6000"\n')
    config.check_ipc_paths(spec, "/" + "r" * 500)


# --- fuzz: mutated files give a ConfigError or pass, never anything else, never a hang ---------

FUZZ_MODULE = "fzq_stages"  # a name no other test imports, and no deletion makes a real module
FUZZ_STAGES = """\
from typing import Iterable

import zpipe


def numbers(count, replica=0, replicas=1, **options):
    yield from range(replica, count, replicas)


def square(x, factor=1):
    return x * x * factor


def total(items: Iterable[int], path="total.txt"):
    return None


class Scale(zpipe.Stage):
    def __init__(self, factor=2):
        self.factor = factor

    def process(self, item):
        return item * self.factor
"""
FUZZ_SEEDS = [
    f"""\
[pipeline]
name = "numbers"
hwm = 100

[[stages]]
name = "source"
run = "{FUZZ_MODULE}:numbers"
params = {{ count = 1000 }}

[[stages]]
name = "square"
run = "{FUZZ_MODULE}:square"
replicas = 2
hwm = 50
params = {{ factor = 3 }}

[[stages]]
name = "sink"
run = "{FUZZ_MODULE}:total"
params = {{ path = "total.txt" }}
""",
    f"""\
[pipeline]
name = "secure-1"
grace = 2.5
startup_timeout = 30
inactivity_timeout = 60
keys = "keys"
control = "tcp://127.0.0.1:6000"
max_message_size = 1048576

[[stages]]
name = "source"
run = "{FUZZ_MODULE}:numbers"
replicas = 2
params = {{ count = 10, nested = {{ a = [1, 2, {{ b = "c" }}] }} }}

[[stages]]
name = "scale"
run = "{FUZZ_MODULE}:Scale"
address = "tcp://127.0.0.1:7000"
ordered = false

[[stages]]
name = "total"
run = "{FUZZ_MODULE}:total"
stream = true
address = "tcp://localhost:7100"
""",
    f"""\
[pipeline]
name = "ordered_run"

[[stages]]
name = "source"
run = "{FUZZ_MODULE}:numbers"
params = {{ count = 5 }}

[[stages]]
name = "work"
run = "{FUZZ_MODULE}:square"
replicas = 3
ordered = true
max_message_size = 65536

[[stages]]
name = "relay"
run = "{FUZZ_MODULE}:Scale"

[[stages]]
name = "sink"
run = "{FUZZ_MODULE}:total"
""",
]
FUZZ_KEYS = ["name", "run", "params", "replicas", "hwm", "stream", "address", "ordered",
             "max_message_size", "grace", "control", "startup_timeout", "inactivity_timeout",
             "keys", "count", "factor", "bogus"]
FUZZ_VALUES = [
    "0", "-1", "1", "2", "3", "255", "256", "257", "1000", "5000", str(10**9), str(2**31),
    str(2**63 - 1), "1" + "0" * 30, "9" * 5000, "1e400", "-1e400", "nan", "+inf", "-inf",
    "0.0", "1.5", "2.0", "1e-300", "604801", "true", "false", '""', '"x"', '"-h"',
    '"--replica"', '"' + "a" * 64 + '"', '"' + "a" * 65 + '"', '"' + "n" * 300 + '"',
    '"' + "x" * 20000 + '"', '"stages:numbers"', f'"{FUZZ_MODULE}:nope"', f'"{FUZZ_MODULE}:Scale"',
    f'"{FUZZ_MODULE}:square"', '"fzq_stages.x:y"', '"tcp://127.0.0.1:99999"', '"tcp://h:1"',
    '"tcp://' + "h" * 300 + ':5"', '"tcp://127.0.0.1:65535"', '"tcp://h-{replica}:5"',
    '"ipc:///tmp/x"', '"keys"', '"badkeys"', '"nokeys"', '"a\\u0000b"', '"\\ud7ff"',
    "[1, 2]", "[]", "{}", "{ a = 1 }", "{ count = 3 }", "{ count = -1, extra = 2 }",
    "1979-05-27T07:32:00Z", "'''x'''",
    "[" * 2000 + "]" * 2000, "{ a = " * 2000 + "1" + " }" * 2000,
    "[" * 150 + "]" * 150, "{ a = " * 120 + "1" + " }" * 120,
]
FUZZ_LINES = [
    "replicas = 256", "replicas = 300", "hwm = 2147483648", "inactivity_timeout = 0.5",
    "inactivity_timeout = nan", 'keys = "keys"', 'keys = "badkeys"', "ordered = true",
    'address = "tcp://127.0.0.1:5555"', "grace = inf", "startup_timeout = 1e-3",
    "[[stages]]", "[pipeline]", "[stages.params]", '[[stages]]\nname = "x"\nrun = "m:f"',
    '[[stages]]\nname = "-h"\nrun = "fzq_stages:square"', "[extra]", "x = 1", "",
    'name = "' + "q" * 200 + '"', "params = { count = 1 }",
]
FUZZ_BYTES = [b"\xff", b"\xc3\x28", b"\x80", b"\xed\xa0\x80", b"\x00", b"\r", b"\t", b"\\",
              b'"', b"'", b"[", b"]", b"{", b"}", b"=", b",", b".", b"#", b"\n", b"-", b"_"]


def _mutate(text: bytes, rng) -> bytes:
    lines = text.split(b"\n")
    choice = rng.randrange(12)  # 6 to 11 keep the TOML valid more often: values and keys
    if choice == 0 and text:  # delete a span of characters
        start = rng.randrange(len(text))
        return text[:start] + text[start + rng.randint(1, 8):]
    if choice == 1:  # insert characters, invalid UTF-8 among them
        start = rng.randrange(len(text) + 1)
        return text[:start] + b"".join(rng.choices(FUZZ_BYTES, k=rng.randint(1, 3))) + text[start:]
    if choice == 2:  # duplicate a line
        at = rng.randrange(len(lines))
        return b"\n".join(lines[:at + 1] + [lines[at]] + lines[at + 1:])
    if choice == 3:  # delete a line
        at = rng.randrange(len(lines))
        return b"\n".join(lines[:at] + lines[at + 1:])
    if choice == 4:  # insert a line
        at = rng.randrange(len(lines) + 1)
        return b"\n".join(lines[:at] + [rng.choice(FUZZ_LINES).encode()] + lines[at:])
    if choice == 5:  # duplicate a span of characters
        start = rng.randrange(len(text) + 1)
        return text[:start] + text[start:start + rng.randint(1, 40)] + text[start:]
    # replace a value (most likely: it is where the limits are), or a key
    assignments = [i for i, line in enumerate(lines) if b" = " in line]
    if not assignments:
        return text
    at = rng.choice(assignments)
    key, _, value = lines[at].partition(b" = ")
    if choice == 11:
        key = rng.choice(FUZZ_KEYS).encode()
    else:
        value = rng.choice(FUZZ_VALUES).encode()
    lines[at] = key + b" = " + value
    return b"\n".join(lines)


@pytest.fixture
def fuzz_project(tmp_path, monkeypatch):
    """A folder as a user has it: the stage module, good keys and garbage keys."""
    import importlib
    import sys

    from zpipe.wire import security
    (tmp_path / f"{FUZZ_MODULE}.py").write_text(FUZZ_STAGES)
    security.create_keys(tmp_path / "keys")
    (tmp_path / "badkeys").mkdir()
    for name in ("server.key_secret", "client.key_secret", "server.key", "client.key"):
        (tmp_path / "badkeys" / name).write_bytes(b"\x00garbage\xff public-key\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    importlib.invalidate_caches()
    yield tmp_path
    for name in [m for m in sys.modules if m == FUZZ_MODULE or m.startswith(FUZZ_MODULE + ".")]:
        del sys.modules[name]


def _runtime_dir(name: str) -> str:
    """As long as the launcher's runtime folder (test_placeholder_runtime_dir_is_as_long_as_mkdtemp)."""
    import os
    import tempfile
    return os.path.join(tempfile.gettempdir(), f"zpipe-{name}-XXXXXXXX")


def _assert_runnable(spec: PipelineSpec, socket) -> None:
    """What passed the checks must also pass what runs it: ZeroMQ's C types, paths, ids."""
    import math
    import os
    for stage in spec.stages:
        socket.sndhwm = socket.rcvhwm = stage.hwm  # OverflowError past a C int
        if stage.max_message_size is not None:
            socket.maxmsgsize = stage.max_message_size
        assert not stage.name.startswith("-"), stage.name  # it would be an option of `zpipe stage`
        assert len(stage.replica_name(stage.replicas - 1).encode()) <= 255  # a routing id
    socket.sndhwm = spec.hwm
    assert sum(stage.replicas for stage in spec.stages) <= TOTAL_LIMIT
    assert not spec.name.startswith("-")
    for seconds in (spec.grace, spec.startup_timeout, spec.inactivity_timeout or 2.0):
        assert math.isfinite(seconds) and 0 < seconds <= 604800, seconds
    assert (spec.inactivity_timeout or 2.0) >= 2.0  # the heartbeats' resolution
    addresses = config.plan_addresses(spec, _runtime_dir(spec.name))
    for address in [addresses.control, *(a for each in addresses.inputs.values() for a in each)]:
        if address.startswith("ipc://"):
            assert len(os.fsencode(address[6:])) <= 107, address


def test_fuzzed_files_give_config_error_or_pass(fuzz_project, request):
    import random
    import signal
    import time

    import zmq

    from zpipe.supervision import launcher

    path = fuzz_project / "pipeline.toml"
    for seed in FUZZ_SEEDS:  # the seeds themselves are good
        path.write_text(seed)
        launcher.check(config.load(path))
    rng = random.Random(20240611)
    failures, outcomes = [], {"ok": 0, "ConfigError": 0}
    context = zmq.Context()
    socket = context.socket(zmq.PUSH)
    socket.linger = 0
    request.addfinalizer(lambda: context.destroy(linger=0))
    alarm_before = signal.getsignal(signal.SIGALRM)
    timer_before = signal.getitimer(signal.ITIMER_REAL)  # pytest-timeout may have one running
    started = time.monotonic()
    for case in range(300):
        text = rng.choice(FUZZ_SEEDS).encode()
        for _ in range(rng.choice((1, 1, 2, 3))):
            text = _mutate(text, rng)
        path.write_bytes(text)
        begun = time.monotonic()
        try:
            spec = config.load(path)
            callees = launcher.check(spec)
            launcher.describe_plan(spec, callees, _runtime_dir(spec.name))
            _assert_runnable(spec, socket)
            outcomes["ok"] += 1
        except ConfigError as exc:
            assert str(path) in str(exc), (case, str(exc)[:300])
            outcomes["ConfigError"] += 1
        except BaseException as exc:  # noqa: BLE001 - the point of the test
            if isinstance(exc, KeyboardInterrupt):
                raise
            failures.append(f"case {case}: {type(exc).__name__}: {str(exc)[:200]}\n"
                            f"{text[:600]!r}")
        took = time.monotonic() - begun
        assert took < 5, f"case {case} took {took:.1f} s:\n{text[:600]!r}"
    assert not failures, f"{len(failures)} of 300 failed:\n" + "\n\n".join(failures[:5])
    # The mutations reach both ends: some files stay valid, most are refused.
    assert outcomes["ok"] >= 10 and outcomes["ConfigError"] >= 150, outcomes
    assert signal.getsignal(signal.SIGALRM) is alarm_before  # the check cleans up after itself
    timer_after = signal.getitimer(signal.ITIMER_REAL)
    if timer_before[0] == 0:
        assert timer_after == (0.0, 0.0)
    else:  # given back, less the time spent
        assert 0 < timer_after[0] <= timer_before[0] - (time.monotonic() - started) + 0.1
    assert time.monotonic() - started < 30


# --- total (the live view's progress) -------------------------------------------------------

def test_a_source_may_say_how_many_items_it_sends(tmp_path):
    spec = load_text(tmp_path, HEAD + SOURCE + "total = 300\n" + SINK)
    assert spec.stages[0].total == 300 and spec.stages[1].total is None


@pytest.mark.parametrize("value", ["-1", "1.5", '"300"', "true"])
def test_total_must_be_a_whole_number(tmp_path, value):
    message = config_error(tmp_path, HEAD + SOURCE + f"total = {value}\n" + SINK)
    assert "stage 'source'" in message and "field 'total' must be a whole number" in message


def test_only_the_source_has_a_total(tmp_path):
    message = config_error(tmp_path, HEAD + SOURCE + SINK + "total = 3\n")
    assert "stage 'sink'" in message and "only the first stage has one" in message
