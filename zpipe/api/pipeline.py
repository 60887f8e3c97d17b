"""Pipelines from Python: ``Task`` and ``run`` (pipeline-lib's model), ``Pipeline`` (ParallelPipe's).

Both run under the same supervisor as `zpipe launch`: every replica is a
forked process over ipc (``mode="process"``) or a thread over inproc
(``mode="thread"``); failures come back to the caller as the original
exception, with the stage and the remote traceback attached.
"""

from __future__ import annotations

import atexit
import collections
import logging
import math
import multiprocessing
import multiprocessing.util  # before our atexit hook (below), which must run before its one
import os
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
from typing import Any, Callable, Iterator, Sequence

import zmq

from ..config import (
    Addresses,
    PipelineSpec,
    check_ipc_paths,
    from_dict,
    plan_addresses,
    with_overrides,
)
from ..errors import ConfigError
from ..preflight import check_keys
from ..replica import shapes, worker
from ..replica.failures import rebuild
from ..supervision import losses
from ..supervision.janitor import Janitor
from ..supervision.processes import ForkedHandle, Processes, Threads
from ..supervision.supervisor import Outcome, Supervisor, signals_stop
from ..wire import shm
from ..wire.security import stop_authenticator

log = logging.getLogger("zpipe")

MODES = ("process", "thread")
FORGOTTEN_WAIT = 10.0  # at exit, seconds a forgotten Pipeline has to stop by itself


@dataclass
class Task:
    """One stage of a pipeline declared in Python (see README: stage shapes).

    ``fn`` is a function, a ``zpipe.Stage`` subclass or instance; ``params``
    its keyword arguments; ``replicas`` how many run side by side; ``hwm`` the
    stage's input high-water mark; ``ordered`` makes a replicated stage's
    outputs leave in input order. ``restart``, ``max_restarts``,
    ``restart_window``, ``on_error``, ``max_errors``, ``item_timeout`` and
    ``total`` are pipeline.toml's fields of the same names (README: "When
    replicas fail", "Watching a run"), and so are ``batch`` (a dict:
    ``{"max_items": 32, "max_wait_ms": 5}``), ``input`` ("latest"),
    ``concurrency`` and ``gpus`` (README: "Batches, latest frames,
    concurrency, GPUs").
    """

    fn: Any
    params: dict[str, Any] | None = None
    replicas: int = 1
    hwm: int | None = None
    name: str | None = None
    stream: bool | None = None
    ordered: bool = False
    restart: str | None = None
    max_restarts: int | None = None
    restart_window: float | None = None
    on_error: str | None = None
    max_errors: int | None = None
    item_timeout: float | None = None
    total: int | None = None  # a source's count of items, for the progress bar (README)
    batch: dict[str, Any] | None = None
    input: str | None = None
    concurrency: int | None = None
    gpus: list[int | str] | None = None


def _default_name(fn: Any) -> str:
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "stage"


_OPTIONAL_FIELDS = ("hwm", "stream", "restart", "max_restarts", "restart_window", "on_error",
                    "max_errors", "item_timeout", "total", "batch", "input", "concurrency",
                    "gpus")


def spec_from_tasks(tasks: Sequence[Task], name: str = "pipeline", hwm: int | None = None,
                    inactivity_timeout: float | None = None, grace: float | None = None,
                    dead_letters: str | os.PathLike[str] | None = None) -> PipelineSpec:
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
                       ("grace", grace),
                       ("dead_letters", None if dead_letters is None else str(dead_letters))):
        if value is not None:
            pipeline[key] = value
    stages = []
    for task, stage_name in zip(tasks, names):
        raw: dict[str, Any] = {"name": stage_name, "run": f"python:{stage_name}",
                               "params": task.params or {}, "replicas": task.replicas,
                               "ordered": task.ordered}
        for key in _OPTIONAL_FIELDS:
            if getattr(task, key) is not None:
                raw[key] = getattr(task, key)
        stages.append(raw)
    return from_dict({"pipeline": pipeline, "stages": stages}, where=f"pipeline {name!r}",
                     targets=[t.fn for t in tasks])


