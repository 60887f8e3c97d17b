"""Pipelines from Python: ``Task`` and ``run`` (pipeline-lib's model), ``Pipeline`` (ParallelPipe's).

Both run under the same supervisor as `zpipe launch`: every replica is a
forked process over ipc (``mode="process"``) or a thread over inproc
(``mode="thread"``); failures come back to the caller as the original
exception, with the stage and the remote traceback attached.
"""

from __future__ import annotations

import atexit
import logging
import math
import multiprocessing
import os
import pickle
import queue
import re
import shutil
import signal
import tempfile
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

import zmq

from . import shapes, worker
from .config import Addresses, PipelineSpec, from_dict, plan_addresses
from .errors import StageError
from .processes import ForkedHandle, Processes, Threads
from .security import stop_authenticator
from .supervisor import Failure, Outcome, Supervisor, signals_stop

log = logging.getLogger("zpipe")

MODES = ("process", "thread")


@dataclass
class Task:
    """One stage of a pipeline declared in Python (see README: stage shapes).

    ``fn`` is a function, a ``zpipe.Stage`` subclass or instance; ``params``
    its keyword arguments; ``replicas`` how many run side by side; ``hwm`` the
    stage's input high-water mark; ``ordered`` makes a replicated stage's
    outputs leave in input order.
    """

    fn: Any
    params: dict[str, Any] | None = None
    replicas: int = 1
    hwm: int | None = None
    name: str | None = None
    stream: bool | None = None
    ordered: bool = False


def _default_name(fn: Any) -> str:
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "stage"


def spec_from_tasks(tasks: Sequence[Task], name: str = "pipeline", hwm: int | None = None,
                    inactivity_timeout: float | None = None,
                    grace: float | None = None) -> PipelineSpec:
    """A validated PipelineSpec for Python tasks (the same checks as pipeline.toml)."""
    tasks = [t if isinstance(t, Task) else Task(t) for t in tasks]
    names: list[str] = []
    for task in tasks:
        if task.name is not None:
            names.append(task.name)
            continue
        base, n = _default_name(task.fn), 2
        candidate = base
        while candidate in names or any(t.name == candidate for t in tasks):
            candidate, n = f"{base}_{n}", n + 1
        names.append(candidate)
    pipeline: dict[str, Any] = {"name": name}
    for key, value in (("hwm", hwm), ("inactivity_timeout", inactivity_timeout),
                       ("grace", grace)):
        if value is not None:
            pipeline[key] = value
    stages = []
    for task, stage_name in zip(tasks, names):
        raw: dict[str, Any] = {"name": stage_name, "run": f"python:{stage_name}",
                               "params": task.params or {}, "replicas": task.replicas,
                               "ordered": task.ordered}
        if task.hwm is not None:
            raw["hwm"] = task.hwm
        if task.stream is not None:
            raw["stream"] = task.stream
        stages.append(raw)
    return from_dict({"pipeline": pipeline, "stages": stages}, where=f"pipeline {name!r}",
                     targets=[t.fn for t in tasks])


def run(tasks: Sequence[Task] | PipelineSpec, mode: str = "process", hwm: int | None = None,
        inactivity_timeout: float | None = None, grace: float | None = None,
        name: str = "pipeline") -> Outcome:
    """Run a pipeline to its end in this process's care; returns its Outcome.

    ``tasks`` is a list of ``Task`` (the first is the source) or a spec from
    ``zpipe.load("pipeline.toml")``. When a stage raises, so does ``run``, with
    the original exception type; a replica that dies raises ``StageError``.
    Ctrl-C stops the source and drains for ``grace`` seconds, then raises
    KeyboardInterrupt. Nothing is left running when ``run`` returns or raises.
    """
    if isinstance(tasks, PipelineSpec):
        spec = tasks
        changes = {k: v for k, v in (("inactivity_timeout", inactivity_timeout),
                                     ("grace", grace)) if v is not None}
        spec = replace(spec, **changes) if changes else spec
    else:
        spec = spec_from_tasks(tasks, name, hwm, inactivity_timeout, grace)
    callees = shapes.resolve_spec(spec)
    execution = Execution(spec, callees, mode)
    try:
        with signals_stop(execution.request_stop, (signal.SIGINT,)):
            execution.start()
            outcome = execution.supervise()
    finally:
        execution.close()
    if outcome.status == "interrupted":
        raise KeyboardInterrupt
    raise_failure(outcome)
    return outcome


