"""Items on the wire: a msgpack header plus one raw frame per numpy array.

A data message is a ZeroMQ multipart message::

    frame 0   msgpack [PROTOCOL_VERSION, [item, item, ...]]
              or      [PROTOCOL_VERSION, [item, ...], [tag, ...]] on links into and
                      out of an ``ordered`` stage, one tag ``[seq, flags]`` per item
    frame 1.. the bytes of each numpy array, in the order the header refers to them

Inside the header an array is msgpack extension type 1 holding
``[frame_index, dtype, shape]``; a numpy scalar is extension type 2 holding
``[dtype, bytes]``. Arrays thus never pass through msgpack. An item is
frozen as it is sent, so the stage may change its array afterwards: on
inproc links the Batch copies an array's bytes once, as it is added, and
sends that private copy; on ipc and tcp links it sends the array's own bytes
and the Outbox waits until ZeroMQ has let go of them. The receiver maps each
frame into an array without copying it (the array is writable: it owns the
received buffer). Tuples arrive as lists, as msgpack has no tuple.

Anyone who can reach a socket can send it bytes: ``decode_tagged`` raises
DecodeError, and only DecodeError, for anything that is not such a message,
and checks every size against the bytes received before it makes an array.
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Sequence
from typing import Any

import msgpack
from zmq import COPY_THRESHOLD

from ..errors import EncodeError

PROTOCOL_VERSION = 4  # docs/protocol.md, Versioning
EXT_ARRAY = 1
EXT_SCALAR = 2
TAG_LAST = 1    # the last output for this input sequence number
TAG_MARKER = 2  # no item: the input produced no output (keeps the sequence whole)

SUPPORTED = ("None, bool, int, float, str, bytes, list, tuple, dict and numpy arrays "
             "(any dtype but object)")

# What a received header may describe (docs/protocol.md, Data links).
MAX_DIMS = 64                     # numpy 2's limit (an older numpy refuses more itself)
MAX_DTYPE_DEPTH = 32              # structured dtypes nested in structured dtypes
_INTP = 2**63                     # elements of one array, and of one dimension, stay below
_KINDS = frozenset("biufcmMUSV")  # never object, nor any dtype that holds pointers
_DTYPE_STRING = re.compile(r"[<>|=]?[b-zA-Z?][0-9]*(?:\[[0-9]*[a-zA-Z]+\])?\Z")  # as dtype.str
_NAT = -2**63


class DecodeError(ValueError):
    """A data message that is not zpipe's wire format (or another version of it)."""


class VersionMismatch(DecodeError):
    """A data message from a peer speaking another protocol version."""


class FrameTooLarge(EncodeError):
    """An array whose frame would exceed the receiver's max_message_size (found before
    the array is copied); the Outbox says which stage refuses it."""

    def __init__(self, nbytes: int, max_size: int):
        super().__init__(f"an array of {nbytes} bytes is larger than the next stage accepts "
                         f"(max_message_size {max_size})")
        self.nbytes = nbytes


def _numpy() -> Any:
    # numpy is imported on first use so that stages which never touch an array
    # start faster.
    import numpy
    return numpy


def _dtype_to_wire(dtype: Any) -> Any:
    """A dtype as msgpack data: its string for plain ones, a description for structs."""
    if dtype.hasobject:
        raise TypeError("numpy arrays of dtype object")
    if dtype.subdtype is not None:
        base, shape = dtype.subdtype
        return {"base": _dtype_to_wire(base), "shape": list(shape)}
    if dtype.fields is not None:
        # names/formats/offsets/itemsize keep padding, alignment and field order exactly.
        return {"names": list(dtype.names),
                "formats": [_dtype_to_wire(dtype.fields[n][0]) for n in dtype.names],
                "offsets": [dtype.fields[n][1] for n in dtype.names],
                "itemsize": dtype.itemsize, "aligned": dtype.isalignedstruct}
    return dtype.str


_STRUCT_KEYS = frozenset({"names", "formats", "offsets", "itemsize"})
_STRUCT_KEYS_ALIGNED = _STRUCT_KEYS | {"aligned"}


