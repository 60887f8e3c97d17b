"""A stage's exception on its way from the replica to the user: safe to describe, rebuilt without pickle.

The replica describes the exception as plain data (type, module, args,
message, traceback) that any exception object yields, even one whose
``__str__`` raises or whose text cannot be encoded. The caller of
``zpipe.run`` rebuilds an exception of the same type from that data: it
imports the type's module, takes the class only if it is an Exception, and
calls it with the args. Nothing received is ever unpickled, so a forged
report can at most name an exception type, never run code of its choosing.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from ..errors import StageError

MAX_TEXT = 64 * 1024  # characters of a message or traceback that travel
MAX_ARGS_BYTES = 64 * 1024

_OWN_FILES = str(Path(__file__).resolve().parent)


def safe_text(value: Any, limit: int = MAX_TEXT) -> str:
    """``str(value)`` that never raises and always encodes as UTF-8 (surrogates escaped)."""
    try:
        text = value if isinstance(value, str) else str(value)
    except BaseException as exc:  # noqa: BLE001 - a broken __str__ must not lose the report
        try:
            inner = type(exc).__name__
        except BaseException:  # noqa: BLE001
            inner = "?"
        text = f"<str() of the {type(value).__name__} failed with {inner}>"
    if not isinstance(text, str):  # a __str__ returning a str subclass is still text
        text = "<unprintable>"
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > limit:
        text = text[:limit] + f"... [{len(text) - limit} more characters]"
    return text


def qualified_name(cls: type) -> str:
    module, name = safe_text(getattr(cls, "__module__", "?")), \
        safe_text(getattr(cls, "__qualname__", "?"))
    return name if module == "builtins" else f"{module}.{name}"


def format_user_traceback(exc: BaseException) -> str:
    """The traceback without zpipe's own frames, so the user's code stands out."""
    try:
        info = traceback.TracebackException.from_exception(exc)
        frames = [f for f in info.stack
                  if not str(Path(f.filename).resolve()).startswith(_OWN_FILES)]
        if frames:
            info.stack = traceback.StackSummary.from_list(frames)
        return safe_text("".join(info.format()))
    except BaseException:  # noqa: BLE001 - the rest of the report still travels
        return f"(the traceback of a {qualified_name(type(exc))} could not be formatted)\n"


def _portable_args(exc: BaseException) -> list[Any] | None:
    """The exception's args if msgpack carries them as they are (None otherwise)."""
    try:
        args = list(exc.args)
        packed = msgpack.packb(args, use_bin_type=True)
    except BaseException:  # noqa: BLE001 - e.g. a lock in the args, a lone surrogate
        return None
    return args if len(packed) <= MAX_ARGS_BYTES else None


def describe(exc: BaseException) -> dict[str, Any]:
    """The fields of an ERROR report for ``exc``; never raises, whatever the object."""
    cls = type(exc)
    return {"exc_type": qualified_name(cls),
            "exc_module": safe_text(getattr(cls, "__module__", "")),
            "exc_qualname": safe_text(getattr(cls, "__qualname__", "")),
            "message": safe_text(exc),
            "traceback": format_user_traceback(exc),
            "args": _portable_args(exc)}


def _find_class(module_name: str, qualname: str) -> type | None:
    """The Exception subclass ``module:qualname``, importing only that module; None if none."""
    if not module_name or not qualname or "<" in qualname:
        return None  # a class defined inside a function cannot be found again
    try:
        module = sys.modules.get(module_name) or importlib.import_module(module_name)
    except BaseException:  # noqa: BLE001 - an unimportable module only loses the type
        return None
    target: Any = module
    for part in qualname.split("."):
        target = getattr(target, part, None)
        if target is None:
            return None
    # Exception, not BaseException: a stage's SystemExit or KeyboardInterrupt
    # must not become the caller's.
    return target if isinstance(target, type) and issubclass(target, Exception) else None


@dataclass
class Failure:
    """One failure of a pipeline, as the supervisor reports it and the caller raises it."""

    stage: str
    replica: str
    kind: str                      # "error", "died" or "timeout"
    message: str
    exc_type: str | None = None
    traceback: str | None = None
    item_type: str | None = None
    phase: str | None = None
    exc_module: str | None = None   # where the exception's class lives, to rebuild it
    exc_qualname: str | None = None
    args: list[Any] | None = None   # its args, when msgpack carries them

    def describe(self) -> str:
        where = f"stage {self.stage!r} replica {self.replica}"
        if self.kind == "timeout":
            return self.message
        if self.kind != "error":
            return f"{where} {self.message}"
        doing = {"run": f"while processing an item of type {self.item_type}" if self.item_type
                 else "while running", "setup": "in setup", "connect": "while connecting",
                 "teardown": "in teardown"}.get(self.phase or "", "")
        head = f"{where} failed {doing}: {self.exc_type}: {self.message}".replace("  ", " ")
        return f"{head}\n{self.traceback.rstrip()}" if self.traceback else head

    @property
    def replica_number(self) -> int | None:
        number = self.replica.rsplit("-", 1)[-1]
        return int(number) if number.isdigit() else None


def rebuild(failure: Failure) -> BaseException:
    """The exception to raise in the caller: the stage's own type when it can be
    rebuilt from the report, else StageError; with ``stage``, ``replica``,
    ``remote_traceback`` and a note showing where it was raised."""
    cls = _find_class(failure.exc_module or "", failure.exc_qualname or "") \
        if failure.kind == "error" else None
    exc: BaseException | None = None
    if cls is not None:
        args = tuple(failure.args) if isinstance(failure.args, list) else (failure.message,)
        try:
            exc = cls(*args)
        except BaseException:  # noqa: BLE001 - its __init__ wants other arguments
            try:
                exc = cls.__new__(cls)
                exc.args = args
            except BaseException:  # noqa: BLE001
                exc = None
        if not isinstance(exc, cls):
            exc = None
    replica, trace = failure.replica_number, failure.traceback
    if exc is None:
        return StageError(failure.describe(), stage=failure.stage, replica=replica,
                          exc_type=failure.exc_type, remote_traceback=trace)
    exc.stage = failure.stage  # type: ignore[attr-defined]
    exc.replica = replica  # type: ignore[attr-defined]
    exc.remote_traceback = trace  # type: ignore[attr-defined]
    exc.add_note(f"zpipe: raised in stage {failure.stage!r}, replica {failure.replica}"
                 + (f"; its traceback there:\n{trace.rstrip()}" if trace else ""))
    return exc