def run(tasks: Sequence[Task] | PipelineSpec, mode: str = "process", hwm: int | None = None,
        inactivity_timeout: float | None = None, grace: float | None = None,
        name: str = "pipeline", dead_letters: str | os.PathLike[str] | None = None) -> Outcome:
    """Run a pipeline to its end in this process's care; returns its Outcome.

    ``tasks`` is a list of ``Task`` (the first is the source) or a spec from
    ``zpipe.load("pipeline.toml")``. When a stage raises, so does ``run``, with
    the original exception type; a replica that dies raises ``StageError``.
    Ctrl-C (SIGINT) and SIGTERM stop the source and drain for ``grace``
    seconds; then ``run`` raises KeyboardInterrupt after SIGINT and
    ``SystemExit(143)`` after SIGTERM (the caller ends as SIGTERM would have
    ended it, but only once the pipeline has stopped in order). Called from
    another thread than the main one, signals are the caller's to handle.
    Nothing is left running when ``run`` returns or raises.
    """
    if isinstance(tasks, PipelineSpec):
        changes = {k: v for k, v in (("inactivity_timeout", inactivity_timeout),
                                     ("grace", grace)) if v is not None}
        spec = with_overrides(tasks, **changes)
    else:
        spec = spec_from_tasks(tasks, name, hwm, inactivity_timeout, grace, dead_letters)
    callees = shapes.resolve_spec(spec)
    execution = Execution(spec, callees, mode)
    try:
        with signals_stop(execution.request_stop):
            execution.start()
            outcome = execution.supervise()
    finally:
        execution.close()
    if outcome.status == "interrupted":
        stop: BaseException = SystemExit(128 + signal.SIGTERM) \
            if outcome.signal == signal.SIGTERM else KeyboardInterrupt()
        raise _with_losses(stop, outcome)
    raise_failure(outcome)
    return outcome


def _with_losses(exc: BaseException, outcome: Outcome) -> BaseException:
    """``exc`` with a note of what the run lost in flight, if it lost anything."""
    lines = losses.describe(outcome.lost)
    if lines:
        exc.add_note("zpipe: " + "\nzpipe: ".join(lines))
    return exc


def raise_failure(outcome: Outcome) -> None:
    """Raise the first failure of an outcome as the caller should see it."""
    if not outcome.failures:
        return
    failure = outcome.failures[0]
    raise _with_losses(rebuild(failure), outcome)


_running: "weakref.WeakSet[Execution]" = weakref.WeakSet()


@atexit.register
def _stop_forgotten_pipelines() -> None:
    # A Pipeline started and never stopped must not keep the interpreter from
    # exiting (multiprocessing would wait for its processes forever). Its
    # supervisor is told to kill everything and given a moment to finish;
    # only then is it closed from here.
    for execution in list(_running):
        execution.request_stop()
        execution.request_stop()
        if not execution.closed.wait(FORGOTTEN_WAIT):
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
        pinned = [s.name for s in spec.stages if s.gpus and s.name in self.thread_stages]
        if pinned:
            raise ConfigError(f"stage {pinned[0]!r}: gpus give each replica its own device "
                              f"through CUDA_VISIBLE_DEVICES, which is per process: run it "
                              f"in process mode")
        if spec.keys is not None:
            check_keys(spec)
        self.runtime_dir: str | None = None
        if mode == "process":
            self.runtime_dir = tempfile.mkdtemp(prefix=f"zpipe-{spec.name}-")
            try:
                check_ipc_paths(spec, self.runtime_dir)
            except ConfigError:
                shutil.rmtree(self.runtime_dir, ignore_errors=True)
                raise
            self.addresses = plan_addresses(spec, self.runtime_dir)
        else:
            self.addresses = _inproc_addresses(spec)
        self.janitor: Janitor | None = None
        self.closed = threading.Event()
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
        segments = shm.folder_for(self.runtime_dir) if self.runtime_dir else None
        for stage in spec.stages:
            for replica in range(stage.replicas):
                wiring[stage.replica_name(replica)] = worker.wiring_for(
                    spec, self.addresses, stage.name, replica, segments)
        _running.add(self)
        forked = [(stage, callee) for stage, callee in zip(spec.stages, self.callees)
                  if stage.name not in self.thread_stages]
        if forked:
            # Whatever ends this process, the watcher ends its replicas and
            # removes the runtime folder (see janitor.py).
            assert self.runtime_dir is not None
            self.janitor = Janitor([self.runtime_dir, shm.folder_for(self.runtime_dir)])
            shm.make_folder(self.runtime_dir)
        # Fork first: a child must not inherit this process's ZeroMQ context
        # or its threads. The children's parent-death signal comes when the
        # thread that forks them ends (Linux ties it to the thread): this
        # thread must live as long as the pipeline (run()'s caller, or a
        # Pipeline's supervising thread).
        fork = multiprocessing.get_context("fork")
        janitor = self.janitor

        def forker(name: str, callee: shapes.Callee, replica: int, replicas: int,
                   gpu: str | None) -> Any:
            def start() -> ForkedHandle:
                assert janitor is not None
                process = fork.Process(target=worker.forked_main, name=f"zpipe-{name}",
                                       args=(callee, replica, replicas, wiring[name],
                                             os.getpid(), (janitor.fd,), gpu))
                process.start()
                janitor.watch(process.pid)
                return ForkedHandle(process)
            return start
        for stage, callee in forked:
            for replica in range(stage.replicas):
                name = stage.replica_name(replica)
                # A restart forks from the supervisor's loop: this same thread.
                self.processes.start(name, forker(name, callee, replica, stage.replicas,
                                                  stage.gpu_of(replica)))
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
            shm.remove_folder(shm.folder_for(self.runtime_dir))
        if self.janitor is not None:
            self.janitor.close()
        if self.ctx is not None and not any(t.is_alive() for t in self.threads.threads.values()):
            stop_authenticator(self.ctx)
            self.ctx.term()
        self.closed.set()


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

    def restart(self, name: str) -> None:
        for part in self.parts:
            part.restart(name)

    def alive(self, name: str) -> bool:
        return any(part.alive(name) for part in self.parts)

    def pid(self, name: str) -> int | None:
        return next((pid for part in self.parts if (pid := part.pid(name)) is not None), None)


