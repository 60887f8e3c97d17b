"""A map stage's hot loop in C: runs of its input through the call and into the batch.

For a relay of small items, the Python loop around the call (take the item,
call, check for None, send: pack, append, look at the batch) costs more than
the msgpack work itself: callgrind counts about 10,700 instructions per item
per hop, of which about 3,400 are that loop, where the raw chain's list
comprehension costs a fraction. Here a stage that maps each item to at most
one output, on unnumbered links without max_message_size (leased ones too:
a run's messages are acknowledged once its outputs are in the outbox),
works through a *run*, up to ``size`` items of its input, as::

    encoded.extend(map(pack, map(process, run)))

so that no bytecode of ours runs per item: each output is still packed right
after its call (frozen before the next call, as send() freezes it), and the
Outbox looks at the batch once per run (run_begins, run_ended) instead of
once per output: about 7,750 instructions per item in callgrind, where the
raw relay's list comprehension takes 7,300. A None output (no output) is
packed too, as codec.NOTHING, and left out of the message as the batch leaves
(Batch.squeeze): a filter of each output cost 45 ns an item, the look for
NOTHING in a message 9 (callgrind: 80 instructions an item fewer). On a leased
output, whose inputs are acknowledged by what the batch holds, a filter keeps
None out of it instead.

The run's size adapts to the stage: it doubles while a run takes under
RUN_TIME / 2 and halves above RUN_TIME, so that the outputs of a run wait for
its end no longer than a batch waits anyway (and a slow stage runs one item
at a time); it never exceeds what one batch holds (the Outbox's batch_items,
and BATCH_BYTES by the mean output seen). During a run of more than one
item, the Flusher looks at the batch as during any busy call, so an output
made before a slow call in the same run still leaves within BATCH_WAIT.

What the per-item loop decides per output, a run decides afterwards, or makes
impossible:

- An output holding a large array makes a frame (or takes a shared-memory
  segment): the batch cuts the run right there (``Batch.on_frame``), so the
  stage is not called again before that array has left (it may reuse the
  array), and the message leaves at once, as send() would send it; the items
  not reached go back to the inbox, ahead of the rest.
- An output of codec.FRAME_MIN bytes or more, or a frame: the stage goes back
  to the per-item loop for good (its outputs are large, so the loop costs
  nothing beside them, and the loop sends a large ``bytes`` item as a frame of
  its own, where a run leaves it in the header, copied).
- A StopIteration raised by the call would end map()'s iteration silently:
  the items left over show it, and it is raised as a RuntimeError.
- An exception names the item it came from (``Inbox.last_item``) and gives the
  items not reached back to the inbox (what the replica still held is
  counted); an output that cannot be packed raises EncodeError, as send() would.
"""

from __future__ import annotations

import functools
import operator
import resource
import time
import types
from typing import Any, Callable, Iterator

from ..errors import EncodeError
from ..wire import codec
from .inbox import Inbox
from .outbox import BATCH_BYTES, Outbox

RUN_TIME = 0.0005  # seconds of CPU a run may take before its size is halved
# A run that waited on something (I/O, a lock, a sleep: a paced source), as the
# thread's voluntary context switches tell, is halved too once it took this
# long: its first outputs waited for its end. Preemption (12 replicas on 2
# cores) is an involuntary switch, which says nothing of the stage. Any run
# is halved past RUN_WALL, so that commands are still looked at often.
RUN_WAITED = RUN_TIME
RUN_WALL = 0.05
_is_output = functools.partial(operator.is_not, None)  # a map stage's None is no output
_second = operator.itemgetter(1)
_DONE: Iterator[Any] = iter(())  # a run of one item, once taken
_END = object()
_length_hint = operator.length_hint
_monotonic = time.monotonic
_RUSAGE_THREAD = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)  # Linux's
_BUILTINS = (types.BuiltinFunctionType, types.MethodDescriptorType, types.WrapperDescriptorType,
             types.MethodWrapperType)


def possible(inbox: Inbox | None, outbox: Outbox | None) -> bool:
    """Whether runs can carry this replica's items: a plain link out, and in, if any."""
    return (outbox is not None and outbox.sock is not None and outbox.plain
            and outbox.max_size is None
            and (inbox is None or (inbox.careful is None and inbox.reorder is None
                                   and not inbox.numbered)))


