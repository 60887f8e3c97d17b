"""Dead letters: the items a stage with ``on_error = "dead-letter"`` could not handle, on disk.

One file per stage, ``<dead_letters folder>/<stage>.msgpack``, holding one
msgpack map per item, appended in the order the items failed:

    item       the input item as the stage received it (numpy arrays and
               scalars in msgpack-numpy's form; a set_get_all batch is a list)
    stage      the stage's name
    replica    the replica's number
    exc_type   the exception's type, ``module.Class``
    message    its text
    traceback  the user's frames of its traceback (or the stack of a stuck call)
    time       when it failed, seconds since the epoch (float)

Several replicas of a stage append to the same file at once: each record is
written by one ``write`` under an exclusive ``flock``, so records never
interleave. Readers take a shared lock, and a last record cut short (a disk
that filled up, a reader that raced a writer on a filesystem without locks)
is reported, not fatal: the records before it are all there.

Reading never unpickles anything: msgpack-numpy would unpickle an array of
dtype object, which a record of ours never holds; such a record is refused.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import fcntl
import os
import reprlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import msgpack

from .failures import safe_text

# numpy and msgpack-numpy are imported where a record is packed or read: a
# replica of a stage without dead letters, or without arrays, starts sooner.

SUFFIX = ".msgpack"
REPLAYING = ".replaying-"  # <stage>.msgpack.replaying-<timestamp>: moved aside by zpipe replay
KEYS = ("item", "stage", "replica", "exc_type", "message", "traceback", "time")
# An item msgpack cannot carry still leaves a record: its repr, under this key.
ITEM_REPR = "item_repr"

_SCALAR = b"zpipe_scalar"  # a numpy scalar msgpack-numpy does not know (datetime64, str_, void)


class DeadLetterError(Exception):
    """A dead letter could not be written: the item would be lost, so the run fails."""


class BadFile(ValueError):
    """A dead-letters file that holds something other than dead letters."""


def path_for(folder: str | os.PathLike[str], stage: str) -> Path:
    """The file of one stage's dead letters."""
    return Path(folder) / f"{stage}{SUFFIX}"


def _encode(obj: Any) -> Any:
    import msgpack_numpy
    import numpy as np
    if isinstance(obj, np.ndarray):
        return _array_map(obj)
    if isinstance(obj, np.generic) and not isinstance(obj, (np.bool_, np.number)):
        # datetime64, timedelta64, str_, bytes_, void: kept as a 0-d array.
        return {**_array_map(np.asarray(obj)), _SCALAR: True}
    return msgpack_numpy.encode(obj)


def _array_map(array: Any) -> dict[bytes, Any]:
    """msgpack-numpy's map of an array (never of objects: those it would pickle)."""
    import msgpack_numpy
    if array.dtype.hasobject:
        raise TypeError("an array of dtype object")
    try:
        return msgpack_numpy.encode(array)
    except ValueError:
        # Datetimes have no buffer view: the same map, with a copy of the bytes.
        structured = array.dtype.kind == "V"
        return {b"nd": True, b"type": array.dtype.descr if structured else array.dtype.str,
                b"kind": b"V" if structured else b"", b"shape": array.shape,
                b"data": array.tobytes()}


def _decode(obj: dict[Any, Any]) -> Any:
    if b"nd" not in obj:
        return obj
    if obj.get(b"kind") == b"O":
        # msgpack-numpy would unpickle it: a record of ours never holds one.
        raise BadFile("an array of dtype object (zpipe never writes one; it is not unpickled)")
    import msgpack_numpy
    import numpy as np
    value = msgpack_numpy.decode(obj)
    if isinstance(value, np.ndarray):
        # Writable, as items arrive in a stage (msgpack-numpy's view of the buffer is not).
        value = value.copy()
        if obj.get(_SCALAR):
            value = value[()]
    return value


def pack_record(record: dict[str, Any]) -> bytes:
    """One record as bytes; an item msgpack cannot carry is kept as its repr."""
    try:
        return msgpack.packb(record, default=_encode, use_bin_type=True)
    except Exception as exc:  # noqa: BLE001 - the rest of the record is still worth keeping
        kept = {**record, "item": None,
                ITEM_REPR: f"{short_repr(record.get('item'), 2000)} (not storable: "
                           f"{type(exc).__name__}: {safe_text(exc, 200)})"}
        return msgpack.packb(kept, default=_encode, use_bin_type=True)


def make_record(item: Any, stage: str, replica: int, described: dict[str, Any],
                when: float | None = None) -> dict[str, Any]:
    """The record of ``item``, which failed with the exception ``described``
    (failures.describe's fields: exc_type, message, traceback)."""
    return {"item": item, "stage": stage, "replica": replica,
            "exc_type": described.get("exc_type") or "?",
            "message": described.get("message") or "",
            "traceback": described.get("traceback") or "",
            "time": time.time() if when is None else when}


