"""The supervisor: readiness, error relay and the ordered drain of a running pipeline.

It binds a ROUTER that every replica's DEALER connects to, and drives the
pipeline through these steps (message names from protocol.py):

1. Start: every replica says HELLO, then READY once its sockets are connected
   and its set-up is done. Only then do the sources get START, so no item is
   sent before every replica downstream is listening.
2. Drain, stage by stage in flow order: when every replica of stage k is DONE,
   the supervisor knows how many items stage k sent (counted by the senders).
   It sends DRAIN to stage k+1, whose replicas report how many they received
   each time their input runs dry. When the reports add up to what stage k
   sent, every item has arrived: stage k+1 gets STOP (its input ends) and
   stage k gets EXIT (its outputs are all delivered, so it may close).
3. Failure: an ERROR, or a replica that exits without one, is reported with
   stage, replica, exception and traceback; every replica gets ABORT, then
   SIGTERM, then SIGKILL, each after a bounded wait.
4. Interrupt: the first request stops the sources and lets the rest drain for
   ``grace`` seconds, then aborts; a second one kills at once.
"""

from __future__ import annotations

import contextlib
import signal as signals
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import zmq

from ..config import PipelineSpec
from ..replica.failures import Failure
from ..replica.itempolicy import Tally, stuck_failure, stuck_report
from ..watch.observe import Observer
from ..wire import protocol, transport
from ..wire.codec import PROTOCOL_VERSION
from ..wire.security import Curve, stop_authenticator
from . import liveness, losses
from .liveness import Liveness
from .recovery import Recovery

TICK_MS = 100
EXIT_TICK_MS = 10  # once every stage is done: replicas are exiting, and the run ends then
ABORT_WAIT = 3.0      # after ABORT, how long before SIGTERM
TERMINATE_WAIT = 3.0  # after SIGTERM, how long before SIGKILL
HEARTBEAT_TIMEOUT = 5.0  # a remote replica silent this long is said to be
GIL_SILENCE = 3.0  # no heartbeat for this long, in a call past item_timeout: it holds the GIL
DROP_SETTLE = 0.5  # a local replica whose connection dropped and lives this long is frozen
STRANGERS_REPORTED = 5   # messages from unknown peers reported one by one,
STRANGERS_EVERY = 1000   # then one line per this many


class Workers(Protocol):
    """The replicas' processes (or threads), as the supervisor sees them."""

    def exited(self) -> dict[str, int]:
        """Replicas that ended since the last call: name -> exit status (negative: signal)."""

    def terminate(self, names: list[str]) -> None: ...

    def kill(self, names: list[str]) -> None: ...

    def restart(self, name: str) -> None:
        """Start that replica again (a new life, under the same name)."""

    def alive(self, name: str) -> bool:
        """Whether that replica's process (or thread) is still there."""

    def pid(self, name: str) -> int | None:
        """The process that replica runs in, if started here (a replica that dies
        before its hello is named by it); None for one started elsewhere."""


@dataclass
class ReplicaState:
    name: str
    stage: str
    replica: int
    pid: int | None = None
    host: str | None = None
    hello: bool = False
    hello_heard: int = 0  # the number of its latest hello among the messages heard (liveness.py)
    ready: bool = False
    done: bool = False
    failed: bool = False
    exited: bool = False
    reported: int = 0
    received: int = 0
    sent: int = 0
    markers_received: int = 0
    markers_sent: int = 0
    pending: int = 0   # entries received and not finished (after an abort)
    unsent: int = 0    # outputs never sent (after an abort)
    final: bool = False  # the counts come from its last report (done, error, aborted)
    heartbeat: tuple[int, int] = (0, 0)  # (received, sent) from the last heartbeat
    last_seen: float = 0.0
    silent: bool = False  # its heartbeats stopped (and that was said)
    gil_stuck: bool = False  # a call of it past item_timeout holds the GIL (and was ended)
    attempting: list[Any] | None = None  # the item sent again it works on (recovery.py)
    call_ago: float | None = None  # its last heartbeat: seconds in the call on one item
    redelivered: int = 0  # items it sent again after a replica downstream was lost
    unacked: int = 0      # items it had sent and not seen acknowledged (its last report)
    stale: int = 0        # messages it dropped, meant for its earlier life
    generation: int = 0   # which life (0: the first); see recovery.py
    gone: bool = False    # ended for good; its siblings took over its work
    error_cause: str | None = None  # an exception it reported, when it may be replaced
    carried: dict[str, int] = field(default_factory=dict)  # counts of its earlier lives

    COUNTED = ("received", "sent", "markers_received", "markers_sent", "redelivered", "stale")

    def total(self, name: str) -> int:
        """A count over every life of this replica."""
        return getattr(self, name) + self.carried.get(name, 0)

    def carry(self) -> None:
        """It died: what it counted stays counted, a next life counts from zero."""
        for name in self.COUNTED:
            self.carried[name] = self.carried.get(name, 0) + getattr(self, name)
            setattr(self, name, 0)
        self.pending = self.unsent = self.unacked = 0

    def new_life(self) -> None:
        """It is started again (or comes back by itself): the next generation."""
        self.generation += 1
        self.hello = self.ready = self.done = self.failed = self.exited = False
        self.final = False
        self.pid, self.error_cause, self.reported = None, None, 0
        self.heartbeat, self.last_seen = (0, 0), time.monotonic()
        self.silent = self.gil_stuck = False
        self.call_ago = self.attempting = None