class Runs:
    """Drives a map stage over its whole input (map), or a source's outputs (source),
    in runs (see the module)."""

    def __init__(self, inbox: Inbox | None, outbox: Outbox, stage: str):
        self.inbox = inbox
        self.outbox = outbox
        self.stage = stage
        self.items: list[Any] = []    # the run in progress
        self.left: Any = iter(())     # ... and the iterator over it
        self.cut: list[Any] | None = None  # the items a frame cut off the run
        self.python_call = True

    def map(self, process: Callable[[Any], Any]) -> bool:
        """Call ``process`` on every input item and send its outputs; True once the
        input has ended, False if the stage went back to the per-item loop (the
        items not taken yet are still the inbox's)."""
        inbox, outbox = self.inbox, self.outbox
        assert inbox is not None
        batch = outbox.batch
        pack = batch.packer.pack
        take, done = inbox.take_run, inbox.run_done
        begins, ended = outbox.run_begins, outbox.run_ended
        size = 1
        batch.on_frame = self._cut
        # A None output is packed too, as codec.NOTHING, which the batch leaves out of
        # its message (Batch.squeeze): but not on a leased output, where an input's
        # acknowledgement waits on whatever the batch holds (Outbox.pending_seq).
        nothing = batch.holds_nothing = outbox.dispatcher is None
        # A builtin called directly raises in C too: its errors are not the packer's.
        self.python_call = not isinstance(process, _BUILTINS)
        try:
            while True:
                self.items = items = take(size)
                if not items:
                    return True
                if len(items) == 1:
                    size = self._one(process, items, size)
                    continue
                self.left = left = iter(items)
                begins()
                started, usage = _monotonic(), _usage()
                try:
                    # (encoded is looked up per run: a flush gives the batch a new list)
                    if nothing:
                        batch.encoded.extend(map(pack, map(process, left)))
                    else:
                        batch.encoded.extend(map(pack, filter(_is_output, map(process, left))))
                except BaseException as exc:
                    self._failed(exc)
                    raise
                elapsed = _spent(usage, _monotonic() - started)
                cut, self.cut = self.cut, None
                if cut:
                    inbox.give_back(cut)
                elif _length_hint(left):
                    self._failed(None)
                    raise RuntimeError(f"stage {self.stage!r}: the call raised StopIteration "
                                       f"(for an item of type "
                                       f"{type(inbox.last_item).__name__})")
                mean, large = ended(len(items), started)
                # The run's items go now, while they are warm in the cache (and their
                # memory is reused by the next message's): the next take() decodes a
                # message first, and they would be freed only after it.
                self.items, self.left = [], _DONE
                del items, left
                done()  # after the outputs are in the outbox: a leased input is acknowledged
                if large or cut is not None:
                    return False
                size = self._next_size(size, elapsed, mean)
        finally:
            batch.on_frame = None

    def source(self, outputs: Iterator[Any]) -> bool:
        """Send every output of a source's iterator; True once it has ended, False if the
        source went back to the per-item loop (``outputs`` then resumes where it was).

        The run's outputs are zip()ped with a gate of ``size`` entries: zip asks the
        gate first, so a frame that cuts the gate (``_cut``) stops the run before the
        source is resumed; it may reuse the array it yielded."""
        outbox = self.outbox
        batch = outbox.batch
        pack = batch.packer.pack
        begins, ended = outbox.run_begins, outbox.run_ended
        size = 1
        batch.on_frame = self._cut
        try:
            while True:
                if size == 1:
                    # One at a time (a paced source, or runs just begun): send() as the
                    # per-item loop does; its fast path sends an output after a pause
                    # at once, where a run's bookkeeping would be its latency.
                    started = _monotonic()
                    out = next(outputs, _END)
                    if out is _END:
                        return True
                    outbox.send(out)
                    size = self._next_size(1, _one_item(_monotonic() - started), 0)
                    continue
                self.items = gate = [None] * size
                self.left = left = iter(gate)
                begins()
                started, usage = _monotonic(), _usage()
                try:
                    batch.encoded.extend(map(pack, map(_second, zip(left, outputs))))
                except BaseException:
                    outbox.run_failed()
                    raise
                elapsed = _spent(usage, _monotonic() - started)
                cut, self.cut = self.cut, None
                # The gate had entries left, yet zip stopped: the source has ended (zip
                # took one gate entry more than outputs came).
                exhausted = cut is None and _length_hint(left) > 0
                mean, large = ended(size, started)
                if exhausted:
                    return True
                if large or cut is not None:
                    return False
                size = self._next_size(size, elapsed, mean)
        finally:
            batch.on_frame = None

    def _one(self, process: Callable[[Any], Any], items: list[Any], size: int) -> int:
        """A run of one item (a low rate, or a slow stage): called and sent as by the
        per-item loop, through send(), which sends an output after a pause at once
        (a run's bookkeeping would be that item's latency). The next run's size."""
        self.left = _DONE
        started = _monotonic()
        try:
            out = process(items[0])
            if out is not None:
                self.outbox.send(out)
        except BaseException as exc:
            self._failed(exc)
            raise
        assert self.inbox is not None
        self.inbox.run_done()
        # Wall time for CPU: a quick item says the stage is quick.
        return self._next_size(size, _one_item(_monotonic() - started), 0)

    def _next_size(self, size: int, elapsed: tuple[float, float, bool], mean: int) -> int:
        """Double a run that was quick, halve a slow one (``elapsed``: its CPU and wall
        time, and whether it waited); at most a batch's worth (``mean``: its outputs'
        mean size)."""
        cpu, wall, waited = elapsed
        if cpu > RUN_TIME or wall > RUN_WALL or (waited and wall > RUN_WAITED):
            return max(1, size // 2)
        if cpu < RUN_TIME / 2:
            # Under BATCH_BYTES (FRAME_MIN too): the run_ended() of such a run need not
            # look for an output a frame's worth.
            return min(size * 2, max(1, self.outbox.batch_items),
                       max(1, (BATCH_BYTES - 1) // max(mean, 1)))
        return size

    def _cut(self) -> None:
        """From the batch, as an output makes a frame: end the run after this output."""
        items = self.items
        taken = len(items) - _length_hint(self.left)
        self.cut = items[taken:]
        del items[taken:]  # the iterator over it stops: no further call

    def _failed(self, exc: BaseException | None) -> None:
        """The run ended in an exception (or StopIteration, ``exc`` None): name the item
        it came from, and give back the items it did not reach."""
        items, inbox = self.items, self.inbox
        left = _length_hint(self.left)
        reached = len(items) - left
        inbox.last_item = items[reached - 1] if reached else None
        inbox.give_back([*items[reached:], *(self.cut or ())])
        inbox.holding = 1  # the item the exception came from, not finished
        self.cut = None
        self.outbox.run_failed()
        if exc is not None and self.python_call and _raised_by_pack(exc):
            raise EncodeError(f"cannot send an output of stage {self.stage!r}: it holds {exc}; "
                              f"zpipe sends {codec.SUPPORTED}") from None


def _usage() -> Any:
    return resource.getrusage(_RUSAGE_THREAD)


def _spent(before: Any, wall: float) -> tuple[float, float, bool]:
    """CPU time, wall time, and whether the thread waited (a voluntary context switch),
    since ``before`` (a _usage())."""
    now = _usage()
    cpu = now.ru_utime + now.ru_stime - before.ru_utime - before.ru_stime
    return cpu, wall, now.ru_nvcsw != before.ru_nvcsw


def _one_item(wall: float) -> tuple[float, float, bool]:
    """A lone item's timing, from its wall time alone (two more system calls would
    be its latency): as CPU time, and as a wait if long."""
    return wall, wall, wall > RUN_WAITED


def _raised_by_pack(exc: BaseException) -> bool:
    """Whether ``exc`` came from packing an output, not from the call: raised right
    under the run by msgpack (whose Cython code shows as frames named after it), or
    in C without a frame."""
    if not isinstance(exc, (TypeError, ValueError, OverflowError)) or \
            isinstance(exc, EncodeError):
        return False
    tb = exc.__traceback__
    inner = tb.tb_next if tb is not None else None
    return inner is None or inner.tb_frame.f_code.co_name.startswith("msgpack.")
