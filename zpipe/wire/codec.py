"""Items on the wire: a msgpack header plus one raw frame per large array or bytes item
(or, over ipc links that are not leased, a shared-memory segment's name: shm.py).

A data message is a ZeroMQ multipart message::

    frame 0   msgpack [PROTOCOL_VERSION, [item, item, ...]]
              or      [PROTOCOL_VERSION, [item, ...], [tag, ...]] on links into and
                      out of an ``ordered`` stage, one tag ``[seq, flags]`` per item
    frame 1.. the bytes of each large numpy array and of each large ``bytes`` item,
              in the order the header refers to them

Inside the header a numpy array of FRAME_MIN bytes or more is msgpack
extension type 1 holding ``[frame_index, dtype, shape]``; a smaller one is
extension type 4 holding ``[dtype, shape, bytes]`` (inline: it shares the
header, and so a message, with other items); a numpy scalar is extension
type 2 holding ``[dtype, bytes]``. Large arrays thus never pass through
msgpack. An item is frozen as it is sent, so the stage may change its array
afterwards: an inline array is copied into the header; on inproc links the
Batch copies a large array's bytes once, as it is added, and sends that
private copy; on ipc and tcp links it sends the array's own bytes and the
Outbox waits until ZeroMQ has let go of them. The receiver maps each frame
into an array without copying it, and copies an inline array out of the
header (either way the array is writable: it owns its memory; the small
arrays of a message whose items are all arrays of one dtype and shape are
copied out at once, each into its own part of one block: _inline_run). Tuples
arrive as lists, as msgpack has no tuple.

An item that is itself ``bytes`` of FRAME_MIN or more travels as its own
frame, extension type 3 ``[frame_index]`` in the header: the bytes object is
sent without a copy and without waiting for ZeroMQ (bytes never change), and
arrives as ``bytes`` (one copy, out of the received frame).

Over an ipc link that is not leased (the Batch then has ``segments``), an
array or top-level ``bytes`` item of shm.SHM_MIN bytes or more is copied into
a shared-memory segment as it is added (which freezes it) and the header
names the segment: extension type 5 ``[segment, dtype, shape]`` for an array,
6 ``[segment, size]`` for bytes. The receiver's array is a view of the
segment (writable, its own until it lets go of it); bytes are copied out.

Anyone who can reach a socket can send it bytes: ``decode_tagged`` raises
DecodeError, and only DecodeError, for anything that is not such a message,
and checks every size against the bytes received (or the segment's size)
before it makes an array.
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
from zmq import COPY_THRESHOLD

from ..errors import EncodeError
from . import shm

PROTOCOL_VERSION = 7  # docs/protocol.md, Versioning
EXT_ARRAY = 1    # [frame_index, dtype, shape]: an array in its own frame
EXT_SCALAR = 2   # [dtype, bytes]: a numpy scalar
EXT_BYTES = 3    # [frame_index]: a top-level bytes item in its own frame
EXT_INLINE = 4   # [dtype, shape, bytes]: a small array inside the header
EXT_SHM_ARRAY = 5  # [segment, dtype, shape]: an array in a shared-memory segment (shm.py)
EXT_SHM_BYTES = 6  # [segment, size]: a top-level bytes item in a segment
# Arrays of this many bytes or more, and top-level bytes items as large, travel
# as their own frames; smaller arrays travel inline, in the header. 64 KiB,
# pyzmq's COPY_THRESHOLD: pyzmq copies a smaller frame anyway (a frame of its
# own then buys nothing and costs a multipart send and a flush), and from it
# on a frame is sent without a copy. It is also the Outbox's BATCH_BYTES, so
# an item this large would have left in a message of its own anyway. The
# receiver takes either form at any size: this is only what a sender chooses.
FRAME_MIN = COPY_THRESHOLD
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
    # start faster (hot paths read _np, set here, first).
    global _np, _ndarray
    import numpy
    _np, _ndarray = numpy, numpy.ndarray
    return numpy


class _NoType:
    pass


_np: Any = None
_ndarray: Any = _NoType  # numpy.ndarray once numpy is imported


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


def _sent_dtype(dtype: Any) -> tuple[Any, bool]:
    """_dtype_to_wire(dtype), and whether its arrays need the _unreadable check;
    kept for a few plain dtypes (no plain dtype equals a structured one)."""
    known = _SENT_DTYPES.get(dtype)
    if known is None:
        known = (_dtype_to_wire(dtype), dtype.kind in "UMV" and _fragile(dtype))
        if type(known[0]) is str:
            if len(_SENT_DTYPES) >= 256:
                _SENT_DTYPES.clear()
            _SENT_DTYPES[dtype] = known
    return known


_SENT_DTYPES: dict[Any, tuple[Any, bool]] = {}
# (dtype, shape) -> the packed [dtype, shape, bytes] of such an inline array up to
# its bytes (their bin header included), and its size: plain dtypes whose every
# byte pattern is a value (no _unreadable check), so that a small array of a
# shape sent before is only its tobytes() behind that prefix.
_INLINE_SENT: dict[tuple[Any, tuple[int, ...]], tuple[bytes, int]] = {}


def _ext(code: int, data: bytes) -> msgpack.ExtType:
    """msgpack.ExtType(code, data) without its checks, which cost a good part of a
    small array's encoding: code is one of ours, data bytes."""
    return _tuple_new(msgpack.ExtType, (code, data))


