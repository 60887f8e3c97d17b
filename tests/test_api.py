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
from conftest import wait_until

import zpipe

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
def test_an_exception_is_rebuilt_from_its_type_and_args_not_pickled(mode):
    # Its attributes (a lock) could not travel, its type and args do.
    with pytest.raises(Unpicklable, match=r"has a lock") as info:
        zpipe.run([zpipe.Task(numbers, params={"count": 3}), zpipe.Task(fail_unpicklably),
                   zpipe.Task(square)], mode=mode)
    assert info.value.stage == "fail_unpicklably"


@pytest.mark.parametrize("mode", MODES)
def test_an_exception_whose_class_cannot_be_found_becomes_a_stage_error(mode):
    class Hidden(Exception):
        pass

    def fail(x):
        raise Hidden("defined in a function")
    with pytest.raises(zpipe.StageError, match=r"Hidden: defined in a function") as info:
        zpipe.run([zpipe.Task(numbers, params={"count": 3}), zpipe.Task(fail, name="fail"),
                   zpipe.Task(square)], mode=mode)
    assert info.value.stage == "fail"


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
    with pytest.raises(zpipe.StageError, match=r"no item moved for 2 s \(inactivity_timeout\)"):
        zpipe.run([zpipe.Task(numbers, params={"count": 3}),
                   zpipe.Task(sleepy, params={"seconds": 3600}),
                   zpipe.Task(square)], mode=mode, inactivity_timeout=2)
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


def _running(marker: str) -> list[int]:
    """Live processes whose command line holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                argv = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if marker in argv and stat[0] != "Z":
                found.append(int(entry.name))
    return found


@pytest.mark.parametrize("mode", MODES)
def test_async_download_example(mode):
    # It serves its own pages on 127.0.0.1 (no network), downloads every one with
    # sixteen GETs in flight, faster than one at a time, and leaves nothing running.
    import importlib.util
    program = EXAMPLES / "async_download.py"
    spec = importlib.util.spec_from_file_location("async_download", program)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = subprocess.run([sys.executable, str(program), mode], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    got = re.fullmatch(r"downloaded (\d+) pages, ([\d,]+) bytes, in ([\d.]+) s \(.*\)\n"
                       r"one at a time would take ([\d.]+) s \(.*\): ([\d.]+)x as long\n",
                       result.stdout)
    assert got, result.stdout
    assert int(got[1]) == example.PAGES
    assert int(got[2].replace(",", "")) == sum(len(example.page_of(i))
                                               for i in range(example.PAGES))
    assert float(got[4]) >= sum(example.delay_of(i) for i in range(example.PAGES))
    assert float(got[5]) >= 2, result.stdout  # about 10x here; start-up is in the elapsed time
    assert not _running(str(program))


# -- defects found by peers' suites and fault injection -----------------------------------

class PlusOne(zpipe.Stage):
    def process(self, x):
        return x + 1


class Printer(zpipe.Stage):
    def stage_run(self, x):
        print(x, flush=True)


def test_pipeline_started_in_a_thread_that_ends_keeps_running():
    # The replicas' parent-death signal follows the thread that forked them:
    # start() in a thread that then ends must not take them down.
    p = zpipe.Pipeline([PlusOne(), PlusOne()], buffer_size=2, multiprocess=True)
    starter = threading.Thread(target=p.start)
    starter.start()
    starter.join()
    for i in range(50):
        p.put(i)
    p.setstop()
    assert sorted(p) == [i + 2 for i in range(50)]


def test_pipeline_used_entirely_from_another_thread():
    results: list = []

    def use() -> None:
        with zpipe.Pipeline([PlusOne()], multiprocess=True) as p:
            for i in range(20):
                p.put(i)
        results.extend(p)
    user = threading.Thread(target=use)
    user.start()
    user.join(60)
    assert sorted(results) == list(range(1, 21))


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("multiprocess", [True, False])
def test_unread_results_make_put_wait_instead_of_filling_memory(multiprocess):
    # 1 MB results nobody reads: the results buffer is bounded like every link,
    # so put() runs out of room (here: times out) long before memory grows.
    before = _rss_mb()
    p = zpipe.Pipeline([zpipe.Task(same)], buffer_size=2, multiprocess=multiprocess).start()
    accepted = 0
    with pytest.raises(TimeoutError, match="no room for the item within 1 s"):
        for _ in range(1500):
            p.put(bytes(1_000_000), timeout=1)
            accepted += 1
    assert accepted < 200
    assert _rss_mb() - before < 300
    p.setstop()  # what was accepted still arrives, without a reader in between
    assert len(list(p)) == accepted


def test_parallelpipe_quick_start_form_with_end_stage_and_len(capfd):
    one, two, end = PlusOne(), PlusOne(), Printer()
    P = zpipe.Pipeline(stages=[one, two], end_stage=end, buffer_size=2, multiprocess=False)
    assert len(P) == 3
    P.start()
    for i in range(5):
        P.put(i)
    P.setstop()
    assert capfd.readouterr().out.split() == [str(i + 2) for i in range(5)]
    assert len(zpipe.Pipeline([one, two, end], buffer_size=[1, 2, 3])) == 3


SIGTERM_PROGRAM = """
import os, sys, time
from typing import Iterable
import zpipe

def forever():
    i = 0
    while True:
        yield i
        i += 1
        time.sleep(0.001)

