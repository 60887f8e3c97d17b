"""A map stage's hot loop in C: runs of its input through the call and into the batch.

For a relay of small items, the Python loop around the call (take the item,
call, check for None, send: pack, append, look at the batch) costs more than
the msgpack work itself: callgrind counts about 10,700 instructions per item
per hop, of which about 3,400 are that loop, where the raw chain's list
comprehension costs a fraction. Here a stage that maps each item to at most
one output, on unnumbered links without max_message_size (leased ones too:
a run's messages are acknowledged once its outputs are in the outbox),
works through a *run*, up to ``size`` items of its input, as::

    encoded.extend(map(pack, filter(is_output, map(process, run))))

so that no bytecode of ours runs per item: each output is still packed right
after its call (frozen before the next call, as send() freezes it), and the
Outbox looks at the batch once per run (run_begins, run_ended) instead of
once per output. About 7,200 instructions per item.

The run's size adapts to the stage: it doubles while a run takes under
RUN_TIME / 2 and halves above RUN_TIME, so that the outputs of a run wait for
its end no longer than a batch waits anyway (and a slow stage runs one item
at a time); it never exceeds what one batch holds (the Outbox's batch_items,
and BATCH_BYTES by the largest output seen). During a run of more than one
item, the Flusher looks at the batch as during any busy call, so an output
made before a slow call in the same run still leaves within BATCH_WAIT.

What the per-item loop decides per output, a run decides afterwards, or makes
impossible:

- An output holding a large array makes a frame (or takes a shared-memory
  segment): the batch cuts the run right there (``Batch.on_frame``), so the
  stage is not called again before that array has left (it may reuse the
  array), and the message leaves at once, as send() would send it; the items
  not reached go back to the inbox, ahead of the rest.
- Outputs of LARGE_OUTPUT bytes or more, or frames: the stage goes back to
  the per-item loop for good (its outputs are large, so the loop costs
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
import time
import types
from typing import Any, Callable

from ..errors import EncodeError
from ..wire import codec
from .inbox import Inbox
from .outbox import BATCH_BYTES, LARGE_OUTPUT, Outbox

RUN_TIME = 0.0005  # seconds a run may take before its size is halved
_is_output = functools.partial(operator.is_not, None)  # a map stage's None is no output
_length_hint = operator.length_hint
_monotonic = time.monotonic
_BUILTINS = (types.BuiltinFunctionType, types.MethodDescriptorType, types.WrapperDescriptorType,
             types.MethodWrapperType)


def possible(inbox: Inbox | None, outbox: Outbox | None) -> bool:
    """Whether runs can carry this replica's items: plain links on both sides."""
    return (inbox is not None and outbox is not None and outbox.sock is not None
            and inbox.careful is None and inbox.reorder is None and not inbox.numbered
            and outbox.plain and outbox.max_size is None)


class Runs:
    """Drives ``process`` over a replica's whole input in runs (see the module)."""

    def __init__(self, inbox: Inbox, outbox: Outbox, stage: str):
        self.inbox = inbox
        self.outbox = outbox
        self.stage = stage
        self.items: list[Any] = []    # the run in progress
        self.left: Any = iter(())     # ... and the iterator over it
        self.cut: list[Any] | None = None  # the items a frame cut off the run
        self.python_call = True

    def run(self, process: Callable[[Any], Any]) -> bool:
        """Call ``process`` on every input item and send its outputs; True once the
        input has ended, False if the stage went back to the per-item loop (the
        items not taken yet are still the inbox's)."""
        inbox, outbox = self.inbox, self.outbox
        batch = outbox.batch
        pack = batch.packer.pack
        take, done = inbox.take_run, inbox.run_done
        begins, ended = outbox.run_begins, outbox.run_ended
        most = max(1, outbox.batch_items)
        size = 1
        batch.on_frame = self._cut
        # A builtin called directly raises in C too: its errors are not the packer's.
        self.python_call = not isinstance(process, _BUILTINS)
        try:
            while True:
                self.items = items = take(size)
                if not items:
                    return True
                self.left = left = iter(items)
                taken = len(items)
                if taken > 1:
                    begins()
                started = _monotonic()
                try:
                    # (encoded is looked up per run: a flush gives the batch a new list)
                    batch.encoded.extend(map(pack, filter(_is_output, map(process, left))))
                except BaseException as exc:
                    self._failed(exc)
                    raise
                elapsed = _monotonic() - started
                cut, self.cut = self.cut, None
                if cut:
                    inbox.give_back(cut)
                elif _length_hint(left):
                    self._failed(None)
                    raise RuntimeError(f"stage {self.stage!r}: the call raised StopIteration "
                                       f"(for an item of type "
                                       f"{type(inbox.last_item).__name__})")
                largest = ended(len(items), started)
                done()  # after the outputs are in the outbox: a leased input is acknowledged
                if largest >= LARGE_OUTPUT or cut is not None:
                    return False
                if elapsed < RUN_TIME / 2:
                    size = min(size * 2, most, max(1, BATCH_BYTES // max(largest, 1)))
                elif elapsed > RUN_TIME:
                    size = max(1, size // 2)
        finally:
            batch.on_frame = None

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
