"""What `zpipe validate` and `zpipe launch` check before any process starts.

Beyond the file itself (zpipe.config): the keys folder's certificates, the
file descriptors the launcher will hold, the ipc socket paths of the plan, and
every stage's import, bounded in time. A stage module that blocks on import
must not hang the command: the check ends with a ConfigError naming the stage
and the module, or, if the module cannot be interrupted, with exit status 2.

That last resort (os._exit) is why ``check`` is for the command line only:
zpipe.run must never end its caller's process, and calls shapes.resolve_spec
and check_keys itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from .config import PipelineSpec, check_ipc_paths, placeholder_runtime_dir
from .errors import ConfigError
from .replica import shapes
from .replica.shapes import Callee

EXIT_BAD_INPUT = 2  # as cli.EXIT_BAD_INPUT: bad file or usage
# After the alarm, a module that swallowed the ImportTimeout is interrupted
# again every REPEAT seconds; WATCHDOG_MARGIN seconds later the watchdog ends
# the process, for a main thread stuck in C code that never returns to Python.
ALARM_REPEAT = 0.5
WATCHDOG_MARGIN = 5.0  # generous: a loaded host must not end a check that was returning
# File descriptors the launcher holds: a stdout and a stderr pipe per replica,
# and the supervisor's connections from each replica's control and heartbeat
# sockets; plus what Python, ZeroMQ and the terminal take.
FDS_PER_REPLICA = 4
FDS_BASE = 64


def check(spec: PipelineSpec) -> list[Callee]:
    """Everything launch would refuse before starting anything; what each stage calls.

    Raises ConfigError. For the command line only (see the module docstring).
    """
    # The launcher's folder has exactly the placeholder's length (same temporary
    # folder, same prefix), so this check holds for the real one too.
    check_ipc_paths(spec, placeholder_runtime_dir(spec.name))
    if spec.keys is not None:
        check_keys(spec)
    check_file_descriptors(spec)
    return resolve_bounded(spec)


def resolve_bounded(spec: PipelineSpec) -> list[Callee]:
    """shapes.resolve_spec, each stage's import bounded by the pipeline's startup_timeout."""
    callees = []
    for index, stage in enumerate(spec.stages):
        module = stage.run.partition(":")[0] if isinstance(stage.run, str) else "?"
        message = (f"{spec.where}: stage {stage.name!r}: importing module {module!r} did not "
                   f"finish within {spec.startup_timeout:g} s (startup_timeout)")
        with time_limit(spec.startup_timeout, message):
            callees.append(shapes.resolve_stage(spec, index))
    shapes.check_types(spec, callees)
    return callees


@contextlib.contextmanager
def time_limit(seconds: float, message: str) -> Iterator[None]:
    """Run the block in the main thread, within ``seconds``; else ConfigError(message).

    The import must run in the main thread (a module may call signal.signal on
    import), so the bound comes to it: SIGALRM (setitimer) raises
    shapes.ImportTimeout inside whatever the block is doing: Python code, and
    also blocking calls such as time.sleep, lock waits and socket reads, which
    the signal interrupts. It repeats every ALARM_REPEAT seconds in case the
    module swallows it. C code that never returns to the interpreter cannot be
    interrupted: for it, a daemon watchdog thread prints the message and ends
    the process with exit status 2 once the margin is over too. Outside the
    main thread there is no SIGALRM, and only the watchdog bounds the block.
    """
    done = threading.Event()
    watchdog = threading.Thread(target=_watch, args=(done, seconds + WATCHDOG_MARGIN, message),
                                name="zpipe-import-watchdog", daemon=True)
    alarm = threading.current_thread() is threading.main_thread() and \
        hasattr(signal, "setitimer")
    armed = True

    def on_alarm(signum: int, frame: object) -> None:
        if armed:
            raise shapes.ImportTimeout(message)

    if alarm:
        previous = signal.signal(signal.SIGALRM, on_alarm)
        earlier = signal.setitimer(signal.ITIMER_REAL, seconds, ALARM_REPEAT)
        began = time.monotonic()
    watchdog.start()
    try:
        yield
    except shapes.ImportTimeout:
        raise ConfigError(message) from None
    finally:
        armed = False  # first: an alarm from now on must not raise here
        done.set()
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            # signal.signal runs a pending alarm first (ours, disarmed) before the swap.
            # None: a handler not set from Python, which cannot be put back; the default.
            signal.signal(signal.SIGALRM, signal.SIG_DFL if previous is None else previous)
            if earlier[0] > 0:
                # Someone's timer was running (pytest-timeout's, say): give it back,
                # less the time spent here; one already due fires at once.
                left = max(earlier[0] - (time.monotonic() - began), 1e-6)
                signal.setitimer(signal.ITIMER_REAL, left, earlier[1])


def _watch(done: threading.Event, seconds: float, message: str) -> None:
    if done.wait(seconds):
        return
    # The main thread did not come back even from the alarm: it is stuck in C
    # code. Nothing has started yet (the check runs before any process), so
    # ending here leaves nothing behind.
    try:
        sys.stderr.write(f"zpipe: error: {message}\n")
        sys.stderr.flush()
    finally:
        os._exit(EXIT_BAD_INPUT)


def check_keys(spec: PipelineSpec) -> None:
    """Refuse a keys folder whose certificates CurveZMQ could not use; raises ConfigError.

    security.Curve only reads the files: a secret file without a secret key,
    keys that are not Z85, a public key that does not match its secret, or a
    garbage ``*.key`` file (the authenticator would then admit no one) all
    pass it, and would show only as replicas that never connect.
    """
    import zmq
    import zmq.auth

    from .wire.security import Curve
    assert spec.keys is not None
    folder = Path(spec.keys)
    at = f"{spec.where}: [pipeline] field 'keys'"
    remedy = f"(make new ones with `zpipe keys {folder}`)"
    if not zmq.has("curve"):
        raise ConfigError(f"{at}: this libzmq ({zmq.zmq_version()}) has no CurveZMQ support")
    try:
        curve = Curve(folder)
    except ConfigError as exc:
        raise ConfigError(f"{at}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - load_certificate fails in more ways than it says
        raise ConfigError(f"{at}: cannot read the keys in {folder}: {type(exc).__name__}: "
                          f"{exc} {remedy}") from None
    for name, public, secret in (("server", curve.server_public, curve.server_secret),
                                 ("client", curve.client_public, curve.client_secret)):
        file = folder / f"{name}.key_secret"
        if not secret:
            raise ConfigError(f"{at}: {file} holds no secret key {remedy}")
        for kind, key in (("public", public), ("secret", secret)):
            if not _z85_key(key):
                raise ConfigError(f"{at}: the {kind} key in {file} is not a CurveZMQ key "
                                  f"(40 characters of Z85) {remedy}")
        if zmq.curve_public(secret) != public:
            raise ConfigError(f"{at}: the public and secret keys in {file} do not belong "
                              f"together {remedy}")
    # The authenticator admits the public key of every *.key file in the folder,
    # and admits no one at all when one of them cannot be read.
    try:
        admitted = zmq.auth.load_certificates(folder)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"{at}: a public key file (*.key) in {folder} cannot be read: "
                          f"{type(exc).__name__}: {exc} {remedy}") from None
    if curve.client_public not in admitted:
        raise ConfigError(f"{at}: no *.key file in {folder} holds the public key of "
                          f"client.key_secret, so every replica would be refused {remedy}")


def _z85_key(key: bytes) -> bool:
    from zmq.utils import z85
    if len(key) != 40:
        return False
    try:
        return len(z85.decode(key)) == 32
    except Exception:  # noqa: BLE001 - not Z85
        return False


def check_file_descriptors(spec: PipelineSpec) -> None:
    """Make room for the launcher's file descriptors, or say why there is none.

    Raises the soft RLIMIT_NOFILE towards the hard one when the pipeline needs
    more (children inherit it); a ConfigError when even the hard one is short.
    """
    try:
        import resource
    except ImportError:  # not Unix
        return
    needed = FDS_BASE + FDS_PER_REPLICA * sum(stage.replicas for stage in spec.stages)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard == resource.RLIM_INFINITY or hard >= needed:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
            return
    replicas = sum(stage.replicas for stage in spec.stages)
    raise ConfigError(f"{spec.where}: {replicas} replicas need about {needed} open files in "
                      f"the launcher, and this process may open {soft} (hard limit {hard}); "
                      f"raise it (ulimit -n) or use fewer replicas")
