"""`zpipe launch`: check a pipeline, start every replica as a process, supervise it.

There is no broker: the launcher computes every address, hands each process
its own (through `zpipe stage FILE NAME --replica I` and the environment),
runs the supervisor in its own process, and relays every child's output
prefixed with its replica name, as `docker compose up` does. Replicas are
forked by a fork server that has imported zpipe once (forkserver.py), rather
than each started as a new interpreter.
"""

from __future__ import annotations

import contextlib
import functools
import os
import selectors
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO, Callable

from ..config import (
    ENV_GPU,
    PipelineSpec,
    apply_environment,
    check_ipc_paths,
    load,
    plan_addresses,
)
from ..errors import ConfigError
from ..replica.shapes import Callee
from ..replica.worker import ENV_PARENT_PID, ENV_RUNTIME_DIR
from ..watch.views import ViewOptions, Views
from ..wire import shm
from .forkserver import ForkedReplica, ForkServer
from .janitor import Janitor
from .processes import Processes, Remote
from .supervisor import Outcome, Supervisor, Workers, signals_stop


def check(spec: PipelineSpec) -> list[Callee]:
    """Import every stage and check its shape, params and types; raises ConfigError.

    Also the keys, the ipc paths and the file descriptors, and each import is
    bounded by startup_timeout (zpipe.preflight): for the command line only,
    as a module stuck in C code ends the process with exit status 2.
    """
    from .. import preflight
    return preflight.check(spec)


def describe_plan(spec: PipelineSpec, callees: list[Callee], runtime_dir: str) -> str:
    """What `zpipe validate` prints: stages, shapes, replicas, addresses and HWMs."""
    addresses = plan_addresses(spec, runtime_dir)
    processes = sum(s.replicas for s in spec.stages)
    lines = [f"pipeline {spec.name!r}: {len(spec.stages)} stages, {processes} replica "
             f"processes, supervisor at {addresses.control}"]
    for index, (stage, callee) in enumerate(zip(spec.stages, callees)):
        role = "source" if index == 0 else "sink" if index == len(spec.stages) - 1 else "stage"
        traits = [f"replicas {stage.replicas}"] + (["ordered"] if stage.ordered else []) + \
            ([f"restart on-failure (at most {stage.max_restarts} in {stage.restart_window:g} s)"]
             if stage.restart == "on-failure" else []) + \
            ([f"on_error {stage.on_error}"] if stage.on_error != "fail" else []) + \
            ([f"item_timeout {stage.item_timeout:g} s"] if stage.item_timeout else [])
        lines.append(f"  {index + 1}. {stage.name} ({role}): {stage.run} -> {callee.describe()}, "
                     + ", ".join(traits))
        if index > 0:
            delivery = ", at least once (leased)" if spec.leased(index) else ""
            lines.append(f"     input hwm {stage.hwm}{delivery}: "
                         f"{', '.join(addresses.inputs[stage.name])}")
        if stage.params:
            try:
                params = repr(stage.params)
            except RecursionError:  # params nested nearly as deep as the parser allows
                import reprlib
                params = reprlib.repr(stage.params)
            lines.append(f"     params: {params}")
    return "\n".join(lines)