_tuple_new = tuple.__new__

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
    (a source may reuse and mutate one object; a small array's bytes are
    copied into the header, a large one's here with ``copy_arrays``, else the
    sender waits for ZeroMQ to let go of them); the message is then assembled in
    ``frames()`` with one join. ``add`` is on every stage's hot path, so it
    does no more than pack, append and count.
    """

    def __init__(self, max_size: int | None = None, copy_arrays: bool = True,
                 segments: shm.Segments | None = None) -> None:
        self.packer = msgpack.Packer(default=self._default, use_bin_type=True)
        self._pack = self.packer.pack
        # The contents of extension types (called inside self.packer's own pack).
        self._inner = msgpack.Packer(use_bin_type=True).pack
        self.encoded: list[bytes] = []
        self.tags: list[Any] | None = None
        # Frames 1.. of the message: large arrays (as uint8 arrays, the Outbox
        # waits for ZeroMQ to let go of them over ipc and tcp) and large bytes
        # items (the bytes objects themselves: never waited for, as they never change).
        self.arrays: list[Any] = []
        self.fresh: list[Any] = []    # frames of the item being packed, until it succeeds
        self.header_bytes = 0         # the items' encodings (inline arrays in), without frames
        self._measured = (0, 0)       # measure(): (items, their bytes) counted so far
        # Bytes per frame the receiver takes: a larger array fails before it is copied.
        self.max_size = max_size
        # False where the sender instead waits until ZeroMQ has let go of each
        # array it sent without a copy (ipc and tcp links, see outbox.py): the
        # array is then frozen without a copy, and the receiver's is its own.
        self.copy_arrays = copy_arrays
        self.copies = _Copies()
        # Over ipc links that are not leased: items of shm.SHM_MIN bytes or more are
        # copied into shared-memory segments, and the header names them (shm.py).
        self.segments = segments
        self.shared: list[str] = []        # segments of the items added, until sent
        self.fresh_shared: list[str] = []  # ... of the item being packed
        # When its source sent what this message carries on (unix time), on a
        # sampled few messages: the sink times them end to end (observe.py).
        self.origin: float | None = None
        # Called as an item makes a frame or takes a segment (replica/runs.py ends
        # its run there).
        self.on_frame: Callable[[], None] | None = None
        # Set by a map stage's runs (replica/runs.py), which pack its None outputs
        # too, as NOTHING: squeeze() leaves those out of the message.
        self.holds_nothing = False
        # The dtype, shape and _INLINE_SENT prefix of the last inline array packed.
        self._last_dtype: Any = None
        self._last_shape: Any = None
        self._last_prefix = b""

    def __len__(self) -> int:
        return len(self.encoded)

    def _default(self, obj: Any) -> Any:
        if type(obj) is _ndarray:  # the usual small array, of a dtype and shape seen before
            # ... usually the very dtype and shape of the last one: compared by
            # identity, where the lookup hashes a dtype (135 of 730 ns an array;
            # _ext is inlined here too, a call less per array).
            if obj.dtype is self._last_dtype and obj.shape == self._last_shape and \
                    self.max_size is None:
                return _tuple_new(msgpack.ExtType,
                                  (EXT_INLINE, self._last_prefix + obj.tobytes()))
            known = _INLINE_SENT.get((obj.dtype, obj.shape))
            if known is not None and (self.max_size is None or known[1] <= self.max_size):
                self._last_dtype, self._last_shape, self._last_prefix = \
                    obj.dtype, obj.shape, known[0]
                return _ext(EXT_INLINE, known[0] + obj.tobytes())
        module = type(obj).__module__
        if module == "numpy":
            np = _np or _numpy()
            if isinstance(obj, np.ndarray):
                wire, fragile = _sent_dtype(obj.dtype)
                nbytes = obj.nbytes  # what it takes on the wire (a broadcast array's too)
                if self.max_size is not None and nbytes > self.max_size:
                    raise FrameTooLarge(nbytes, self.max_size)
                if fragile and _unreadable(obj):
                    raise TypeError(f"a numpy array of {obj.dtype} with bytes that are no "
                                    f"value of it")
                if nbytes < FRAME_MIN:
                    # Inline, inside the header: tobytes() copies it as flat
                    # C-ordered bytes (whatever its strides; a broadcast array's
                    # every element; ndarray's own, whatever a subclass makes of
                    # it), which freezes it. The item then needs no frame of its
                    # own and shares a message with others.
                    raw = np.ndarray.tobytes(obj)
                    if type(wire) is str and not fragile:
                        return _ext(EXT_INLINE, self._inline_prefix(obj, wire, nbytes) + raw)
                    return _ext(EXT_INLINE, self._inner([wire, list(obj.shape), raw]))
                if nbytes >= shm.SHM_MIN and self.segments is not None:
                    name = self.segments.put_array(obj)
                    if name is not None:  # else no room: a frame, as below
                        self.fresh_shared.append(name)
                        if self.on_frame is not None:
                            self.on_frame()
                        return _ext(EXT_SHM_ARRAY, self._inner([name, wire, list(obj.shape)]))
                # As flat C-ordered bytes, so that every dtype (datetime,
                # structured, ...) exposes a plain buffer. Over inproc, private
                # too: ZeroMQ would hand that very memory to the receiver.
                # Copied once: ascontiguousarray copies a non-contiguous array;
                # a contiguous one is copied here, into a buffer of the Batch's
                # own (_Copies). Elsewhere the Outbox waits for ZeroMQ instead.
                if obj.flags.c_contiguous and self.copy_arrays:
                    raw = self.copies.take(nbytes)
                    np.copyto(raw, obj.view(np.ndarray).reshape(-1).view(np.uint8))
                else:
                    raw = np.ascontiguousarray(obj).reshape(-1).view(np.uint8)
                self.fresh.append(raw)
                if self.on_frame is not None:
                    self.on_frame()
                return _ext(EXT_ARRAY, self._inner(
                    [len(self.arrays) + len(self.fresh), wire, list(obj.shape)]))
            if isinstance(obj, np.generic):
                if obj.dtype.kind in "UMV" and _fragile(obj.dtype) and \
                        _unreadable(np.asarray(obj)):
                    raise TypeError(f"a numpy scalar of {obj.dtype} with bytes that are no "
                                    f"value of it")
                return _ext(EXT_SCALAR, self._inner([_dtype_to_wire(obj.dtype), obj.tobytes()]))
        if isinstance(obj, int):
            raise TypeError(f"the integer {obj}, outside the 64-bit range msgpack carries")
        raise TypeError(f"values of type {type(obj).__module__}.{type(obj).__qualname__}"
                        if module != "builtins" else f"values of type {type(obj).__qualname__}")

    def _inline_prefix(self, obj: Any, wire: str, nbytes: int) -> bytes:
        """The start of an inline array's [wire, shape, bytes], kept in _INLINE_SENT
        (a plain dtype and a shape make the size, and so the bin header)."""
        packed = self._inner([wire, list(obj.shape), bytes(nbytes)])
        prefix = packed[:len(packed) - nbytes]
        if len(_INLINE_SENT) >= 1024:  # a stage of ever new shapes
            _INLINE_SENT.clear()
        _INLINE_SENT[obj.dtype, obj.shape] = (prefix, nbytes)
        return prefix

    def add(self, item: Any, tag: Any = None) -> None:
        """Pack one item (with its tag on numbered links); raises EncodeError naming the type."""
        try:
            data = self._pack(item) if type(item) is not bytes or len(item) < FRAME_MIN else \
                self._framed(item)
        except FrameTooLarge:
            self._forget()
            raise
        except (TypeError, ValueError, OverflowError) as exc:
            raise self._refused(item, exc) from None
        self.encoded.append(data)
        self.header_bytes += len(data)
        self.take_fresh()
        if tag is not None or self.tags is not None:
            if self.tags is None:
                self.tags = [None] * (len(self.encoded) - 1)
            self.tags.append(tag)

    # -- for a caller that packs and appends itself (the Outbox's fast path) --------

    def pack(self, item: Any) -> bytes:
        """The encoding add() would append for ``item`` (untagged), not added: the
        frames it makes (large arrays and bytes items) wait in ``fresh`` until
        add_packed() takes them, or forget() drops them. Raises what packing raises
        (not EncodeError: add() names the type)."""
        return self._pack(item) if type(item) is not bytes or len(item) < FRAME_MIN else \
            self._framed(item)

    def take_fresh(self) -> None:
        """The item just packed is in ``encoded``: its frames and segments are the message's."""
        if self.fresh:
            self.arrays += self.fresh
            self.fresh.clear()
        if self.fresh_shared:
            self.shared += self.fresh_shared
            self.fresh_shared.clear()

    def add_packed(self, data: bytes) -> None:
        """Add what pack() returned, with the frames it left in ``fresh``."""
        self.encoded.append(data)
        self.header_bytes += len(data)
        self.take_fresh()
        if self.tags is not None:
            self.tags.append(None)

    def forget(self) -> None:
        """Drop what a failed pack() left behind."""
        self._forget()

    def measure(self) -> int:
        """The bytes of the items' encodings, those appended to ``encoded`` directly
        included (header_bytes counts only what add() and add_packed() added);
        counted from where the last call left off, and kept in header_bytes."""
        encoded = self.encoded
        count, size = self._measured
        end = len(encoded)
        if count > end:  # items were taken out since (pop, drop): count again
            count = size = 0
        if count < end:
            size += sum(map(len, encoded[count:end]))
            self._measured = (end, size)
        self.header_bytes = size
        return size

    def squeeze(self, count: int | None = None) -> int:
        """Leave NOTHING out of the first ``count`` items (all by default), in place; the
        number of items left there. One look per message (about 9 ns an item) where
        a filter of each output in a run cost 45."""
        encoded = self.encoded
        end = len(encoded) if count is None else count
        if not self.holds_nothing:
            return end
        try:
            encoded.index(NOTHING, 0, end)
        except ValueError:
            return end
        kept = [data for data in encoded[:end] if data != NOTHING]
        encoded[:end] = kept  # in place: a run may be appending to this very list
        self._measured = (0, 0)
        return len(kept)

    def outputs(self) -> int:
        """The items waiting, NOTHING not counted (nothing changed: any thread)."""
        return len(self.encoded) - (self.encoded.count(NOTHING) if self.holds_nothing else 0)

    def counted(self, items: int, size: int) -> None:
        """The last ``items`` encodings, appended to ``encoded`` directly, take ``size``
        bytes: measure() counts them only if they are not exactly what came after
        what it counted already."""
        count, measured = self._measured
        if count + items == len(self.encoded):
            self._measured = (count + items, measured + size)

    def drop(self, count: int) -> None:
        """Forget the first ``count`` items, once frames(count) has been sent; those
        appended since stay. In place: ``encoded`` stays the list it was."""
        dropped = sum(map(len, self.encoded[:count]))
        del self.encoded[:count]
        if self.tags is not None:
            del self.tags[:count]
        self.arrays = []  # the Outbox sends any item with frames at once, alone
        self.shared = []  # ... and any item in a segment
        self.header_bytes = max(0, self.header_bytes - dropped)
        self._measured = (0, 0)
        self.origin = None  # it went with those

    def _framed(self, item: bytes) -> bytes:
        """A large top-level bytes item: its own frame, the bytes object itself (sent
        without a copy; it never changes, so nobody waits for ZeroMQ to let go of it),
        or from shm.SHM_MIN bytes over a link with segments, a copy in a segment.

        Only top-level items: msgpack packs bytes inside lists and dicts itself,
        without a hook to take them out, so those stay in the header.
        """
        if self.segments is not None and len(item) >= shm.SHM_MIN:
            name = self.segments.put_bytes(item)
            if name is not None:
                self.fresh_shared.append(name)
                return self._pack(_ext(EXT_SHM_BYTES, self._inner([name, len(item)])))
        self.fresh.append(item)
        return self._pack(_ext(EXT_BYTES, self._inner([len(self.arrays) + len(self.fresh)])))

    def _forget(self) -> None:
        """Drop what a failed pack left behind (its segments are free again)."""
        self.fresh.clear()
        if self.fresh_shared:
            assert self.segments is not None
            for name in self.fresh_shared:
                self.segments.give_back(name)
            self.fresh_shared.clear()
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
        self._measured = (0, 0)
        return data, tag, arrays

    def push(self, data: bytes, tag: Any, arrays: list[Any]) -> None:
        """Put back what pop() took (into an empty batch, so array indices still hold)."""
        assert not self.encoded
        self.encoded, self.arrays = [data], list(arrays)
        self.tags = None if tag is None else [tag]
        self.header_bytes = len(data)

    def frames(self, count: int | None = None) -> list[Any]:
        """The message's frames (the batch keeps its items until ``clear()``): of
        all its items, or of the first ``count`` (then see drop(); only while no
        item has frames, which the Outbox never leaves waiting)."""
        if count is None:
            encoded, tags = self.encoded, self.tags
            count = len(encoded)
        else:
            encoded = self.encoded[:count]
            tags = None if self.tags is None else self.tags[:count]
        if self.origin is not None:
            header = b"".join([_HEAD_STAMPED, self.packer.pack_array_header(count),
                               *encoded, self._pack(tags), self._pack(self.origin)])
        elif tags is None:
            prefix = _PREFIXES[count] if count < len(_PREFIXES) else \
                _HEAD_PLAIN + self.packer.pack_array_header(count)
            header = b"".join([prefix, *encoded])  # one copy of the items, not two
        else:
            header = b"".join([_HEAD_TAGGED, self.packer.pack_array_header(count),
                               *encoded, self._pack(tags)])
        return [header, *self.arrays] if self.arrays else [header]

    def clear(self) -> None:
        """Empty the batch, once its frames have been sent."""
        self.encoded, self.tags, self.arrays, self.shared = [], None, [], []
        self.header_bytes = 0
        self._measured = (0, 0)
        self.origin = None


