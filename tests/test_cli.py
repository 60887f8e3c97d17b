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
    assert result.returncode == 2 and "--replica (or $ZPIPE_REPLICA) must be 0 to 1" in result.stderr


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
    # square has 2 replicas: from its input on, links are at least once.
    assert re.search(r"input hwm 7, at least once \(leased\): ipc://\S+/1-0, ipc://\S+/1-1", out)
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


# --- every bad file: `zpipe: error:`, exit 2, no traceback, no hang, nothing left running -----

BLOCKING_STAGES = STAGES + """
def relay(x):
    return x
"""
MODULES = {
    "blocking": "import threading\nthreading.Event().wait()  # never set\ndef f(x):\n    return x\n",
    "exits": "import sys\nsys.exit(5)\n",
    # Swallows every exception, the alarm's included: only the watchdog ends it.
    "stubborn": "import time\nwhile True:\n    try:\n        time.sleep(30)\n"
                "    except BaseException:\n        pass\n",
    # Blocks SIGALRM, then waits: as C code the interpreter never comes back from.
    "deaf": "import signal, time\nsignal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])\n"
            "time.sleep(60)\n",
    # Leaves a thread that never ends: the command must exit all the same.
    "lingering": "import threading\nthreading.Thread(target=threading.Event().wait).start()\n"
                 "def f(x):\n    return x\n",
}


def middle(run: str, extra: str = "", head: str = "", name: str = "mid") -> str:
    return toml(GOOD[0], f'name = "{name}"\nrun = "{run}"\n{extra}', GOOD[2], extra=head)


def deep_params() -> str:
    return toml('name = "source"\nrun = "stages:numbers"\nparams = { count = 10, x = '
                + "{ a = " * 2000 + "1" + " }" * 2000 + " }", GOOD[2])


FILES = [
    # (id, file text, what stderr must say)
    ("blocks-on-import", middle("blocking:f", head="startup_timeout = 2"),
     r"stage 'mid': importing module 'blocking' did not finish within 2 s \(startup_timeout\)"),
    ("sys-exit-on-import", middle("exits:f"),
     r"stage 'mid': field 'run': importing module 'exits' failed: it called sys.exit\(5\)"),
    ("name-starting-with-dash", middle("stages:square", name="-h"),
     r"stage '-h': field 'name' is required and must use letters, digits, '-' and '_', "
     r"not start with '-', and have at most 64 characters"),
    ("name-too-long", middle("stages:square", name="n" * 150),
     r"stage #2: field 'name' .* at most 64 characters \(got 150 characters"),
    ("replicas-1e9", middle("stages:square", f"replicas = {10**9}"),
     r"stage 'mid': field 'replicas' must be a whole number >= 1 and at most 256 "
     r"\(got 1000000000\)"),
    ("replicas-in-all", toml(GOOD[0], *(f'name = "s{i}"\nrun = "stages:square"\nreplicas = 250'
                                        for i in range(5)), GOOD[2]),
     r"1252 replicas in all, more than the limit of 1024 replicas in a pipeline"),
    ("hwm-2**31", middle("stages:square", f"hwm = {2**31}"),
     r"stage 'mid': field 'hwm' must be a whole number >= 1 and at most 1,000,000 "
     r"\(got 2147483648\)"),
    ("nested-2000", deep_params(), r"invalid TOML: arrays or inline tables nested too deeply"),
    ("inactivity-nan", toml(*GOOD, extra="inactivity_timeout = nan"),
     r"\[pipeline\]: field 'inactivity_timeout' must be a number of seconds >= 2 and at most "
     r"604800 \(a week\) \(got nan\)"),
    ("inactivity-1", toml(*GOOD, extra="inactivity_timeout = 1"),
     r"field 'inactivity_timeout' must be a number of seconds >= 2 .*\(got 1\); the supervisor "
     r"sees progress only through the replicas' heartbeats"),
    ("grace-inf", toml(*GOOD, extra="grace = inf"), r"field 'grace' .* \(got inf\)"),
    ("garbage-keys", toml(*GOOD, extra='keys = "keys"'),
     r"\[pipeline\] field 'keys': keys in \S+: No public key found"),
]


def write_file(project, text: str) -> None:
    project.pipeline(text, BLOCKING_STAGES)
    for name, source in MODULES.items():
        project.write(f"{name}.py", source)
    keys = project.root / "keys"
    keys.mkdir(exist_ok=True)
    for name in ("server.key_secret", "client.key_secret", "server.key", "client.key"):
        (keys / name).write_bytes(b"\x89PNG\r\n\x1a\n\x00\xffgarbage")