def append(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one record, atomically with respect to other writers; raises DeadLetterError.

    One ``write`` of the whole record with O_APPEND, under an exclusive flock:
    replicas in other processes appending at the same moment never mix their
    bytes. A write cut short (disk full) is undone, so the file stays readable.
    """
    data = pack_record(record)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        raise DeadLetterError(f"cannot write dead letters to {path}: {exc.strerror or exc}") \
            from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise DeadLetterError(f"cannot write dead letters to {path}: "
                                  f"{exc.strerror or exc}") from None
    finally:
        os.close(fd)  # releases the lock


@dataclass
class Letters:
    """What one dead-letters file holds: its records, and what was wrong with the rest."""

    path: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    truncated: int = 0          # bytes of a last record cut short (ignored)
    problem: str | None = None  # the file is damaged from some record on (the rest ignored)

    @property
    def stage(self) -> str:
        return self.path.name[:-len(SUFFIX)] if self.path.name.endswith(SUFFIX) else \
            self.path.name.split(SUFFIX)[0]

    def warnings(self) -> list[str]:
        said = []
        if self.truncated:
            said.append(f"{self.path}: the last {self.truncated} bytes are a record cut short "
                        f"(a write that did not finish); ignored, the {len(self.records)} "
                        f"records before it are intact")
        if self.problem:
            said.append(f"{self.path}: {self.problem}")
        return said


def read(path: str | os.PathLike[str]) -> Letters:
    """Every record of a dead-letters file, in the order they were appended.

    Raises OSError if the file cannot be read. A damaged file is not an
    exception: ``problem`` says where the damage begins (records before it
    are returned), ``truncated`` how many bytes a last record cut short has.
    """
    path = Path(path)
    letters = Letters(path)
    with open(path, "rb") as handle:
        with contextlib.suppress(OSError):  # a filesystem without locks: read anyway
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
        size = os.fstat(handle.fileno()).st_size
        unpacker = msgpack.Unpacker(handle, raw=False, object_hook=_decode, max_buffer_size=0,
                                    strict_map_key=False)
        while True:
            offset = unpacker.tell()
            try:
                record = next(unpacker)
            except StopIteration:
                letters.truncated = size - unpacker.tell()
                break
            except Exception as exc:  # noqa: BLE001 - any damage, at any depth
                letters.problem = (f"not a dead letter at byte {offset} "
                                   f"({type(exc).__name__}: {safe_text(exc, 200)}); "
                                   f"that and everything after it ignored")
                break
            why = _not_a_record(record)
            if why:
                letters.problem = (f"not a dead letter at byte {offset} ({why}); that and "
                                   f"everything after it ignored")
                break
            letters.records.append(record)
    return letters


def _not_a_record(record: Any) -> str | None:
    if not isinstance(record, dict):
        return f"a {type(record).__name__}, not a map"
    missing = [k for k in KEYS if k not in record and not (k == "item" and ITEM_REPR in record)]
    if missing:
        return f"no {', '.join(missing)}"
    for key in ("stage", "exc_type", "message", "traceback"):
        if not isinstance(record[key], str):
            return f"{key} is a {type(record[key]).__name__}, not text"
    if isinstance(record["time"], bool) or not isinstance(record["time"], (int, float)):
        return "time is not a number"
    return None


def files(folder: str | os.PathLike[str]) -> list[Path]:
    """The stage files of a dead-letters folder, by name."""
    return sorted(p for p in Path(folder).iterdir() if p.name.endswith(SUFFIX) and p.is_file())


def set_aside(folder: str | os.PathLike[str]) -> list[Path]:
    """Files a replay moved aside and kept because it failed."""
    return sorted(p for p in Path(folder).iterdir() if REPLAYING in p.name and p.is_file())


def replay_items(path: str) -> Iterator[Any]:
    """A source yielding the recorded items of one dead-letters file, in order (zpipe replay)."""
    for record in read(path).records:
        if "item" in record:
            yield record["item"]


class _ShortRepr(reprlib.Repr):
    def repr_ndarray(self, value: Any, level: int) -> str:  # reprlib's hook, by type name
        return f"array(shape={value.shape}, dtype={value.dtype})"


_SHORT = _ShortRepr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxdict = 6
_SHORT.maxlevel = 3


def short_repr(value: Any, limit: int = 200) -> str:
    """The repr of an item, cut short whatever its size (an array shows its shape)."""
    try:
        text = _SHORT.repr(value)
    except Exception:  # noqa: BLE001 - a listing must never fail on one item
        text = f"<a {type(value).__name__}>"
    text = safe_text(text)
    return text if len(text) <= limit else text[:limit] + "..."


def summary(folder: str | os.PathLike[str], show: int = 0) -> tuple[list[str], list[str]]:
    """What `zpipe dead-letters FOLDER` prints: (lines, warnings).

    Per stage: how many items, per exception type how many; with ``show``, the
    first ``show`` records of each stage: replica, time, exception, the item.
    Raises OSError for a folder that cannot be read.
    """
    lines: list[str] = []
    warnings: list[str] = []
    total = stages = 0
    for path in files(folder):
        try:
            letters = read(path)
        except OSError as exc:
            warnings.append(f"{path}: cannot read: {exc.strerror or exc}")
            continue
        warnings.extend(letters.warnings())
        records = letters.records
        if not records:
            continue
        stages += 1
        total += len(records)
        by_type = collections.Counter(r["exc_type"] for r in records)
        lines.append(f"{letters.stage}: {len(records)} item(s) in {path}")
        for exc_type, count in by_type.most_common():
            lines.append(f"  {count:>6}  {exc_type}")
        for number, record in enumerate(records[:show], start=1):
            lines.extend(describe_record(record, number))
    if total:
        lines.append(f"{total} dead letter(s) of {stages} stage(s)")
    for path in set_aside(folder):
        warnings.append(f"{path}: moved aside by a replay that did not finish; rename it to "
                        f"{path.name.split(REPLAYING)[0]} to replay it again")
    return lines, warnings


def describe_record(record: dict[str, Any], number: int) -> list[str]:
    """A record, readable: which replica, when, the exception, the item cut short."""
    when = datetime.datetime.fromtimestamp(record["time"]).isoformat(sep=" ",
                                                                     timespec="seconds")
    message = safe_text(record["message"], 300).replace("\n", " ")
    item = record[ITEM_REPR] if ITEM_REPR in record else short_repr(record.get("item"))
    return [f"  #{number} {record['stage']}-{record['replica']} at {when}: "
            f"{record['exc_type']}: {message}",
            f"      item: {item}"]
