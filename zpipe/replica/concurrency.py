"""Calls off a replica's main thread: ``concurrency = N``, ``input = "latest"``, ``async def``.

A stage with any of these is driven by a ``Driver`` (Body.run) instead of the
bare loop. The main thread keeps everything the replica's sockets touch, as
everywhere else (a ZeroMQ socket belongs to one thread; the outbox is not
thread-safe beyond its own flusher): it receives, hands items to the calls,
sends their outputs, acknowledges leases, answers the supervisor. The user's
calls run elsewhere:

- a plain ``def`` (or a Stage's ``process``, a plain generator) on a pool of
  ``concurrency`` threads (``ThreadCalls``);
- an ``async def`` (or ``async def process``) as tasks on one asyncio event
  loop in a thread of its own (``LoopCalls``): up to ``concurrency`` at once,
  1 when the stage does not say.

A call's outputs come back to the main thread with its completion (a pipe
wakes the main thread's wait, which the input socket and the control socket
share), and leave from there: in completion order, or in input order with
``ordered = true`` (completions are held until every earlier item's are out).
``setup()`` and ``teardown()`` stay on the main thread.

Backpressure: at most ``concurrency`` items are taken and not yet finished
(running, or done and held for order); the rest waits in the link, whose
``hwm`` bounds it as for any stage. On a leased link each item's lot is
finished once its outputs are sent, in whatever order calls complete; the
lots are acknowledged in arrival order all the same (delivery.Lots holds a
finished lot until every earlier one is). An item sent again to a stage whose
on_error takes failed items (``careful``) is called alone, once the calls
before it have completed, and named to the supervisor first, as in the bare
loop.

**input = "latest"** is the same driver with another rule for what it takes:
whenever the main thread has a message in, every buffered item but the
newest is dropped (counted, finished, and so acknowledged on a leased link:
never sent again; an ordered stage's number is closed with a marker), and a
call that is free gets the newest. Because the calls run off the main
thread, the main thread keeps draining the input socket *while a call runs*,
however long it takes: upstream never waits on this stage's calls (only on
its outputs, when the stage after it is full), and what it holds stays one
item plus the calls in flight, never a queue of stale frames. A call that
holds the GIL in C code for long stops the draining too (as it stops the
heartbeat): release the GIL in long native calls.

``item_timeout`` works with one thread (``input = "latest"`` without
concurrency): the call is watched and interrupted in that thread, as in the
bare loop, but a call stuck in C code is only reported, since only the main
thread's can end the process. shapes.py refuses it with ``concurrency > 1``
or an ``async def``.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import os
import queue
import threading
import time
from typing import Any, Callable

from .delivery import Lot
from .shapes import Shape
from .stuck import StuckCall, stuck_message

DRAIN_MESSAGES = 256  # input = "latest": messages taken in a row before the next call starts
CLOSE_WAIT = 2.0      # at the end: seconds the threads may take to stop (they are idle then)
ABANDON_WAIT = 0.2    # after a failure, ABORT or SIGTERM: calls in flight are not waited for
_monotonic = time.monotonic


class Job:
    """One call: the items it was given (one; a list after set_get_all), what it made."""

    __slots__ = ("careful", "ended", "entries", "failure", "index", "outputs", "started",
                 "value")

    def __init__(self, index: int, entries: list[tuple[Lot | None, int]], value: Any,
                 careful: bool):
        self.index = index
        self.entries = entries  # (lot on a leased link, number on a numbered link) per item
        self.value = value
        self.careful = careful
        self.outputs: list[Any] = []
        self.failure: Any = None  # the exception, or a stuck call's report (a dict)
        self.started = self.ended = 0.0


class Driver:
    """Runs a stage's items through calls off the main thread (see the module docstring)."""

    def __init__(self, body: Any, inbox: Any, send: Callable[[Any], None],
                 end_input: Callable[[], None] | None):
        callee = body.callee
        self.callee = callee
        self.inbox = inbox
        self.send = send
        self.end_input = end_input
        self.limit = max(1, callee.concurrency)
        self.latest = callee.latest
        self.ordered = callee.ordered
        self.errors = body.errors
        self.watch = self.errors.watch if self.errors is not None else None
        self.process = body.process()
        self.flat = callee.shape is Shape.FLATMAP
        self.get_all = callee.shape is Shape.CLASS and bool(body.instance.get_all)
        self.asynchronous = callee.asynchronous or inspect.iscoroutinefunction(self.process)
        self.completed: collections.deque[Job] = collections.deque()  # from the calls
        self.held: dict[int, Job] = {}  # ordered: completed, waiting for earlier ones
        self.in_flight = 0              # jobs started and not released
        self.next_index = 0
        self.next_release = 0
        self.serial = False             # a careful job is out: nothing else meanwhile
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)

    # -- the main thread ---------------------------------------------------------------

    def run(self) -> None:
        inbox, control = self.inbox, self.inbox.control
        name = f"zpipe-{self.callee.stage}"
        calls: ThreadCalls | LoopCalls = \
            LoopCalls(self._acall, self._completed, name) if self.asynchronous else \
            ThreadCalls(self.limit, self._call, self._completed, name, self._on_thread)
        inbox.interrupt = self.completed.__len__
        inbox.add_wake(self.read_fd, self._drain_pipe)
        wait = ABANDON_WAIT
        try:
            while True:
                if self.completed:
                    self._collect()
                if self.latest and len(inbox.buffer) > 1:
                    inbox.drop_older(self.end_input)
                while self.in_flight < self.limit and inbox.buffer and not self.serial:
                    if self.in_flight and inbox.next_is_careful():
                        break  # it goes alone, once the others are done
                    self._start(calls)
                if self.completed:
                    continue
                stopped = control.stopped
                if stopped and not inbox.buffer and not self.in_flight:
                    wait = CLOSE_WAIT
                    return
                room = self.in_flight < self.limit and not self.serial
                if not stopped and (self.latest or (room and not inbox.buffer)):
                    # Lossless: one message when there is room for its items. Latest:
                    # always, and then all that waits, each time keeping the newest.
                    if inbox._fill(block=True) and self.latest:
                        for _ in range(DRAIN_MESSAGES):
                            inbox.drop_older(self.end_input)
                            if not inbox._fill(block=False):
                                break
                else:
                    inbox.idle_without_input()
        finally:
            inbox.interrupt = None
            inbox.remove_wake(self.read_fd)
            calls.close(wait)  # daemon threads: one stuck in a call does not keep the process
            for fd in (self.read_fd, self.write_fd):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _start(self, calls: Any) -> None:
        """Take the next item (after set_get_all, what waits) and hand it to a call."""
        inbox = self.inbox
        careful = inbox.next_is_careful()
        item, lot, seq, key = inbox.take()
        entries = [(lot, seq)]
        value = item
        if self.get_all:
            items = [item]
            while inbox.buffer and len(items) < inbox.batch_limit and not careful and \
                    not inbox.next_is_careful():
                more, lot, seq, _ = inbox.take()
                items.append(more)
                entries.append((lot, seq))
            value = items
            inbox.batches_taken += 1
            inbox.batched += len(items)
        if key is not None:
            cause = inbox.poison.get(key)
            if cause is not None:  # it ended a replica before: on_error takes it, no call
                assert self.errors is not None
                self.errors.failed(item, None, {"exc_type": "zpipe.PoisonItem",
                                                "message": cause, "traceback": None})
                self._close(entries)
                return
            inbox.careful([*key])
            self.serial = True
        job = Job(self.next_index, entries, value, key is not None)
        self.next_index += 1
        self.in_flight += 1
        inbox.holding += len(entries)
        calls.submit(job)

    def _collect(self) -> None:
        """Completed calls: a failure that fails the stage raises now; outputs leave in
        completion order, or (ordered) once every earlier item's have."""
        completed = self.completed
        while completed:
            job = completed.popleft()
            if job.failure is not None and self._fatal(job.failure):
                self.inbox.last_item = job.value  # the report names this item's type
                raise job.failure
            if not self.ordered:
                self._release(job)
                continue
            self.held[job.index] = job
            while self.next_release in self.held:
                self._release(self.held.pop(self.next_release))
                self.next_release += 1

    def _fatal(self, failure: Any) -> bool:
        if type(failure) is dict:  # a stuck call, interrupted: only under skip / dead-letter
            return False
        return not isinstance(failure, Exception) or self.errors is None or \
            self.errors.policy.on_error == "fail"

    def _release(self, job: Job) -> None:
        """A job's outputs go out (what a plain generator made before it raised too),
        its failure goes to on_error, its items are finished."""
        inbox = self.inbox
        lot, seq = job.entries[-1]
        if len(job.entries) > 1:
            self._close(job.entries[:-1])  # set_get_all: the list's output is its last's
        if seq >= 0:
            inbox.seq = seq
        for out in job.outputs:
            self.send(out)
        if job.failure is not None:
            assert self.errors is not None
            failure = job.failure
            if type(failure) is dict:
                assert self.watch is not None
                self.errors.failed(job.value, None, {
                    "exc_type": "zpipe.StuckCall",
                    "message": stuck_message(failure, self.watch.limit),
                    "traceback": failure.get("stack")})
            else:
                self.errors.failed(job.value, failure)
        if self.end_input is not None:
            self.end_input()
        inbox.finish(lot)
        self.in_flight -= 1
        inbox.holding -= len(job.entries)
        inbox.times.items.add(max(0.0, job.ended - job.started) / len(job.entries),
                              len(job.entries))
        if job.careful:
            inbox.careful(None)
            self.serial = False

    def _close(self, entries: list[tuple[Lot | None, int]]) -> None:
        """Items finished without outputs: their numbers closed, their lots finished."""
        for lot, seq in entries:
            if self.end_input is not None:
                if seq >= 0:
                    self.inbox.seq = seq
                self.end_input()
            self.inbox.finish(lot)

    def _drain_pipe(self) -> None:
        try:
            while os.read(self.read_fd, 4096):
                pass
        except BlockingIOError:
            pass

    # -- the calls' threads -----------------------------------------------------------

    def _completed(self, job: Job) -> None:
        """From a call's thread: done; wake the main thread."""
        self.completed.append(job)
        try:
            os.write(self.write_fd, b"\0")
        except (BlockingIOError, OSError):
            pass  # full: the main thread has wake-ups to read already (or it has ended)

    def _on_thread(self) -> None:
        if self.watch is not None:  # one thread (shapes.py): its calls are watched
            self.watch.thread = threading.get_ident()

    def _call(self, job: Job) -> None:
        watch = self.watch
        outputs = job.outputs
        job.started = _monotonic()
        result = None
        try:
            if watch is not None:
                watch.begin(job.value)
            result = self.process(job.value)
            if self.flat:
                for out in result:
                    outputs.append(out)
            elif result is not None:
                outputs.append(result)
            if watch is not None:
                watch.end()
        except StuckCall:
            assert watch is not None
            watch.end()
            job.failure = dict(watch.report)
        except BaseException as exc:  # noqa: BLE001 - the main thread decides
            if watch is not None:
                watch.end()
            job.failure = exc
        finally:
            close = getattr(result, "close", None) if self.flat else None
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001 - its finally blocks ran as best they could
                    pass
            job.ended = _monotonic()

    async def _acall(self, job: Job) -> None:
        job.started = _monotonic()
        try:
            result = self.process(job.value)
            if inspect.isawaitable(result):
                result = await result
            if self.flat:
                job.outputs.extend(result)
            elif result is not None:
                job.outputs.append(result)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - the main thread decides
            job.failure = exc
        finally:
            job.ended = _monotonic()


