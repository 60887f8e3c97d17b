"""The launcher's fork server: replica processes forked from one that has already imported zpipe.

Starting a replica as `python -m zpipe stage ...` costs an interpreter and
every import of zpipe, pyzmq and msgpack: about 0.1-0.2 s of CPU a replica, so
32 replicas on 2 cores took seconds before the first item could flow. `zpipe
launch` instead starts this server once (``python -m zpipe.supervision.forkserver``,
a process of its own: single-threaded, no ZeroMQ context, none of the
launcher's state) while it checks the pipeline; the server imports what a
replica runs, freezes those objects out of the garbage collector's sight, and
forks each replica on request. A forked replica then runs exactly what `zpipe
stage` runs, with the same argv, environment, standard streams and exit.

What Popen gave each replica, and how it is kept:

- Its own stdout and stderr pipes, read by the launcher: the launcher makes
  them and passes the write ends along with the request (SCM_RIGHTS); stdin
  is /dev/null.
- Its environment, per replica (CUDA_VISIBLE_DEVICES of a stage with gpus,
  the ZPIPE_* variables): sent with the request and set before any of the
  stage's code runs. The server itself starts with the launcher's environment,
  so what Python reads only at start-up (PYTHONPATH, PYTHONHASHSEED, ...)
  is the same.
- Its command line in ``ps`` and /proc (`zpipe stage --replica I -- FILE NAME`):
  the server is started with room in its own argv, which each child
  overwrites with its replica's argv.
- Death with the launcher: the server dies with it (PR_SET_PDEATHSIG, SIGKILL),
  each replica with the server (ZPIPE_PARENT_PID names the server; the
  replica's own parent-death signal is SIGTERM), and the janitor is given
  every pid.
- Its exit status: the server reaps its children and reports each status;
  signals go through the server too, which only signals a child it has not
  reaped yet (so never a reused pid).

The server ignores SIGINT and SIGTERM (Ctrl-C is the launcher's to handle, as
for replicas), and leaves when the launcher closes its socket or dies.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Any, Iterable

READY_TIMEOUT = 60.0  # seconds for the server to import zpipe and answer
ANSWER_TIMEOUT = 30.0  # seconds for a fork's answer once it is ready
MAX_MESSAGE = 1 << 20  # a request: argv and environment, as JSON
PR_SET_PDEATHSIG = 1


class ForkedReplica:
    """A replica forked by the server, seen as a subprocess.Popen (what Processes and
    the launcher's OutputPump use of one)."""

    def __init__(self, server: ForkServer, pid: int, stdout: IO[bytes], stderr: IO[bytes]):
        self.server = server
        self.pid = pid
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.server.collect(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(f"replica pid {self.pid}", timeout or 0)
            self.server.collect(left)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            self.server.signal(self.pid, signum)


class ForkServer:
    """The launcher's end: ``popen(argv, env)`` forks a replica (a ForkedReplica);
    ``close()`` at the end."""

    def __init__(self, env: dict[str, str], argvs: Iterable[list[str]]):
        """``env``: the environment the replicas share; ``argvs``: the command lines
        its children are to show."""
        room = max((sum(len(os.fsencode(a)) + 1 for a in argv) for argv in argvs), default=0)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = ours
        self.children: dict[int, ForkedReplica] = {}
        self.ready = False
        base = [sys.executable, "-m", __name__, str(os.getpid()), str(theirs.fileno())]
        used = sum(len(os.fsencode(a)) + 1 for a in base) + 1  # + the room argument's NUL
        try:
            self.process = subprocess.Popen(
                [*base, " " * max(1, room - used)], env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
        self.pid = self.process.pid

    def popen(self, argv: list[str], env: dict[str, str]) -> ForkedReplica:
        """Fork a replica that runs ``argv`` (``[python, "-m", "zpipe", "stage", ...]``)
        with ``env``; OSError if the server cannot."""
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        try:
            request = json.dumps({"argv": argv, "env": env}).encode()
            try:
                socket.send_fds(self.sock, [request], [out_write, err_write])
            except OSError as exc:
                raise OSError(f"zpipe fork server (pid {self.pid}) is gone: {exc}") from None
            pid = self._answer(ANSWER_TIMEOUT if self.ready else READY_TIMEOUT)
            self.ready = True
        except BaseException:
            os.close(out_read)
            os.close(err_read)
            raise
        finally:
            os.close(out_write)
            os.close(err_write)
        child = ForkedReplica(self, pid, os.fdopen(out_read, "rb", buffering=0),
                              os.fdopen(err_read, "rb", buffering=0))
        self.children[pid] = child
        return child

    def signal(self, pid: int, signum: int) -> None:
        try:
            self.sock.send(json.dumps({"signal": pid, "signum": signum}).encode())
        except OSError:
            pass  # the server is gone: so are its children (collect() says so)

    def collect(self, timeout: float | None) -> None:
        """Take the exit statuses the server reported, waiting up to ``timeout`` for one."""
        self._read(timeout, until_started=False)

    def _answer(self, timeout: float) -> int:
        pid = self._read(timeout, until_started=True)
        if pid is None:
            # A late answer would be taken for the next request's: it is not
            # waited for. Its replicas die with it (parent-death signal).
            self.process.kill()
            raise OSError(f"zpipe fork server (pid {self.pid}) did not answer within "
                          f"{timeout:g} s")
        return pid

    def _read(self, timeout: float | None, until_started: bool) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(MAX_MESSAGE)
            except (BlockingIOError, TimeoutError):
                return None
            except OSError:
                data = b""
            if not data:
                self._lost()
                if until_started:
                    raise OSError(f"zpipe fork server (pid {self.pid}) ended")
                return None
            message = json.loads(data)
            if "started" in message:
                return int(message["started"])  # answers come in the order asked
            if "error" in message:
                raise OSError(message["error"])
            child = self.children.pop(int(message["ended"]), None)
            if child is not None:
                child.returncode = int(message["status"])
            if not until_started:
                deadline = time.monotonic()  # one was waited for: now only what is there

    def _lost(self) -> None:
        """The server died (killed by hand): its replicas had SIGTERM from their
        parent-death signal; whatever still runs is killed, and all count as ended."""
        for pid, child in list(self.children.items()):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
            child.returncode = -signal.SIGKILL
        self.children.clear()

    def close(self) -> None:
        """After every replica has been reaped: the server leaves."""
        self.sock.close()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# -- the server -------------------------------------------------------------------


def _serve(sock: socket.socket) -> tuple[list[str], dict[str, str]] | None:
    """Fork replicas until the launcher leaves; in a child, return its (argv, env)."""
    # Imported in the child by `zpipe stage` itself; here, once for every replica.
    import zpipe.cli  # noqa: F401
    import zpipe.replica.worker  # noqa: F401
    gc.collect()
    gc.freeze()  # the children's collections (and their exit's) skip all of this
    wake_read, wake_write = os.pipe()  # SIGCHLD wakes the loop through it
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_read, selectors.EVENT_READ)
    live: set[int] = set()  # forked and not reaped: their pids are still theirs
    while True:
        ready = [key.fileobj for key, _ in selector.select()]
        if wake_read in ready:
            os.read(wake_read, 4096)
        _reap(sock, live)
        if sock not in ready:
            continue
        # (recv_fds ignores its flags before Python 3.12: read only when readable.)
        data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 2)
        if not data:
            return None  # the launcher closed its end: the run is over
        message = json.loads(data)
        if "signal" in message:
            if message["signal"] in live:
                os.kill(message["signal"], message["signum"])
            continue
        if threading.active_count() != 1:
            # A fork copies only the forking thread: never from more than one.
            _send(sock, {"error": "zpipe fork server: more than one thread; not forking"})
            _close(fds)
            continue
        try:
            pid = os.fork()
        except OSError as exc:
            _send(sock, {"error": f"zpipe fork server: fork: {exc}"})
            _close(fds)
            continue
        if pid == 0:
            selector.close()
            signal.set_wakeup_fd(-1)
            os.close(wake_read)
            os.close(wake_write)
            sock.close()
            _child_streams(fds)
            return message["argv"], message["env"]
        live.add(pid)
        _close(fds)
        _send(sock, {"started": pid})


def _reap(sock: socket.socket, live: set[int]) -> None:
    while live:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        live.discard(pid)
        _send(sock, {"ended": pid, "status": os.waitstatus_to_exitcode(status)})


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    try:
        sock.send(json.dumps(message).encode())
    except OSError:
        pass  # the launcher is gone; the loop's next read says so


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _child_streams(fds: list[int]) -> None:
    """stdin from /dev/null, stdout and stderr to the launcher's pipes."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    for fd, target in ((devnull, 0), *zip(fds, (1, 2))):
        os.dup2(fd, target)
        os.close(fd)


def _become(argv: list[str], env: dict[str, str]) -> list[str]:
    """In a forked child: look and behave like `python -m zpipe ARGS`; returns ARGS."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    os.environ.clear()
    os.environ.update(env)
    _show_command_line(argv)
    args = argv[3:]  # after [python, "-m", "zpipe"]
    # What `python -m zpipe` puts first: the path of zpipe/__main__.py.
    sys.argv = [os.path.join(os.path.dirname(sys.modules["zpipe"].__file__ or ""),
                             "__main__.py"), *args]
    return args


def _show_command_line(argv: list[str]) -> None:
    """Write ``argv`` over this process's own (what /proc/PID/cmdline and ps show).

    Python keeps copies of its argv; the original strings are memory of ours,
    between arg_start and arg_end (/proc/self/stat fields 48 and 49). Left
    as it is when the new one does not fit.
    """
    try:
        with open("/proc/self/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])
    except (OSError, IndexError, ValueError):
        return
    data = b"".join(os.fsencode(a) + b"\0" for a in argv)
    if 0 < len(data) <= end - start:
        ctypes.memmove(start, data.ljust(end - start, b"\0"), end - start)


def _main() -> None:
    launcher, fd = int(sys.argv[1]), int(sys.argv[2])
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != launcher:  # the launcher died before prctl took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    request = _serve(sock)
    if request is None:
        # The launcher has reaped every replica. Nothing of anyone's runs here,
        # so there is nothing for an interpreter's exit to finish.
        os._exit(0)
    args = _become(*request)
    from zpipe.cli import main
    main(args=args, prog_name="zpipe")


if __name__ == "__main__":
    _main()