class OutputPump(threading.Thread):
    """Copies every child's stdout and stderr to ours, each line prefixed with its replica.

    Children may be added while it runs (a replica started again); it runs
    until ``close()`` and every stream it has has ended.
    """

    def __init__(self, out: IO[bytes], err: IO[bytes],
                 emit: Callable[[str, str, bytes, int], None] | None = None):
        super().__init__(name="zpipe-output", daemon=True)
        self.out, self.err = out, err
        # Where lines go instead, when a view shows them (views.py): (replica,
        # "stdout" | "stderr", line, width of the names).
        self.emit = emit
        self.selector = selectors.DefaultSelector()
        self.width = 0
        self.added: list[tuple[str, ForkedReplica]] = []
        self.lock = threading.Lock()
        self.closing = False
        self.ended = False  # the wake pipe is closed (under the lock: nobody writes to it then)
        self.wake_read, self.wake_write = os.pipe()
        self.selector.register(self.wake_read, selectors.EVENT_READ, None)

    def add(self, name: str, proc: ForkedReplica) -> None:
        """Relay ``proc``'s output (from any thread: the pump registers it itself)."""
        with self.lock:
            self.width = max(self.width, len(name))
            self.added.append((name, proc))
            self._wake()

    def close(self, timeout: float) -> None:
        """Stop once the streams have ended (a grandchild may hold one open: not longer
        than ``timeout``). Again: only waits."""
        if self.closing:
            if self.ident is not None:
                self.join(timeout)
            return
        with self.lock:
            self.closing = True
            if self.ident is None:  # never started
                self._close_wake()
                return
            # The pump may have seen `closing` and ended already: then no write.
            self._wake()
        self.join(timeout)

    def _wake(self) -> None:
        if not self.ended:
            os.write(self.wake_write, b"x")

    def _close_wake(self) -> None:
        self.ended = True
        os.close(self.wake_read)
        os.close(self.wake_write)

    def _register_added(self) -> None:
        with self.lock:
            added, self.added = self.added, []
        for name, proc in added:
            for stream, target in ((proc.stdout, self.out), (proc.stderr, self.err)):
                assert stream is not None
                os.set_blocking(stream.fileno(), False)
                self.selector.register(stream, selectors.EVENT_READ, [name, target, b""])

    def run(self) -> None:
        try:
            self._register_added()
            while not (self.closing and len(self.selector.get_map()) <= 1):
                for key, _ in self.selector.select(timeout=1.0):
                    if key.data is None:  # woken: children added, or closing
                        os.read(self.wake_read, 4096)
                        self._register_added()
                        continue
                    self._relay(key)
        finally:
            with self.lock:
                self._close_wake()

    def _relay(self, key: selectors.SelectorKey) -> None:
        name, target, partial = key.data
        try:
            chunk = os.read(key.fd, 65536)
        except BlockingIOError:
            return
        if self.emit is not None:
            if not chunk:
                self.selector.unregister(key.fileobj)
                lines = [partial] if partial else []
            else:
                *lines, key.data[2] = (partial + chunk).split(b"\n")
            stream = "stderr" if target is self.err else "stdout"
            for line in lines:
                self.emit(name, stream, line, self.width)
            return
        prefix = f"{name:<{self.width}} | ".encode()
        if not chunk:
            self.selector.unregister(key.fileobj)
            if partial:
                self._write(target, prefix + partial + b"\n")
            return
        *lines, key.data[2] = (partial + chunk).split(b"\n")
        if lines:
            self._write(target, b"".join(prefix + line + b"\n" for line in lines))

    @staticmethod
    def _write(target: IO[bytes], data: bytes) -> None:
        try:
            target.write(data)
            target.flush()
        except (BrokenPipeError, ValueError):
            pass


def launch(path: str | Path, grace: float | None = None,
           report: Callable[[str], None] | None = None,
           out: IO[bytes] | None = None, err: IO[bytes] | None = None,
           view: ViewOptions | None = None) -> Outcome:
    """Run the pipeline in ``path`` to its end on this host; raises ConfigError for a bad
    file. ``view``: what to show and serve while it runs (views.py), else plain lines."""
    path = Path(path).resolve()
    spec = apply_environment(load(path), os.environ)
    argvs = {stage.replica_name(replica): replica_argv(path, stage.name, replica)
             for stage in spec.stages for replica in range(stage.replicas)}
    # Replicas inherit the server's open-files limit: it is raised first.
    from .. import preflight
    preflight.check_file_descriptors(spec)
    # It imports zpipe while the stages are checked here (forkserver.py).
    server = ForkServer({**os.environ, "PYTHONUNBUFFERED": "1"}, argvs.values())
    try:
        return _launch(path, spec, argvs, server, grace, report, out, err, view)
    finally:
        server.close()


def replica_argv(path: Path, stage: str, replica: int) -> list[str]:
    """The command line of a replica: `zpipe stage`, as a container runs it too."""
    # "--": a stage name is never taken for an option.
    return [sys.executable, "-m", "zpipe", "stage", "--replica", str(replica), "--", str(path),
            stage]