class ThreadCalls:
    """A pool of threads, each taking jobs in turn."""

    def __init__(self, count: int, call: Callable[[Job], None],
                 done: Callable[[Job], None], name: str, on_start: Callable[[], None]):
        self.jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.call, self.done, self.on_start = call, done, on_start
        self.threads = [threading.Thread(target=self._work, name=f"{name}-call-{i}",
                                         daemon=True) for i in range(count)]
        for thread in self.threads:
            thread.start()

    def _work(self) -> None:
        self.on_start()
        while True:
            job = self.jobs.get()
            if job is None:
                return
            self.call(job)
            self.done(job)

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def close(self, wait: float) -> None:
        """No more jobs; wait up to ``wait`` s for the threads to end."""
        for _ in self.threads:
            self.jobs.put(None)
        deadline = _monotonic() + wait
        for thread in self.threads:
            thread.join(max(0.0, deadline - _monotonic()))


class LoopCalls:
    """An asyncio event loop in a thread of its own: each job a task on it."""

    def __init__(self, call: Callable[[Job], Any], done: Callable[[Job], None], name: str):
        self.call, self.done = call, done
        self.loop = asyncio.new_event_loop()
        self.tasks: set[asyncio.Task[None]] = set()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"{name}-loop", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            try:
                tasks = list(self.tasks)
                for task in tasks:
                    task.cancel()
                if tasks:
                    loop.run_until_complete(asyncio.wait(tasks, timeout=CLOSE_WAIT))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    def submit(self, job: Job) -> None:
        self.loop.call_soon_threadsafe(self._begin, job)

    def _begin(self, job: Job) -> None:
        task = self.loop.create_task(self._one(job))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _one(self, job: Job) -> None:
        await self.call(job)
        self.done(job)

    def close(self, wait: float) -> None:
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:
            pass  # closed already
        self.thread.join(wait)