# The start of a header, [version, [items...]] or [version, [items...], tags],
# up to the items' array header: fixed bytes, so the common small counts are
# precomputed.
_HEAD_PLAIN = b"\x92" + msgpack.packb(PROTOCOL_VERSION)
_HEAD_TAGGED = b"\x93" + msgpack.packb(PROTOCOL_VERSION)
_HEAD_STAMPED = b"\x94" + msgpack.packb(PROTOCOL_VERSION)  # [version, items, tags|nil, origin]
_PREFIXES = [_HEAD_PLAIN + header
             for header in map(msgpack.Packer().pack_array_header, range(1025))]

# A map stage's None output as a run packs it (replica/runs.py): no item, left
# out of the message (Batch.squeeze).
NOTHING = msgpack.packb(None)

# A message of one untagged item is HEAD_ONE + the item's packed bytes (what
# frames() makes of a batch of one): the Outbox sends an output after a pause so.
HEAD_ONE = _PREFIXES[1]


def encode(items: Sequence[Any], tags: Sequence[Any] | None = None) -> list[Any]:
    """Frames of one data message carrying ``items``; raises EncodeError naming the type."""
    batch = Batch()
    for index, item in enumerate(items):
        batch.add(item, None if tags is None else tags[index])
    return batch.frames()


