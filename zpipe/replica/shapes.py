"""What a stage's ``run`` names, which shape it has, and how it is driven.

Shapes (see README): a source ``f(**params)`` returning an iterable; a plain
function ``f(item, **params)``; a stream function ``f(items, **params)``
yielding outputs; a ``zpipe.Stage`` subclass built as ``Cls(**params)``.
"""

from __future__ import annotations

import collections.abc
import contextlib
import enum
import functools
import importlib
import importlib.machinery
import inspect
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sized

from ..errors import ConfigError

if typing.TYPE_CHECKING:
    from ..config import PipelineSpec
    from .batching import Batching
    from .itempolicy import ItemErrors, Policy
    from .runs import Runs
from ..api.stage import Stage


class Shape(enum.Enum):
    SOURCE = "source"
    PLAIN = "plain function"
    FLATMAP = "plain generator (one call per item, every yield sent)"
    STREAM = "stream function"
    CLASS = "class"
    SOURCE_CLASS = "source class"


@dataclass(frozen=True)
class Callee:
    """A resolved stage: the target, its shape and the keyword arguments to call it with."""

    stage: str
    target: Any
    shape: Shape
    params: dict[str, Any]
    # on_error, max_errors, item_timeout (itempolicy.py); None: a failed item fails the stage.
    policy: "Policy | None" = None
    # How its replicas drive it (README: "Batches, latest frames, concurrency"):
    # lists of waiting items (batching.py); only the newest input, calls off the
    # main thread, several at once, an async def on an event loop (concurrency.py).
    batch: "Batching | None" = None
    latest: bool = False
    concurrency: int = 1
    asynchronous: bool = False
    ordered: bool = False  # outputs in input order (concurrency > 1 keeps to it by itself)

    @property
    def driven(self) -> bool:
        """Whether its calls run off the replica's main thread (concurrency.Driver)."""
        return self.latest or self.concurrency > 1 or self.asynchronous

    def describe(self) -> str:
        name = getattr(self.target, "__qualname__", type(self.target).__name__)
        how = [self.shape.value]
        if self.asynchronous:
            how.append("async")
        if self.batch is not None:
            how.append(f"lists of up to {self.batch.max_items} items, waiting up to "
                       f"{self.batch.max_wait_ms:g} ms")
        if self.latest:
            how.append("the newest input only")
        if self.concurrency > 1:
            how.append(f"{self.concurrency} calls at once")
        return f"{name} ({', '.join(how)})"


class ImportTimeout(BaseException):
    """Raised inside a stage module's import when it overran its time (see zpipe.preflight).

    A BaseException, so that the module's own ``except Exception`` does not
    swallow it, and import_target lets it through rather than calling it the
    module's failure.
    """


