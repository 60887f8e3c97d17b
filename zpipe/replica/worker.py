"""A replica as an OS process: the entry point of `zpipe stage` and of `zpipe launch`'s children.

This layer owns what only a process has: signals, the parent-death signal,
the heartbeat thread and logging set-up. The replica itself is runtime.Replica.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import zmq

from ..config import ENV_GPU, Addresses, PipelineSpec, StageSpec, plan_addresses
from ..errors import ConfigError
from ..wire import shm, transport
from ..wire.security import Curve, stop_authenticator
from . import shapes
from .runtime import EXIT_TERMINATED, Heartbeat, Replica, Wiring

log = logging.getLogger("zpipe")

ENV_RUNTIME_DIR = "ZPIPE_RUNTIME_DIR"
ENV_PARENT_PID = "ZPIPE_PARENT_PID"
ENV_SUPERVISOR_TIMEOUT = "ZPIPE_SUPERVISOR_TIMEOUT"
DEFAULT_SUPERVISOR_TIMEOUT = 5.0
PR_SET_PDEATHSIG = 1
HEARTBEAT_JOIN_TIMEOUT = 5.0


def wiring_for(spec: PipelineSpec, addresses: Addresses, stage_name: str, replica: int,
               segments: str | None = None) -> Wiring:
    """Where one replica of ``stage_name`` receives and sends; ``segments``: the run's
    shared-memory folder (shm.py), when it has one."""
    index = spec.index(stage_name)
    stage = spec.stages[index]
    upstream = spec.stages[index - 1] if index > 0 else None
    downstream = spec.stages[index + 1] if index + 1 < len(spec.stages) else None

    def reordering(s: StageSpec | None) -> bool:
        # One replica keeps order by itself; only replicated ordered stages need numbers.
        return s is not None and s.ordered and s.replicas > 1

    return Wiring(control=addresses.control,
                  input=addresses.inputs[stage.name][replica] if upstream else None,
                  input_hwm=stage.hwm,
                  downstream=addresses.inputs[downstream.name] if downstream else (),
                  downstream_hwm=downstream.hwm if downstream else 0,
                  connect_timeout=spec.startup_timeout,
                  number_outputs=reordering(downstream), ordered=reordering(stage),
                  reorder=reordering(upstream), keys=str(spec.keys) if spec.keys else None,
                  input_max_size=stage.max_message_size,
                  downstream_max_size=downstream.max_message_size if downstream else None,
                  downstream_name=downstream.name if downstream else "",
                  input_leased=spec.leased(index), output_leased=spec.leased(index + 1)
                  if downstream else False, segments=segments)


def run_stage_process(spec: PipelineSpec, stage_name: str, replica: int,
                      health_port: int | None = None) -> int:
    """`zpipe stage`: run one replica in this process until it ends; returns the exit status.
    ``health_port``: answer /livez and /readyz there (health.py), for a container engine."""
    stage = spec.stage(stage_name)
    if not 0 <= replica < stage.replicas:
        raise ConfigError(f"{spec.where}: stage {stage_name!r} has {stage.replicas} replica(s); "
                          f"--replica (or $ZPIPE_REPLICA) must be 0 to {stage.replicas - 1} "
                          f"(got {replica})")
    parent = os.environ.get(ENV_PARENT_PID)
    become_replica_process(int(parent) if parent else None)
    runtime_dir = os.environ.get(ENV_RUNTIME_DIR)
    if runtime_dir is None and (spec.control is None or any(
            s.address is None for s in spec.stages[1:])):
        raise ConfigError(f"{spec.where}: stage {stage_name!r} uses ipc addresses; set "
                          f"{ENV_RUNTIME_DIR} to the launcher's runtime folder, or give every "
                          f"stage a tcp address and [pipeline] control")
    addresses = plan_addresses(spec, Path(runtime_dir or "."))
    callee = shapes.resolve_stage(spec, spec.index(stage_name))
    health = None
    if health_port is not None:
        from ..watch.health import Health
        health = Health()
        try:
            health.start(health_port)
        except OSError as exc:
            raise ConfigError(f"stage {stage_name!r} replica {replica}: --health-port: "
                              f"{exc}") from None
    try:
        segments = shm.folder_for(runtime_dir) if runtime_dir else None
        return serve(callee, replica, stage.replicas,
                     wiring_for(spec, addresses, stage_name, replica, segments), health=health)
    finally:
        if health is not None:
            health.close()


def become_replica_process(parent: int | None) -> None:
    """What a process does first to serve as a replica: signals, parent death, logging."""
    if parent is not None:
        _guard_against_orphaning(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to handle
    signal.signal(signal.SIGTERM, _terminate)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def serve(callee: shapes.Callee, replica: int, replicas: int, wiring: Wiring,
          ctx: zmq.Context | None = None, supervisor_timeout: float | None = None,
          health: Any = None) -> int:
    """Run one replica, with a heartbeat, until it ends; its exit status.

    A process gets its own context and gives up when the supervisor goes
    silent for ``supervisor_timeout`` seconds (default from the environment);
    a thread shares its caller's context and supervisor, and never gives up.
    """
    own = ctx is None
    context = transport.replica_context(len(wiring.downstream)) if own else ctx
    if supervisor_timeout is None:
        supervisor_timeout = float(os.environ.get(ENV_SUPERVISOR_TIMEOUT,
                                                  DEFAULT_SUPERVISOR_TIMEOUT))
    worker = Replica(callee, replica, replicas, wiring, context)
    global _serving
    if own:
        _serving = worker
    timeout = supervisor_timeout
    heartbeat = Heartbeat(context, wiring.control, worker.name, worker.counts, timeout,
                          on_lost=lambda: _supervisor_lost(worker.name, timeout),
                          first_contact_timeout=wiring.connect_timeout,
                          curve=Curve(wiring.keys) if wiring.keys else None, watch=worker.watch)
    if health is not None:
        heartbeat.on_beat = functools.partial(_tell_health, health, worker)
    heartbeat.start()
    try:
        return worker.run()
    finally:
        heartbeat.stop()
        heartbeat.join(HEARTBEAT_JOIN_TIMEOUT)
        heartbeat.close()
        if own:
            stop_authenticator(context)
            if not transport.end_context(context):
                log.warning("replica %s: ZeroMQ's threads did not end within %g s (one "
                            "looking up a peer's name?); exiting without them",
                            worker.name, transport.CONTEXT_END_WAIT)


def forked_main(callee: shapes.Callee, replica: int, replicas: int, wiring: Wiring,
                parent: int, close_fds: tuple[int, ...] = (), gpu: str | None = None) -> None:
    """Entry point of a replica forked by zpipe.run (mode="process").

    ``close_fds`` are descriptors of the caller's that a fork inherits and must
    not keep open (the janitor's pipe, which must close when the caller dies).
    ``gpu``: the device of a stage with gpus, set before the stage's setup()
    can start a CUDA runtime (which reads CUDA_VISIBLE_DEVICES once).
    """
    if gpu is not None:
        os.environ[ENV_GPU] = gpu
    for fd in close_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    become_replica_process(parent)
    sys.exit(serve(callee, replica, replicas, wiring))


_serving: Replica | None = None  # the replica this process runs


def _terminate(signum: int, frame: object) -> None:
    # SystemExit, not an Exception: user code's `except Exception` must not
    # swallow it, and finally blocks (teardown) still run. Once only: a
    # second SIGTERM (the parent's death after the supervisor's terminate, a
    # signal to the whole group) must not cut that cleanup short, and one
    # that comes while teardown() runs waits for it to end. SIGKILL remains
    # for a replica that does not finish.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if _serving is not None and _serving.tearing_down:
        _serving.terminate_after_teardown = True
        return
    raise SystemExit(EXIT_TERMINATED)


def _supervisor_lost(name: str, timeout: float) -> None:
    print(f"zpipe: replica {name}: no word from the supervisor for {timeout:.0f} s; exiting",
          file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    # If the main thread is stuck where a signal cannot reach it, go anyway.
    threading.Timer(timeout, lambda: os._exit(EXIT_TERMINATED)).start()


def _guard_against_orphaning(parent: int) -> None:
    """Die with the launcher (or the Python caller) even if it is SIGKILLed."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the heartbeat timeout still applies
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(EXIT_TERMINATED)


def _tell_health(health: Any, worker: Replica) -> None:
    """From the heartbeat thread: alive; ready while it runs and its input has not
    begun to drain (a container engine then sends it no new work)."""
    health.beat()
    control = worker.control
    if worker.phase != "run":
        health.ready(False, "draining" if worker.phase in ("teardown", "done") else "starting")
    elif control is not None and (control.draining or control.stopped):
        health.ready(False, "draining")
    else:
        health.ready(True)