def _dtype_from_wire(wire: Any, depth: int = 0) -> Any:
    """The dtype a received description names, if it is one a sender can send."""
    np = _numpy()
    if type(wire) is str:
        # Only what dtype.str gives ("<f4", "|S5", "<M8[10s]"): numpy would also
        # parse names, comma lists and subarrays, and make unsized "S0"/"U0"
        # strings one character long (an allocation by a claimed count).
        if not _DTYPE_STRING.match(wire):
            raise DecodeError(f"not a dtype: {_brief(wire)}")
        dtype = np.dtype(wire)
        if dtype.kind not in _KINDS or dtype.fields is not None or \
                dtype.subdtype is not None or (not dtype.itemsize and dtype.kind in "SU"):
            raise DecodeError(f"not a dtype zpipe sends: {_brief(wire)}")
        return dtype
    if type(wire) is not dict or depth >= MAX_DTYPE_DEPTH:
        raise DecodeError(f"not a dtype: {_brief(wire)}")
    keys = wire.keys()
    if keys == {"base", "shape"}:  # a subarray field
        base = _dtype_from_wire(wire["base"], depth + 1)
        _count(wire["shape"])
        return np.dtype((base, tuple(wire["shape"])))
    if not _STRUCT_KEYS <= keys <= _STRUCT_KEYS_ALIGNED:
        raise DecodeError(f"not a dtype description: keys {_brief(sorted(map(str, keys)))}")
    names, formats, offsets = wire["names"], wire["formats"], wire["offsets"]
    itemsize, aligned = wire["itemsize"], wire.get("aligned", False)
    if type(names) is not list or type(formats) is not list or type(offsets) is not list or \
            not len(names) == len(formats) == len(offsets) or \
            any(type(name) is not str for name in names) or \
            any(type(offset) is not int or not 0 <= offset < _INTP for offset in offsets) or \
            type(itemsize) is not int or not 0 <= itemsize < _INTP or type(aligned) is not bool:
        raise DecodeError("not a structured dtype description")
    return np.dtype({"names": names, "formats": [_dtype_from_wire(f, depth + 1) for f in formats],
                     "offsets": offsets, "itemsize": itemsize}, align=aligned)


def _count(shape: Any) -> int:
    """The number of elements of a received shape (Python ints: no overflow)."""
    if type(shape) is not list or len(shape) > MAX_DIMS:
        raise DecodeError(f"not a shape: {_brief(shape)}")
    count = 1
    for n in shape:
        if type(n) is not int or not 0 <= n < _INTP:
            raise DecodeError(f"not a shape: {_brief(shape)}")
        count *= n
    if count >= _INTP:
        raise DecodeError(f"not a shape: {_brief(shape)}")
    return count


def _fragile(dtype: Any) -> bool:
    """Whether some byte patterns are no value of ``dtype``: UCS4 text (code points
    above U+10FFFF make numpy fail on every read) and datetimes of generic unit
    (anything but NaT)."""
    if dtype.names is not None:
        return any(_fragile(dtype.fields[name][0]) for name in dtype.names)
    if dtype.subdtype is not None:
        return _fragile(dtype.subdtype[0])
    return dtype.kind == "U" or (dtype.kind == "M" and "[" not in dtype.str)