def raise_failure(outcome: Outcome) -> None:
    """Raise the first failure of an outcome as the caller should see it."""
    if not outcome.failures:
        return
    failure = outcome.failures[0]
    raise _exception(failure)


def _exception(failure: Failure) -> BaseException:
    exc: BaseException | None = None
    if failure.exception is not None:
        try:
            exc = pickle.loads(failure.exception)
        except Exception:  # noqa: BLE001 - fall back to a StageError with the text
            exc = None
    if not isinstance(exc, BaseException):
        return StageError(failure.describe(), stage=failure.stage, replica=_replica(failure),
                          exc_type=failure.exc_type, remote_traceback=failure.traceback)
    exc.stage = failure.stage  # type: ignore[attr-defined]
    exc.replica = _replica(failure)  # type: ignore[attr-defined]
    exc.remote_traceback = failure.traceback  # type: ignore[attr-defined]
    exc.add_note(f"zpipe: raised in stage {failure.stage!r}, replica {failure.replica}"
                 + (f"; its traceback there:\n{failure.traceback.rstrip()}"
                    if failure.traceback else ""))
    return exc


def _replica(failure: Failure) -> int | None:
    number = failure.replica.rsplit("-", 1)[-1]
    return int(number) if number.isdigit() else None


_running: "weakref.WeakSet[Execution]" = weakref.WeakSet()


@atexit.register
def _stop_forgotten_pipelines() -> None:
    # A Pipeline started and never stopped must not keep the interpreter from
    # exiting (multiprocessing would wait for its processes forever).
    for execution in list(_running):
        execution.processes.kill(list(execution.processes.handles))
        execution.close()


class Execution:
    """One pipeline running under this process: replicas forked or in threads, a supervisor.

    ``threads`` names stages that run as threads of this process whatever the
    mode (the put and get ends of a ``Pipeline``).
    """

    def __init__(self, spec: PipelineSpec, callees: list[shapes.Callee], mode: str,
                 threads: Sequence[str] = ()):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)} (got {mode!r})")
        self.spec = spec
        self.callees = callees
        self.mode = mode
        self.thread_stages = set(threads) | ({s.name for s in spec.stages}
                                             if mode == "thread" else set())
        self.runtime_dir: str | None = None
        if mode == "process":
            self.runtime_dir = tempfile.mkdtemp(prefix=f"zpipe-{spec.name}-")
            self.addresses = plan_addresses(spec, self.runtime_dir)
        else:
            self.addresses = _inproc_addresses(spec)
        self.processes = Processes()
        self.threads = Threads()
        self.workers = _Both(self.processes, self.threads)
        self.ctx: zmq.Context | None = None
        self.supervisor: Supervisor | None = None
        self.pending_signals: list[int] = []

    def request_stop(self, signum: int = signal.SIGINT) -> None:
        if self.supervisor is not None:
            self.supervisor.request_stop(signum)
        else:
            self.pending_signals.append(signum)

    def start(self) -> None:
        spec, wiring = self.spec, {}
        for stage in spec.stages:
            for replica in range(stage.replicas):
                wiring[stage.replica_name(replica)] = worker.wiring_for(
                    spec, self.addresses, stage.name, replica)
        _running.add(self)
        # Fork first: a child must not inherit this process's ZeroMQ context
        # or its threads.
        fork = multiprocessing.get_context("fork")
        for stage, callee in zip(spec.stages, self.callees):
            if stage.name in self.thread_stages:
                continue
            for replica in range(stage.replicas):
                name = stage.replica_name(replica)
                process = fork.Process(target=worker.forked_main, name=f"zpipe-{name}",
                                       args=(callee, replica, stage.replicas, wiring[name],
                                             os.getpid()))
                process.start()
                self.processes.add(name, ForkedHandle(process))
        self.ctx = zmq.Context()
        self.supervisor = Supervisor(spec, self.addresses.control, self.workers, log.info,
                                     ctx=self.ctx)
        for signum in self.pending_signals:
            self.supervisor.request_stop(signum)
        for stage, callee in zip(spec.stages, self.callees):
            if stage.name not in self.thread_stages:
                continue
            for replica in range(stage.replicas):
                name = stage.replica_name(replica)
                self.threads.start(name, _thread_body(callee, replica, stage.replicas,
                                                      wiring[name], self.ctx))

    def supervise(self) -> Outcome:
        assert self.supervisor is not None
        return self.supervisor.run()

    def close(self) -> None:
        """Nothing may outlive this: kill and reap the processes, wait for the threads."""
        _running.discard(self)
        self.processes.reap()
        self.threads.reap()
        if self.runtime_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
        if self.ctx is not None and not any(t.is_alive() for t in self.threads.threads.values()):
            stop_authenticator(self.ctx)
            self.ctx.term()