# -- ParallelPipe's model ----------------------------------------------------------

_END = object()
QUEUE_POLL = 0.1
PUT_WAIT_WARNING = 10.0  # seconds a put() waits on unread results before it says so


class _Results:
    """What the last stage returns, until ``get()`` takes it: bounded like every
    link (its stage waits while it is full), until ``lift()`` (after setstop,
    what is still in flight is finite and must not wait on a reader)."""

    def __init__(self, bound: int):
        self.bound: int | None = bound
        self.items: collections.deque[Any] = collections.deque()
        self.changed = threading.Condition()

    def put(self, item: Any, give_up: Callable[[], bool]) -> None:
        with self.changed:
            while self.bound is not None and len(self.items) >= self.bound:
                if give_up():
                    return  # the pipeline is aborting: nobody will read it
                self.changed.wait(QUEUE_POLL)
            self.items.append(item)
            self.changed.notify_all()

    def get(self, timeout: float) -> Any:
        """The oldest result; queue.Empty after ``timeout`` seconds without one."""
        with self.changed:
            if not self.items:
                self.changed.wait(timeout)
            if not self.items:
                raise queue.Empty
            item = self.items.popleft()
            self.changed.notify_all()
            return item

    def full(self) -> bool:
        return self.bound is not None and len(self.items) >= self.bound

    def lift(self) -> None:
        with self.changed:
            self.bound = None
            self.changed.notify_all()

    def __len__(self) -> int:
        return len(self.items)