def _launch(path: Path, spec: PipelineSpec, argvs: dict[str, list[str]], server: ForkServer,
            grace: float | None, report: Callable[[str], None] | None, out: IO[bytes] | None,
            err: IO[bytes] | None, view: ViewOptions | None) -> Outcome:
    check(spec)
    views = Views(view, spec.name) if view is not None else None
    report = views.report if views is not None else report or _print_report
    runtime_dir = tempfile.mkdtemp(prefix=f"zpipe-{spec.name}-")
    try:
        check_ipc_paths(spec, runtime_dir)  # check() judged by a folder of the same length
    except ConfigError:
        shutil.rmtree(runtime_dir, ignore_errors=True)
        raise
    segments = shm.folder_for(runtime_dir)  # large items on ipc links (shm.py)
    janitor = Janitor([runtime_dir, segments])  # first: from here on, nothing may outlive us
    janitor.watch(server.pid)
    shm.make_folder(runtime_dir)
    pump = OutputPump(out or sys.stdout.buffer, err or sys.stderr.buffer,
                      views.stage_line if views is not None else None)

    def started(name: str, proc: ForkedReplica) -> None:  # restarts too
        janitor.watch(proc.pid)
        pump.add(name, proc)
    workers = Processes(on_start=started)
    stop_on_signals = contextlib.ExitStack()
    try:
        addresses = plan_addresses(spec, runtime_dir)
        # Where `zpipe status NAME` finds the supervisor (status.py).
        (Path(runtime_dir) / "address").write_text(addresses.control + "\n")
        supervisor = _supervisor(spec, addresses.control, workers, report, grace)
        stop_on_signals.enter_context(signals_stop(supervisor.request_stop))
        if views is not None:
            _start_views(views, supervisor)
            stop_on_signals.callback(views.close, None)  # on the way out of a failure
        # A replica's parent is the fork server: it dies with the server, which dies
        # with us (and the janitor has every pid).
        env = {**os.environ, ENV_RUNTIME_DIR: runtime_dir, ENV_PARENT_PID: str(server.pid),
               "PYTHONUNBUFFERED": "1"}
        for stage in spec.stages:
            for replica in range(stage.replicas):
                name = stage.replica_name(replica)
                replica_env = with_gpu(env, stage.gpu_of(replica))
                workers.start(name, functools.partial(server.popen, argvs[name], replica_env))
        pump.start()
        outcome = supervisor.run()
        pump.close(1.0)  # the stages' last lines come before the summary
        _ended(supervisor, views, outcome)
        return outcome
    finally:
        workers.reap()
        pump.close(1.0)  # a grandchild may hold a pipe open: do not wait on it
        stop_on_signals.close()
        shutil.rmtree(runtime_dir, ignore_errors=True)
        shm.remove_folder(segments)  # what replicas held when they ended, however
        janitor.close()


def supervise(path: str | Path, grace: float | None = None,
              report: Callable[[str], None] | None = None,
              view: ViewOptions | None = None) -> Outcome:
    """`zpipe supervise`: the supervisor alone, for replicas started elsewhere."""
    spec = apply_environment(load(path), os.environ)
    if spec.control is None or any(s.address is None for s in spec.stages[1:]):
        raise ConfigError(f"{spec.where}: zpipe supervise serves replicas started elsewhere, "
                          f"so every address must be tcp: set [pipeline] control and each "
                          f"later stage's address (or ZPIPE_CONTROL, ZPIPE_ADDRESS_<STAGE>)")
    views = Views(view, spec.name) if view is not None else None
    report = views.report if views is not None else report or _print_report
    supervisor = _supervisor(spec, spec.control, Remote(), report, grace)
    with signals_stop(supervisor.request_stop), contextlib.ExitStack() as cleanup:
        if views is not None:
            _start_views(views, supervisor)
            cleanup.callback(views.close, None)
        supervisor.progress(f"{spec.name}: supervisor at {spec.control}, waiting for "
                            f"{sum(s.replicas for s in spec.stages)} replicas")
        outcome = supervisor.run()
        # Its last EXITs are the only word replicas started elsewhere wait for:
        # ending the context is what waits for them to leave (the socket's linger).
        supervisor.ctx.term()
        _ended(supervisor, views, outcome)
    return outcome


def _supervisor(spec: PipelineSpec, control: str, workers: Workers,
                report: Callable[[str], None], grace: float | None) -> Supervisor:
    try:
        return Supervisor(spec, control, workers, report, grace=grace)
    except OSError as exc:  # the file's control address is taken, or not this host's
        raise ConfigError(f"{spec.where}: [pipeline] control: {exc}") from None


def with_gpu(env: dict[str, str], gpu: str | None) -> dict[str, str]:
    """``env`` for a replica of a stage with ``gpus``: it sees its one device (a
    process's CUDA runtime reads CUDA_VISIBLE_DEVICES once, when it starts)."""
    return env if gpu is None else {**env, ENV_GPU: gpu}


def _start_views(views: Views, supervisor: Supervisor) -> None:
    supervisor.progress = views.progress
    try:
        views.start(lambda: supervisor.observer.latest)
    except OSError as exc:  # a metrics or health port in use
        supervisor.close()
        views.close(None)
        raise ConfigError(str(exc)) from None


def _ended(supervisor: Supervisor, views: Views | None, outcome: Outcome) -> None:
    """The last lines: the outcome, and the summary."""
    line = f"{supervisor.spec.name}: {outcome.status} after {outcome.elapsed:.2f} s"
    if outcome.status == "ok":
        supervisor.progress(line)
    else:
        supervisor.report(line)
    if views is not None:
        views.close(outcome.summary)


def _print_report(text: str) -> None:
    print(f"zpipe: {text}", file=sys.stderr, flush=True)
