"""The Python API: zpipe.Task/run (pipeline-lib's model) and zpipe.Pipeline (ParallelPipe's)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

import pytest

import zpipe
from conftest import wait_until

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MODES = ["process", "thread"]


def children() -> list[int]:
    """Live (non-zombie) child processes of this test process."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid() and fields[0] != "Z":
                found.append(int(entry.name))
    return found


@pytest.fixture(autouse=True)
def nothing_left_running():
    yield
    wait_until(lambda: not children(), timeout=10, what="child processes to end")
    assert not [t.name for t in threading.enumerate() if t.name.startswith("zpipe-")]


# -- stages used below (module level, as users write them) -------------------------

def numbers(count: int) -> Iterator[int]:
    yield from range(count)


def square(x: int) -> int:
    return x * x


def write_lines(items: Iterable, path: str) -> None:
    with open(path, "w") as out:
        for item in items:
            out.write(json.dumps(item) + "\n")


class Odd(Exception):
    """An exception type of the user's own."""


def fail_at(x: int, bad: int) -> int:
    if x == bad:
        raise Odd(f"cannot take {x}")
    return x


class Unpicklable(Exception):
    def __init__(self, handle):
        super().__init__("has a lock")
        self.handle = handle


def fail_unpicklably(x: int) -> int:
    raise Unpicklable(threading.Lock())


def die_at(x: int, bad: int) -> int:
    if x == bad:
        os._exit(3)
    return x


def sleepy(x, seconds):
    # In small slices: a thread can be stopped only between Python instructions.
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(min(0.05, seconds))
    return x


def jitter(x: int) -> int | None:
    time.sleep((x * 7919 % 13) / 2000)  # uneven work, so replicas overtake each other
    return None if x % 5 == 0 else x * 10


def pairs(x: int) -> Iterator[list]:
    time.sleep((x * 31 % 7) / 2000)
    yield [x, "a"]
    if x % 3:
        yield [x, "b"]


def text_source(count: int) -> Iterable[str]:
    for i in range(count):
        yield str(i)


def add_one(items: Iterable[int]) -> Iterable[int]:
    for x in items:
        yield x + 1


def same(x):
    return x


