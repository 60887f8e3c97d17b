"""Unit tests of zpipe.replica.shapes: import, classify, check and drive a stage's callable."""

from __future__ import annotations

import collections.abc
import importlib
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any, Iterable, Iterator

import pytest

import zpipe
from zpipe.errors import ConfigError
from zpipe.replica import shapes
from zpipe.replica.shapes import Body, Callee, Inputs, Shape, classify

WHERE = "pipeline.toml: stage 'st'"


def resolve(stage, run, params, first, stream, replicas, base_dir, where):
    """One stage resolved as a pipeline does it (a two-stage pipeline around it)."""
    from zpipe.config import PipelineSpec, StageSpec
    stages = [StageSpec(name=stage, run=run, params=params, replicas=replicas, stream=stream)]
    if not first:
        stages.insert(0, StageSpec(name="feed", run="builtins:iter", target=lambda: iter(())))
    spec = PipelineSpec(name="p", stages=tuple(stages), base_dir=base_dir, path=Path(where))
    return shapes.resolve_stage(spec, len(stages) - 1)


# --- helpers -------------------------------------------------------------------------------

@pytest.fixture
def isolated_imports(monkeypatch):
    """Undo what import_target does to sys.path and sys.modules."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    importlib.invalidate_caches()
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]


@pytest.fixture
def module_dir(tmp_path, isolated_imports):
    """A folder like the one holding pipeline.toml; write(name, source) adds a module."""
    folder = tmp_path / "pipeline"
    folder.mkdir()

    def write(name: str, source: str) -> Path:
        path = folder / f"{name}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source), encoding="utf-8")
        importlib.invalidate_caches()
        return path

    write.folder = folder  # type: ignore[attr-defined]
    return write


class ListInputs(Inputs):
    """A stand-in for the runtime's Inbox: items from a list, batches of fixed size."""

    def __init__(self, items: list[Any], batch: int = 2):
        self.items = list(items)
        self.batch = batch

    def __next__(self) -> Any:
        if not self.items:
            raise StopIteration
        return self.items.pop(0)

    def batches(self) -> Iterator[list[Any]]:
        while self.items:
            chunk, self.items = self.items[: self.batch], self.items[self.batch:]
            yield chunk


def drive(target: Any, items: list[Any] | None, params: dict[str, Any] | None = None,
          first: bool = False, stream: bool | None = None, replica: int = 0,
          replicas: int = 1, batch: int = 2) -> list[Any]:
    """Resolve ``target`` like a stage, run it over ``items`` and return what it sent."""
    callee = shapes.resolve_target("st", target, params or {}, first, stream, replicas, WHERE)
    body = Body(callee, replica, replicas)
    sent: list[Any] = []
    body.setup()
    try:
        body.run(None if first else ListInputs(items or [], batch), sent.append)
    finally:
        body.teardown()
    return sent


# --- stage shapes used below ---------------------------------------------------------------

def numbers(count=3):
    yield from range(count)


def list_source(count=3):
    return list(range(count))


def square(x, offset=0):
    return x * x + offset


def evens(x):
    return x if x % 2 == 0 else None


def twice(x):
    yield x
    yield x


def total(items, start=0):
    yield sum(items, start)


def annotated_iterable(items: Iterable[int]):
    return [sum(items)]


def annotated_iterator(items: Iterator):
    return [len(list(items))]


def annotated_typing_iterable(items: typing.Iterable):
    return [max(items)]


def annotated_abc_iterable(items: collections.abc.Iterable[int], path: str = "x"):
    return [min(items)]


def annotated_list(items: list):
    return items


def no_annotation(items):
    return items


async def async_plain(x):
    return x


async def async_gen(x):
    yield x


class Doubler(zpipe.Stage):
    def __init__(self, factor=2):
        self.factor = factor

    def process(self, item):
        return item * self.factor


class PPStage(zpipe.Stage):
    def stage_run(self, x):
        return x + 100


class Counter(zpipe.Stage):
    def generate(self):
        yield from "abc"