def _thread_body(callee: shapes.Callee, replica: int, replicas: int, wiring: Any,
                 ctx: zmq.Context) -> Any:
    return lambda: worker.serve(callee, replica, replicas, wiring, ctx=ctx,
                                supervisor_timeout=math.inf)


def _inproc_addresses(spec: PipelineSpec) -> Addresses:
    prefix = f"inproc://zpipe-{uuid.uuid4().hex[:12]}"
    return Addresses(control=f"{prefix}/control",
                     inputs={s.name: () if i == 0 else tuple(
                         f"{prefix}/{s.replica_name(r)}" for r in range(s.replicas))
                         for i, s in enumerate(spec.stages)})


class _Both:
    """Processes and threads together, as one supervisor.Workers."""

    def __init__(self, processes: Processes, threads: Threads):
        self.parts = (processes, threads)

    def exited(self) -> dict[str, int]:
        return {**self.parts[0].exited(), **self.parts[1].exited()}

    def terminate(self, names: list[str]) -> None:
        for part in self.parts:
            part.terminate(names)

    def kill(self, names: list[str]) -> None:
        for part in self.parts:
            part.kill(names)


# -- ParallelPipe's model ----------------------------------------------------------

_END = object()
QUEUE_POLL = 0.1


class Pipeline:
    """ParallelPipe's API: ``start()``, ``put(x)``, ``setstop()``, results by ``get()``.

    The caller's ``put`` is the source: every stage receives items, the first
    included. ``put`` blocks while the first buffer is full (backpressure, never
    a drop); ``setstop()`` finishes every item already put, then stops every
    stage. What the last stage returns can be read with ``get()`` or by
    iterating. A stage's error is raised at the next ``put``, ``get`` or
    ``setstop``. ``buffer_size`` is each stage's input high-water mark (an int,
    or one per stage); ``multiprocess=False`` runs the stages as threads.
    """

    def __init__(self, stages: Sequence[Any], buffer_size: int | Sequence[int] = 2,
                 multiprocess: bool = True, inactivity_timeout: float | None = None,
                 name: str = "pipeline"):
        stages = list(stages)
        if not stages:
            raise ValueError("Pipeline needs at least one stage")
        sizes = [buffer_size] * len(stages) if isinstance(buffer_size, int) else list(buffer_size)
        if len(sizes) != len(stages):
            raise ValueError(f"buffer_size has {len(sizes)} sizes for {len(stages)} stages; "
                             f"give one per stage, or one int")
        tasks = [Task(self._feed, name="zpipe-put", hwm=sizes[0])]
        tasks += [replace(s, hwm=size if s.hwm is None else s.hwm) if isinstance(s, Task)
                  else Task(s, hwm=size) for s, size in zip(stages, sizes)]
        tasks.append(Task(self._collect, name="zpipe-get"))
        self.spec = spec_from_tasks(tasks, name, inactivity_timeout=inactivity_timeout)
        self.callees = shapes.resolve_spec(self.spec)
        self.mode = "process" if multiprocess else "thread"
        self.inputs: queue.Queue[Any] = queue.Queue(maxsize=sizes[0])
        self.outputs: queue.Queue[Any] = queue.Queue()
        self.execution: Execution | None = None
        self.supervising: threading.Thread | None = None
        self.outcome: Outcome | None = None
        self.stopping = False

    # The two ends, run as threads of this process.
    def _feed(self) -> Iterator[Any]:
        while True:
            try:
                item = self.inputs.get(timeout=QUEUE_POLL)
            except queue.Empty:
                supervisor = self.execution.supervisor if self.execution else None
                if supervisor is not None and supervisor.aborting_since is not None:
                    return
                continue
            if item is _END:
                return
            yield item

    def _collect(self, item: Any) -> None:
        self.outputs.put(item)

    def start(self) -> "Pipeline":
        if self.execution is not None:
            raise RuntimeError("this Pipeline was already started")
        self.execution = Execution(self.spec, self.callees, self.mode,
                                   threads=("zpipe-put", "zpipe-get"))
        self.execution.start()

        def supervise() -> None:
            try:
                self.outcome = self.execution.supervise()
            finally:
                self.execution.close()
        self.supervising = threading.Thread(target=supervise, name="zpipe-supervisor",
                                            daemon=True)
        self.supervising.start()
        return self

    @property
    def finished(self) -> bool:
        return self.supervising is not None and not self.supervising.is_alive()

    def _check(self) -> None:
        if self.execution is None:
            raise RuntimeError("call start() first")
        if self.outcome is not None:
            raise_failure(self.outcome)

    def put(self, x: Any) -> None:
        """Hand one item to the first stage; blocks while its buffer is full."""
        self._check()
        if self.stopping or self.finished:
            raise RuntimeError("this Pipeline has been stopped; put() takes no more items")
        def attempt() -> None:
            try:
                self.inputs.put(x, timeout=QUEUE_POLL)
            except queue.Full:
                if self.finished:
                    self._check()
                    raise RuntimeError("the pipeline has stopped; put() takes no more items") \
                        from None
                raise
        self._blocking(attempt, queue.Full)

    def _blocking(self, attempt: Any, retry: type[Exception]) -> Any:
        """Retry ``attempt`` until it succeeds, raising a stage's failure as soon as it is known."""
        try:
            while True:
                try:
                    return attempt()
                except retry:
                    self._check()
        except KeyboardInterrupt:
            self.abort()
            raise

    def setstop(self) -> None:
        """Finish every item already put, stop every stage, and return."""
        self._check()
        if not self.stopping:
            self.stopping = True
            self._blocking(lambda: self.inputs.put(_END, timeout=QUEUE_POLL), queue.Full)
        self._blocking(self._join, TimeoutError)
        self._check()

    stop = setstop

    def _join(self) -> None:
        assert self.supervising is not None
        self.supervising.join(QUEUE_POLL)
        if self.supervising.is_alive():
            raise TimeoutError

    def abort(self) -> None:
        """Stop everything now, items in flight included."""
        if self.execution is not None and not self.finished:
            self.execution.request_stop()
            self.execution.request_stop()
            assert self.supervising is not None
            self.supervising.join()

    def get(self, timeout: float | None = None) -> Any:
        """The next output of the last stage.

        Raises TimeoutError after ``timeout`` seconds, and EOFError once the
        pipeline has stopped and every output has been read.
        """
        self._check()
        deadline = None if timeout is None else time.monotonic() + timeout

        def attempt() -> Any:
            try:
                return self.outputs.get(timeout=QUEUE_POLL)
            except queue.Empty:
                if self.finished and self.outputs.empty():
                    self._check()
                    raise EOFError("the pipeline has stopped and every output was read") \
                        from None
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"no output within {timeout:g} s") from None
                raise
        return self._blocking(attempt, queue.Empty)

    def __iter__(self) -> Iterator[Any]:
        while True:
            try:
                yield self.get()
            except EOFError:
                return

    def __enter__(self) -> "Pipeline":
        return self.start()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.setstop()
        else:
            self.abort()