def assert_refused(project, result, message: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stderr.startswith("zpipe: error: "), result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert str(project.toml) in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr) < 2000  # one clear line, however large the value
    assert not (project.root / "source-ran").exists()


@pytest.mark.parametrize("command", ["validate", "launch"])
@pytest.mark.parametrize("text, message", [f[1:] for f in FILES], ids=[f[0] for f in FILES])
def test_bad_files_are_refused_in_one_line(project, command, text, message):
    write_file(project, text)
    result = project.run(command, str(project.toml), timeout=60)
    assert_refused(project, result, message)


@pytest.mark.parametrize("command", ["validate", "launch"])
def test_invalid_utf8(project, command):
    write_file(project, toml(*GOOD))
    project.toml.write_bytes(project.toml.read_bytes().replace(b'name = "t"', b'name = "t\xff"'))
    result = project.run(command, str(project.toml), timeout=60)
    assert_refused(project, result, r"not UTF-8, as a TOML file must be: byte 0xff at line 2, "
                                    r"column 10")


@pytest.mark.parametrize("module", ["stubborn", "deaf"])
def test_an_import_that_cannot_be_interrupted_still_ends(project, module):
    # The alarm is swallowed or never delivered: the watchdog ends the process.
    import time
    write_file(project, middle(f"{module}:f", head="startup_timeout = 1"))
    started = time.monotonic()
    result = project.run("validate", str(project.toml), timeout=60)
    assert_refused(project, result, rf"stage 'mid': importing module '{module}' did not finish "
                                    rf"within 1 s")
    assert time.monotonic() - started < 20


def test_a_module_leaving_a_thread_does_not_keep_validate(project):
    write_file(project, middle("lingering:f"))
    result = project.run("validate", str(project.toml), timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("ok\n")


@pytest.mark.parametrize("command", ["validate", "launch"])
def test_ipc_paths_too_long_for_the_temporary_folder(project, tmp_path, command):
    import os
    import subprocess

    from conftest import ZPIPE
    tmpdir = tmp_path / ("t" * max(1, 100 - len(str(tmp_path))))
    tmpdir.mkdir()
    write_file(project, toml(*GOOD))
    result = subprocess.run([*ZPIPE, command, str(project.toml)], cwd=project.root,
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "TMPDIR": str(tmpdir)})
    assert_refused(project, result, r"the ipc socket of the supervisor, \S+/control, is \d+ "
                                    r"bytes long, more than the 107 bytes a Unix socket path "
                                    r"may have: .*set TMPDIR to a shorter folder")
    assert not list(tmpdir.iterdir())  # no runtime folder left behind


def test_grace_option_must_be_finite(project):
    write_file(project, toml(*GOOD))
    for value in ("nan", "inf", "0", "-1"):
        result = project.run("launch", str(project.toml), "--grace", value)
        assert result.returncode == 2 and "--grace" in result.stderr, result.stderr
        assert not (project.root / "source-ran").exists()


# --- in process: the keys and the bounded import of launcher.check -------------------------

@pytest.fixture
def in_process(tmp_path, monkeypatch):
    """A folder with a pipeline whose module is imported into this process, and undone after."""
    import importlib
    before = set(sys.modules)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    name = f"cli_mod_{tmp_path.name}".replace("-", "_")
    (tmp_path / f"{name}.py").write_text("def numbers(count):\n    yield from range(count)\n"
                                         "def sink(x):\n    pass\n")
    importlib.invalidate_caches()

    def write(extra: str = "", module: str = name) -> Path:
        path = tmp_path / "pipeline.toml"
        path.write_text(toml(f'name = "source"\nrun = "{module}:numbers"\nparams = {{ count = 1 }}',
                             f'name = "sink"\nrun = "{module}:sink"', extra=extra))
        return path

    write.root = tmp_path  # type: ignore[attr-defined]
    yield write
    for added in set(sys.modules) - before:
        del sys.modules[added]


def check(path: Path) -> None:
    from zpipe import config
    from zpipe.supervision import launcher
    launcher.check(config.load(path))


def good_keys(folder: Path) -> Path:
    from zpipe.wire import security
    security.create_keys(folder)
    return folder