class NoProcess(zpipe.Stage):
    pass


# --- classify ------------------------------------------------------------------------------

def test_first_stage_is_a_source():
    assert classify(numbers, True, None, WHERE) is Shape.SOURCE
    assert classify(list_source, True, None, WHERE) is Shape.SOURCE
    # even a function whose first parameter looks like a stream
    assert classify(annotated_iterable, True, None, WHERE) is Shape.SOURCE


@pytest.mark.parametrize("target", [square, evens, annotated_list, no_annotation, len])
def test_plain_functions(target):
    assert classify(target, False, None, WHERE) is Shape.PLAIN


@pytest.mark.parametrize("target", [twice, total, annotated_iterable, annotated_iterator,
                                    annotated_typing_iterable, annotated_abc_iterable])
def test_stream_functions(target):
    assert classify(target, False, None, WHERE) is Shape.STREAM


def test_stream_true_forces_stream():
    assert classify(square, False, True, WHERE) is Shape.STREAM
    assert classify(no_annotation, False, True, WHERE) is Shape.STREAM


def test_stream_false():
    assert classify(twice, False, False, WHERE) is Shape.FLATMAP
    assert classify(annotated_iterable, False, False, WHERE) is Shape.PLAIN
    assert classify(square, False, False, WHERE) is Shape.PLAIN


def test_string_annotations_under_future_import(module_dir):
    module_dir("future_mod", """\
        from __future__ import annotations
        import typing
        from typing import Iterable, Iterator
        import collections.abc

        def iterable(items: Iterable[int]): ...
        def iterator(items: Iterator[str], path: str = ""): ...
        def typing_iterable(items: typing.Iterable[int]): ...
        def abc_iterator(items: collections.abc.Iterator): ...
        def unresolved(items: Iterable[int], other: NotDefinedAnywhere = None): ...
        def plain(item: int, path: str = ""): ...
        def plain_list(item: list[int]): ...
        """)
    module = shapes.import_target("future_mod:plain", module_dir.folder, WHERE).__module__
    mod = sys.modules[module]
    for name in ["iterable", "iterator", "typing_iterable", "abc_iterator", "unresolved"]:
        assert classify(getattr(mod, name), False, None, WHERE) is Shape.STREAM, name
    for name in ["plain", "plain_list"]:
        assert classify(getattr(mod, name), False, None, WHERE) is Shape.PLAIN, name


def test_stage_subclass_is_class():
    assert classify(Doubler, False, None, WHERE) is Shape.CLASS
    assert classify(Doubler, False, False, WHERE) is Shape.CLASS


def test_parallelpipe_stage_run_is_accepted():
    assert classify(PPStage, False, None, WHERE) is Shape.CLASS


def test_stage_subclass_without_process_rejected():
    with pytest.raises(ConfigError, match=r"stage 'st'.*process"):
        classify(NoProcess, False, None, WHERE)


def test_stage_subclass_with_stream_rejected():
    with pytest.raises(ConfigError, match=r"stage 'st'.*field 'stream'"):
        classify(Doubler, False, True, WHERE)


def test_stage_subclass_as_source_needs_generate():
    assert classify(Counter, True, None, WHERE) is Shape.SOURCE_CLASS
    with pytest.raises(ConfigError, match=r"stage 'st'.*Doubler.*generate"):
        classify(Doubler, True, None, WHERE)


@pytest.mark.parametrize("target", [async_plain, async_gen])
@pytest.mark.parametrize("first", [True, False])
def test_async_rejected_where_no_event_loop_runs_it(target, first):
    with pytest.raises(ConfigError, match=r"stage 'st'.*async"):
        classify(target, first, None, WHERE)


def test_an_async_def_after_the_first_stage_is_a_plain_function_on_a_loop():
    # resolve_stage allows it: its replicas run it on an event loop (concurrency.py).
    assert classify(async_plain, False, None, WHERE, allow_async=True) is Shape.PLAIN
    for first, target, stream in [(True, async_plain, None), (False, async_gen, None),
                                  (False, async_plain, True)]:
        with pytest.raises(ConfigError, match="never a source"):
            classify(target, first, stream, WHERE, allow_async=True)