def decode(frames: Sequence[Any], segments: shm.Attached | None = None) -> list[Any]:
    """Items of one data message; frames may be bytes or zmq.Frame objects."""
    return decode_tagged(frames, segments)[0]


def decode_tagged(frames: Sequence[Any], segments: shm.Attached | None = None
                  ) -> tuple[list[Any], list[Any] | None]:
    """Items of one data message and their tags (None on untagged links)."""
    return decode_stamped(frames, segments)[:2]


def decode_stamped(frames: Sequence[Any], segments: shm.Attached | None = None
                   ) -> tuple[list[Any], list[Any] | None, float | None]:
    """Items of one data message, their tags (None on untagged links), and its
    origin stamp (None but on a sampled few: see Batch.origin). ``segments``: the
    receiver's shared-memory side, on an ipc input that takes segments (shm.py);
    without it a segment in a message makes it malformed.

    Raises DecodeError, and nothing else, for what is not a data message:
    every ext type, array and tag is checked where it appears.
    """
    count = len(frames)
    message = None
    if count == 1:
        head = frames[0]
        # A message without arrays (the common, small case) needs no state, nor
        # does one on an input that takes segments until it names one (then
        # decoded again, with _InSegments): making that state cost a lone item
        # about 2 µs on its way to the stage.
        ext_hook: Any = _ext_without_frames if segments is None else _ext_or_segments
        if len(head) < _RUN_MIN_BYTES:
            # A few items, as at a low rate, where this is on every item's way to
            # its stage on a cache gone cold in the pause: the usual message in a
            # few steps, its header read where it lies (msgpack takes a
            # zmq.Frame's buffer). Copied into bytes first and its start checked
            # as a slice, as before, it cost a lone item about 5 µs more over the
            # bench's two receiving hops (the two ways in turns within each run,
            # blocks of 50 items: median of 20 runs, 13 of them higher). Another
            # message (tagged, stamped) is checked below as it came out.
            try:
                message = _unpackb(head, raw=False, strict_map_key=False, ext_hook=ext_hook)
            except Exception:  # noqa: BLE001 - decoded again below, which says why
                pass
            else:
                if type(message) is list and len(message) == 2 and \
                        type(message[1]) is list and type(message[0]) is int and \
                        message[0] == PROTOCOL_VERSION:
                    return message[1], None, None
        else:
            head = _contents(head)  # _inline_run slices it
            items = _inline_run(head)
            if items is not None:
                return items, None, None
    elif count:
        head = frames[0]
        ext_hook = _Arrays(frames, segments)
    else:
        raise DecodeError("empty message")
    try:
        if message is None:
            try:
                message = _unpacked(head, ext_hook)
            except _Segmented:
                ext_hook = _InSegments(segments)
                message = _unpacked(head, ext_hook)
        if type(message) is list and len(message) == 2 and type(message[1]) is list and \
                type(message[0]) is int and message[0] == PROTOCOL_VERSION and \
                (count == 1 or ext_hook.next == count):
            return message[1], None, None  # the usual message, checked in one go
        return _unusual(message, ext_hook, count)
    except DecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a stranger's bytes make fail
        raise DecodeError(f"not a zpipe data message: {_why(exc)}") from None