def read(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- run() ----------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_run_delivers_every_item_through_replicas(tmp_path, mode):
    out = tmp_path / "out.jsonl"
    outcome = zpipe.run([zpipe.Task(numbers, params={"count": 2000}),
                         zpipe.Task(square, replicas=3),
                         zpipe.Task(write_lines, params={"path": str(out)})], mode=mode)
    assert outcome.status == "ok"
    assert outcome.counts["square"] == {"received": 2000, "sent": 2000}
    assert sorted(read(out)) == [x * x for x in range(2000)]


@pytest.mark.parametrize("mode", MODES)
def test_stage_error_is_reraised_as_the_original_type(tmp_path, mode):
    with pytest.raises(Odd, match="cannot take 7") as info:
        zpipe.run([zpipe.Task(numbers, params={"count": 100}),
                   zpipe.Task(fail_at, params={"bad": 7}, replicas=2),
                   zpipe.Task(write_lines, params={"path": str(tmp_path / "out")})], mode=mode)
    exc = info.value
    assert exc.stage == "fail_at" and exc.replica in (0, 1)
    assert "in fail_at" in exc.remote_traceback and "raise Odd" in exc.remote_traceback
    assert any("raised in stage 'fail_at'" in note for note in exc.__notes__)


@pytest.mark.parametrize("mode", MODES)
def test_an_exception_that_cannot_travel_becomes_a_stage_error(mode):
    with pytest.raises(zpipe.StageError, match=r"Unpicklable: has a lock") as info:
        zpipe.run([zpipe.Task(numbers, params={"count": 3}), zpipe.Task(fail_unpicklably),
                   zpipe.Task(square)], mode=mode)
    assert info.value.stage == "fail_unpicklably"


def test_a_worker_that_dies_raises_stage_error_naming_the_stage():
    with pytest.raises(zpipe.StageError, match=r"stage 'die_at' replica die_at-0 .*died "
                                               r"without a word: exited with status 3"):
        zpipe.run([zpipe.Task(numbers, params={"count": 50}),
                   zpipe.Task(die_at, params={"bad": 10}), zpipe.Task(square)])


def test_mismatched_annotations_are_refused_before_anything_runs():
    with pytest.raises(zpipe.ConfigError, match=r"stage 'text_source' produces items of type "
                                                r"str but stage 'add_one' accepts int"):
        zpipe.run([zpipe.Task(text_source, params={"count": 3}), zpipe.Task(add_one),
                   zpipe.Task(square)])
    # Unannotated or agreeing neighbours pass.
    zpipe.run([zpipe.Task(numbers, params={"count": 3}), zpipe.Task(add_one),
               zpipe.Task(lambda x: x)], mode="thread")


def test_bad_task_arguments_name_the_stage_and_field():
    with pytest.raises(zpipe.ConfigError, match=r"stage 'square': field 'replicas'"):
        zpipe.run([zpipe.Task(numbers, params={"count": 3}), zpipe.Task(square, replicas=0)])
    with pytest.raises(zpipe.ConfigError, match=r"stage 'square': field 'params' does not fit"):
        zpipe.run([zpipe.Task(numbers, params={"count": 3}),
                   zpipe.Task(square, params={"y": 1})])
    with pytest.raises(ValueError, match="mode must be one of process, thread"):
        zpipe.run([zpipe.Task(numbers, params={"count": 3})], mode="fibers")


@pytest.mark.parametrize("mode", MODES)
def test_inactivity_timeout_turns_a_stall_into_an_error(mode):
    started = time.monotonic()
    with pytest.raises(zpipe.StageError, match=r"no item moved for 1 s \(inactivity_timeout\)"):
        zpipe.run([zpipe.Task(numbers, params={"count": 3}),
                   zpipe.Task(sleepy, params={"seconds": 3600}),
                   zpipe.Task(square)], mode=mode, inactivity_timeout=1)
    # Processes are killed; a thread stuck in a C call is left behind, but run() returns.
    assert time.monotonic() - started < 20


@pytest.mark.parametrize("mode", MODES)
def test_ordered_replicated_stage_keeps_input_order(tmp_path, mode):
    out = tmp_path / "out.jsonl"
    zpipe.run([zpipe.Task(numbers, params={"count": 600}),
               zpipe.Task(jitter, replicas=3, ordered=True),
               zpipe.Task(same),
               zpipe.Task(pairs, stream=False, replicas=2, ordered=True),
               zpipe.Task(write_lines, params={"path": str(out)})], mode=mode)
    expected = [[x * 10, tag] for x in range(600) if x % 5
                for tag in (["a", "b"] if (x * 10) % 3 else ["a"])]
    assert read(out) == expected


def test_ordered_needs_a_single_sender_and_receiver():
    with pytest.raises(zpipe.ConfigError, match=r"stage 'jitter': field 'ordered': the next "
                                                r"stage \('pairs'\) has 2 replicas"):
        zpipe.run([zpipe.Task(numbers, params={"count": 3}),
                   zpipe.Task(jitter, replicas=3, ordered=True),
                   zpipe.Task(pairs, stream=False, replicas=2), zpipe.Task(square)])
    with pytest.raises(zpipe.ConfigError, match=r"stage 'jitter': field 'ordered': input order "
                                                r"is defined only when the stage before"):
        zpipe.run([zpipe.Task(numbers, params={"count": 3}), zpipe.Task(square, replicas=2),
                   zpipe.Task(jitter, ordered=True), zpipe.Task(square)])
    with pytest.raises(zpipe.ConfigError, match=r"a stream function's outputs cannot be matched"):
        zpipe.run([zpipe.Task(numbers, params={"count": 3}),
                   zpipe.Task(add_one, ordered=True, replicas=2), zpipe.Task(square)])


def test_run_a_pipeline_toml_from_python(tmp_path):
    (tmp_path / "steps.py").write_text(
        "def numbers(count):\n    yield from range(count)\n"
        "def double(x):\n    return 2 * x\n"
        "from typing import Iterable\n"
        "def total(items: Iterable[int], path):\n    open(path, 'w').write(str(sum(items)))\n")
    (tmp_path / "pipeline.toml").write_text(
        '[pipeline]\nname = "py"\n'
        '[[stages]]\nname = "src"\nrun = "steps:numbers"\nparams = { count = 100 }\n'
        '[[stages]]\nname = "double"\nrun = "steps:double"\nreplicas = 2\n'
        f'[[stages]]\nname = "total"\nrun = "steps:total"\nparams = {{ path = "{tmp_path}/t" }}\n')
    outcome = zpipe.run(zpipe.load(tmp_path / "pipeline.toml"))
    assert outcome.status == "ok" and (tmp_path / "t").read_text() == str(2 * sum(range(100)))


def test_ctrl_c_in_run_drains_then_raises_keyboard_interrupt(tmp_path):
    script = tmp_path / "endless.py"
    script.write_text(
        "import itertools, time, zpipe\n"
        "def forever():\n"
        "    for i in itertools.count():\n"
        "        time.sleep(0.002)\n"
        "        yield i\n"
        "def record(items: 'Iterable', path):\n"
        "    with open(path, 'w') as f:\n"
        "        for x in items:\n"
        "            f.write(f'{x}\\n'); f.flush()\n"
        "if __name__ == '__main__':\n"
        f"    zpipe.run([zpipe.Task(forever), zpipe.Task(abs, replicas=2),\n"
        f"               zpipe.Task(record, params={{'path': '{tmp_path}/out'}})])\n")
    proc = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True)
    try:
        out = tmp_path / "out"
        wait_until(lambda: out.exists() and len(out.read_text().splitlines()) > 20,
                   what="items at the sink")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert "KeyboardInterrupt" in err
    got = [int(x) for x in out.read_text().splitlines()]
    assert sorted(got) == list(range(len(got)))  # what was produced arrived, nothing lost