def _unreadable(array: Any) -> bool:
    """Whether an array of a _fragile dtype holds bytes that are no value of it."""
    np = _numpy()
    dtype = array.dtype
    if dtype.names is not None:
        return any(_unreadable(array[name]) for name in dtype.names)
    if dtype.kind == "U":
        code = np.dtype(np.uint32).newbyteorder(dtype.byteorder)
        return bool((array.view(np.dtype((code, (dtype.itemsize // 4,)))) > 0x10FFFF).any())
    if dtype.kind == "M" and "[" not in dtype.str:
        return bool((array.view(np.dtype(np.int64).newbyteorder(dtype.byteorder)) != _NAT).any())
    return False


def _brief(value: Any, limit: int = 80) -> str:
    """repr(value), cut short: what a stranger sent goes into log lines."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class _Copies:
    """Memory for the private copies of large arrays, reused once ZeroMQ has let go of it.

    Fresh memory costs more than the copy itself (the kernel zeroes every page
    it hands out): a stage that sends arrays of one size keeps reusing a few
    buffers. Each copy goes out as a view of its buffer; ZeroMQ (through
    pyzmq, which holds the view until libzmq frees the message, over inproc
    only once the receiver drops it) is then the view's only holder, so the
    buffer is free again once the view is gone.
    """

    LIMIT = 64 * 2**20  # bytes of buffers kept (others are freed as usual)

    def __init__(self) -> None:
        self.kept: list[list[Any]] = []  # [buffer, weakref to its view in flight]
        self.size = 0

    def take(self, nbytes: int) -> Any:
        """A writable uint8 array of ``nbytes`` that nothing else refers to."""
        spare = None
        for entry in self.kept:
            if entry[1]() is None:
                if len(entry[0]) == nbytes:
                    view = entry[0][:]
                    entry[1] = weakref.ref(view)
                    return view
                spare = entry
        if spare is not None and self.size + nbytes > self.LIMIT:
            self.kept.remove(spare)  # a free buffer of another size makes room
            self.size -= len(spare[0])
        buffer = _numpy().empty(nbytes, dtype="u1")
        view = buffer[:]
        if self.size + nbytes <= self.LIMIT:
            self.kept.append([buffer, weakref.ref(view)])
            self.size += nbytes
        return view


class Batch:
    """One data message under construction: items are packed one by one as they come.

    Packing each item when it is added makes an unsendable item fail in the
    stage that produced it, at that item, and freezes the item as it was
    (a source may reuse and mutate one object; an array's bytes are copied
    here with ``copy_arrays``, else the sender waits for ZeroMQ to let go of
    them); the message is then assembled in
    ``frames()`` with one join. ``add`` is on every stage's hot path, so it
    does no more than pack, append and count.
    """

    def __init__(self, max_size: int | None = None, copy_arrays: bool = True) -> None:
        self.packer = msgpack.Packer(default=self._default, use_bin_type=True)
        self._pack = self.packer.pack
        self.encoded: list[bytes] = []
        self.tags: list[Any] | None = None
        self.arrays: list[Any] = []   # frames 1.. of the message
        self.fresh: list[Any] = []    # arrays of the item being packed, until it succeeds
        self.header_bytes = 0         # the items' encodings, without their arrays
        # Bytes per frame the receiver takes: a larger array fails before it is copied.
        self.max_size = max_size
        # False where the sender instead waits until ZeroMQ has let go of each
        # array it sent without a copy (ipc and tcp links, see outbox.py): the
        # array is then frozen without a copy, and the receiver's is its own.
        self.copy_arrays = copy_arrays
        self.copies = _Copies()
        # When its source sent what this message carries on (unix time), on a
        # sampled few messages: the sink times them end to end (observe.py).
        self.origin: float | None = None

    def __len__(self) -> int:
        return len(self.encoded)

    def _default(self, obj: Any) -> Any:
        module = type(obj).__module__
        if module == "numpy":
            np = _numpy()
            if isinstance(obj, np.ndarray):
                dtype = _dtype_to_wire(obj.dtype)
                nbytes = obj.nbytes  # what the frame will hold (a broadcast array's too)
                if self.max_size is not None and nbytes > self.max_size:
                    raise FrameTooLarge(nbytes, self.max_size)
                if obj.dtype.kind in "UMV" and _fragile(obj.dtype) and _unreadable(obj):
                    raise TypeError(f"a numpy array of {obj.dtype} with bytes that are no "
                                    f"value of it")
                # As flat C-ordered bytes, so that every dtype (datetime,
                # structured, ...) exposes a plain buffer. Over inproc, private
                # too: ZeroMQ would hand that very memory to the receiver.
                # Copied once: pyzmq copies frames under COPY_THRESHOLD itself;
                # ascontiguousarray copies a non-contiguous array; a large
                # contiguous one is copied here, into a buffer of the Batch's
                # own (_Copies). Elsewhere the Outbox waits for ZeroMQ instead.
                if not nbytes:
                    raw = b""
                elif nbytes >= COPY_THRESHOLD and obj.flags.c_contiguous and self.copy_arrays:
                    raw = self.copies.take(nbytes)
                    np.copyto(raw, obj.view(np.ndarray).reshape(-1).view(np.uint8))
                else:
                    raw = np.ascontiguousarray(obj).reshape(-1).view(np.uint8)
                self.fresh.append(raw)
                return msgpack.ExtType(EXT_ARRAY, msgpack.packb(
                    [len(self.arrays) + len(self.fresh), dtype, list(obj.shape)],
                    use_bin_type=True))
            if isinstance(obj, np.generic):
                if obj.dtype.kind in "UMV" and _fragile(obj.dtype) and \
                        _unreadable(np.asarray(obj)):
                    raise TypeError(f"a numpy scalar of {obj.dtype} with bytes that are no "
                                    f"value of it")
                return msgpack.ExtType(EXT_SCALAR, msgpack.packb(
                    [_dtype_to_wire(obj.dtype), obj.tobytes()], use_bin_type=True))
        if isinstance(obj, int):
            raise TypeError(f"the integer {obj}, outside the 64-bit range msgpack carries")
        raise TypeError(f"values of type {type(obj).__module__}.{type(obj).__qualname__}"
                        if module != "builtins" else f"values of type {type(obj).__qualname__}")

    def add(self, item: Any, tag: Any = None) -> None:
        """Pack one item (with its tag on numbered links); raises EncodeError naming the type."""
        try:
            data = self._pack(item)
        except FrameTooLarge:
            self._forget()
            raise
        except (TypeError, ValueError, OverflowError) as exc:
            raise self._refused(item, exc) from None
        self.encoded.append(data)
        self.header_bytes += len(data)
        if self.fresh:
            self.arrays += self.fresh
            self.fresh.clear()
        if tag is not None or self.tags is not None:
            if self.tags is None:
                self.tags = [None] * (len(self.encoded) - 1)
            self.tags.append(tag)

    def alone(self, item: Any) -> list[Any]:
        """The frames of a message of ``item`` alone, on an untagged link (the
        batch must be empty, and stays so): an idle link's path, kept short."""
        try:
            data = self._pack(item)
        except FrameTooLarge:
            self._forget()
            raise
        except (TypeError, ValueError, OverflowError) as exc:
            raise self._refused(item, exc) from None
        if self.fresh:
            arrays, self.fresh = self.fresh, []
            return [_PREFIXES[1] + data, *arrays]
        return [_PREFIXES[1] + data]

    def _forget(self) -> None:
        """Drop what a failed pack left behind."""
        self.fresh.clear()
        self.packer.reset()

    def _refused(self, item: Any, exc: Exception) -> EncodeError:
        self._forget()
        return EncodeError(f"cannot send an item of type {type(item).__name__}: it holds "
                           f"{exc}; zpipe sends {SUPPORTED}")

    def largest_frame(self) -> int:
        return max([self.header_bytes + 16, *(len(a) for a in self.arrays)])

    def pop(self, mark: int) -> tuple[bytes, Any, list[Any]]:
        """Take the last item back out: (its encoding, its tag, its array frames).

        ``mark`` is ``len(self.arrays)`` from before that item was added.
        """
        data = self.encoded.pop()
        arrays, self.arrays = self.arrays[mark:], self.arrays[:mark]
        tag = self.tags.pop() if self.tags is not None else None
        self.header_bytes -= len(data)
        return data, tag, arrays

    def push(self, data: bytes, tag: Any, arrays: list[Any]) -> None:
        """Put back what pop() took (into an empty batch, so array indices still hold)."""
        assert not self.encoded
        self.encoded, self.arrays = [data], list(arrays)
        self.tags = None if tag is None else [tag]
        self.header_bytes = len(data)

    def frames(self) -> list[Any]:
        """The message's frames (the batch keeps its items until ``clear()``)."""
        count = len(self.encoded)
        if self.origin is not None:
            header = b"".join([_HEAD_STAMPED, self.packer.pack_array_header(count),
                               *self.encoded, self._pack(self.tags), self._pack(self.origin)])
        elif self.tags is None:
            prefix = _PREFIXES[count] if count < len(_PREFIXES) else \
                _HEAD_PLAIN + self.packer.pack_array_header(count)
            header = prefix + b"".join(self.encoded)
        else:
            header = b"".join([_HEAD_TAGGED, self.packer.pack_array_header(count),
                               *self.encoded, self._pack(self.tags)])
        return [header, *self.arrays] if self.arrays else [header]

    def clear(self) -> None:
        """Empty the batch, once its frames have been sent."""
        self.encoded, self.tags, self.arrays = [], None, []
        self.header_bytes = 0
        self.origin = None


# The start of a header, [version, [items...]] or [version, [items...], tags],
# up to the items' array header: fixed bytes, so the common small counts are
# precomputed.
_HEAD_PLAIN = b"\x92" + msgpack.packb(PROTOCOL_VERSION)
_HEAD_TAGGED = b"\x93" + msgpack.packb(PROTOCOL_VERSION)
_HEAD_STAMPED = b"\x94" + msgpack.packb(PROTOCOL_VERSION)  # [version, items, tags|nil, origin]
_PREFIXES = [_HEAD_PLAIN + header
             for header in map(msgpack.Packer().pack_array_header, range(1025))]


def encode(items: Sequence[Any], tags: Sequence[Any] | None = None) -> list[Any]:
    """Frames of one data message carrying ``items``; raises EncodeError naming the type."""
    batch = Batch()
    for index, item in enumerate(items):
        batch.add(item, None if tags is None else tags[index])
    return batch.frames()


def decode(frames: Sequence[Any]) -> list[Any]:
    """Items of one data message; frames may be bytes or zmq.Frame objects."""
    return decode_tagged(frames)[0]


def decode_tagged(frames: Sequence[Any]) -> tuple[list[Any], list[Any] | None]:
    """Items of one data message and their tags (None on untagged links)."""
    return decode_stamped(frames)[:2]


def decode_stamped(frames: Sequence[Any]) -> tuple[list[Any], list[Any] | None, float | None]:
    """Items of one data message, their tags (None on untagged links), and its
    origin stamp (None but on a sampled few: see Batch.origin).

    Raises DecodeError, and nothing else, for what is not a data message:
    every ext type, array and tag is checked where it appears.
    """
    count = len(frames)
    if count == 1:
        # A message without arrays (the common, small case) needs no state.
        ext_hook: Any = _ext_without_frames
    elif count:
        ext_hook = _Arrays(frames)
    else:
        raise DecodeError("empty message")
    head = frames[0]
    try:
        head = head.bytes  # a zmq.Frame
    except AttributeError:
        pass
    try:
        try:
            message = msgpack.unpackb(head, ext_hook=ext_hook, raw=False, strict_map_key=False)
        except TypeError:
            # A tuple used as a dict key arrives as an unhashable list: decode
            # again with tuples, then turn them into lists everywhere but keys.
            if count > 1:
                ext_hook = _Arrays(frames)
            message = _lists(msgpack.unpackb(head, ext_hook=ext_hook, raw=False,
                                             strict_map_key=False, use_list=False))
        if type(message) is list and len(message) == 2 and type(message[1]) is list and \
                type(message[0]) is int and message[0] == PROTOCOL_VERSION and \
                (count == 1 or ext_hook.next == count):
            return message[1], None, None  # the usual message, checked in one go
        return _unusual(message, ext_hook, count)
    except DecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a stranger's bytes make fail
        raise DecodeError(f"not a zpipe data message: {_why(exc)}") from None


def _unusual(message: Any, ext_hook: Any,
             count: int) -> tuple[list[Any], list[Any] | None, float | None]:
    """The checks of every message but the usual one: another version, a tagged
    or stamped message, frames that no array took, or not a data message at all."""
    if type(message) is not list or not 2 <= len(message) <= 4 or type(message[1]) is not list:
        raise DecodeError("not a zpipe data message: header is not [version, items], "
                          "[version, items, tags] or [version, items, tags, origin]")
    if type(message[0]) is not int or message[0] != PROTOCOL_VERSION:
        raise VersionMismatch(f"protocol version {_brief(message[0])} received, this zpipe "
                              f"speaks {PROTOCOL_VERSION}: run the same zpipe version in every "
                              f"stage")
    if count > 1 and ext_hook.next != count:
        raise DecodeError(f"not a zpipe data message: {count - 1} array frames, "
                          f"{ext_hook.next - 1} arrays")
    items = message[1]
    if len(message) == 2:
        return items, None, None
    origin = None
    if len(message) == 4:
        origin = message[3]
        if type(origin) is not float or not math.isfinite(origin):
            raise DecodeError(f"not a zpipe data message: origin {_brief(origin)} is not a time")
        if message[2] is None:
            return items, None, origin
    tags = message[2]
    if type(tags) is not list or len(tags) != len(items):
        raise DecodeError("not a zpipe data message: tags do not match items")
    for item, tag in zip(items, tags):
        if type(tag) is not list or len(tag) != 2 or type(tag[0]) is not int or \
                type(tag[1]) is not int or tag[0] < 0 or tag[1] & ~(TAG_LAST | TAG_MARKER):
            raise DecodeError(f"not a zpipe data message: tag {_brief(tag)} is not [seq, flags]")
        if tag[1] & TAG_MARKER and (tag[1] != TAG_LAST | TAG_MARKER or item is not None):
            raise DecodeError(f"not a zpipe data message: marker {_brief(tag)} with an item, or "
                              f"without LAST")
    return items, tags, origin


def _why(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 200 else text[:200] + "..."


class _Arrays:
    """The ext hook of a message with array frames: the k-th array takes frame k."""

    __slots__ = ("frames", "next")

    def __init__(self, frames: Sequence[Any]):
        self.frames = frames
        self.next = 1  # the frame the next array must refer to

    def __call__(self, code: int, data: bytes) -> Any:
        if code != EXT_ARRAY:
            return _ext_without_frames(code, data)
        try:
            return self._array(data)
        except DecodeError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise DecodeError(f"not a zpipe data message: a bad array: {_why(exc)}") from None

    def _array(self, data: bytes) -> Any:
        header = msgpack.unpackb(data)
        if type(header) is not list or len(header) != 3:
            raise DecodeError(f"an array's header {_brief(header)} is not "
                              f"[frame_index, dtype, shape]")
        index, wire, shape = header
        frames = self.frames
        if type(index) is not int or index != self.next or index >= len(frames):
            raise DecodeError(f"array refers to frame {_brief(index)} of {len(frames)} "
                              f"(the next is frame {self.next})")
        dtype = _dtype_from_wire(wire)
        if dtype.subdtype is not None or dtype.hasobject:
            raise DecodeError(f"not an array's dtype: {dtype}")
        frame = frames[index]
        buffer = frame.buffer if hasattr(frame, "buffer") else frame
        # Before anything is made: the claimed size must be the bytes received.
        nbytes = _count(shape) * dtype.itemsize
        if nbytes != len(buffer):
            raise DecodeError(f"array {_brief(shape)} of {dtype.str} needs {nbytes} bytes, "
                              f"frame {index} has {len(buffer)}")
        self.next = index + 1
        np = _numpy()
        # No bytes (a 0 in the shape, or a dtype of itemsize 0): nothing to
        # allocate, whatever the element count.
        array = np.ndarray(shape, dtype, buffer=buffer if nbytes else bytearray())
        if _fragile(dtype) and _unreadable(array):
            raise DecodeError(f"array of {dtype.str} holds bytes that are no value of it")
        return array


def _ext_without_frames(code: int, data: bytes) -> Any:
    if code == EXT_SCALAR:
        try:
            return _scalar(data)
        except DecodeError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise DecodeError(f"not a zpipe data message: a bad numpy scalar: {_why(exc)}") \
                from None
    if code == EXT_ARRAY:
        raise DecodeError("array refers to a frame, in a message of 1 frame")
    raise DecodeError(f"not a zpipe data message: extension type {code}")


def _scalar(data: bytes) -> Any:
    value = msgpack.unpackb(data)
    if type(value) is not list or len(value) != 2 or type(value[1]) is not bytes:
        raise DecodeError(f"a numpy scalar {_brief(value)} is not [dtype, bytes]")
    wire, raw = value
    dtype = _dtype_from_wire(wire)
    if dtype.subdtype is not None or dtype.hasobject or len(raw) != dtype.itemsize:
        raise DecodeError(f"a numpy scalar of {dtype} in {len(raw)} bytes")
    np = _numpy()
    array = np.frombuffer(raw, dtype=dtype) if raw else np.zeros(1, dtype=dtype)
    if _fragile(dtype) and _unreadable(array):
        raise DecodeError(f"a numpy scalar of {dtype.str} of bytes that are no value of it")
    return array[0]


def _lists(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return value