# A message's header is unpacked with its keywords given at the call, which
# reach unpackb as they are (a vectorcall): bound in a functools.partial, they
# become a dict to copy and parse, on every message's way, cold at a low rate.
# 1,500 calls each, caches evicted before each: level with a bare unpackb(head)
# so, a partial 0.5 µs slower with 2 MB evicted, 2.1 µs with 16 MB.
_unpackb = msgpack.unpackb


def _contents(frame: Any) -> bytes:
    """A frame's bytes: a zmq.Frame's copied out, bytes as they are."""
    try:
        return frame.bytes
    except AttributeError:
        return frame


def _unpacked(head: Any, ext_hook: Any) -> Any:
    try:
        return _unpackb(head, raw=False, strict_map_key=False, ext_hook=ext_hook)
    except TypeError:
        # A tuple used as a dict key arrives as an unhashable list: decode
        # again with tuples, then turn them into lists everywhere but keys
        # (the same arrays and segments again: see again()).
        again = getattr(ext_hook, "again", None)  # the hooks with state
        if again is not None:
            again()
        return _lists(msgpack.unpackb(head, ext_hook=ext_hook, raw=False,
                                      strict_map_key=False, use_list=False))


def _unusual(message: Any, ext_hook: Any,
             count: int) -> tuple[list[Any], list[Any] | None, float | None]:
    """The checks of every message but the usual one: another version, a tagged
    or stamped message, frames that no array or bytes item took, or not a data
    message at all."""
    if type(message) is not list or not 2 <= len(message) <= 4 or type(message[1]) is not list:
        raise DecodeError("not a zpipe data message: header is not [version, items], "
                          "[version, items, tags] or [version, items, tags, origin]")
    if type(message[0]) is not int or message[0] != PROTOCOL_VERSION:
        raise VersionMismatch(f"protocol version {_brief(message[0])} received, this zpipe "
                              f"speaks {PROTOCOL_VERSION}: run the same zpipe version in every "
                              f"stage")
    if count > 1 and ext_hook.next != count:
        raise DecodeError(f"not a zpipe data message: {count - 1} frames after the header, "
                          f"{ext_hook.next - 1} arrays and bytes items in frames")
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