# --- check_params --------------------------------------------------------------------------

def test_check_params_accepts_fitting_params():
    shapes.check_params(square, Shape.PLAIN, {"offset": 1}, WHERE)
    shapes.check_params(square, Shape.PLAIN, {}, WHERE)
    shapes.check_params(numbers, Shape.SOURCE, {"count": 5}, WHERE)
    shapes.check_params(total, Shape.STREAM, {"start": 5}, WHERE)
    shapes.check_params(Doubler, Shape.CLASS, {"factor": 3}, WHERE)
    shapes.check_params(len, Shape.PLAIN, {}, WHERE)


@pytest.mark.parametrize("target, shape, params, word", [
    (square, Shape.PLAIN, {"offst": 1}, "offst"),
    (numbers, Shape.SOURCE, {"cnt": 1}, "cnt"),
    (total, Shape.STREAM, {"begin": 1}, "begin"),
    (twice, Shape.FLATMAP, {"n": 1}, "n"),
    (Doubler, Shape.CLASS, {"factr": 3}, "factr"),
    (PPStage, Shape.CLASS, {"x": 1}, "x"),
])
def test_check_params_unexpected(target, shape, params, word):
    with pytest.raises(ConfigError) as info:
        shapes.check_params(target, shape, params, WHERE)
    message = str(info.value)
    assert "stage 'st'" in message
    assert "field 'params'" in message
    assert word in message


def test_check_params_missing():
    def needs(item, *, path):
        return item

    with pytest.raises(ConfigError) as info:
        shapes.check_params(needs, Shape.PLAIN, {}, WHERE)
    message = str(info.value)
    assert "stage 'st'" in message and "field 'params'" in message and "path" in message


def test_check_params_function_taking_no_item():
    def nothing():
        return 1

    with pytest.raises(ConfigError, match="field 'params'"):
        shapes.check_params(nothing, Shape.PLAIN, {}, WHERE)


# --- import_target / resolve ---------------------------------------------------------------

def test_resolve_from_base_dir(module_dir):
    module_dir("team_stages", """\
        def double(x, factor=2):
            return x * factor

        class Holder:
            @staticmethod
            def inner(x):
                return x
        """)
    callee = resolve("double", "team_stages:double", {"factor": 3}, False, None, 1,
                            module_dir.folder, "pipeline.toml")
    assert isinstance(callee, Callee)
    assert callee.shape is Shape.PLAIN
    assert callee.params == {"factor": 3}
    assert callee.target(2, **callee.params) == 6
    assert callee.describe() == "double (plain function)"
    inner = shapes.import_target("team_stages:Holder.inner", module_dir.folder, WHERE)
    assert inner(5) == 5


def test_base_dir_comes_before_sys_path(module_dir, tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "dup_mod.py").write_text("WHO = 'elsewhere'\ndef f(x): return 'elsewhere'\n")
    sys.path.insert(0, str(other))
    module_dir("dup_mod", "def f(x): return 'base'\n")
    target = shapes.import_target("dup_mod:f", module_dir.folder, WHERE)
    assert target(0) == "base"


def test_base_dir_first_even_when_already_on_sys_path(module_dir, tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "dup_mod2.py").write_text("def f(x): return 'elsewhere'\n")
    sys.path.insert(0, str(other))
    sys.path.append(str(module_dir.folder))
    module_dir("dup_mod2", "def f(x): return 'base'\n")
    assert shapes.import_target("dup_mod2:f", module_dir.folder, WHERE)(0) == "base"


def test_package_module_in_base_dir(module_dir):
    module_dir("pkg/__init__", "")
    module_dir("pkg/sub", "def f(x): return -x\n")
    assert shapes.import_target("pkg.sub:f", module_dir.folder, WHERE)(3) == -3