# -- ParallelPipe's Pipeline ----------------------------------------------------------

class Double(zpipe.Stage):
    def stage_run(self, x):
        return 2 * x


class Collect(zpipe.Stage):
    """With set_get_all(): gets lists of what waits in its input."""

    def process(self, batch):
        assert isinstance(batch, list) and batch
        time.sleep(0.01)
        return batch


class Boom(zpipe.Stage):
    def process(self, x):
        if x == 3:
            raise KeyError("three")
        return x


@pytest.mark.parametrize("multiprocess", [True, False])
def test_pipeline_put_get_in_order(multiprocess):
    with zpipe.Pipeline([Double(), Double()], buffer_size=3, multiprocess=multiprocess) as p:
        for i in range(200):
            p.put(i)
    assert list(p) == [4 * i for i in range(200)]
    with pytest.raises(EOFError):
        p.get()


@pytest.mark.parametrize("multiprocess", [True, False])
def test_set_get_all_receives_lists_of_waiting_items(multiprocess):
    p = zpipe.Pipeline([Double(), Collect().set_get_all()], buffer_size=[2, 50],
                       multiprocess=multiprocess)
    p.start()
    for i in range(300):
        p.put(i)
    p.setstop()
    batches = list(p)
    assert sorted(x for b in batches for x in b) == [2 * i for i in range(300)]
    assert len(batches) < 300  # some batches held several items


@pytest.mark.parametrize("multiprocess", [True, False])
def test_pipeline_error_surfaces_at_the_next_call(multiprocess):
    p = zpipe.Pipeline([Boom()], multiprocess=multiprocess).start()
    with pytest.raises(KeyError, match="three"):
        for i in range(1000):
            p.put(i)
            time.sleep(0.001)
    with pytest.raises(KeyError):
        p.setstop()


def test_pipeline_put_blocks_instead_of_dropping():
    # 40 items of 200 kB through a stage taking 10 ms each: the buffers (HWM 1
    # on each side plus the OS's socket buffers) hold a handful, so put() must
    # wait for most of the work; ParallelPipe would drop them instead.
    slow = zpipe.Task(sleepy, params={"seconds": 0.01})
    with zpipe.Pipeline([slow, zpipe.Task(len)], buffer_size=1) as p:
        started = time.monotonic()
        for i in range(40):
            p.put(bytes(200_000))
        assert time.monotonic() - started > 0.2
    assert list(p) == [200_000] * 40


@pytest.mark.parametrize("argv, label", [([], "process"), (["--threads"], "thread")])
def test_parallelpipe_readme_program_prints_all_ten_lines(tmp_path, argv, label):
    source = (EXAMPLES / "parallelpipe_readme.py").read_text()
    assert source.startswith("from zpipe import Pipeline, Stage\n")
    if argv:
        assert source.count("multiprocess=True") == 1
        source = source.replace("multiprocess=True", "multiprocess=False")
    program = tmp_path / "readme.py"
    program.write_text(source)
    result = subprocess.run([sys.executable, str(program)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        str([f"Pipeline: {i}", "stage one", "stage two", "stage three"]) for i in range(1, 11)]


@pytest.mark.parametrize("mode", MODES)
def test_pipeline_lib_image_batch_example(mode):
    result = subprocess.run([sys.executable, str(EXAMPLES / "image_batch.py"), mode],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    counts = re.fullmatch(r"Counter\((\{.*\})\)\n", result.stdout)
    assert counts, result.stdout
    assert sum(eval(counts[1]).values()) == 24