class Sink(zpipe.Stage):
    def __init__(self, folder):
        self.folder = folder
    def setup(self):
        self.count = 0
        open(os.path.join(self.folder, f"ready-{os.getpid()}"), "w").close()
    def process(self, x):
        self.count += 1
    def teardown(self):
        time.sleep(0.2)  # a teardown that takes a moment: a second signal must not cut it
        with open(os.path.join(self.folder, f"torn-{os.getpid()}"), "w") as f:
            f.write(str(self.count))

zpipe.run([zpipe.Task(forever), zpipe.Task(lambda x: x, name="relay", replicas=2),
           zpipe.Task(Sink, params={"folder": sys.argv[1]}, replicas=6)], grace=20)
"""


def _start_sigterm_program(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """SIGTERM_PROGRAM running, every sink replica set up; (its process, the marks folder)."""
    program = tmp_path / "program.py"
    program.write_text(SIGTERM_PROGRAM)
    folder = tmp_path / "marks"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, str(program), str(folder)], stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_until(lambda: len(list(folder.glob("ready-*"))) == 6, timeout=30,
                   what="every sink replica to be set up")
    except BaseException:
        proc.kill()
        raise
    return proc, folder


def test_sigterm_to_a_program_calling_run_is_the_ordered_stop(tmp_path):
    proc, folder = _start_sigterm_program(tmp_path)
    try:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    torn = list(folder.glob("torn-*"))
    assert len(torn) == 6, err  # every sink finished its teardown
    assert "Exception in thread" not in err and "Traceback" not in err, err


def test_a_replica_takes_sigterm_once_and_lets_teardown_finish(tmp_path):
    proc, folder = _start_sigterm_program(tmp_path)
    try:
        sinks = [int(p.name.split("-")[1]) for p in folder.glob("ready-*")]
        for _ in range(3):  # as signals to a whole group do, or a parent dying after them
            for pid in sinks:
                os.kill(pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0  # sinks killed from outside fail the run
    assert len(list(folder.glob("torn-*"))) == 6, err
    assert "Exception in thread" not in err, err


GIL_PROGRAM = """
import os, sys
import zpipe

def numbers(count):
    yield from range(count)

def hold(x, folder):
    if x == 3:
        open(os.path.join(folder, "holding"), "w").close()
        sum(range(10**10))  # one C call that keeps the GIL for minutes
    return x

zpipe.run([zpipe.Task(numbers, params={"count": 10}),
           zpipe.Task(hold, params={"folder": sys.argv[1]}), zpipe.Task(lambda x: None)],
          name=sys.argv[2])
"""


def test_a_caller_killed_while_a_replica_holds_the_gil_leaves_nothing(tmp_path):
    import tempfile
    import uuid

    from conftest import processes_mentioning

    name = f"gil{uuid.uuid4().hex[:8]}"
    program = tmp_path / "program.py"
    program.write_text(GIL_PROGRAM)
    proc = subprocess.Popen([sys.executable, str(program), str(tmp_path), name])
    folders = lambda: list(Path(tempfile.gettempdir()).glob(f"zpipe-{name}-*"))  # noqa: E731
    try:
        wait_until(lambda: (tmp_path / "holding").exists(), what="the GIL-holding call")
        assert folders()
        proc.kill()
        proc.wait()
        wait_until(lambda: not processes_mentioning(str(program)), timeout=6,
                   what="every replica to go")
        wait_until(lambda: not folders(), timeout=5, what="the runtime folder to go")
    finally:
        proc.kill()
        for pid in processes_mentioning(str(program)):
            os.kill(pid, signal.SIGKILL)


def endless_bytes(folder: str, size: int) -> Iterator[bytes]:
    while not os.path.exists(os.path.join(folder, "stop")):
        yield bytes(size)


def counting_relay(x, folder: str):
    path = os.path.join(folder, "calls")
    calls = int(Path(path).read_text()) if os.path.exists(path) else 0
    Path(path).write_text(str(calls + 1))
    return x


def stuck_sink(x, folder: str) -> None:
    # Holds its first item until told to stop: everything upstream backs up.
    while not os.path.exists(os.path.join(folder, "stop")):
        time.sleep(0.01)


@pytest.mark.parametrize("mode, bound", [("process", 2 * 3 + 3 + 2), ("thread", 2 * 3 + 3)])
def test_what_a_link_holds_is_what_the_readme_says(tmp_path, mode, bound):
    """README, "What a link holds": 2 x hwm + 3 messages, plus the OS's socket
    buffers (about two 200 kB items) on ipc and tcp."""
    readme = (EXAMPLES.parent / "README.md").read_text()
    assert "runs at most 2 x 3 + 3 + 2 = 11 times" in readme and "so 9." in readme
    params = {"folder": str(tmp_path)}
    runner = threading.Thread(target=zpipe.run, args=([
        zpipe.Task(endless_bytes, params={**params, "size": 200_000}),
        zpipe.Task(counting_relay, params=params), zpipe.Task(stuck_sink, params=params)],),
        kwargs={"mode": mode, "hwm": 3})
    runner.start()
    calls = tmp_path / "calls"
    try:
        # Until the relay has stopped being called for a second: the links are full.
        seen: list[tuple[float, str]] = []

        def settled() -> bool:
            now, count = time.monotonic(), calls.read_text() if calls.exists() else ""
            if not seen or seen[-1][1] != count:
                seen.append((now, count))
            return bool(count) and now - seen[-1][0] > 1.0
        wait_until(settled, timeout=30, what="the links to fill")
        assert 2 * 3 <= int(calls.read_text()) <= bound
    finally:
        (tmp_path / "stop").touch()
        runner.join(60)