class _InSegments:
    """The ext hook of a message on an input that takes segments: arrays and bytes
    items in shared memory (shm.py); the rest as _ext_without_frames."""

    __slots__ = ("segments", "made", "replay")

    def __init__(self, segments: shm.Attached):
        self.segments = segments
        self.made: list[Any] = []  # what segments became, in the order met
        self.replay = -1           # decoding again: the next of made to give

    def again(self) -> None:
        """The message is decoded a second time: the segments it named are held
        already, so each one met gives what it gave the first time (and one the
        first decoding stopped before, at a tuple key, is taken now)."""
        self.replay = 0

    def __call__(self, code: int, data: bytes) -> Any:
        if code == EXT_SHM_ARRAY:
            what, make = "array in shared memory", self._array
        elif code == EXT_SHM_BYTES:
            what, make = "bytes item in shared memory", self._bytes
        else:
            return _ext_without_frames(code, data)
        if 0 <= self.replay < len(self.made):
            self.replay += 1
            return self.made[self.replay - 1]
        value = _made(what, make, data)
        self.made.append(value)
        if self.replay >= 0:
            self.replay += 1
        return value

    def _array(self, data: bytes) -> Any:
        header = msgpack.unpackb(data)
        if type(header) is not list or len(header) != 3:
            raise DecodeError(f"an array's header {_brief(header)} is not "
                              f"[segment, dtype, shape]")
        name, wire, shape = header
        dtype, fragile = _array_dtype(wire)
        # Before anything is opened: the size the segment must have.
        nbytes = _count(shape) * dtype.itemsize
        array = self.segments.array(name, dtype, shape, nbytes)
        if fragile and _unreadable(array):
            raise DecodeError(f"array of {dtype.str} holds bytes that are no value of it")
        return array

    def _bytes(self, data: bytes) -> bytes:
        header = msgpack.unpackb(data)
        if type(header) is not list or len(header) != 2 or type(header[1]) is not int:
            raise DecodeError(f"a bytes item's header {_brief(header)} is not [segment, size]")
        return self.segments.bytes(header[0], header[1])


