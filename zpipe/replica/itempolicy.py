"""Per-item error policies: what a stage does with an item whose call raises or is stuck.

``on_error`` (pipeline.toml, per stage):

- ``fail`` (the default): the exception fails the replica, as always;
- ``skip``: the item is reported to the supervisor (ITEM_ERROR), counted, and
  the stage goes on with the next one;
- ``dead-letter``: the same, and the item is appended to the stage's
  dead-letters file first (deadletters.py).

A stage's ``Policy`` travels on its Callee (shapes.resolve_stage builds it);
each replica runs its items through ``ItemErrors.run`` instead of the bare
loop when its stage has a policy or an ``item_timeout`` (stuck.py): a stage
with neither keeps the bare loop, so that the hot path pays nothing.

Only the user's call is guarded: an output that cannot be sent is still the
stage's failure. An ordered stage's item that fails still closes its number
(``end_input``: a MARKER when it sent nothing), so nothing downstream waits.

The supervisor's side is ``Tally``: it counts per stage, says the first few
errors in full and then at most a line a second, fails the run past
``max_errors``, and says the counts at the end.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from ..wire import protocol
from . import deadletters, failures
from .delivery import Poisoned
from .failures import Failure
from .stuck import CallWatch, StuckCall, stuck_message

ERRORS_IN_FULL = 3       # per stage, the supervisor says this many with their traceback,
LINE_EVERY = 1.0         # then at most one line a second per stage
TRACEBACKS_SENT = ERRORS_IN_FULL  # a replica sends tracebacks of its first few only
SKIPPED, DEAD_LETTERED = "skipped", "dead-lettered"

_FAILED = object()  # what a guarded call returns when it raised
_END = object()


@dataclass(frozen=True)
class Policy:
    """One stage's per-item settings, as its replicas need them."""

    on_error: str = "fail"
    max_errors: int | None = None
    item_timeout: float | None = None
    dead_letters: Path | None = None  # the stage's file, for on_error = "dead-letter"

    @property
    def active(self) -> bool:
        """Whether items must go through ItemErrors.run at all."""
        return self.on_error != "fail" or self.item_timeout is not None


class ItemErrors:
    """One replica's handling of failed items: counts, dead letters, reports."""

    def __init__(self, policy: Policy, stage: str, replica: int):
        self.policy = policy
        self.stage = stage
        self.replica = replica
        self.name = f"{stage}-{replica}"
        self.count = 0
        # control.send, set once the replica is connected (Replica.run).
        self.send: Callable[..., None] | None = None
        self.watch: CallWatch | None = None
        if policy.item_timeout is not None:
            self.watch = CallWatch(stage, self.name, policy.item_timeout,
                                   interrupt=policy.on_error != "fail",
                                   abandon=self._dead_letter
                                   if policy.on_error == "dead-letter" else None)

    # -- the loop ---------------------------------------------------------------

    def run(self, items: Iterable[Any], process: Callable[[Any], Any],
            send: Callable[[Any], None], end_input: Callable[[], None] | None,
            flat: bool) -> None:
        """Body.run's per-item loop, with every call guarded."""
        if self.watch is not None:
            self.watch.thread = threading.get_ident()
        call = self._call
        for item in items:
            if type(item) is Poisoned:  # it ended a replica before (recovery.py)
                self.failed(item.item, None, {"exc_type": "zpipe.PoisonItem",
                                              "message": item.cause, "traceback": None})
            elif flat:
                self._flat(item, process, send)
            else:
                out = call(process, item, item)
                if out is not None and out is not _FAILED:
                    send(out)
            if end_input is not None:
                end_input()

    def _flat(self, item: Any, process: Callable[[Any], Any], send: Callable[[Any], None]) -> None:
        """A plain generator (stream = false): each step of it is a guarded call, each
        output sent between steps (a send waiting on a full link is not a stuck call)."""
        outputs = self._call(process, item, item)
        if outputs is _FAILED:
            return
        if not hasattr(outputs, "__next__"):
            outputs = self._call(iter, outputs, item)
            if outputs is _FAILED:
                return
        try:
            while True:
                out = self._call(_step, outputs, item)
                if out is _END or out is _FAILED:
                    return
                send(out)
        finally:
            # Only a send that raised leaves it suspended: let its finally blocks run.
            close = getattr(outputs, "close", None)
            if close is not None:
                close()

    def _call(self, function: Callable[[Any], Any], argument: Any, item: Any) -> Any:
        """``function(argument)``, the user's code; _FAILED if it raised and the policy
        took the item (for "fail" the exception goes on)."""
        watch = self.watch
        if watch is None:
            try:
                return function(argument)
            except Exception as exc:
                if not self.failed(item, exc):
                    raise
                return _FAILED
        try:
            watch.begin(item)
            out = function(argument)
            watch.end()
            return out
        except StuckCall:
            watch.end()
            report = watch.report
            described = {"exc_type": "zpipe.StuckCall",
                         "message": stuck_message(report, watch.limit),
                         "traceback": report.get("stack")}
            if not self.failed(item, None, described):
                raise
            return _FAILED
        except Exception as exc:
            watch.end()
            if not self.failed(item, exc):
                raise
            return _FAILED

    # -- a failed item ----------------------------------------------------------

    def failed(self, item: Any, exc: BaseException | None,
               described: dict[str, Any] | None = None) -> bool:
        """Take a failed item by the policy; False when the failure must go on (fail)."""
        policy = self.policy
        if policy.on_error == "fail":
            return False
        if described is None:
            assert exc is not None
            described = failures.describe(exc)
        self.count += 1
        action = SKIPPED
        if policy.on_error == "dead-letter":
            self._dead_letter(item, described)
            action = DEAD_LETTERED
        if self.send is not None:
            self.send(protocol.ITEM_ERROR, exc_type=described.get("exc_type"),
                      message=described.get("message") or "",
                      traceback=described.get("traceback") if self.count <= TRACEBACKS_SENT
                      else None, item_type=type(item).__name__, action=action,
                      count=self.count)
        return True

    def _dead_letter(self, item: Any, described: dict[str, Any]) -> None:
        assert self.policy.dead_letters is not None
        deadletters.append(self.policy.dead_letters,
                           deadletters.make_record(item, self.stage, self.replica, described))


