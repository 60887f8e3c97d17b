"""One replica of one stage: its sockets, its input and output, its life cycle.

Life cycle, driven by the supervisor (see protocol.py)::

    HELLO -> connect downstream, setup() -> READY -> [source: wait START]
    -> run the body until its input ends (STOP) -> teardown() -> DONE -> wait EXIT

The hot path (receive, decode, call, encode, send) checks the control socket
with one cheap flag read per message; everything else happens when idle.
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import zmq

from . import codec, protocol, transport
from .errors import EncodeError
from .security import Curve
from .shapes import Body, Callee, Inputs

log = logging.getLogger("zpipe")

IDLE_POLL_MS = 1000
# Small items travel several to a message when a link is busy. An output that
# follows the previous flush by more than IDLE_GAP leaves at once (no latency
# on an idle link); otherwise it waits at most BATCH_WAIT for others to join it.
BATCH_ITEMS = 1000
# ZeroMQ spreads messages, not items, over replicas: into a replicated stage,
# small batches keep the work spread evenly.
BATCH_ITEMS_REPLICATED = 4
BATCH_BYTES = 256 * 1024
BATCH_WAIT = 0.001
# While the stage is busy in user code, a waiting batch leaves within this;
# a shorter period costs a busy stage more thread wake-ups than it saves.
FLUSHER_PERIOD = 0.005
IDLE_GAP = 0.0002
CONTROL_CHECK = 0.02  # while busy, look for commands (ABORT, STOP) this often
HEARTBEAT_INTERVAL = 1.0
ERROR_ACK_TIMEOUT = 10.0
EXIT_WAIT_TIMEOUT = None  # a finished replica waits for EXIT as long as the supervisor lives


# Both are BaseExceptions, like GeneratorExit: they pass through user code
# (a stream function iterating its inputs) even where it catches Exception.
class Aborted(BaseException):
    """The supervisor said ABORT: stop at once, without handing anything on."""


class SourceStopped(BaseException):
    """The supervisor said STOP to a source: end production after the item just sent."""


@dataclass(frozen=True)
class Wiring:
    """Where one replica connects: its control address, its input, its downstream."""

    control: str
    input: str | None              # None for a source
    input_hwm: int
    downstream: tuple[str, ...]    # () for a sink
    downstream_hwm: int
    connect_timeout: float = 60.0
    number_outputs: bool = False   # the next stage is ordered: number what this one sends
    ordered: bool = False          # this stage is ordered: tag outputs with their input's number
    reorder: bool = False          # the previous stage is ordered: restore the order on arrival
    keys: str | None = None        # CurveZMQ keys folder, when the pipeline has one
    input_max_size: int | None = None       # bytes per frame, on this stage's input
    downstream_max_size: int | None = None  # ... and on the next stage's
    downstream_name: str = ""


class Control:
    """The replica's end of the control channel (a DEALER to the supervisor's ROUTER)."""

    def __init__(self, sock: zmq.Socket):
        self.sock = sock
        self.started = False
        self.draining = False
        self.stopped = False
        self.exit = False
        self.next_check = 0.0

    def send(self, kind: str, **fields: Any) -> None:
        self.sock.send(protocol.pack(kind, **fields))

    def pending(self) -> bool:
        return bool(self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN)

    def check(self, now: float) -> None:
        """Handle waiting commands, at most every CONTROL_CHECK seconds (a busy replica's poll)."""
        if now >= self.next_check:
            self.next_check = now + CONTROL_CHECK
            if self.pending():
                self.handle()

    def handle(self) -> None:
        """Apply every waiting command; ABORT raises Aborted."""
        while self.pending():
            try:
                kind, fields = protocol.unpack(self.sock.recv(zmq.NOBLOCK))
            except zmq.Again:
                return
            except ValueError as exc:
                log.warning("ignored a control message: %s", exc)
                continue
            if kind == protocol.START:
                self.started = True
            elif kind == protocol.DRAIN:
                self.draining = True
            elif kind == protocol.STOP:
                self.stopped = True
            elif kind == protocol.EXIT:
                self.exit = True
            elif kind == protocol.ABORT:
                raise Aborted(fields.get("reason", "aborted"))

    def wait_for(self, condition: Callable[[], bool], timeout: float | None = None) -> bool:
        """Handle commands until ``condition()`` holds; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.handle()
            if condition():
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            self.sock.poll(100 if deadline is None else
                           max(1, min(100, int((deadline - time.monotonic()) * 1000))))


class Inbox(Inputs):
    """The items arriving on a replica's PULL socket, as an iterator.

    It ends when the supervisor says STOP, which it does only once the
    replicas of this stage together have received every item upstream sent.
    """

    def __init__(self, sock: zmq.Socket, control: Control, stage: str, batch_limit: int):
        self.sock = sock
        self.batch_limit = batch_limit
        self.control = control
        self.stage = stage
        self.buffer: collections.deque[Any] = collections.deque()
        self.received = 0
        self.reported: int | None = None
        self.malformed = 0
        self.last_item: Any = None
        self.seqs: collections.deque[int] = collections.deque()  # numbers of buffered items
        self.seq = -1                   # number of the item last returned (numbered links)
        self.reorder: Reorder | None = None
        self.before_idle: Callable[[], None] = lambda: None  # the outbox flushes its batch
        self.poller = zmq.Poller()
        self.poller.register(sock, zmq.POLLIN)
        self.poller.register(control.sock, zmq.POLLIN)

    def __next__(self) -> Any:
        while not self.buffer:  # a message may add nothing yet (held back for reordering)
            if not self._fill(block=True):
                raise StopIteration
        if self.seqs:
            self.seq = self.seqs.popleft()
        item = self.last_item = self.buffer.popleft()
        return item

    def batches(self) -> Any:
        """Lists of every item waiting (at least one), for ``set_get_all()``."""
        while True:
            while not self.buffer:
                if not self._fill(block=True):
                    return
            while len(self.buffer) < self.batch_limit and self._fill(block=False):
                pass
            batch = list(self.buffer)
            self.buffer.clear()
            self.last_item = batch
            yield batch

    def _fill(self, block: bool) -> bool:
        """Receive one message into the buffer; False when none came (ended, or not blocking)."""
        while True:
            try:
                head = self.sock.recv(zmq.NOBLOCK, copy=False)
                # Only arrays make more frames; a one-frame message skips the
                # multipart machinery (the common, small case).
                frames = [head, *self.sock.recv_multipart(copy=False)] if head.more else [head]
            except zmq.Again:
                if not block or self.control.stopped:
                    return False
                self._idle()
                continue
            self.control.check(time.monotonic())
            try:
                items, tags = codec.decode_tagged(frames)
            except codec.DecodeError as exc:
                # Anyone may reach a socket: what is not zpipe's format is
                # dropped, never fatal (a real peer of another version is
                # caught by the supervisor when it says hello).
                self.malformed += 1
                log.warning("stage %r dropped a malformed message (%d so far): %s",
                            self.stage, self.malformed, exc)
                continue
            self.received += len(items)
            if tags is None:
                self.buffer.extend(items)
            elif self.reorder is not None:
                self.buffer.extend(self.reorder.add(items, tags))
            else:
                self.buffer.extend(items)
                self.seqs.extend(tag[0] for tag in tags)
            return True

    def _idle(self) -> None:
        self.before_idle()  # never sit on outputs while waiting for input
        if self.control.draining and self.received != self.reported:
            self.control.send(protocol.RECEIVED, received=self.received)
            self.reported = self.received
        events = dict(self.poller.poll(IDLE_POLL_MS))
        if self.control.sock in events:
            self.control.handle()


class Reorder:
    """Puts the outputs of an ordered stage's replicas back into input order.

    Each output carries its input's number and a LAST flag on the last output
    for that input; an input without outputs sends a MARKER. Outputs wait here
    until every earlier input is complete.
    """

    def __init__(self) -> None:
        self.next = 0
        self.waiting: dict[int, list[Any]] = {}
        self.complete: set[int] = set()
        self.markers = 0

    def add(self, items: list[Any], tags: list[Any]) -> list[Any]:
        for item, (seq, flags) in zip(items, tags):
            bucket = self.waiting.setdefault(seq, [])
            if flags & codec.TAG_MARKER:
                self.markers += 1
            else:
                bucket.append(item)
            if flags & codec.TAG_LAST:
                self.complete.add(seq)
        ready: list[Any] = []
        while self.next in self.complete:
            self.complete.remove(self.next)
            ready.extend(self.waiting.pop(self.next))
            self.next += 1
        return ready


_NOTHING = object()


class Outbox:
    """Encodes and sends a replica's outputs, blocking (never dropping) when downstream is full.

    Outputs are packed into a batch as they come (see BATCH_*); the batch
    leaves when it is full, when it holds an array or many bytes, when its
    oldest output has waited BATCH_WAIT, or when the replica is about to wait
    for input. While the main thread is busy in user code, a Flusher thread
    sends a batch whose time is up; a lock hands the socket between the two.
    """

    def __init__(self, sock: zmq.Socket | None, control: Control, source: bool,
                 number_outputs: bool = False, ordered_by: Inbox | None = None):
        self.sock = sock
        self.control = control
        self.source = source
        self.sent = 0
        self.markers = 0
        self.number_outputs = number_outputs
        self.numbered = 0
        self.ordered_by = ordered_by     # an ordered stage's inbox: outputs take its numbers
        self.pending: Any = _NOTHING     # an ordered stage's output, held until the next one
        self.plain = not number_outputs and ordered_by is None  # the usual case, checked first
        self.batch = codec.Batch()
        self.lock = threading.Lock()
        self.oldest = 0.0                # when the batch's first output was added
        self.last_flush = 0.0
        self.flusher: Flusher | None = None
        self.max_size: int | None = None
        self.downstream = ""
        self.batch_items = BATCH_ITEMS
        if sock is not None:
            self.poller = zmq.Poller()
            self.poller.register(sock, zmq.POLLOUT)
            self.poller.register(control.sock, zmq.POLLIN)
            self.flusher = Flusher(self)
            self.flusher.start()

    def send(self, item: Any) -> None:
        if self.plain:
            return self._emit(item, None)
        if self.ordered_by is not None:
            # Held back one output so that the last one of each input can carry LAST.
            if self.pending is not _NOTHING:
                self._emit(self.pending, [self.ordered_by.seq, 0])
            self.pending = item
            return
        if self.number_outputs:
            tag, self.numbered = [self.numbered, codec.TAG_LAST], self.numbered + 1
            self._emit(item, tag)
        else:
            self._emit(item, None)

    def end_input(self) -> None:
        """An ordered stage has handled one input completely: close its outputs."""
        assert self.ordered_by is not None
        seq = self.ordered_by.seq
        if self.pending is _NOTHING:
            self.markers += 1
            self._emit(None, [seq, codec.TAG_LAST | codec.TAG_MARKER])
        else:
            item, self.pending = self.pending, _NOTHING
            self._emit(item, [seq, codec.TAG_LAST])

    def _emit(self, item: Any, tag: Any) -> None:
        now = time.monotonic()
        if self.sock is None:
            self.sent += 1
        else:
            with self.lock:
                batch = self.batch
                empty = not batch.encoded
                batch.add(item, tag)
                if self.max_size is not None and batch.largest_frame() > self.max_size:
                    self._respect_max_size(now)
                if empty:
                    self.oldest = now
                if (empty and now - self.last_flush > IDLE_GAP) or batch.arrays or \
                        len(batch.encoded) >= self.batch_items or batch.nbytes >= BATCH_BYTES or \
                        now - self.oldest >= BATCH_WAIT:
                    self._flush_locked(now)
                elif empty and self.flusher is not None and self.flusher.idle:
                    self.flusher.idle = False
                    self.flusher.armed.set()
        self.control.check(now)
        if self.source and self.control.stopped:
            raise SourceStopped()

    def _respect_max_size(self, now: float) -> None:
        """The last item made a frame too big for the next stage: send it on its own, or fail."""
        assert self.max_size is not None
        last = self.batch.pop()
        if self.batch.encoded:
            self._flush_locked(now)
        self.batch.push(*last)
        if self.batch.largest_frame() > self.max_size:
            self.batch.pop()
            raise EncodeError(f"an item of {self.batch_size_of(last)} bytes is larger than "
                              f"stage {self.downstream!r} accepts (max_message_size "
                              f"{self.max_size})")

    @staticmethod
    def batch_size_of(last: tuple[bytes, Any, list[Any]]) -> int:
        data, _, arrays = last
        return len(data) + sum(len(a) for a in arrays)

    def flush(self) -> None:
        """Send what waits in the batch (main thread; blocks while downstream is full)."""
        if self.sock is not None and self.batch:
            with self.lock:
                if self.batch:
                    self._flush_locked(time.monotonic())

    def _flush_locked(self, now: float) -> None:
        count = len(self.batch)
        frames = self.batch.frames()
        assert self.sock is not None
        try:
            _send(self.sock, frames)
        except zmq.Again:
            self._send_blocking(frames)
        self.sent += count
        self.last_flush = now

    def flush_if_due(self) -> bool:
        """From the Flusher: send the batch if its time is up and the socket takes it now.

        Returns whether a batch still waits (the Flusher then looks again later).
        """
        if not self.lock.acquire(blocking=False):
            return True  # the main thread is sending: look again later
        try:
            assert self.sock is not None and self.flusher is not None
            now = time.monotonic()
            if self.batch.encoded and now - self.oldest >= BATCH_WAIT and \
                    self.sock.getsockopt(zmq.EVENTS) & zmq.POLLOUT:
                count = len(self.batch)
                _send(self.sock, self.batch.frames())
                self.sent += count
                self.last_flush = now
            if not self.batch.encoded:
                # Decided under the lock, so that _emit sees it and re-arms.
                self.flusher.idle = True
                return False
            return True
        finally:
            self.lock.release()

    def close(self) -> None:
        if self.flusher is not None:
            self.flusher.stop()

    def _send_blocking(self, frames: list[Any]) -> None:
        assert self.sock is not None
        while True:
            events = dict(self.poller.poll(IDLE_POLL_MS))
            if self.control.sock in events:
                self.control.handle()
            if self.sock in events:
                try:
                    _send(self.sock, frames)
                    return
                except zmq.Again:
                    continue


def _send(sock: zmq.Socket, frames: list[Any]) -> None:
    """Send without blocking (zmq.Again if full); arrays without a copy, small headers copied
    (a copy is cheaper than tracking a zero-copy frame for a few hundred bytes)."""
    if len(frames) == 1:
        sock.send(frames[0], zmq.NOBLOCK)
    else:
        sock.send_multipart(frames, zmq.NOBLOCK, copy=False)


class Flusher(threading.Thread):
    """Sends an outbox's batch that has waited BATCH_WAIT, looking every FLUSHER_PERIOD.

    It sleeps on ``armed`` while no batch waits; the outbox sets it when a
    batch starts and the Flusher is idle (both under the outbox's lock).
    """

    def __init__(self, outbox: Outbox):
        super().__init__(name="zpipe-flusher", daemon=True)
        self.outbox = outbox
        self.armed = threading.Event()
        self.idle = True
        self.stopping = False

    def run(self) -> None:
        while not self.stopping:
            self.armed.wait()
            self.armed.clear()
            while not self.stopping:
                time.sleep(FLUSHER_PERIOD)
                if not self.outbox.flush_if_due():
                    break

    def stop(self) -> None:
        self.stopping = True
        self.armed.set()
        self.join(5)


class Heartbeat(threading.Thread):
    """Sends heartbeats with counts; gives up the replica if the supervisor goes silent.

    It has its own DEALER socket (ZeroMQ sockets belong to one thread), so it
    keeps beating while the main thread is inside a long user call.
    """

    def __init__(self, ctx: zmq.Context, address: str, identity: str,
                 counts: Callable[[], dict[str, int]], supervisor_timeout: float,
                 on_lost: Callable[[], None], first_contact_timeout: float = 60.0,
                 curve: Curve | None = None):
        super().__init__(name=f"zpipe-heartbeat-{identity}", daemon=True)
        self.ctx = ctx
        self.address = address
        self.identity = identity
        self.counts = counts
        self.supervisor_timeout = supervisor_timeout
        self.first_contact_timeout = first_contact_timeout
        self.curve = curve
        self.on_lost = on_lost
        self.stopping = threading.Event()
        # stop() wakes the thread through an inproc pair rather than the thread
        # polling often: frequent wake-ups cost the data path ~60 us per hop.
        wake = f"inproc://zpipe-wake-{id(self)}"
        self.waker = ctx.socket(zmq.PAIR)
        self.waker.setsockopt(zmq.LINGER, 0)
        self.waker.bind(wake)
        self.woken = ctx.socket(zmq.PAIR)
        self.woken.setsockopt(zmq.LINGER, 0)
        self.woken.connect(wake)

    def run(self) -> None:
        sock = transport.dealer(self.ctx, self.address, f"{self.identity}/hb", self.curve)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self.woken, zmq.POLLIN)
        last_ping, heard = time.monotonic(), False
        try:
            while not self.stopping.is_set():
                sock.send(protocol.pack(protocol.HEARTBEAT, **self.counts()))
                deadline = time.monotonic() + HEARTBEAT_INTERVAL
                while (left := deadline - time.monotonic()) > 0 and not self.stopping.is_set():
                    if sock in dict(poller.poll(int(left * 1000) + 1)):
                        sock.recv()
                        last_ping, heard = time.monotonic(), True
                # Until the first ping the supervisor may still be starting
                # (containers start in any order): allow it the start-up time.
                limit = self.supervisor_timeout if heard else max(self.supervisor_timeout,
                                                                   self.first_contact_timeout)
                if time.monotonic() - last_ping > limit:
                    self.on_lost()
                    return
        except zmq.ContextTerminated:
            pass
        finally:
            sock.close(0)
            self.woken.close(0)

    def stop(self) -> None:
        """From the thread that made this Heartbeat: end it now."""
        self.stopping.set()
        if not self.waker.closed:
            try:
                self.waker.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the thread has already ended

    def close(self) -> None:
        self.waker.close(0)


class Replica:
    """Runs one replica to its end and returns its exit status (0 ok, 1 failed)."""

    def __init__(self, callee: Callee, replica: int, replicas: int, wiring: Wiring,
                 ctx: zmq.Context):
        self.callee = callee
        self.stage = callee.stage
        self.replica = replica
        self.name = f"{callee.stage}-{replica}"
        self.wiring = wiring
        self.body = Body(callee, replica, replicas)
        self.ctx = ctx
        self.control: Control | None = None
        self.inbox: Inbox | None = None
        self.outbox: Outbox | None = None
        self.phase = "start"

    def counts(self) -> dict[str, int]:
        """Entries received and sent on the links (order markers included, and counted)."""
        inbox, outbox = self.inbox, self.outbox
        return {"received": inbox.received if inbox else 0,
                "sent": outbox.sent if outbox else 0,
                "markers_received": inbox.reorder.markers if inbox and inbox.reorder else 0,
                "markers_sent": outbox.markers if outbox else 0}

    def run(self) -> int:
        sockets: list[zmq.Socket] = []
        curve = Curve(self.wiring.keys) if self.wiring.keys else None
        control_sock = transport.dealer(self.ctx, self.wiring.control, self.name, curve)
        sockets.append(control_sock)
        control = self.control = Control(control_sock)
        status = 0
        try:
            control.send(protocol.HELLO, pid=os.getpid(), host=socket.gethostname(),
                         version=codec.PROTOCOL_VERSION)
            self.phase = "connect"
            if self.wiring.input is not None:
                pull = transport.pull(self.ctx, self.wiring.input, self.wiring.input_hwm, curve,
                                      self.wiring.input_max_size)
                sockets.append(pull)
                self.inbox = Inbox(pull, control, self.stage, self.wiring.input_hwm)
                if self.wiring.reorder:
                    self.inbox.reorder = Reorder()
            push = None
            if self.wiring.downstream:
                push = transport.push(self.ctx, self.wiring.downstream, self.wiring.downstream_hwm,
                                      control.handle, self.wiring.connect_timeout, curve)
                sockets.append(push)
            self.outbox = Outbox(push, control, source=self.inbox is None,
                                 number_outputs=self.wiring.number_outputs,
                                 ordered_by=self.inbox if self.wiring.ordered else None)
            self.outbox.max_size = self.wiring.downstream_max_size
            if len(self.wiring.downstream) > 1:
                self.outbox.batch_items = BATCH_ITEMS_REPLICATED
            self.outbox.downstream = self.wiring.downstream_name
            if self.inbox is not None:
                self.inbox.before_idle = self.outbox.flush
            self.phase = "setup"
            try:
                self.body.setup()
                control.send(protocol.READY)
                if self.inbox is None:
                    control.wait_for(lambda: control.started or control.stopped)
                self.phase = "run"
                if not (self.inbox is None and control.stopped):
                    self._run_body()
            except BaseException:
                self._teardown_after_failure()
                raise
            self.phase = "teardown"
            self.body.teardown()
            control.send(protocol.DONE, **self.counts())
            self.phase = "done"
            control.wait_for(lambda: control.exit, EXIT_WAIT_TIMEOUT)
        except Aborted:
            status = 0
        except Exception as exc:  # noqa: BLE001 - every failure goes to the supervisor
            status = 1
            self._report(exc)
        finally:
            if self.outbox is not None:
                self.outbox.close()
            for sock in sockets:
                sock.close(0 if status == 0 else transport.LINGER_MS)
        return status

    def _teardown_after_failure(self) -> None:
        # The first failure is the one to report; a teardown failing after it
        # is only logged.
        try:
            self.body.teardown()
        except Exception:  # noqa: BLE001
            log.exception("stage %r replica %s: teardown failed too", self.stage, self.name)

    def _run_body(self) -> None:
        assert self.outbox is not None and self.control is not None
        end_input = self.outbox.end_input if self.outbox.ordered_by is not None else None
        try:
            self.body.run(self.inbox, self.outbox.send, end_input)
        except SourceStopped:
            pass
        self.outbox.flush()  # before DONE: what DONE counts must be on its way
        if self.inbox is None:
            return
        if self.inbox is not None and not self.control.stopped:
            # The function returned before its input ended (like a `head`): the
            # rest of the input must still be received, or upstream never
            # finishes; it is counted and said, not silently lost.
            discarded = sum(1 for _ in self.inbox)
            if discarded:
                log.warning("stage %r replica %s: the function returned before its input "
                            "ended; %d later items were discarded", self.stage, self.name,
                            discarded)

    def _report(self, exc: BaseException) -> None:
        assert self.control is not None
        item = self.inbox.last_item if self.inbox else None
        item_type = type(item).__name__ if self.inbox and self.phase == "run" else None
        try:
            self.control.send(protocol.ERROR, exc_type=_qualified(type(exc)), message=str(exc),
                              traceback=format_user_traceback(exc), phase=self.phase,
                              item_type=item_type, exception=_pickled(exc), **self.counts())
            # Wait until the supervisor has it (it answers ABORT), so the report
            # can never be overtaken by the news of this process's exit.
            self.control.wait_for(lambda: False, ERROR_ACK_TIMEOUT)
        except Aborted:
            pass
        except zmq.ZMQError:
            pass


def _pickled(exc: BaseException) -> bytes | None:
    """The exception itself, for a caller in Python to re-raise (None if it will not pickle)."""
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)
        return data
    except Exception:  # noqa: BLE001 - the formatted report is still sent
        return None


def _qualified(cls: type) -> str:
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


_OWN_FILES = str(Path(__file__).resolve().parent)


def format_user_traceback(exc: BaseException) -> str:
    """The traceback without zpipe's own frames, so the user's code stands out."""
    info = traceback.TracebackException.from_exception(exc)
    frames = [f for f in info.stack if not str(Path(f.filename).resolve()).startswith(_OWN_FILES)]
    if frames:
        info.stack = traceback.StackSummary.from_list(frames)
    return "".join(info.format())