class _Arrays:
    """The ext hook of a message with more than one frame: the k-th array or bytes
    item that refers to a frame takes frame k."""

    __slots__ = ("frames", "next", "shared")

    def __init__(self, frames: Sequence[Any], segments: shm.Attached | None = None):
        self.frames = frames
        self.next = 1  # the frame the next array or bytes item must refer to
        self.shared = _ext_without_frames if segments is None else _InSegments(segments)

    def again(self) -> None:
        self.next = 1
        if self.shared is not _ext_without_frames:
            self.shared.again()

    def __call__(self, code: int, data: bytes) -> Any:
        if code == EXT_ARRAY:
            what, make = "array", self._array
        elif code == EXT_BYTES:
            what, make = "bytes item", self._bytes
        else:
            return self.shared(code, data)
        return _made(what, make, data)

    def _frame(self, index: Any, what: str) -> Any:
        """Frame ``index``, which must be the next one, as the k-th referring ext claims."""
        frames = self.frames
        if type(index) is not int or index != self.next or index >= len(frames):
            raise DecodeError(f"{what} refers to frame {_brief(index)} of {len(frames)} "
                              f"(the next is frame {self.next})")
        self.next = index + 1
        return frames[index]

    def _array(self, data: bytes) -> Any:
        header = msgpack.unpackb(data)
        if type(header) is not list or len(header) != 3:
            raise DecodeError(f"an array's header {_brief(header)} is not "
                              f"[frame_index, dtype, shape]")
        index, wire, shape = header
        frame = self._frame(index, "array")
        dtype, fragile = _array_dtype(wire)
        buffer = frame.buffer if hasattr(frame, "buffer") else frame
        # Before anything is made: the claimed size must be the bytes received.
        nbytes = _count(shape) * dtype.itemsize
        if nbytes != len(buffer):
            raise DecodeError(f"array {_brief(shape)} of {dtype.str} needs {nbytes} bytes, "
                              f"frame {index} has {len(buffer)}")
        # No bytes (a 0 in the shape, or a dtype of itemsize 0): nothing to
        # allocate, whatever the element count.
        array = _numpy().ndarray(shape, dtype, buffer=buffer if nbytes else bytearray())
        if fragile and _unreadable(array):
            raise DecodeError(f"array of {dtype.str} holds bytes that are no value of it")
        return array

    def _bytes(self, data: bytes) -> bytes:
        header = msgpack.unpackb(data)
        if type(header) is not list or len(header) != 1:
            raise DecodeError(f"a bytes item's header {_brief(header)} is not [frame_index]")
        frame = self._frame(header[0], "bytes item")
        if type(frame) is bytes:
            return frame
        # A zmq.Frame: one copy, as user code gets bytes (Frame.bytes keeps it, so
        # a second decode of the message, see decode_stamped, makes no other).
        # Anything else with a buffer (a memoryview, a uint8 array): its bytes.
        got = getattr(frame, "bytes", None)
        return got if type(got) is bytes else bytes(memoryview(frame))


def _array_dtype(wire: Any) -> tuple[Any, bool]:
    """The dtype of a received array, and whether it is _fragile: a few plain ones
    are kept, as parsing a dtype string costs more than the rest of a small array."""
    if type(wire) is str:
        known = _ARRAY_DTYPES.get(wire)
        if known is not None:
            return known
    dtype = _dtype_from_wire(wire)
    if dtype.subdtype is not None or dtype.hasobject:
        raise DecodeError(f"not an array's dtype: {dtype}")
    known = (dtype, _fragile(dtype))
    if type(wire) is str:
        if len(_ARRAY_DTYPES) >= 256:  # bounded: what strangers send only slows this down
            _ARRAY_DTYPES.clear()
        _ARRAY_DTYPES[wire] = known
    return known


_ARRAY_DTYPES: dict[str, tuple[Any, bool]] = {}


def _ext_without_frames(code: int, data: bytes) -> Any:
    if code == EXT_INLINE:
        # The start of an inline array received (and checked) before, with as many
        # bytes after it as it said: only those bytes are new.
        known = _INLINE_RECEIVED.get(len(data))
        if known is not None and data.startswith(known[0]):
            prefix, dtype, shape, fragile = known
            try:
                array = _np.frombuffer(bytearray(data[len(prefix):]), dtype)
                if len(shape) != 1:
                    array = array.reshape(shape)
                if not fragile or not _unreadable(array):
                    return array
            except Exception as exc:  # noqa: BLE001
                raise DecodeError(f"not a zpipe data message: a bad inline array: "
                                  f"{_why(exc)}") from None
            raise DecodeError(f"inline array of {dtype.str} holds bytes that are no value of it")
        what, make = "inline array", _inline
    elif code == EXT_SCALAR:
        what, make = "numpy scalar", _scalar
    elif code == EXT_ARRAY:
        raise DecodeError("array refers to a frame, in a message of 1 frame")
    elif code == EXT_BYTES:
        raise DecodeError("bytes item refers to a frame, in a message of 1 frame")
    elif code in (EXT_SHM_ARRAY, EXT_SHM_BYTES):
        raise DecodeError("an item in shared memory, on a link that takes none (tcp, inproc, "
                          "leased, or outside a launched run)")
    else:
        raise DecodeError(f"not a zpipe data message: extension type {code}")
    return _made(what, make, data)


class _Segmented(Exception):
    """A one-frame message names a segment: decode_stamped decodes it again with
    _InSegments (never a DecodeError: that is caught)."""


def _ext_or_segments(code: int, data: bytes) -> Any:
    """The ext hook of a one-frame message on an input that takes segments, until
    it names one."""
    if code == EXT_SHM_ARRAY or code == EXT_SHM_BYTES:
        raise _Segmented
    return _ext_without_frames(code, data)


def _made(what: str, make: Any, data: bytes) -> Any:
    """``make(data)``, whatever it raises for a stranger's bytes (shm.SegmentError
    among it) turned into DecodeError naming ``what``."""
    try:
        return make(data)
    except DecodeError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise DecodeError(f"not a zpipe data message: a bad {what}: {_why(exc)}") from None


