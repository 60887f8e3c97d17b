"""Dynamic batching: a stage's callable takes a list of the items waiting, up to a bound.

``batch = { max_items = 32, max_wait_ms = 5 }`` on a plain or class stage: the
call gets what is waiting at once, and waits at most ``max_wait_ms`` for more
when it has fewer than ``max_items``; while the previous call ran, items
gathered, so batches grow under load by themselves and stay small when the
stage keeps up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

MAX_BATCH_ITEMS = 100_000
MAX_BATCH_WAIT_MS = 60_000.0
BATCH_KEYS = ("max_items", "max_wait_ms")


@dataclass(frozen=True)
class Batching:
    """How one call's list of items is gathered."""

    max_items: int = 32
    max_wait_ms: float = 5.0

    @property
    def max_wait(self) -> float:
        """Seconds."""
        return self.max_wait_ms / 1000.0


def parse_batch(raw: Any, where: str) -> Batching | None:
    """``batch = {...}`` of one stage, checked; ``where`` names the stage."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: field 'batch' must be a table such as "
                          f"{{ max_items = 32, max_wait_ms = 5 }} (got {type(raw).__name__})")
    unknown = sorted(set(raw) - set(BATCH_KEYS))
    if unknown:
        raise ConfigError(f"{where}: field 'batch' has unknown key(s) {', '.join(unknown)} "
                          f"(known: {', '.join(BATCH_KEYS)})")
    items = raw.get("max_items", Batching.max_items)
    if isinstance(items, bool) or not isinstance(items, int) or not 1 <= items <= MAX_BATCH_ITEMS:
        raise ConfigError(f"{where}: field 'batch.max_items' must be a whole number from 1 to "
                          f"{MAX_BATCH_ITEMS:,} (got {items!r})")
    wait = raw.get("max_wait_ms", Batching.max_wait_ms)
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or \
            not math.isfinite(wait) or not 0 <= wait <= MAX_BATCH_WAIT_MS:
        raise ConfigError(f"{where}: field 'batch.max_wait_ms' must be milliseconds from 0 to "
                          f"{MAX_BATCH_WAIT_MS:,.0f} (got {wait!r})")
    return Batching(max_items=items, max_wait_ms=float(wait))


# -- the runtime: a replica's batched calls -------------------------------------------

ODD_BATCHES_LOGGED = 3  # batches that failed whole but not item by item: said this often


class BatchRunner:
    """Drives a batched stage in its replica (Body.run, on the main thread).

    Each call gets ``inputs.batches(max_items, max_wait)``: what waits at
    once, and more until the deadline (inbox.py). What it returns must be a
    list of as many outputs, in the same order: each is sent (``None``: that
    item has none), and each item is then closed (``end_input``: an ordered
    stage's number). Anything else is the stage's bug, not an item's, and
    fails it, saying the stage, the lengths and the type.

    Errors stay per item. A call that raises (or is stuck past
    ``item_timeout``) is tried again item by item, each a list of one, to find
    the item at fault: with ``on_error = "skip"`` or ``"dead-letter"`` that item
    is skipped or dead-lettered and the others' outputs go on; with ``"fail"``
    the first item that fails alone fails the stage, reported with that item's
    type. (A batch that fails whole but whose items all pass alone goes on
    with their outputs; that is logged.) The items are thus called twice: a
    call with side effects must bear that, as it bears redelivery.
    """

    def __init__(self, body: Any, inputs: Any, send: Any, end_input: Any):
        self.body = body
        self.callee = body.callee
        self.inputs = inputs
        self.send = send
        self.end_input = end_input
        self.errors = body.errors
        self.watch = self.errors.watch if self.errors is not None else None
        self.process = body.process()
        self.odd = 0

    def run(self) -> None:
        import threading
        batching: Batching = self.callee.batch
        if self.watch is not None:
            self.watch.thread = threading.get_ident()
        for batch in self.inputs.batches(batching.max_items, batching.max_wait):
            self.one(batch)

    def one(self, batch: list[Any]) -> None:
        from .delivery import Poisoned
        seqs = getattr(self.inputs, "batch_seqs", None) if self.end_input is not None else None
        if len(batch) == 1 and type(batch[0]) is Poisoned:  # it ended a replica before
            poisoned = batch[0]
            assert self.errors is not None
            self.errors.failed(poisoned.item, None, {"exc_type": "zpipe.PoisonItem",
                                                    "message": poisoned.cause,
                                                    "traceback": None})
            self._close(0, seqs)
            return
        outputs, failure = self._call(batch)
        if failure is None:
            self._check(outputs, len(batch))
            for index, out in enumerate(outputs):
                self._emit(index, out, seqs)
            return
        # Find the item at fault: each alone.
        results = []
        for index, item in enumerate(batch):
            alone, failed = self._call([item]) if len(batch) > 1 else (None, failure)
            if failed is None:
                self._check(alone, 1)
                results.append(alone[0])
                self._emit(index, alone[0], seqs)
                continue
            if not self._take_failed(item, failed):
                if hasattr(self.inputs, "last_item"):
                    self.inputs.last_item = item  # the failure names this item's type
                raise failed if isinstance(failed, BaseException) else RuntimeError(failed)
            self._close(index, seqs)
        if len(results) == len(batch) and self.odd < ODD_BATCHES_LOGGED:
            import logging
            self.odd += 1
            logging.getLogger("zpipe").warning(
                "stage %r: a batched call on %d items raised %s, but each item alone "
                "passed; their outputs went on", self.callee.stage, len(batch),
                _what(failure))

    def _emit(self, index: int, out: Any, seqs: list[int] | None) -> None:
        if seqs:
            self.inputs.seq = seqs[index]
        if out is not None:
            self.send(out)
        if self.end_input is not None:
            self.end_input()

    def _close(self, index: int, seqs: list[int] | None) -> None:
        """An item without outputs (failed and taken by on_error): its number closes."""
        if self.end_input is not None:
            if seqs:
                self.inputs.seq = seqs[index]
            self.end_input()

    def _call(self, batch: list[Any]) -> tuple[Any, Any]:
        """(outputs, None), or (None, the exception, or the stuck call's report)."""
        from .stuck import StuckCall
        watch = self.watch
        try:
            if watch is not None:
                watch.begin(batch)
            out = self.process(batch)
            if watch is not None:
                watch.end()
            return out, None
        except StuckCall:
            assert watch is not None
            watch.end()
            return None, dict(watch.report)
        except Exception as exc:
            if watch is not None:
                watch.end()
            return None, exc

    def _take_failed(self, item: Any, failed: Any) -> bool:
        """An item failed alone: True once on_error has taken it, False to fail."""
        if self.errors is None:
            return False
        if isinstance(failed, BaseException):
            return self.errors.failed(item, failed)
        from .stuck import stuck_message
        assert self.watch is not None
        return self.errors.failed(item, None, {
            "exc_type": "zpipe.StuckCall", "message": stuck_message(failed, self.watch.limit),
            "traceback": failed.get("stack")})

    def _check(self, outputs: Any, count: int) -> None:
        if type(outputs) is not list:
            raise TypeError(f"stage {self.callee.stage!r}: a batched call on a list of {count} "
                            f"item(s) returned {type(outputs).__name__}, not a list of "
                            f"{count} output(s) (batch = {{...}}: one output per input, in "
                            f"order, None for an input without one)")
        if len(outputs) != count:
            raise ValueError(f"stage {self.callee.stage!r}: a batched call on a list of "
                             f"{count} item(s) returned a list of {len(outputs)} (batch = "
                             f"{{...}}: one output per input, in order, None for an input "
                             f"without one)")


def _what(failure: Any) -> str:
    if isinstance(failure, BaseException):
        return f"{type(failure).__name__}: {failure}"
    return "zpipe.StuckCall"