KEY_DAMAGE = {
    "garbage": ("server.key_secret", lambda k: bytes(range(256)) * 4, "No public key found"),
    "empty": ("client.key_secret", lambda k: b"", "No public key found"),
    "public-key-without-secret": ("server.key_secret", lambda k: (k / "server.key").read_bytes(),
                                  "server.key_secret holds no secret key"),
    "not-z85": ("client.key_secret",
                lambda k: b'curve\n    public-key = "' + b"~" * 40 + b'"\n    secret-key = "'
                          + b"~" * 40 + b'"\n', "is not a CurveZMQ key"),
    "too-short": ("client.key_secret",
                  lambda k: b'curve\n    public-key = "abc"\n    secret-key = "def"\n',
                  "is not a CurveZMQ key"),
    "pair-mismatch": ("server.key_secret",
                      lambda k: b"\n".join(line for line in (k / "server.key_secret").read_bytes()
                                           .splitlines() if b"secret-key" not in line)
                      + b"\n" + b"\n".join(line for line in (k / "client.key_secret").read_bytes()
                                           .splitlines() if b"secret-key" in line) + b"\n",
                      "do not belong together"),
    "key-without-equals": ("server.key_secret", lambda k: b"curve\n    public-key\n",
                           "cannot read the keys"),
    "garbage-public-file": ("other.key", lambda k: b"\x00\xff", "a public key file"),
    "client-key-missing": ("client.key", None, "every replica would be refused"),
    "secret-is-a-folder": ("server.key_secret", "folder", "lacks server.key_secret"),
}


@pytest.mark.parametrize("damage", list(KEY_DAMAGE))
def test_damaged_keys_are_refused_by_the_check(in_process, damage):
    import shutil

    from zpipe.errors import ConfigError
    keys = good_keys(in_process.root / "keys")
    path = in_process('keys = "keys"')
    check(path)  # intact keys pass
    file, content, message = KEY_DAMAGE[damage]
    if content is None:
        (keys / file).unlink()
    elif content == "folder":
        (keys / file).unlink()
        (keys / file).mkdir()
    else:
        (keys / file).write_bytes(content(keys))
    with pytest.raises(ConfigError) as info:
        check(path)
    assert str(path) in str(info.value) and "field 'keys'" in str(info.value)
    assert message in str(info.value), str(info.value)
    shutil.rmtree(keys)


def test_blocking_import_is_bounded_in_process(in_process):
    import signal
    import time

    from zpipe.errors import ConfigError
    (in_process.root / "sleepy_cli_mod.py").write_text(
        "import time\ntime.sleep(60)\ndef numbers(count):\n    yield 1\ndef sink(x):\n    pass\n")
    path = in_process("startup_timeout = 0.5", module="sleepy_cli_mod")
    handler, timer = signal.getsignal(signal.SIGALRM), signal.getitimer(signal.ITIMER_REAL)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"stage 'source': importing module 'sleepy_cli_mod' did "
                                          r"not finish within 0.5 s \(startup_timeout\)"):
        check(path)
    assert time.monotonic() - started < 5
    assert "sleepy_cli_mod" not in sys.modules
    assert signal.getsignal(signal.SIGALRM) is handler  # what was there before is back
    assert (signal.getitimer(signal.ITIMER_REAL)[0] > 0) == (timer[0] > 0)


def test_file_descriptors_for_the_replicas(in_process, monkeypatch):
    import resource

    from zpipe import preflight
    from zpipe.errors import ConfigError
    path = in_process()
    monkeypatch.setattr(resource, "getrlimit", lambda which: (20, 30))
    with pytest.raises(ConfigError, match=r"2 replicas need about 72 open files in the launcher, "
                                          r"and this process may open 20 \(hard limit 30\); "
                                          r"raise it \(ulimit -n\)"):
        check(path)
    raised = []
    monkeypatch.setattr(resource, "getrlimit", lambda which: (20, 1000))
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: raised.append(limits))
    check(path)
    assert raised == [(preflight.FDS_BASE + 2 * preflight.FDS_PER_REPLICA, 1000)]


def test_a_control_address_that_cannot_be_bound_is_a_clear_error(project):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        project.pipeline(f'''
            [pipeline]
            name = "bound"
            control = "tcp://127.0.0.1:{port}"
            [[stages]]
            name = "source"
            run = "stages:numbers"
            [[stages]]
            name = "sink"
            run = "stages:sink"
        ''', "def numbers():\n    yield 1\n\ndef sink(x):\n    pass\n")
        result = project.launch(timeout=60)
    assert result.returncode == 2, result.stderr
    assert "[pipeline] control: cannot bind the supervisor's control socket " \
           f"tcp://127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