@dataclass
class StageState:
    name: str
    replicas: list[ReplicaState]
    status: str = "running"  # running -> draining -> stopping -> done
    expected: int | None = None

    def total(self, name: str) -> int:
        return sum(r.total(name) for r in self.replicas)

    @property
    def received(self) -> int:
        return self.total("received")

    @property
    def sent(self) -> int:
        return self.total("sent")

    @property
    def items_in(self) -> int:
        """Items received, order markers left out."""
        return self.received - self.total("markers_received")

    @property
    def items_out(self) -> int:
        return self.sent - self.total("markers_sent")

    @property
    def pending(self) -> int:
        return sum(r.pending for r in self.replicas)

    @property
    def unsent(self) -> int:
        return sum(r.unsent for r in self.replicas)

    @property
    def unacked(self) -> int:
        return sum(r.unacked for r in self.replicas)

    @property
    def relived(self) -> bool:
        return any(r.generation or r.gone for r in self.replicas)


@dataclass
class Outcome:
    status: str                    # "ok", "failed" or "interrupted"
    failures: list[Failure] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    signal: int | None = None
    elapsed: float = 0.0
    lost: dict[str, dict[str, int]] = field(default_factory=dict)  # see losses.py
    restarts: dict[str, int] = field(default_factory=dict)     # per stage (recovery.py)
    redelivered: dict[str, int] = field(default_factory=dict)  # items sent again into a stage
    item_errors: dict[str, int] = field(default_factory=dict)  # items skipped or dead-lettered
    summary: dict[str, Any] | None = None  # the last snapshot (observe.py): figures per stage

    @property
    def exit_code(self) -> int:
        if self.status == "interrupted":
            return 128 + (self.signal or signals.SIGINT)
        return 1 if self.status == "failed" else 0


