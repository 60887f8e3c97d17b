"""The `zpipe` command line: bad input is exit 2 before anything runs; validate prints the plan."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

from test_launcher import toml

STAGES = """
import pathlib

def numbers(count):
    pathlib.Path("source-ran").touch()  # the tests check that nothing ran
    yield from range(count)

def square(x, factor=1):
    return x * x * factor

def sink(x):
    pass

NOT_CALLABLE = 3
"""

GOOD = [
    'name = "source"\nrun = "stages:numbers"\nparams = { count = 10 }',
    'name = "square"\nrun = "stages:square"\nreplicas = 2\nhwm = 7',
    'name = "sink"\nrun = "stages:sink"',
]


def with_stage(index: int, text: str) -> str:
    stages = list(GOOD)
    stages[index] = text
    return toml(*stages)


BAD = [
    # (file text, what the message must say)
    ('[pipeline\nname = "x"\n', r"invalid TOML: .*\(at line 1, column \d+\)"),
    (toml(*GOOD, extra="colour = 3"), r"\[pipeline\]: unknown field 'colour'"),
    (with_stage(1, GOOD[1] + "\nreplica = 2"), r"stage 'square': unknown field 'replica'"),
    (toml(GOOD[0], GOOD[1], GOOD[1]), r"stage 'square': duplicate name"),
    (with_stage(1, GOOD[1].replace("replicas = 2", "replicas = 0")),
     r"stage 'square': field 'replicas' must be a whole number >= 1"),
    (with_stage(1, GOOD[1].replace("hwm = 7", "hwm = -1")),
     r"stage 'square': field 'hwm' must be a whole number >= 1"),
    (with_stage(1, 'name = "square"\nrun = "stages.square"'),
     r"stage 'square': field 'run' must be \"module:attribute\""),
    (with_stage(1, 'name = "square"\nrun = "nosuchmodule:square"'),
     r"stage 'square': field 'run': no module named 'nosuchmodule'"),
    (with_stage(1, 'name = "square"\nrun = "stages:cube"'),
     r"stage 'square': field 'run': module 'stages' has no attribute 'cube'"),
    (with_stage(1, 'name = "square"\nrun = "stages:NOT_CALLABLE"'),
     r"stage 'square': field 'run': 'stages:NOT_CALLABLE' is a int, not a function"),
    (with_stage(1, GOOD[1] + "\nparams = { facter = 2 }"),
     r"stage 'square': field 'params' does not fit square\(x, factor=1\): got an unexpected "
     r"keyword argument 'facter'"),
    (with_stage(0, 'name = "source"\nrun = "stages:numbers"'),
     r"stage 'source': field 'params' does not fit numbers\(count\): missing a required "
     r"argument: 'count'"),
    (with_stage(1, 'name = "squ are"\nrun = "stages:square"'), r"stage 'squ are': field 'name' is required and must use letters"),
    (toml(*GOOD).replace('name = "t"', 'title = "t"'), r"\[pipeline\]: unknown field 'title'"),
    ('[pipeline]\nname = "t"\n', r"no stages"),
    (with_stage(0, GOOD[0] + "\nreplicas = 2"),
     r"stage 'source': field 'replicas': a first stage with 2 replicas would produce every "
     r"item 2 times"),
]


@pytest.mark.parametrize("command", ["launch", "validate"])
@pytest.mark.parametrize("text, message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_exits_2_naming_the_field_before_anything_runs(project, command, text,
                                                                  message):
    project.pipeline(text, STAGES)
    result = project.run(command, str(project.toml))
    assert result.returncode == 2, result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert str(project.toml) in result.stderr
    assert not (project.root / "source-ran").exists()
    assert "Traceback" not in result.stderr


def test_missing_file_and_unknown_stage(project):
    result = project.run("launch", "nope.toml")
    assert result.returncode == 2 and "nope.toml: no such file" in result.stderr
    project.pipeline(toml(*GOOD), STAGES)
    result = project.run("stage", str(project.toml), "cube")
    assert result.returncode == 2 and "no stage named 'cube'" in result.stderr
    result = project.run("stage", str(project.toml), "square", "--replica", "5")
    assert result.returncode == 2 and "--replica must be 0 to 1" in result.stderr


def test_usage_errors_exit_2(project):
    assert project.run("launch").returncode == 2
    assert project.run("frobnicate").returncode == 2


def test_validate_prints_the_plan(project):
    project.pipeline(toml(*GOOD), STAGES)
    result = project.run("validate", str(project.toml))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "pipeline 't': 3 stages, 4 replica processes" in out
    assert re.search(r"square \(stage\): stages:square -> square \(plain function\), replicas 2",
                     out)
    assert re.search(r"input hwm 7: ipc://\S+/square-0, ipc://\S+/square-1", out)
    assert "sink (sink): stages:sink -> sink (plain function), replicas 1" in out
    assert not (project.root / "source-ran").exists()


def test_modules_are_found_next_to_the_file_from_any_directory(project, tmp_path):
    project.pipeline(toml(*GOOD), STAGES)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = project.run("launch", str(project.toml), cwd=elsewhere)
    assert result.returncode == 0, result.stderr


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("zpipe")
    assert script.exists() or shutil.which("zpipe"), "pip install -e . provides `zpipe`"
