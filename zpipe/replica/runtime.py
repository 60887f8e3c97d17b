"""One replica of one stage: its sockets, its input and output, its life cycle.

Life cycle, driven by the supervisor (see protocol.py)::

    HELLO -> connect downstream, setup() -> READY -> [source: wait START]
    -> run the body until its input ends (STOP) -> teardown() -> DONE -> wait EXIT

The hot path (receive, decode, call, encode, send) checks the control socket
with one cheap flag read per message; everything else happens when idle.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

import zmq

from ..watch.observe import Histogram, Times
from ..wire import codec, protocol, shm, transport
from ..wire.security import Curve
from . import balance, failures
from .control import Aborted, Control, SourceStopped
from .delivery import ACK_DELAY, Lots
from .inbox import Inbox, Reorder
from .outbox import BATCH_ITEMS_REPLICATED, Outbox
from .runs import Runs
from .runs import possible as runs_possible
from .shapes import Body, Callee
from .stuck import CallWatch

log = logging.getLogger("zpipe")

HEARTBEAT_INTERVAL = 1.0
PAUSE = 1.0  # a heartbeat this late means its thread did not run meanwhile
ERROR_ACK_TIMEOUT = 10.0
EXIT_TERMINATED = 143  # 128 + SIGTERM
EXIT_WAIT_TIMEOUT = None  # a finished replica waits for EXIT as long as the supervisor lives


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
    input_leased: bool = False     # messages in are acknowledged once finished (delivery.py)
    output_leased: bool = False    # ... and so are messages out: kept until then
    segments: str | None = None    # the run's shared-memory folder (shm.py), if it has one


class Heartbeat(threading.Thread):
    """Sends heartbeats with counts; gives up the replica if the supervisor goes silent.

    It has its own DEALER socket (ZeroMQ sockets belong to one thread), so it
    keeps beating while the main thread is inside a long user call.
    """

    def __init__(self, ctx: zmq.Context, address: str, identity: str,
                 counts: Callable[[], dict[str, int]], supervisor_timeout: float,
                 on_lost: Callable[[], None], first_contact_timeout: float = 60.0,
                 curve: Curve | None = None, watch: CallWatch | None = None):
        super().__init__(name=f"zpipe-heartbeat-{identity}", daemon=True)
        self.watch = watch  # the replica's stuck-call watch (stuck.py), if it has one
        self.ctx = ctx
        self.address = address
        self.identity = identity
        self.counts = counts
        self.supervisor_timeout = supervisor_timeout
        self.first_contact_timeout = first_contact_timeout
        self.curve = curve
        self.on_lost = on_lost
        self.on_beat: Callable[[], None] | None = None  # each beat (health.py, when served)
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
                watch = self.watch
                if watch is not None:
                    watch.check(sock)
                sock.send(protocol.pack(protocol.HEARTBEAT, **self.counts(),
                                        call_started_ago=watch.ago() if watch else None))
                if self.on_beat is not None:
                    self.on_beat()
                deadline = time.monotonic() + HEARTBEAT_INTERVAL
                while (left := deadline - time.monotonic()) > 0 and not self.stopping.is_set():
                    if sock in dict(poller.poll(int(left * 1000) + 1)):
                        sock.recv()
                        last_ping, heard = time.monotonic(), True
                if time.monotonic() - deadline > PAUSE:
                    # This thread did not run for a while (a call holding the GIL,
                    # SIGSTOP): the supervisor's silence then says nothing. Beat
                    # again, and judge only from now on.
                    last_ping = time.monotonic()
                    continue
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
        self.watch = self.body.errors.watch if self.body.errors else None  # see Heartbeat
        self.ctx = ctx
        self.control: Control | None = None
        self.inbox: Inbox | None = None
        self.outbox: Outbox | None = None
        self.phase = "start"
        self.times = Times()  # its inbox's and outbox's clocks (observe.py)
        self.total: int | None = None  # a source's count of items, when it has a len()
        self.body.on_total = functools.partial(setattr, self, "total")
        # A SIGTERM while teardown() runs waits for it (see worker._terminate).
        self.tearing_down = False
        self.terminate_after_teardown = False

    def counts(self) -> dict[str, int]:
        """Entries received and sent on the links (order markers included, and counted)."""
        inbox, outbox = self.inbox, self.outbox
        dispatcher = outbox.dispatcher if outbox is not None else None
        return {"received": inbox.received if inbox else 0,
                "sent": outbox.sent if outbox else 0,
                "markers_received": inbox.reorder.markers if inbox and inbox.reorder else 0,
                "markers_sent": outbox.markers if outbox else 0,
                # (kept in heartbeats: a replica killed later sends no last report)
                "redelivered": dispatcher.outstanding.redelivered if dispatcher else 0,
                "figures": self.figures()}

    def figures(self) -> dict[str, object]:
        """What it measured of itself (observe.py): read by the heartbeat thread."""
        times, inbox = self.times, self.inbox
        now = _monotonic()
        return {"busy": times.busy(now), "blocked": times.blocked, "idle": times.idle,
                "queue": inbox.queued() if inbox is not None else 0,
                "rss": _rss(), "cpu": time.process_time(),
                "items": times.items.wire(),
                "end_to_end": times.end_to_end.wire() if times.end_to_end else None,
                "total": self.total,
                # input = "latest" passed these over; lists handed to a batched call
                # (batch, set_get_all) and the items in them: mean = batch_items / batches.
                "dropped": inbox.dropped if inbox is not None else 0,
                "batches": inbox.batches_taken if inbox is not None else 0,
                "batch_items": inbox.batched if inbox is not None else 0}

    def final_counts(self) -> dict[str, int]:
        """counts(), and what it still holds: for its last report, from the main thread
        (the heartbeat thread must not walk structures the main thread changes)."""
        inbox, outbox = self.inbox, self.outbox
        taken = outbox is not None and outbox.checking
        dispatcher = outbox.dispatcher if outbox is not None else None
        return {**self.counts(), "pending": inbox.unfinished(taken) if inbox else 0,
                "unsent": outbox.unsent() if outbox else 0,
                "unacked": dispatcher.outstanding.items() if dispatcher else 0,
                "stale": inbox.lots.stale if inbox and inbox.lots else 0}

    def run(self) -> int:
        sockets: list[zmq.Socket] = []
        curve = Curve(self.wiring.keys) if self.wiring.keys else None
        control_sock = transport.dealer(self.ctx, self.wiring.control, self.name, curve)
        sockets.append(control_sock)
        control = self.control = Control(control_sock)
        if self.body.errors is not None:
            self.body.errors.send = control.send  # ITEM_ERROR, from this (the body's) thread
        status = 0
        try:
            control.send(protocol.HELLO, pid=os.getpid(), host=socket.gethostname(),
                         version=codec.PROTOCOL_VERSION)
            self.phase = "connect"
            # The supervisor's answer says which life of this replica this is:
            # on a leased input, messages meant for an earlier one are dropped.
            if not control.wait_for(lambda: control.generation is not None,
                                    self.wiring.connect_timeout):
                raise TimeoutError(f"no answer from the supervisor at {self.wiring.control} "
                                   f"within {self.wiring.connect_timeout:g} s")
            wiring = self.wiring
            lots = None
            if wiring.input is not None:
                # A leased input is a ROUTER: credits (balance.py), acknowledgements.
                leased = wiring.input_leased
                pull = transport.pull(self.ctx, wiring.input, wiring.input_hwm, curve,
                                      wiring.input_max_size, leased)
                sockets.append(pull)
                if leased:
                    lots = Lots(functools.partial(transport.send_frames, pull,
                                                  flags=transport.NOBLOCK),
                                ACK_DELAY, wiring.input_hwm)
                self.inbox = Inbox(pull, control, self.stage, wiring.input_hwm,
                                   balance.Lender(pull, wiring.input_hwm, self.body.replicas > 1,
                                                  lots) if leased else None,
                                   lots)
                self.inbox.generation = control.generation
                self.inbox.times = self.times
                policy = self.callee.policy
                if leased and policy is not None and policy.on_error != "fail":
                    self.inbox.careful = control.attempt
                if wiring.reorder:
                    self.inbox.reorder = Reorder()
                if not leased and wiring.input.startswith("ipc://") and \
                        shm.usable(wiring.segments):
                    assert wiring.segments is not None
                    self.inbox.segments = shm.Attached(wiring.segments)
            push = dispatcher = None
            downstream = wiring.downstream
            if downstream:
                # Known downstream by name and life: a poisoned item is named by it.
                # A replica downstream that is down (being started again) or gone
                # is not waited for.
                absent = {i for i, state in enumerate(control.downstream)
                          if type(state) is list and len(state) == 2 and state[1] != "up"}
                push = transport.push(self.ctx, downstream, wiring.downstream_hwm,
                                      control.handle, wiring.connect_timeout, curve,
                                      wiring.output_leased,
                                      f"{self.name}#{control.generation}".encode(), absent)
                sockets.append(push)
                if wiring.output_leased:
                    dispatcher = balance.Dispatcher(push, downstream, wiring.downstream_hwm)
                    dispatcher.starting_from(control.downstream)
                    control.on_peer = dispatcher.event
                    for event in control.early:
                        dispatcher.event(*event)
                    control.early.clear()
            # Large items through shared memory: on ipc links to one host, not leased
            # (a leased message is kept to be sent again: it keeps its frames).
            # Each link's queues, at both ends, and one item in hand at each.
            in_flight = 2 * wiring.downstream_hwm * len(downstream) + 2
            segments = shm.Segments(wiring.segments, in_flight) \
                if downstream and dispatcher is None and \
                all(a.startswith("ipc://") for a in downstream) and \
                shm.usable(wiring.segments) else None
            self.outbox = Outbox(push, control, source=self.inbox is None,
                                 number_outputs=wiring.number_outputs,
                                 ordered_by=self.inbox if wiring.ordered else None,
                                 dispatcher=dispatcher,
                                 # Over inproc the receiver would get the sender's very
                                 # memory, and a leased message is kept to be sent
                                 # again: there an array is copied as it is sent.
                                 copy_arrays=dispatcher is not None or
                                 any(a.startswith("inproc://") for a in downstream),
                                 segments=segments)
            self.outbox.max_size = wiring.downstream_max_size
            self.outbox.times = self.times
            self.outbox.origins = self.inbox
            if not downstream:
                self.times.end_to_end = Histogram()  # a sink times stamps end to end
            if len(downstream) > 1:
                self.outbox.batch_items = BATCH_ITEMS_REPLICATED
            if lots is not None and dispatcher is not None:
                lots.outputs_pending = self.outbox.pending_seq
                lots.outputs_acked_below = self.outbox.acked_below
            if lots is not None or dispatcher is not None:
                control.periodic = self._keep_leases
                if push is not None and self.inbox is not None:
                    # An idle replica wakes for acknowledgements too (its input's
                    # senders may be waiting on them).
                    self.inbox.wake_for(push.getsockopt(zmq.FD), self._keep_leases)
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
                self.times.started = _monotonic()
                if not (self.inbox is None and control.stopped):
                    self._run_body()
            except BaseException:
                self._teardown_after_failure()
                raise
            self.phase = "teardown"
            self._teardown()
            if self.terminate_after_teardown:
                raise SystemExit(EXIT_TERMINATED)
            self._wait_delivered()
            if self.inbox is not None and self.inbox.lots is not None:
                self.inbox.lots.flush()
            control.send(protocol.DONE, **self.final_counts())
            self.phase = "done"
            control.wait_for(lambda: control.exit, EXIT_WAIT_TIMEOUT)
        except Aborted:
            status = 0
            try:
                # What it held: the supervisor says what the run lost (losses.py).
                control.send(protocol.ABORTED, **self.final_counts())
            except zmq.ZMQError:
                pass
        except Exception as exc:  # noqa: BLE001 - every failure goes to the supervisor
            status = 1
            self._report(exc)
        finally:
            if self.outbox is not None:
                self.outbox.close()
            if self.inbox is not None and self.inbox.segments is not None:
                self.inbox.segments.close()
            # The control socket lingers: its last report (ERROR, ABORTED) must
            # reach the supervisor before this process is seen to end.
            for sock in sockets:
                sock.close(0 if status == 0 and sock is not control_sock else transport.LINGER_MS)
        return status

    def _keep_leases(self) -> None:
        """Take acknowledgements from downstream and give them upstream (delivery.py)."""
        assert self.outbox is not None
        self.outbox.pump()
        if self.inbox is not None and self.inbox.lots is not None:
            self.inbox.lots.acknowledge()

    def _wait_delivered(self) -> None:
        """Before DONE on a leased output: every message sent is acknowledged (and sent
        again first, if the replica it went to was lost)."""
        outbox, control = self.outbox, self.control
        assert outbox is not None and control is not None
        if outbox.dispatcher is None:
            return
        poller = zmq.Poller()
        poller.register(outbox.sock, zmq.POLLIN)
        poller.register(control.sock, zmq.POLLIN)
        while True:
            control.handle()
            self._keep_leases()
            if outbox.delivered():
                return
            poller.poll(100)

    def _teardown_after_failure(self) -> None:
        # The first failure is the one to report; a teardown failing after it
        # is only logged.
        try:
            self._teardown()
        except Exception:  # noqa: BLE001
            log.exception("stage %r replica %s: teardown failed too", self.stage, self.name)

    def _teardown(self) -> None:
        self.tearing_down = True
        try:
            self.body.teardown()
        finally:
            self.tearing_down = False

    def _run_body(self) -> None:
        assert self.outbox is not None and self.control is not None
        end_input = self.outbox.end_input if self.outbox.ordered_by is not None else None
        try:
            runs = Runs(self.inbox, self.outbox, self.stage) \
                if runs_possible(self.inbox, self.outbox) else None
            self.body.run(self.inbox, self.outbox.send, end_input, runs)
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
        fields = {**failures.describe(exc), "phase": self.phase, "item_type": item_type,
                  **self.final_counts()}
        try:
            self.control.send(protocol.ERROR, **fields)
            # Wait until the supervisor has it (it answers ABORT), so the report
            # can never be overtaken by the news of this process's exit.
            self.control.wait_for(lambda: False, ERROR_ACK_TIMEOUT)
        except Aborted:
            pass
        except zmq.ZMQError:
            pass


def _rss() -> int:
    """This process's resident memory, in bytes (its peak where /proc is not there)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_monotonic = time.monotonic