def test_falls_back_to_sys_path(module_dir):
    assert shapes.import_target("json:dumps", module_dir.folder, WHERE) is __import__("json").dumps


def test_missing_module(module_dir):
    with pytest.raises(ConfigError) as info:
        resolve("st", "no_such_module_xyz:f", {}, False, None, 1, module_dir.folder,
                       "pipeline.toml")
    message = str(info.value)
    assert "stage 'st'" in message and "field 'run'" in message
    assert "no_such_module_xyz" in message


def test_missing_submodule(module_dir):
    module_dir("pkg2/__init__", "")
    with pytest.raises(ConfigError, match=r"field 'run'.*pkg2\.nope"):
        shapes.import_target("pkg2.nope:f", module_dir.folder, WHERE)


def test_module_failing_to_import(module_dir):
    module_dir("broken", "raise RuntimeError('boom at import')\n")
    with pytest.raises(ConfigError, match=r"stage 'st'.*field 'run'.*RuntimeError.*boom"):
        shapes.import_target("broken:f", module_dir.folder, WHERE)


def test_module_importing_something_missing(module_dir):
    module_dir("needs_dep", "import dependency_that_is_absent_q\n")
    with pytest.raises(ConfigError, match="dependency_that_is_absent_q"):
        shapes.import_target("needs_dep:f", module_dir.folder, WHERE)


def test_missing_attribute(module_dir):
    module_dir("has_some", "def present(x): return x\n")
    with pytest.raises(ConfigError) as info:
        shapes.import_target("has_some:absent", module_dir.folder, WHERE)
    message = str(info.value)
    assert "stage 'st'" in message and "field 'run'" in message
    assert "'absent'" in message and "has_some" in message


def test_missing_nested_attribute(module_dir):
    module_dir("has_cls", "class C:\n    pass\n")
    with pytest.raises(ConfigError, match=r"field 'run'.*C\.missing"):
        shapes.import_target("has_cls:C.missing", module_dir.folder, WHERE)


def test_attribute_not_callable(module_dir):
    module_dir("has_const", "LIMIT = 3\n")
    with pytest.raises(ConfigError, match=r"stage 'st'.*field 'run'.*int.*not a function"):
        shapes.import_target("has_const:LIMIT", module_dir.folder, WHERE)


@pytest.mark.parametrize("name", ["json", "csv"])
def test_local_module_shadowing_loaded_module(module_dir, name):
    importlib.import_module(name)
    module_dir(name, "def f(x): return x\n")
    with pytest.raises(ConfigError) as info:
        shapes.import_target(f"{name}:f", module_dir.folder, WHERE)
    message = str(info.value)
    assert "stage 'st'" in message and "field 'run'" in message
    assert repr(name) in message and "rename" in message


def test_local_module_imported_twice_is_fine(module_dir):
    module_dir("twice_mod", "def f(x): return x\ndef g(x): return x\n")
    shapes.import_target("twice_mod:f", module_dir.folder, WHERE)
    assert shapes.import_target("twice_mod:g", module_dir.folder, WHERE)(1) == 1


def test_resolve_checks_params(module_dir):
    module_dir("p_mod", "def f(x, scale=1): return x * scale\n")
    with pytest.raises(ConfigError, match=r"stage 'st'.*field 'params'.*scal"):
        resolve("st", "p_mod:f", {"scal": 2}, False, None, 1, module_dir.folder,
                       "pipeline.toml")


def test_resolve_without_base_dir(isolated_imports):
    callee = resolve("st", "json:dumps", {}, False, None, 1, None, "p")
    assert callee.shape is Shape.PLAIN



# --- whatever a module does on import, a ConfigError naming it (but Ctrl-C) -----------------

@pytest.mark.parametrize("code, shown", [("5", "sys.exit(5)"), ("'bye'", "sys.exit('bye')"),
                                          ("", "sys.exit(None)")])