def _inline(data: bytes) -> Any:
    """A small array, inside the header: copied out, so that it is writable and its own."""
    value = msgpack.unpackb(data)
    if type(value) is not list or len(value) != 3 or type(value[2]) is not bytes:
        raise DecodeError(f"an inline array {_outline(value)} is not [dtype, shape, bytes]")
    wire, shape, raw = value
    known = _ARRAY_DTYPES.get(wire) if type(wire) is str else None
    dtype, fragile = known if known is not None else _array_dtype(wire)
    # Before anything is made: the claimed size must be the bytes received.
    if type(shape) is list and len(shape) == 1 and type(shape[0]) is int and \
            0 <= shape[0] < _INTP:
        nbytes = shape[0] * dtype.itemsize  # the usual shape, checked at once
    else:
        nbytes = _count(shape) * dtype.itemsize
    if nbytes != len(raw):
        raise DecodeError(f"inline array {_brief(shape)} of {dtype.str} needs {nbytes} bytes, "
                          f"it has {len(raw)}")
    # Its own writable memory (no other item's: each has its bytearray); none
    # for an array of 0 bytes, whatever its element count.
    np = _np or _numpy()
    if nbytes:
        array = np.frombuffer(bytearray(raw), dtype)  # faster than ndarray(shape, ...)
        if len(shape) != 1:
            array = array.reshape(shape)
        if len(_INLINE_RECEIVED) >= 256:  # bounded: what strangers send only slows this down
            _INLINE_RECEIVED.clear()
        # [wire, shape, bytes]: the bytes end the data (unpackb took all of it).
        _INLINE_RECEIVED[len(data)] = (data[:len(data) - nbytes], dtype, shape, fragile)
    else:
        array = np.ndarray(shape, dtype, buffer=bytearray())
    if fragile and _unreadable(array):
        raise DecodeError(f"inline array of {dtype.str} holds bytes that are no value of it")
    return array


# len(data) -> (its start up to the array's bytes, dtype, shape, fragile) of inline
# arrays received, whose checks passed: one of the same length and start differs
# only in its bytes.
_INLINE_RECEIVED: dict[int, tuple[bytes, Any, list[int], bool]] = {}

# msgpack's ext headers by first byte: (bytes of the size after it, fixed size or None).
_EXT_HEADS = {0xc7: (1, None), 0xc8: (2, None), 0xc9: (4, None),
              0xd4: (0, 1), 0xd5: (0, 2), 0xd6: (0, 4), 0xd7: (0, 8), 0xd8: (0, 16)}
# A message this short is no run worth the look: one or two items, which
# _inline_run would only make later.
_RUN_MIN_BYTES = 256


def _inline_run(head: bytes) -> list[Any] | None:
    """The items of a one-frame message ``[VERSION, [array, array, ...]]`` whose every
    item is an inline array with the same start (dtype, shape, size) as one received
    and checked before, made in one go; None for any other message (decoded as usual).

    The small-arrays case: through the ext hook, each array costs about 0.8 µs
    (a call from msgpack, two copies, np.frombuffer); here the message's arrays
    are checked with one comparison, copied out of the header at once into one
    block of their own, and handed out as views of it (about 0.1 µs each). Each
    array is writable and its part of the block is its own; the block lives as
    long as any of them.
    """
    # [VERSION, items]: a fixarray of 2, the version as a positive fixint, then
    # the items' array header (fixarray, array 16 or array 32).
    if head[0] != 0x92 or head[1] != PROTOCOL_VERSION:
        return None
    kind = head[2]
    if kind == 0xdc:
        count, at = int.from_bytes(head[3:5], "big"), 5
    elif kind == 0xdd:
        count, at = int.from_bytes(head[3:7], "big"), 7
    elif 0x90 <= kind <= 0x9f:
        count, at = kind & 0x0f, 3
    else:
        return None
    ext = _EXT_HEADS.get(head[at])
    if ext is None or count < 2:
        return None
    width, size = ext
    if size is None:
        size = int.from_bytes(head[at + 1:at + 1 + width], "big")
    start = 2 + width  # the ext's first byte, its size, its type
    if head[at + start - 1] != EXT_INLINE or len(head) - at != count * (start + size):
        return None
    known = _INLINE_RECEIVED.get(size)
    if known is None:
        return None
    prefix, dtype, shape, fragile = known
    if fragile or not shape or not head.startswith(prefix, at + start):
        return None  # (a 0-d array would come out of the block as a scalar)
    np = _np
    rows = np.frombuffer(head, np.uint8, count * (start + size), at).reshape(count, -1)
    skip = start + len(prefix)  # every row: the ext header and the array's start...
    if not (rows[:, :skip] == rows[0, :skip]).all():
        return None
    # ... then its bytes, copied (aligned, writable) into the block.
    block = rows[:, skip:].copy().view(dtype)
    return list(block.reshape(count, *shape)) if len(shape) != 1 else list(block)


def _outline(value: Any) -> str:
    """What a received list holds, by type (its bytes may be large): else _brief."""
    if type(value) is list:
        return "[" + ", ".join(type(v).__name__ for v in value[:8]) + \
            (", ..." if len(value) > 8 else "") + "]"
    return _brief(value)


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