def import_target(run: str, base_dir: Path | None, where: str) -> Any:
    """Import ``module:attribute``, the module looked up first in ``base_dir``.

    Whatever the module does on import, other than Ctrl-C, ends as a
    ConfigError naming the module: an exception, and also ``sys.exit(N)``
    (SystemExit), which would otherwise end the caller without a word.
    """
    module_name, _, attr_path = run.partition(":")
    try:
        if base_dir is not None:
            base = str(base_dir)
            if sys.path[:1] != [base]:
                if base in sys.path:
                    sys.path.remove(base)
                sys.path.insert(0, base)
            top = module_name.split(".")[0]
            local = importlib.machinery.PathFinder.find_spec(top, [base])
            loaded = sys.modules.get(top)
            if local is not None and loaded is not None and \
                    local.origin != getattr(loaded, "__file__", None):
                raise ConfigError(f"{where}: field 'run': module {top!r} in {base} has the name "
                                  f"of a module Python has already loaded from elsewhere; "
                                  f"rename it")
        module = importlib.import_module(module_name)
    except (ConfigError, KeyboardInterrupt, ImportTimeout):
        raise
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigError(f"{where}: field 'run': no module named {exc.name!r} "
                              f"(looked in {base_dir or 'sys.path'} and sys.path)") from None
        raise ConfigError(f"{where}: field 'run': importing {module_name!r} failed: "
                          f"ModuleNotFoundError: {exc}") from exc
    except SystemExit as exc:
        raise ConfigError(f"{where}: field 'run': importing module {module_name!r} failed: "
                          f"it called sys.exit({exc.code!r})") from None
    except BaseException as exc:  # noqa: BLE001 - anything a module may raise (GeneratorExit...)
        raise ConfigError(f"{where}: field 'run': importing {module_name!r} failed: "
                          f"{type(exc).__name__}: {exc}") from exc
    target: Any = module
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(f"{where}: field 'run': module {module_name!r} has no attribute "
                              f"{attr_path!r}") from None
        except Exception as exc:  # noqa: BLE001 - a module __getattr__ or property may raise
            raise ConfigError(f"{where}: field 'run': reading {attr_path!r} of module "
                              f"{module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    if not callable(target):
        raise ConfigError(f"{where}: field 'run': {run!r} is a {type(target).__name__}, "
                          f"not a function or class")
    return target


def classify(target: Any, first: bool, stream: bool | None, where: str,
             allow_async: bool = False) -> Shape:
    """Decide how a stage is called from what it is and where it sits.

    An ``async def`` is a plain function for a stage after the first when
    ``allow_async`` (resolve_stage: its replicas run it on an event loop,
    concurrency.py); an async generator, or an async source, never is.
    """
    if inspect.isasyncgenfunction(target) or (inspect.iscoroutinefunction(target) and (
            first or not allow_async or stream)):
        raise ConfigError(f"{where}: async functions are not supported here; an async def "
                          f"may be a plain function after the first stage (one call per "
                          f"item, on an event loop: see 'concurrency'), never a source, a "
                          f"stream function or an async generator")
    if inspect.iscoroutinefunction(target):
        return Shape.PLAIN
    stage_class = target if inspect.isclass(target) else type(target)
    if isinstance(target, Stage) or (inspect.isclass(target) and issubclass(target, Stage)):
        target = stage_class
        if stream:
            raise ConfigError(f"{where}: field 'stream': a zpipe.Stage class takes items one "
                              f"by one (or as lists after set_get_all()); drop 'stream'")
        if first:
            if target.generate is Stage.generate:
                raise ConfigError(f"{where}: {target.__name__} is the first stage, so it must "
                                  f"define generate(self) yielding items")
            return Shape.SOURCE_CLASS
        if target.process is Stage.process and target.stage_run is Stage.stage_run:
            raise ConfigError(f"{where}: {target.__name__} must define process(self, item)")
        return Shape.CLASS
    if first:
        return Shape.SOURCE
    if stream is True:
        return Shape.STREAM
    if stream is False:
        return Shape.FLATMAP if inspect.isgeneratorfunction(target) else Shape.PLAIN
    if inspect.isgeneratorfunction(target) or _first_param_is_iterable(target):
        return Shape.STREAM
    return Shape.PLAIN


_ITERABLE_TYPES = (collections.abc.Iterable, collections.abc.Iterator,
                   collections.abc.Generator, typing.Iterable, typing.Iterator, typing.Generator)
_ITERABLE_TEXT = re.compile(r"^(?:typing\.|t\.|abc\.|collections\.abc\.)?(?:Iterable|Iterator|Generator)\b")


def _first_param_is_iterable(target: Any) -> bool:
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return False
    if not params or params[0].annotation is inspect.Parameter.empty:
        return False
    annotation = params[0].annotation
    if isinstance(annotation, str):
        try:
            annotation = typing.get_type_hints(target).get(params[0].name, annotation)
        except Exception:
            return bool(_ITERABLE_TEXT.match(annotation))
        if isinstance(annotation, str):
            return bool(_ITERABLE_TEXT.match(annotation))
    origin = typing.get_origin(annotation) or annotation
    return origin in _ITERABLE_TYPES


def source_accepts_sharding(target: Any) -> bool:
    """True when a source takes ``replica`` and ``replicas`` to split its work itself."""
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    return "replica" in params and "replicas" in params


def check_params(target: Any, shape: Shape, params: dict[str, Any], where: str,
                 extra: dict[str, Any] | None = None) -> None:
    """Fail unless ``params`` fit the callable's signature for its shape."""
    if isinstance(target, Stage):
        if params:
            raise ConfigError(f"{where}: field 'params': {type(target).__name__} is already an "
                              f"instance; pass its arguments when you build it")
        return
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return  # builtins without a signature: let the call itself decide
    kwargs = {**params, **(extra or {})}
    try:
        if shape in (Shape.SOURCE, Shape.CLASS, Shape.SOURCE_CLASS):
            signature.bind(**kwargs)
        else:
            signature.bind(object(), **kwargs)
    except TypeError as exc:
        name = getattr(target, "__name__", repr(target))
        given = ", ".join(sorted(params)) or "none"
        raise ConfigError(f"{where}: field 'params' does not fit {name}{signature}: {exc} "
                          f"(params given: {given})") from None


def resolve_spec(spec: "PipelineSpec") -> list[Callee]:
    """Import (or take), classify and check every stage of a pipeline; raises ConfigError."""
    callees = [resolve_stage(spec, index) for index in range(len(spec.stages))]
    check_types(spec, callees)
    return callees


def resolve_stage(spec: "PipelineSpec", index: int) -> Callee:
    """Import (or take), classify and check one stage: what its replicas call."""
    stage = spec.stages[index]
    where = f"{spec.where}: stage {stage.name!r}"
    target = stage.target if stage.target is not None else \
        import_target(stage.run, spec.base_dir, where)
    callee = resolve_target(stage.name, target, stage.params, index == 0, stage.stream,
                            stage.replicas, where, allow_async=True)
    if stage.ordered and callee.shape is Shape.STREAM:
        raise ConfigError(f"{where}: field 'ordered': a stream function's outputs cannot be "
                          f"matched to its inputs; use a plain function or a zpipe.Stage")
    return _with_execution(spec, index, _with_policy(spec, index, callee, where), where)


def is_async(callee: Callee) -> bool:
    """Whether the stage's call is an ``async def`` (a function, or a Stage's process)."""
    target = callee.target
    if callee.shape is Shape.CLASS:
        process = getattr(target if inspect.isclass(target) else type(target), "process", None)
        return inspect.iscoroutinefunction(process)
    return inspect.iscoroutinefunction(target)


def _with_execution(spec: "PipelineSpec", index: int, callee: Callee, where: str) -> Callee:
    """The callee with how its replicas drive it: batch, input, concurrency; the
    combinations that cannot work refused here, before anything starts."""
    stage = spec.stages[index]
    batch = getattr(stage, "batch", None)
    latest = getattr(stage, "input", "all") == "latest"
    concurrency = getattr(stage, "concurrency", 1) or 1
    asynchronous = is_async(callee)
    if batch is None and not latest and concurrency == 1 and not asynchronous:
        return callee if not stage.ordered else _replace(callee, ordered=True)
    shape = callee.shape
    what = {Shape.SOURCE: "a source", Shape.SOURCE_CLASS: "a source",
            Shape.STREAM: "a stream function", Shape.FLATMAP: "a plain generator"}.get(shape)
    if batch is not None:
        if shape not in (Shape.PLAIN, Shape.CLASS):
            why = ("has no input items" if shape in (Shape.SOURCE, Shape.SOURCE_CLASS) else
                   "takes its items itself (batch them in the function)"
                   if shape is Shape.STREAM else
                   "yields any number of outputs per item, so a list of outputs cannot be "
                   "matched to the list of inputs")
            raise ConfigError(f"{where}: field 'batch': {what} {why}; 'batch' is for a plain "
                              f"function or a zpipe.Stage, called with a list of items and "
                              f"returning a list of as many outputs")
        if asynchronous:
            raise ConfigError(f"{where}: field 'batch': the callable is an async def; a "
                              f"batched call runs on the replica's main thread: make it a "
                              f"plain def, or drop 'batch' and use 'concurrency'")
        if latest:
            raise ConfigError(f"{where}: fields 'batch' and 'input = \"latest\"' together: "
                              f"'latest' hands each call the newest item only; choose one")
    for field, wanted in (("input", latest), ("concurrency", concurrency > 1)):
        if wanted and shape not in (Shape.PLAIN, Shape.CLASS, Shape.FLATMAP):
            why = ("has no input items" if shape in (Shape.SOURCE, Shape.SOURCE_CLASS) else
                   "takes its items itself, in one call, so they cannot be handed to it one "
                   "by one")
            raise ConfigError(f"{where}: field {field!r}: {what} {why}; it is for a plain "
                              f"function, a plain generator or a zpipe.Stage")
    if latest and spec.leased(index) and stage.hwm < concurrency + 2:
        # Its sender keeps each message until it is finished: the ones in the calls
        # and the newest waiting; with no room for one more it would wait.
        raise ConfigError(f"{where}: field 'hwm': input = \"latest\" on a link that keeps "
                          f"each message until it is finished (restart or replicas) needs "
                          f"hwm >= {concurrency + 2} (the calls' items, the newest waiting, "
                          f"one on its way), or its upstream would wait for its calls "
                          f"(got hwm = {stage.hwm})")
    policy = callee.policy
    if policy is not None and policy.item_timeout is not None and (
            concurrency > 1 or asynchronous):
        raise ConfigError(f"{where}: field 'item_timeout': "
                          + ("an async def's calls share one event loop, so one that is stuck "
                             "cannot be interrupted alone" if asynchronous else
                             f"it watches one call at a time, and concurrency = {concurrency} "
                             f"runs several")
                          + "; bound the call yourself (asyncio.wait_for, a timeout of the "
                            "library you call) or drop 'item_timeout'")
    return _replace(callee, batch=batch, latest=latest, concurrency=concurrency,
                    asynchronous=asynchronous, ordered=stage.ordered)


def _replace(callee: Callee, **changes: Any) -> Callee:
    from dataclasses import replace
    return replace(callee, **changes)


def _with_policy(spec: "PipelineSpec", index: int, callee: Callee, where: str) -> Callee:
    """The callee with its stage's per-item policy, where items can be told apart."""
    stage = spec.stages[index]
    if stage.on_error == "fail" and stage.item_timeout is None:
        return callee
    field = "on_error" if stage.on_error != "fail" else "item_timeout"
    if callee.shape in (Shape.SOURCE, Shape.SOURCE_CLASS):
        raise ConfigError(f"{where}: field {field!r}: the first stage has no input items, so "
                          f"its exceptions cannot be per item (they fail the run); drop it")
    if callee.shape is Shape.STREAM:
        raise ConfigError(f"{where}: field {field!r}: a stream function gets all its items in "
                          f"one call, so an exception (or a stuck call) cannot be told to "
                          f"belong to one item; make it a plain function (stream = false), "
                          f"or a zpipe.Stage, or drop {field!r}")
    from dataclasses import replace

    from .itempolicy import Policy
    letters = None
    if stage.on_error == "dead-letter":
        from ..config import DEFAULT_DEAD_LETTERS
        from .deadletters import path_for
        letters = path_for(spec.dead_letters or (spec.base_dir or Path.cwd()) /
                           DEFAULT_DEAD_LETTERS, stage.name)
    return replace(callee, policy=Policy(stage.on_error, stage.max_errors, stage.item_timeout,
                                         letters))


def resolve_target(stage_name: str, target: Any, params: dict[str, Any], first: bool,
                   stream: bool | None, replicas: int, where: str,
                   allow_async: bool = False) -> Callee:
    shape = classify(target, first, stream, where, allow_async)
    extra = None
    if shape in (Shape.SOURCE, Shape.SOURCE_CLASS) and (
            replicas > 1 or source_accepts_sharding(target)):
        if not source_accepts_sharding(target):
            raise ConfigError(f"{where}: field 'replicas': a first stage with {replicas} "
                              f"replicas would produce every item {replicas} times; give the "
                              f"function 'replica' and 'replicas' parameters to split the work, "
                              f"or use replicas = 1")
        extra = {"replica": 0, "replicas": replicas}
    check_params(target, shape, params, where, extra)
    return Callee(stage=stage_name, target=target, shape=shape, params=dict(params))


class Body:
    """A stage ready to run in its replica: ``setup()``, ``run(inputs, send)``, ``teardown()``.

    The runtime sends READY between ``setup`` and ``run``, so a model that loads
    in ``setup`` is loaded before the source begins.
    """

    def __init__(self, callee: Callee, replica: int = 0, replicas: int = 1):
        self.callee = callee
        self.replica = replica
        self.replicas = replicas
        self.instance: Any = None
        # Failed and stuck items (itempolicy.py), for a stage with on_error or item_timeout.
        self.errors: "ItemErrors | None" = None
        if callee.policy is not None and callee.policy.active:
            from .itempolicy import ItemErrors
            self.errors = ItemErrors(callee.policy, callee.stage, replica)
        # A source's count of items, when what it returns has a len() (the live view).
        self.on_total: Callable[[int], None] | None = None

    def setup(self) -> None:
        if self.callee.shape in (Shape.CLASS, Shape.SOURCE_CLASS):
            target = self.callee.target
            self.instance = target if isinstance(target, Stage) else target(**self._params())
            self.instance.setup()

    def _params(self) -> dict[str, Any]:
        """The params, plus replica and replicas for a source that splits its work."""
        params = self.callee.params
        if self.callee.shape in (Shape.SOURCE, Shape.SOURCE_CLASS) and \
                source_accepts_sharding(self.callee.target):
            params = {**params, "replica": self.replica, "replicas": self.replicas}
        return params

    def teardown(self) -> None:
        if self.instance is not None:
            instance, self.instance = self.instance, None
            instance.teardown()

    def process(self) -> Callable[[Any], Any]:
        """What is called per item (or per list): ``process`` of the Stage, or the
        function with its params."""
        if self.callee.shape is Shape.CLASS:
            return self.instance.process
        target, params = self.callee.target, self.callee.params
        return functools.partial(target, **params) if params else target

    def run(self, inputs: "Inputs | None", send: Callable[[Any], None],
            end_input: Callable[[], None] | None = None,
            runs: Runs | None = None) -> None:
        """Feed the body its inputs until they end; pass every output to ``send``.

        ``end_input``, if given, is called once each input item has been fully
        handled (an ``ordered`` stage closes that item's outputs with it).
        ``runs``, if given, carries a source's outputs or a map stage's items
        faster (runs.py), until it hands the rest back to the loops here.
        """
        callee = self.callee
        target, params, shape = callee.target, callee.params, callee.shape
        if shape is Shape.SOURCE or shape is Shape.SOURCE_CLASS:
            outputs = target(**self._params()) if shape is Shape.SOURCE else \
                self.instance.generate()
            if self.on_total is not None and isinstance(outputs, Sized):
                with contextlib.suppress(Exception):  # a len() that fails says nothing
                    self.on_total(len(outputs))
            _send_all(outputs, send, callee, runs)
        elif shape is Shape.STREAM:
            assert inputs is not None
            result = target(inputs, **params)
            if result is not None:
                _send_all(result, send, callee)
        elif callee.batch is not None:  # lists of waiting items, a list of outputs back
            from .batching import BatchRunner
            BatchRunner(self, inputs, send, end_input).run()
        elif callee.driven:  # calls off the main thread: latest, concurrency, async def
            from .concurrency import Driver
            Driver(self, inputs, send, end_input).run()
        else:
            assert inputs is not None
            if shape is Shape.CLASS:
                process = self.instance.process
                items = inputs.batches() if self.instance.get_all else inputs
            else:
                process = (lambda item: target(item, **params)) if params else target  # noqa: E731
                items = inputs
            if self.errors is not None:  # each call guarded, item by item
                self.errors.run(items, process, send, end_input, shape is Shape.FLATMAP)
                return
            if shape is not Shape.FLATMAP and end_input is None:
                if runs is not None and items is inputs and runs.map(process):
                    return
                for item in items:  # the usual case, every item: kept to the bare loop
                    out = process(item)
                    if out is not None:
                        send(out)
                return
            flat = shape is Shape.FLATMAP
            for item in items:
                out = process(item)
                if flat:
                    _send_all(out, send, callee)
                elif out is not None:
                    send(out)
                if end_input is not None:
                    end_input()


def _send_all(outputs: Any, send: Callable[[Any], None], callee: Callee,
              runs: Runs | None = None) -> None:
    if not isinstance(outputs, Iterable):
        raise TypeError(f"stage {callee.stage!r}: {callee.describe()} returned "
                        f"{type(outputs).__name__}, not an iterable of items")
    try:
        each = iter(outputs)
        if runs is not None and runs.source(each):
            return
        for out in each:
            send(out)
    finally:
        close = getattr(outputs, "close", None)
        if close is not None:
            close()


class Inputs(Iterator[Any]):
    """What a stage body iterates over; the runtime provides the implementation."""

    def batches(self, limit: int | None = None, wait: float = 0.0) -> Iterator[list[Any]]:
        """Lists of the items waiting (at least one): every one (set_get_all), or at
        most ``limit``, waiting up to ``wait`` seconds for more (batch = {...})."""
        raise NotImplementedError


# -- runtime type checks of adjacent stages (pipeline-lib's rule) ---------------


def _annotation(target: Any, which: str) -> Any:
    """A callable's first-parameter ("input") or return ("output") annotation, or None."""
    function = target.process if inspect.isclass(target) and issubclass(target, Stage) else target
    try:
        hints = typing.get_type_hints(function)
        parameters = list(inspect.signature(function).parameters)
    except Exception:  # noqa: BLE001 - unresolvable annotations are simply not checked
        return None
    if inspect.isclass(target) and parameters[:1] == ["self"]:
        parameters = parameters[1:]
    if which == "output":
        return hints.get("return")
    return hints.get(parameters[0]) if parameters else None


def _element(annotation: Any) -> Any:
    """T of Iterable[T] / Iterator[T] / Generator[T, ...]; None if not such a type."""
    origin = typing.get_origin(annotation)
    if origin in (collections.abc.Iterable, collections.abc.Iterator, collections.abc.Generator):
        args = typing.get_args(annotation)
        return args[0] if args else typing.Any
    return None


def _item_types(callee: Callee) -> tuple[Any, Any]:
    """(type of one input item, type of one output item); None where unknown."""
    target = callee.target if not isinstance(callee.target, Stage) else type(callee.target)
    accepts, returns = _annotation(target, "input"), _annotation(target, "output")
    if callee.shape in (Shape.SOURCE, Shape.STREAM, Shape.FLATMAP):
        returns = _element(returns) if returns is not None else None
    if callee.shape is Shape.STREAM:
        accepts = _element(accepts) if accepts is not None else None
    if callee.shape in (Shape.SOURCE, Shape.SOURCE_CLASS):
        accepts = None
    return accepts, returns


def compatible(produced: Any, accepted: Any) -> bool:
    """Whether items annotated ``produced`` may be given where ``accepted`` is annotated."""
    if produced is None or accepted is None or typing.Any in (produced, accepted) or \
            accepted is object or produced == accepted or \
            isinstance(produced, (typing.TypeVar, str)) or isinstance(accepted, (typing.TypeVar, str)):
        return True
    if typing.get_origin(accepted) in (typing.Union, types.UnionType):
        return any(compatible(produced, a) for a in typing.get_args(accepted))
    if typing.get_origin(produced) in (typing.Union, types.UnionType):
        return all(compatible(p, accepted) for p in typing.get_args(produced))
    p_origin = typing.get_origin(produced) or produced
    a_origin = typing.get_origin(accepted) or accepted
    # Tuples arrive as lists: a tuple producer feeds a list consumer.
    if p_origin is tuple and a_origin is list:
        return True
    if not (inspect.isclass(p_origin) and inspect.isclass(a_origin)):
        return True
    if not issubclass(p_origin, a_origin):
        return False
    p_args, a_args = typing.get_args(produced), typing.get_args(accepted)
    if p_args and a_args and len(p_args) == len(a_args) and Ellipsis not in p_args + a_args:
        return all(compatible(p, a) for p, a in zip(p_args, a_args))
    return True


def check_types(spec: "PipelineSpec", callees: list[Callee]) -> None:
    """Fail before starting when adjacent stages' annotations disagree; unannotated pass."""
    for (left, right) in zip(callees, callees[1:]):
        produced = _item_types(left)[1]
        accepted = _item_types(right)[0]
        if produced is None or accepted is None or produced is type(None):
            continue
        if not compatible(produced, accepted):
            raise ConfigError(f"{spec.where}: stage {left.stage!r} produces items of type "
                              f"{_type_name(produced)} but stage {right.stage!r} accepts "
                              f"{_type_name(accepted)}")


def _type_name(annotation: Any) -> str:
    if typing.get_args(annotation) or not hasattr(annotation, "__name__"):
        return str(annotation).replace("typing.", "")
    return annotation.__name__