class Supervisor:
    """Runs one pipeline's control loop until every replica has ended."""

    def __init__(self, spec: PipelineSpec, control_address: str, workers: Workers,
                 report: Callable[[str], None], grace: float | None = None,
                 ctx: zmq.Context | None = None):
        self.spec = spec
        self.workers = workers
        self.report = report
        # Lines that only say how it goes (left out under --quiet: views.py).
        self.progress: Callable[[str], None] = report
        self.grace = spec.grace if grace is None else grace
        self.ctx = ctx or zmq.Context.instance()
        curve = Curve(spec.keys) if spec.keys else None
        self.router = transport.router(self.ctx, control_address, curve)
        self.liveness = Liveness(self.router)
        self.stages = [StageState(s.name, [ReplicaState(s.replica_name(i), s.name, i)
                                           for i in range(s.replicas)]) for s in spec.stages]
        self.replicas = {r.name: r for st in self.stages for r in st.replicas}
        self.handlers: dict[str, Callable[[ReplicaState, dict[str, Any]], None]] = {
            protocol.HELLO: self._on_hello, protocol.READY: self._on_ready,
            protocol.RECEIVED: self._on_received, protocol.DONE: self._on_done,
            protocol.ERROR: self._on_error, protocol.ABORTED: self._on_aborted,
            protocol.ITEM_ERROR: self._on_item_error, protocol.STUCK: self._on_stuck,
            protocol.ATTEMPT: self._on_attempt}
        # Items skipped or dead-lettered, per stage (on_error, itempolicy.py).
        self.tally = Tally({s.name: s.max_errors for s in spec.stages},
                           {s.name: (spec.dead_letters / f"{s.name}.msgpack")
                            if s.on_error == "dead-letter" and spec.dead_letters else None
                            for s in spec.stages})
        self.strangers = 0  # control messages from peers that are not replicas
        self.recovery = Recovery(self)
        self.observer = Observer(self)  # figures and snapshots (observe.py)
        self.heard = 0  # the number of the message being handled (liveness.heard)
        self.dropped: dict[str, float] = {}  # local replicas whose connection dropped, when
        self.failures: list[Failure] = []
        self.pending_signals: list[int] = []
        self.interrupted: int | None = None
        self.started_at = time.monotonic()
        self.running = False
        self.aborting_since: float | None = None
        self.terminated_since: float | None = None
        self.killed = False
        self.grace_deadline: float | None = None
        self.last_progress = time.monotonic()
        self.killed_since: float | None = None
        # Replicas this process did not start are known only by their heartbeats.
        self.remote = bool(getattr(workers, "remote", False))

    # -- public ------------------------------------------------------------

    def request_stop(self, signum: int = signals.SIGINT) -> None:
        """Ask for a stop (safe to call from a signal handler)."""
        self.pending_signals.append(signum)

    def run(self) -> Outcome:
        try:
            while not all(r.exited for r in self.replicas.values()) or \
                    (self.recovery.pending() and self.aborting_since is None):
                self._tick()
            # A replica's last report is sent before it exits; one whose exit
            # was seen in the same tick may still be waiting here.
            self._read_messages()
        finally:
            self.close()
        if self.strangers:
            self.report(f"ignored {self.strangers} control message(s) from peers that are not "
                        f"replicas of this pipeline")
        if self.interrupted is not None:
            status = "interrupted"
        else:
            status = "failed" if self.failures else "ok"
        counts = {st.name: {"received": st.items_in, "sent": st.items_out} for st in self.stages}
        redelivered = {st.name: self.stages[i - 1].total("redelivered")
                       for i, st in enumerate(self.stages) if i}
        for name, items in redelivered.items():
            if items or self.recovery.restarts[name]:
                self.report(f"stage {name!r}: {self.recovery.restarts[name]} restart(s); "
                            f"{items} item(s) sent to it again after a replica was lost "
                            f"(at least once: those may have arrived twice)")
        for line in self.tally.summary():
            self.report(line)
        lost = {}
        if status != "ok":
            for stage in self.stages:
                if stage.status != "done":
                    self.report(f"stage {stage.name!r} stopped: {stage.items_in} in, "
                                f"{stage.items_out} out")
            lost = losses.losses(self.stages, [self.spec.leased(i)
                                               for i in range(len(self.stages))])
            for line in losses.describe(lost):
                self.report(line)
        self.observer.refresh(time.monotonic(), status, force=True)
        return Outcome(status, self.failures, counts, self.interrupted,
                       time.monotonic() - self.started_at, lost,
                       {k: v for k, v in self.recovery.restarts.items() if v},
                       {k: v for k, v in redelivered.items() if v},
                       item_errors=dict(self.tally.counts), summary=self.observer.latest)

    def close(self) -> None:
        """Close its sockets (run() does, at its end)."""
        self.liveness.close()
        # Lingering: the last EXITs must reach replicas that wait for them (a
        # replica started elsewhere gets no other word, and would give the
        # supervisor up for lost). Messages to peers already gone are dropped.
        self.router.close(transport.LINGER_MS)
        stop_authenticator(self.ctx)

    # -- loop --------------------------------------------------------------

    def _tick(self) -> None:
        # Exits are seen by looking (workers.exited()), not by a message: look
        # more often while they are due, so the run ends as soon as the last one.
        ending = self.stages[-1].status == "done"
        if self.router.poll(EXIT_TICK_MS if ending else TICK_MS):
            self._read_messages()
        for identity, first in self.liveness.dropped():
            # A replica's heartbeat socket drops with its main one: the main one,
            # which begins with its hello, says which life it was.
            if not identity.endswith("/hb"):
                self._connection_dropped(identity, first)
        for name, status in self.workers.exited().items():
            self._on_exit(self.replicas[name], status)
        while self.pending_signals:
            self._on_signal(self.pending_signals.pop(0))
        self._check_timers()
        self.observer.refresh(time.monotonic())

    def _read_messages(self) -> None:
        """Handle every message waiting, without waiting for more."""
        while True:
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) != 2:
                continue
            identity = frames[0].bytes.decode(errors="replace")
            self.heard = self.liveness.heard(identity, frames[1])
            self._on_message(identity, frames[1].bytes)

    def _send(self, to: ReplicaState, kind: str, **fields: Any) -> None:
        if not to.exited:
            self.router.send_multipart([to.name.encode(), protocol.pack(kind, **fields)])
            if self.remote and kind == protocol.EXIT:
                to.exited = True  # its work is over; it closes by itself

    def _on_message(self, identity: str, data: bytes) -> None:
        heartbeat = identity.endswith("/hb")
        replica = self.replicas.get(identity[:-3] if heartbeat else identity)
        if replica is None:
            # Anyone who can reach the control socket may send anything; only
            # the pipeline's own replicas are listened to, and asked for status.
            if not self.observer.asked(identity, data):
                self._stranger(identity, data)
            return
        try:
            kind, fields = protocol.unpack(data)
        except protocol.VersionMismatch as exc:
            self._fail(Failure(replica.stage, replica.name, "error",
                               exc_type="zpipe.VersionMismatch", message=str(exc)))
            return
        except ValueError as exc:
            self.report(f"ignored a control message from replica {identity}: {exc}")
            return
        if replica.exited and not replica.done and kind != protocol.HELLO:
            if heartbeat:
                # Its next life's heartbeat thread may speak before that life's
                # hello (started again elsewhere): answered from its hello on.
                # An earlier life's beats go unanswered; it gives up by itself.
                return
            # A replica taken for lost (frozen, then woken) speaks again: it is
            # not one any more; its work went elsewhere.
            self.router.send_multipart([replica.name.encode(), protocol.pack(
                protocol.ABORT, reason="taken for lost: its work went elsewhere")])
            return
        if heartbeat:
            self.router.send_multipart([identity.encode(), protocol.pack(protocol.PING)])
            replica.last_seen = time.monotonic()
            replica.silent = False
            if kind == protocol.HEARTBEAT:
                replica.call_ago = fields.get("call_started_ago")
                counts = (fields.get("received", 0), fields.get("sent", 0))
                if counts != replica.heartbeat:
                    replica.heartbeat = counts
                    self.last_progress = time.monotonic()
                if not replica.final:
                    # Until its last report, what it said last (a killed replica sends none).
                    self._take_counts(replica, fields, final=False)
            elif kind == protocol.STUCK:  # the heartbeat thread watches calls (stuck.py)
                self.handlers[kind](replica, fields)
            return
        handler = self.handlers.get(kind)
        if handler is None:
            self.report(f"ignored a {kind!r} message from replica {identity}: replicas do not "
                        f"send it")
            return
        handler(replica, fields)

    def _stranger(self, identity: str, data: bytes) -> None:
        self.strangers += 1
        if self.strangers <= STRANGERS_REPORTED:
            self.report(f"ignored a control message from {identity[:80]!r}, which is not one "
                        f"of this pipeline's replicas ({len(data)} bytes)")
        elif self.strangers % STRANGERS_EVERY == 0:
            self.report(f"ignored {self.strangers} control messages from unknown peers so far")

    # -- messages ----------------------------------------------------------

    def _on_hello(self, replica: ReplicaState, fields: dict[str, Any]) -> None:
        if fields.get("version", PROTOCOL_VERSION) != PROTOCOL_VERSION:
            self._fail(Failure(replica.stage, replica.name, "error",
                               exc_type="zpipe.VersionMismatch",
                               message=f"speaks protocol version {fields.get('version')!r}, "
                                       f"this supervisor {PROTOCOL_VERSION}: run the same zpipe "
                                       f"version everywhere"))
            return
        if replica.hello and not replica.exited and replica.name not in self.recovery.rejoining:
            # It was started again by whoever runs it (a container engine) before
            # its silence was noticed: this life ended there.
            replica.exited = True
            if not self.recovery.ended(replica, "was started again (a second hello)"):
                self._fail(Failure(replica.stage, replica.name, "died",
                                   message="was started again (it said hello a second "
                                           "time), and its stage has restart = \"no\""))
                return
        coming_back = self.recovery.hello(replica)
        replica.hello, replica.pid, replica.host = True, fields.get("pid"), fields.get("host")
        replica.hello_heard = self.heard
        replica.last_seen = time.monotonic()
        if self.remote and not coming_back:
            self.progress(f"replica {replica.name} joined from {fields.get('host')} "
                        f"(pid {replica.pid})")
        self._send(replica, protocol.WELCOME, generation=replica.generation,
                   poison=self.recovery.poison[replica.stage],
                   downstream=self.recovery.downstream_of(replica))
        if self.aborting_since is not None:
            self._send(replica, protocol.ABORT, reason="the pipeline is stopping")

    def _on_ready(self, replica: ReplicaState, fields: dict[str, Any]) -> None:
        replica.ready = True
        if replica.name in self.recovery.rejoining:
            self.recovery.ready(replica)
            if self.running:
                return
        if self.aborting_since is None and not self.running and all(
                r.ready for r in self.replicas.values()):
            self.running = True
            self.last_progress = time.monotonic()
            elapsed = time.monotonic() - self.started_at
            self.progress(f"{self.spec.name}: {len(self.replicas)} replicas ready in "
                        f"{elapsed:.2f} s; starting")
            self.observer.run_started = time.monotonic()
            for source in self.stages[0].replicas:
                self._send(source, protocol.START)

    def _on_received(self, replica: ReplicaState, fields: dict[str, Any]) -> None:
        replica.reported = fields.get("received", 0)
        self.last_progress = time.monotonic()
        self._check_drained(self._stage_of(replica))

    def _on_done(self, replica: ReplicaState, fields: dict[str, Any]) -> None:
        replica.done = True
        self.last_progress = time.monotonic()
        self._take_counts(replica, fields)
        stage = self._stage_of(replica)
        if stage is not self.stages[0] and stage.status != "stopping":
            # Its input cannot have ended before STOP: items would be lost.
            self._fail(Failure(stage.name, replica.name, "error", exc_type="zpipe.ProtocolError",
                               message="finished before its input ended"))
            return
        self._check_stage_done(stage)

    def _stage_ended_replica(self, replica: ReplicaState) -> None:
        """A replica is gone for good: its stage may be done without it."""
        self._check_stage_done(self._stage_of(replica))

    def _check_stage_done(self, stage: StageState) -> None:
        if stage.status == "done" or not all(r.done or r.gone for r in stage.replicas):
            return
        index = self.stages.index(stage)
        if stage.expected is not None and stage.received != stage.expected:
            self._fail(Failure(stage.name, "*", "error", exc_type="zpipe.CountMismatch",
                               message=f"received {stage.received} items, upstream sent "
                                       f"{stage.expected}"))
            return
        stage.status = "done"
        self.progress(f"stage {stage.name!r} finished: {stage.items_in} in, {stage.items_out} out")
        if index + 1 < len(self.stages):
            following = self.stages[index + 1]
            if self.spec.leased(index + 1):
                # Every message it sent was acknowledged before its DONE, and an
                # acknowledgement means finished downstream: nothing is left.
                following.status = "stopping"
                for r in following.replicas:
                    self._send(r, protocol.STOP)
                for r in stage.replicas:
                    self._send(r, protocol.EXIT)
            else:
                following.status, following.expected = "draining", stage.sent
                for r in following.replicas:
                    self._send(r, protocol.DRAIN, expected=stage.sent)
        else:
            for r in stage.replicas:
                self._send(r, protocol.EXIT)

    def _on_error(self, replica: ReplicaState, fields: dict[str, Any]) -> None:
        self._take_counts(replica, fields)
        self.observer.error(replica.stage, fields.get("exc_type"))
        failure = Failure(replica.stage, replica.name, "error",
                          message=fields.get("message", ""), exc_type=fields.get("exc_type"),
                          traceback=fields.get("traceback"), item_type=fields.get("item_type"),
                          phase=fields.get("phase"), exc_module=fields.get("exc_module"),
                          exc_qualname=fields.get("exc_qualname"), args=fields.get("args"))
        if self.recovery.replaceable(replica):
            # Said in full now; what follows (restart, siblings) when it has exited.
            self.report(failure.describe())
            replica.error_cause = f"raised {failure.exc_type}: {failure.message}"[:300]
        else:
            replica.failed = True
            self._fail(failure)
        self._send(replica, protocol.ABORT, reason="failed")

    def _on_item_error(self, replica: ReplicaState, fields: dict[str, Any]) -> None:
        """An item was skipped or dead-lettered: say so (rate-limited), count it, and fail
        the run once its stage has had more than max_errors."""
        line, failure = self.tally.item_error(replica.stage, replica.name, fields)
        self.observer.error(replica.stage, fields.get("exc_type"))
        if line:
            self.report(line)
        if failure is not None and self.aborting_since is None:
            self._fail(failure)

    def _on_stuck(self, replica: ReplicaState, fields: dict[str, Any]) -> None:
        """A call ran past item_timeout: say so with its stack; fail the run for on_error =
        "fail", and when the call could not be interrupted (unless a restart or the
        stage's other replicas take over when the replica ends)."""
        self.report(stuck_report(replica.stage, replica.name, fields))
        failure = stuck_failure(replica.stage, replica.name, fields)
        if failure is None or self.aborting_since is not None:
            return
        if self.recovery.replaceable(replica):
            replica.error_cause = failure.message[:300] if failure.kind == "died" else \
                f"was stuck: {failure.message}"[:300]
            if failure.kind == "error":
                # on_error = "fail": the item fails its replica, which a restart or
                # its siblings replace; it is stuck, so it is ended from here.
                self._end_stuck(replica)
            return
        replica.failed = True
        self._fail(failure)

    def _on_attempt(self, replica: ReplicaState, fields: dict[str, Any]) -> None:
        key = fields.get("key")
        replica.attempting = key if isinstance(key, list) and len(key) == 3 and \
            isinstance(key[0], bytes) else None
        if replica.attempting is not None:
            self._send(replica, protocol.NOTED, key=key)

    def _on_aborted(self, replica: ReplicaState, fields: dict[str, Any]) -> None:
        self._take_counts(replica, fields)

    def _take_counts(self, replica: ReplicaState, fields: dict[str, Any],
                     final: bool = True) -> None:
        self.observer.take(replica, fields.get("figures"))
        for name in ("received", "sent", "markers_received", "markers_sent", "pending",
                     "unsent", "redelivered", "stale", "unacked"):
            setattr(replica, name, fields.get(name, getattr(replica, name)))
        replica.final = replica.final or final

    # -- drain -------------------------------------------------------------

    def _stage_of(self, replica: ReplicaState) -> StageState:
        return self.stages[self.spec.index(replica.stage)]

    def _check_drained(self, stage: StageState) -> None:
        if stage.status != "draining" or stage.expected is None:
            return
        total = sum(r.reported for r in stage.replicas)
        if total > stage.expected:
            self._fail(Failure(stage.name, "*", "error", exc_type="zpipe.CountMismatch",
                               message=f"received {total} items, upstream sent only "
                                       f"{stage.expected}"))
        elif total == stage.expected:
            stage.status = "stopping"
            for r in stage.replicas:
                self._send(r, protocol.STOP)
            upstream = self.stages[self.stages.index(stage) - 1]
            for r in upstream.replicas:
                self._send(r, protocol.EXIT)

    # -- failures, exits, signals ---------------------------------------------

    def _fail(self, failure: Failure) -> None:
        self.failures.append(failure)
        self.report(failure.describe())
        self._abort("a stage failed")

    def _abort(self, reason: str) -> None:
        if self.aborting_since is not None:
            return
        self.aborting_since = time.monotonic()
        self.report(f"{self.spec.name}: stopping every stage ({reason})")
        for stage in self.stages:
            for r in stage.replicas:
                self._send(r, protocol.ABORT, reason=reason)

    def _on_exit(self, replica: ReplicaState, status: int | None) -> None:
        """A replica ended (``status``), or a remote one fell silent (None)."""
        replica.exited = True
        index = self.spec.index(replica.stage)
        # After DONE on a leased output (or as the sink) everything it sent was
        # acknowledged: however it ends then, nothing is lost.
        finished = replica.done and (status == 0 or index + 1 == len(self.stages) or
                                     self.spec.leased(index + 1))
        expected = finished or replica.failed or self.aborting_since is not None or self.killed
        if expected:
            return
        how = describe_status(status) if status is not None else \
            f"no heartbeat for {HEARTBEAT_TIMEOUT:g} s (its process or host is gone)"
        cause = replica.error_cause or (f"was {how}" if how.startswith("killed") else
                                        f"sent {how}" if status is None else how)
        if self.recovery.ended(replica, cause):
            return
        where = self.pid_of(replica)
        self._fail(Failure(replica.stage, replica.name, "died",
                           message=f"{where}{replica.error_cause}" if replica.error_cause else
                           f"{where}died without a word: {how}"))

    def pid_of(self, replica: ReplicaState) -> str:
        """The words naming a replica's process, "(pid N) ": its pid from its hello, or
        from where it was started (one that died before its hello); else none."""
        pid = replica.pid if replica.pid is not None else self.workers.pid(replica.name)
        return f"(pid {pid}) " if pid is not None else ""

    def _connection_dropped(self, name: str, first: int) -> None:
        """ZeroMQ dropped a replica's connection (``first``: the number of the first
        message heard on it): it ended, or it did not answer the heartbeats of its
        libzmq thread, which a call holding the GIL still answers."""
        replica = self.replicas.get(name)
        if replica is None or first < replica.hello_heard:
            return  # the connection of an earlier life, which its hello ended
        if replica.exited or replica.done or self.aborting_since is not None \
                or self.killed:
            return
        if not self.remote:
            # A process that ends drops its connections a moment before it is seen
            # to exit: look again shortly (_check_dropped).
            self.dropped.setdefault(name, time.monotonic())
            return
        replica.error_cause = (f"lost its connection: its process ended, or did not answer "
                               f"ZeroMQ's heartbeats for {liveness.PONG_TIMEOUT_MS / 1000:g} s "
                               f"(frozen, or its host is gone)")
        self._on_exit(replica, None)

    def _check_dropped(self, now: float) -> None:
        """Local replicas whose connection dropped a while ago and that still live: frozen."""
        for name, when in list(self.dropped.items()):
            replica = self.replicas[name]
            if replica.exited or replica.done or self.aborting_since is not None:
                del self.dropped[name]
                continue
            if now - when < DROP_SETTLE or not self.workers.alive(name):
                continue  # not yet, or it exited: the exit says how
            del self.dropped[name]
            state = process_state(replica.pid)
            replica.error_cause = (
                f"was stopped ({state}) and did not answer ZeroMQ's heartbeats for "
                f"{liveness.PONG_TIMEOUT_MS / 1000:g} s" if state else
                f"did not answer ZeroMQ's heartbeats for {liveness.PONG_TIMEOUT_MS / 1000:g} s "
                f"(frozen)")
            self.report(f"replica {name} {replica.error_cause}; killing it")
            self.workers.kill([name])  # its exit then goes the usual way

    def _flapping(self, replica: ReplicaState, deaths: int, limit: int, window: float,
                  cause: str) -> None:
        self._fail(Failure(replica.stage, replica.name, "died",
                           message=f"is flapping: it died {deaths} times within {window:g} s "
                                   f"(max_restarts = {limit}); the last time it {cause}"))

    def _did_not_return(self, replica: ReplicaState, timeout: float) -> None:
        self._fail(Failure(replica.stage, replica.name, "died",
                           message=f"did not come back within {timeout:g} s of its death "
                                   f"(restart = \"on-failure\": its host should start it "
                                   f"again)"))

    def _on_signal(self, signum: int) -> None:
        if self.interrupted is None:
            self.interrupted = signum
            if not self.running or self.aborting_since is not None:
                self._abort(f"{signals.Signals(signum).name}")
                return
            self.report(f"{self.spec.name}: {signals.Signals(signum).name}: stopping the "
                        f"source; draining for up to {self.grace:g} s (again to kill at once)")
            self.grace_deadline = time.monotonic() + self.grace
            for r in self.stages[0].replicas:
                self._send(r, protocol.STOP)
        else:
            self.report(f"{self.spec.name}: killing every stage now")
            self._kill()

    def _alive(self) -> list[str]:
        return [r.name for r in self.replicas.values() if not r.exited]

    def _check_timers(self) -> None:
        now = time.monotonic()
        if self.aborting_since is None:
            self.recovery.tick(now)
        if self.remote and self.killed:
            for r in self.replicas.values():
                r.exited = True
        if not self.running and self.aborting_since is None and \
                now - self.started_at > self.spec.startup_timeout:
            waiting = [r.name + (" (in set-up or connecting)" if r.hello else " (not started)")
                       for r in self.replicas.values() if not r.ready]
            self._fail(Failure(self.spec.name, "-", "timeout",
                               message=f"replicas not ready after {self.spec.startup_timeout:g} s: "
                                       f"{', '.join(waiting)}"))
        if self.grace_deadline is not None and now > self.grace_deadline and \
                self.aborting_since is None:
            self._abort(f"grace period of {self.grace:g} s over")
        timeout = self.spec.inactivity_timeout
        if timeout and self.running and self.aborting_since is None and \
                now - self.last_progress > timeout:
            busy = [st.name for st in self.stages if st.status != "done"]
            self._fail(Failure(self.spec.name, "-", "timeout",
                               message=f"no item moved for {timeout:g} s (inactivity_timeout); "
                                       f"stages not finished: {', '.join(busy)}"))
        if self.aborting_since is not None and not self.killed:
            if self.terminated_since is None and now - self.aborting_since > ABORT_WAIT:
                self.terminated_since = now
                self.workers.terminate(self._alive())
            elif self.terminated_since is not None and now - self.terminated_since > TERMINATE_WAIT:
                self._kill()
        if self.remote:
            self._check_remote(now)
        self._check_gil_stuck(now)
        self._check_dropped(now)
        if self.killed_since is not None and now - self.killed_since > TERMINATE_WAIT:
            # Only threads outlive a kill: they cannot be forced. Leave them.
            for name in self._alive():
                self.report(f"replica {name} did not stop; left behind")
                self.replicas[name].exited = True

    def _check_gil_stuck(self, now: float) -> None:
        """Heartbeats that stop for longer than item_timeout, from a replica ZeroMQ still
        hears, mean a call holding the GIL: its own watch (stuck.py) cannot run, so
        the supervisor says it, and ends it."""
        if self.aborting_since is not None or not self.running:
            return
        for r in self.replicas.values():
            limit = self.spec.stage(r.stage).item_timeout
            if limit is None or r.exited or r.done or not r.ready or r.gil_stuck:
                continue
            silent = now - r.last_seen
            if silent > limit + GIL_SILENCE:
                r.gil_stuck = True
                running = silent + (r.call_ago or 0.0)
                r.error_cause = (f"was stuck: a call on one item ran for at least "
                                 f"{running:.0f} s (item_timeout {limit:g} s) holding the GIL, "
                                 f"so not even its stack could be read")
                self.report(f"stage {r.stage!r} replica {r.name} {r.error_cause}; ending it")
                self._end_stuck(r)

    def _end_stuck(self, replica: ReplicaState) -> None:
        """End a replica whose call is stuck (its own threads cannot); its end then goes
        the usual way (restart, siblings, or failure)."""
        if self.remote:
            self._on_exit(replica, None)  # cannot be killed from here: taken for lost
        else:
            self.workers.kill([replica.name])

    def _check_remote(self, now: float) -> None:
        for r in self.replicas.values():
            # Its connection says whether it lives (liveness.py); its silence alone
            # (a call that holds the GIL) is only said, once, unless it is stopping.
            if r.hello and not r.exited and now - r.last_seen > HEARTBEAT_TIMEOUT:
                if self.aborting_since is not None or self.killed:
                    r.exited = True
                elif not r.silent:
                    r.silent = True
                    self.report(f"replica {r.name} has sent no heartbeat for "
                                f"{HEARTBEAT_TIMEOUT:g} s, though ZeroMQ still hears it "
                                f"(inside a call that holds the GIL?)")
        if self.aborting_since is not None and now - self.aborting_since > ABORT_WAIT:
            for r in self.replicas.values():
                r.exited = True  # told to abort; nothing more can be done from here

    def _kill(self) -> None:
        self.killed = True
        self.killed_since = time.monotonic()
        self.workers.kill(self._alive())


def process_state(pid: int | None) -> str | None:
    """"SIGSTOP" style words for a stopped process (state T or t in /proc), else None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError, TypeError):
        return None
    return {b"T": "SIGSTOP", b"t": "stopped by a debugger"}.get(state)


def describe_status(status: int) -> str:
    if status < 0:
        try:
            name = signals.Signals(-status).name
        except ValueError:
            name = "unknown signal"
        return f"killed by signal {-status} ({name})"
    return f"exited with status {status}"


@contextlib.contextmanager
def signals_stop(request_stop: Callable[[int], None],
                 signums: tuple[int, ...] = (signals.SIGINT, signals.SIGTERM)) -> Iterator[None]:
    """While inside, these signals call ``request_stop`` (the ordered stop) instead of
    their usual handlers; only the main thread can take signals, elsewhere this does nothing."""
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in signums:
            previous[signum] = signals.signal(signum, lambda sig, frame: request_stop(sig))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signals.signal(signum, handler)