def _step(iterator: Any) -> Any:
    return next(iterator, _END)


# -- the supervisor's side -------------------------------------------------------------


class Tally:
    """The supervisor's count of failed items, per stage, and what it says about them."""

    def __init__(self, max_errors: dict[str, int | None], folders: dict[str, Path | None]):
        self.max_errors = max_errors
        self.folders = folders  # stage -> its dead-letters file
        self.counts: dict[str, int] = {}
        self.actions: dict[str, dict[str, int]] = {}
        self.last_line: dict[str, float] = {}
        self.unsaid: dict[str, int] = {}

    def item_error(self, stage: str, replica: str, fields: dict[str, Any]
                   ) -> tuple[str | None, Failure | None]:
        """(a line to report or None, the failure of the run or None) for one ITEM_ERROR."""
        count = self.counts[stage] = self.counts.get(stage, 0) + 1
        action = fields.get("action") or SKIPPED
        by_action = self.actions.setdefault(stage, {})
        by_action[action] = by_action.get(action, 0) + 1
        what = f"{fields.get('exc_type')}: {fields.get('message', '')}"
        line = None
        now = time.monotonic()
        if count <= ERRORS_IN_FULL:
            line = (f"stage {stage!r} replica {replica}: an item of type "
                    f"{fields.get('item_type')} failed and was {action} ({what})")
            trace = fields.get("traceback")
            if trace:
                line += "\n" + trace.rstrip()
            if count == ERRORS_IN_FULL:
                line += f"\n(further failed items of stage {stage!r}: at most a line a second)"
            self.last_line[stage] = now
        else:
            self.unsaid[stage] = self.unsaid.get(stage, 0) + 1
            if now - self.last_line.get(stage, 0.0) >= LINE_EVERY:
                line = (f"stage {stage!r}: {self.unsaid[stage]} more item(s) {action}, "
                        f"{count} in all; the latest in replica {replica}, of type "
                        f"{fields.get('item_type')}: {_one_line(what)}")
                self.unsaid[stage] = 0
                self.last_line[stage] = now
        limit = self.max_errors.get(stage)
        failure = None
        if limit is not None and count > limit:
            failure = Failure(stage, replica, "error", exc_type="zpipe.TooManyErrors",
                              message=f"{count} items failed, more than max_errors = {limit} "
                                      f"(a flood of bad items is a bug); the last: "
                                      f"{_one_line(what)}",
                              item_type=fields.get("item_type"), phase="run")
        return line, failure

    def summary(self) -> list[str]:
        """The end-of-run lines: per stage, how many items were skipped or dead-lettered."""
        lines = []
        for stage, by_action in self.actions.items():
            parts = []
            for action, count in by_action.items():
                part = f"{count} item(s) {action}"
                if action == DEAD_LETTERED and self.folders.get(stage):
                    part += f" (in {self.folders[stage]})"
                parts.append(part)
            lines.append(f"stage {stage!r}: " + ", ".join(parts))
        return lines


def stuck_report(stage: str, replica: str, fields: dict[str, Any]) -> str:
    """The supervisor's line about a STUCK report, with the stack."""
    limit = fields.get("limit") or 0.0
    action = fields.get("action") or ""
    line = f"stage {stage!r} replica {replica}: stuck: {stuck_message(fields, limit)}"
    line += f"; {action}" if action else ""
    stack = fields.get("stack")
    return f"{line}\n{stack.rstrip()}" if stack else line


def stuck_failure(stage: str, replica: str, fields: dict[str, Any]) -> Failure | None:
    """The failure of the run a STUCK report means, or None (an interrupt is under way)."""
    limit = fields.get("limit") or 0.0
    action = fields.get("action") or ""
    if action == "failing":
        return Failure(stage, replica, "error", exc_type="zpipe.StuckCall",
                       message=f"{stuck_message(fields, limit)} (on_error = \"fail\")",
                       traceback=fields.get("stack"), item_type=fields.get("item_type"),
                       phase="run")
    if action == "ending the process":
        return Failure(stage, replica, "died",
                       message=f"was ended: {stuck_message(fields, limit)}, and did not come "
                               f"back when interrupted (inside C code?)")
    return None


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."