class Pipeline:
    """ParallelPipe's API: ``start()``, ``put(x)``, ``setstop()``, results by ``get()``.

    The caller's ``put`` is the source: every stage receives items, the first
    included. ``put`` blocks while the first buffer is full (backpressure, never
    a drop); ``setstop()`` finishes every item already put, then stops every
    stage. What the last stage returns can be read with ``get()`` or by
    iterating; while it is not read, results wait in a buffer as large as the
    last stage's, and then ``put`` waits too. A stage's error is raised at the
    next ``put``, ``get`` or ``setstop``. ``end_stage`` (ParallelPipe's) is
    added after ``stages``. ``buffer_size`` is each stage's input high-water
    mark (an int, or one per stage, ``end_stage`` included);
    ``multiprocess=False`` runs the stages as threads.
    """

    def __init__(self, stages: Sequence[Any], end_stage: Any = None,
                 buffer_size: int | Sequence[int] = 2, multiprocess: bool = True,
                 inactivity_timeout: float | None = None, name: str = "pipeline"):
        stages = list(stages) + ([end_stage] if end_stage is not None else [])
        if not stages:
            raise ValueError("Pipeline needs at least one stage")
        sizes = [buffer_size] * len(stages) if isinstance(buffer_size, int) else list(buffer_size)
        if len(sizes) != len(stages):
            raise ValueError(f"buffer_size has {len(sizes)} sizes for {len(stages)} stages; "
                             f"give one per stage, or one int")
        tasks = [Task(self._feed, name="zpipe-put", hwm=sizes[0])]
        tasks += [replace(s, hwm=size if s.hwm is None else s.hwm) if isinstance(s, Task)
                  else Task(s, hwm=size) for s, size in zip(stages, sizes)]
        # The results' end is bounded like the stages' inputs: the last buffer size.
        tasks.append(Task(self._collect, name="zpipe-get", hwm=sizes[-1]))
        self.spec = spec_from_tasks(tasks, name, inactivity_timeout=inactivity_timeout)
        self.callees = shapes.resolve_spec(self.spec)
        self.mode = "process" if multiprocess else "thread"
        self.inputs: queue.Queue[Any] = queue.Queue(maxsize=sizes[0])
        self.outputs = _Results(sizes[-1])
        self.execution: Execution | None = None
        self.supervising: threading.Thread | None = None
        self.outcome: Outcome | None = None
        self.stopping = False
        self.warned = False

    def __len__(self) -> int:
        """The number of stages (ParallelPipe's ``len(P)``)."""
        return len(self.spec.stages) - 2

    def _aborting(self) -> bool:
        supervisor = self.execution.supervisor if self.execution else None
        return supervisor is not None and supervisor.aborting_since is not None

    # The two ends, run as threads of this process.
    def _feed(self) -> Iterator[Any]:
        while True:
            try:
                item = self.inputs.get(timeout=QUEUE_POLL)
            except queue.Empty:
                if self._aborting():
                    return
                continue
            if item is _END:
                return
            yield item

    def _collect(self, item: Any) -> None:
        self.outputs.put(item, self._aborting)

    def start(self) -> "Pipeline":
        if self.execution is not None:
            raise RuntimeError("this Pipeline was already started")
        execution = self.execution = Execution(self.spec, self.callees, self.mode,
                                               threads=("zpipe-put", "zpipe-get"))
        started = threading.Event()
        failed: list[BaseException] = []

        def supervise() -> None:
            # The replicas are forked here, not in the caller's thread: their
            # parent-death signal follows the thread that forks them, and this
            # one lives exactly as long as the pipeline.
            outcome = None
            try:
                try:
                    execution.start()
                except BaseException as exc:
                    failed.append(exc)
                    return
                finally:
                    started.set()
                outcome = execution.supervise()
            finally:
                execution.close()
                # Only now, with everything ended, may callers see the outcome.
                self.outcome = outcome
        self.supervising = threading.Thread(target=supervise, name="zpipe-supervisor",
                                            daemon=True)
        self.supervising.start()
        started.wait()
        if failed:
            self.supervising.join()
            raise failed[0]
        return self

    @property
    def finished(self) -> bool:
        return self.supervising is not None and not self.supervising.is_alive()

    def _check(self) -> None:
        if self.execution is None:
            raise RuntimeError("call start() first")
        if self.outcome is not None:
            raise_failure(self.outcome)

    def put(self, x: Any, timeout: float | None = None) -> None:
        """Hand one item to the first stage; blocks while its buffer is full.

        Raises TimeoutError after ``timeout`` seconds without room.
        """
        self._check()
        if self.stopping or self.finished:
            raise RuntimeError("this Pipeline has been stopped; put() takes no more items")
        since = time.monotonic()

        def attempt() -> None:
            try:
                self.inputs.put(x, timeout=QUEUE_POLL)
            except queue.Full:
                if self.finished:
                    self._check()
                    raise RuntimeError("the pipeline has stopped; put() takes no more items") \
                        from None
                waited = time.monotonic() - since
                if timeout is not None and waited > timeout:
                    raise TimeoutError(f"no room for the item within {timeout:g} s") from None
                if waited > PUT_WAIT_WARNING and self.outputs.full() and not self.warned:
                    self.warned = True
                    log.warning("zpipe: put() has waited %.0f s: the pipeline holds %d results "
                                "nobody has read; read them with get() or by iterating over "
                                "the Pipeline (from another thread if this one puts)",
                                waited, len(self.outputs))
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
            # From here what is in flight is finite: results need no reader to drain.
            self.outputs.lift()
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
                if self.finished and not self.outputs:
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