def test_module_calling_sys_exit_on_import(module_dir, code, shown):
    module_dir("exits_mod", f"import sys\nsys.exit({code})\n")
    with pytest.raises(ConfigError) as info:
        shapes.import_target("exits_mod:f", module_dir.folder, WHERE)
    message = str(info.value)
    assert "stage 'st'" in message and "field 'run'" in message
    assert "module 'exits_mod'" in message and shown in message
    assert "exits_mod" not in sys.modules  # the failed import left nothing behind


def test_module_raising_a_base_exception_on_import(module_dir):
    module_dir("base_exc_mod", "class Odd(BaseException):\n    pass\nraise Odd('strange')\n")
    with pytest.raises(ConfigError, match=r"stage 'st'.*importing 'base_exc_mod' failed: "
                                          r"Odd: strange"):
        shapes.import_target("base_exc_mod:f", module_dir.folder, WHERE)


def test_ctrl_c_during_import_is_not_a_config_error(module_dir):
    module_dir("interrupted_mod", "raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        shapes.import_target("interrupted_mod:f", module_dir.folder, WHERE)


def test_import_timeout_passes_through(module_dir):
    # preflight.time_limit raises it inside a blocked import and reports it itself.
    module_dir("timed_out_mod", "from zpipe.replica.shapes import ImportTimeout\n"
                                "raise ImportTimeout('late')\n")
    with pytest.raises(shapes.ImportTimeout):
        shapes.import_target("timed_out_mod:f", module_dir.folder, WHERE)


def test_module_getattr_raising(module_dir):
    module_dir("lazy_mod", "def __getattr__(name):\n    raise RuntimeError('no ' + name)\n")
    with pytest.raises(ConfigError, match=r"field 'run': reading 'f' of module 'lazy_mod' "
                                          r"failed: RuntimeError: no f"):
        shapes.import_target("lazy_mod:f", module_dir.folder, WHERE)


# --- source replicas -----------------------------------------------------------------------

def sharded(replica, replicas, count=10):
    yield from range(replica, count, replicas)


def test_source_with_replicas_rejected_without_sharding():
    with pytest.raises(ConfigError) as info:
        shapes.resolve_target("st", numbers, {}, True, None, 2, WHERE)
    message = str(info.value)
    assert "stage 'st'" in message and "field 'replicas'" in message
    assert "replica" in message


def test_source_with_replicas_accepted_with_sharding():
    callee = shapes.resolve_target("st", sharded, {"count": 7}, True, None, 3, WHERE)
    assert callee.shape is Shape.SOURCE
    outputs = [drive(sharded, None, {"count": 7}, first=True, replica=r, replicas=3)
               for r in range(3)]
    assert outputs == [[0, 3, 6], [1, 4], [2, 5]]


def test_sharding_source_with_replicas_params_wrong_rejected():
    with pytest.raises(ConfigError, match="field 'params'"):
        shapes.resolve_target("st", sharded, {"cont": 7}, True, None, 2, WHERE)


def test_sharding_source_with_one_replica():
    assert drive(sharded, None, {"count": 3}, first=True) == [0, 1, 2]


def test_source_class_with_replicas_rejected():
    with pytest.raises(ConfigError, match="field 'replicas'"):
        shapes.resolve_target("st", Counter, {}, True, None, 2, WHERE)


# --- Body.run ------------------------------------------------------------------------------

def test_run_source_generator_and_iterable():
    assert drive(numbers, None, {"count": 4}, first=True) == [0, 1, 2, 3]
    assert drive(list_source, None, {}, first=True) == [0, 1, 2]


def test_run_source_returning_non_iterable_fails():
    def bad():
        return 5

    with pytest.raises(TypeError, match=r"stage 'st'.*int.*not an iterable"):
        drive(bad, None, first=True)


def test_run_source_closes_generator_on_send_failure():
    closed = []

    def gen():
        try:
            yield 1
            yield 2
        finally:
            closed.append(True)

    callee = shapes.resolve_target("st", gen, {}, True, None, 1, WHERE)

    def send(item):
        raise RuntimeError("downstream broke")

    with pytest.raises(RuntimeError):
        Body(callee).run(None, send)
    assert closed == [True]


def test_run_plain():
    assert drive(square, [1, 2, 3], {"offset": 1}) == [2, 5, 10]


def test_run_plain_none_filters():
    assert drive(evens, [1, 2, 3, 4, 0]) == [2, 4, 0]


def test_run_plain_falsy_values_are_sent():
    assert drive(lambda x: x, [0, "", [], False]) == [0, "", [], False]


def test_run_flatmap():
    assert drive(twice, [1, 2], stream=False) == [1, 1, 2, 2]


def test_run_stream_generator():
    assert drive(total, [1, 2, 3], {"start": 10}) == [16]


def test_run_stream_returning_iterable_or_none():
    assert drive(annotated_iterator, list("abcd")) == [4]
    seen = []

    def sink(items: Iterable[int]):
        seen.extend(items)

    assert drive(sink, [1, 2]) == []
    assert seen == [1, 2]


def test_run_stream_forced():
    def batch(items):
        items = list(items)
        return [items[i:i + 2] for i in range(0, len(items), 2)]

    assert drive(batch, [1, 2, 3, 4, 5], stream=True) == [[1, 2], [3, 4], [5]]


def test_run_class_and_stage_run():
    assert drive(Doubler, [1, 2], {"factor": 5}) == [5, 10]
    assert drive(PPStage, [1, 2]) == [101, 102]


def test_run_source_class():
    assert drive(Counter, None, first=True) == ["a", "b", "c"]


class Recorder(zpipe.Stage):
    log: list[str] = []

    def __init__(self, fail_on=None, get_all=False):
        self.fail_on = fail_on
        if get_all:
            self.set_get_all()
        Recorder.log.append("init")

    def setup(self):
        Recorder.log.append("setup")

    def process(self, item):
        Recorder.log.append(f"process {item}")
        if item == self.fail_on:
            raise ValueError(f"bad item {item}")
        return item if item != 0 else None

    def teardown(self):
        Recorder.log.append("teardown")


@pytest.fixture
def recorder():
    Recorder.log = []
    return Recorder.log


def test_class_lifecycle_order(recorder):
    assert drive(Recorder, [1, 0, 2]) == [1, 2]
    assert recorder == ["init", "setup", "process 1", "process 0", "process 2", "teardown"]


def test_class_teardown_after_exception(recorder):
    with pytest.raises(ValueError, match="bad item 2"):
        drive(Recorder, [1, 2, 3], {"fail_on": 2})
    assert recorder == ["init", "setup", "process 1", "process 2", "teardown"]


def test_teardown_runs_once():
    callee = shapes.resolve_target("st", Recorder, {}, False, None, 1, WHERE)
    Recorder.log = []
    body = Body(callee)
    body.setup()
    body.teardown()
    body.teardown()
    assert Recorder.log == ["init", "setup", "teardown"]


def test_teardown_without_setup_is_harmless():
    callee = shapes.resolve_target("st", Recorder, {}, False, None, 1, WHERE)
    Body(callee).teardown()


def test_class_set_get_all_uses_batches(recorder):
    sent = drive(Recorder, [1, 2, 3, 4, 5], {"get_all": True}, batch=2)
    assert sent == [[1, 2], [3, 4], [5]]
    assert recorder == ["init", "setup", "process [1, 2]", "process [3, 4]", "process [5]",
                        "teardown"]


def test_set_get_single_returns_to_items():
    class Toggle(zpipe.Stage):
        def setup(self):
            self.set_get_all()
            self.set_get_single()

        def process(self, item):
            return [item]

    assert drive(Toggle, [1, 2]) == [[1], [2]]


def test_function_shapes_do_not_set_up_instances():
    callee = shapes.resolve_target("st", square, {}, False, None, 1, WHERE)
    body = Body(callee)
    body.setup()
    assert body.instance is None
    body.teardown()
