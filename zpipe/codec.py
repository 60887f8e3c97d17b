"""Items on the wire: a msgpack header plus one raw frame per numpy array.

A data message is a ZeroMQ multipart message::

    frame 0   msgpack [PROTOCOL_VERSION, [item, item, ...]]
              or      [PROTOCOL_VERSION, [item, ...], [tag, ...]] on links into and
                      out of an ``ordered`` stage, one tag ``[seq, flags]`` per item
    frame 1.. the bytes of each numpy array, in the order the header refers to them

Inside the header an array is msgpack extension type 1 holding
``[frame_index, dtype, shape]``; a numpy scalar is extension type 2 holding
``[dtype, bytes]``. Arrays thus never pass through msgpack; the receiver maps
each frame into an array without copying it (the array is writable: it owns the
received buffer). Tuples arrive as lists, as msgpack has no tuple.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import msgpack

from .errors import EncodeError

PROTOCOL_VERSION = 2  # docs/protocol.md, Versioning
EXT_ARRAY = 1
EXT_SCALAR = 2
TAG_LAST = 1    # the last output for this input sequence number
TAG_MARKER = 2  # no item: the input produced no output (keeps the sequence whole)

SUPPORTED = ("None, bool, int, float, str, bytes, list, tuple, dict and numpy arrays "
             "(any dtype but object)")


class DecodeError(ValueError):
    """A data message that is not zpipe's wire format (or another version of it)."""


class VersionMismatch(DecodeError):
    """A data message from a peer speaking another protocol version."""


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


def _dtype_from_wire(wire: Any) -> Any:
    np = _numpy()
    if isinstance(wire, str):
        return np.dtype(wire)
    if "base" in wire:
        return np.dtype((_dtype_from_wire(wire["base"]), tuple(wire["shape"])))
    return np.dtype({"names": wire["names"],
                     "formats": [_dtype_from_wire(f) for f in wire["formats"]],
                     "offsets": wire["offsets"], "itemsize": wire["itemsize"]},
                    align=bool(wire.get("aligned")))


class Batch:
    """One data message under construction: items are packed one by one as they come.

    Packing each item when it is added makes an unsendable item fail in the
    stage that produced it, at that item, and freezes the item as it was
    (a source may reuse and mutate one object); the message is then
    assembled in ``frames()`` with one join. ``add`` is on every stage's hot
    path, so it does no more than pack, append and count.
    """

    def __init__(self) -> None:
        self.packer = msgpack.Packer(default=self._default, use_bin_type=True)
        self._pack = self.packer.pack
        self.encoded: list[bytes] = []
        self.tags: list[Any] | None = None
        self.arrays: list[Any] = []   # frames 1.. of the message
        self.fresh: list[Any] = []    # arrays of the item being packed, until it succeeds
        self.header_bytes = 0         # the items' encodings, without their arrays

    def __len__(self) -> int:
        return len(self.encoded)

    def _default(self, obj: Any) -> Any:
        module = type(obj).__module__
        if module == "numpy":
            np = _numpy()
            if isinstance(obj, np.ndarray):
                dtype = _dtype_to_wire(obj.dtype)
                # As flat bytes, so that every dtype (datetime, structured, ...)
                # exposes a plain buffer; C order, copying only if not already.
                raw = np.ascontiguousarray(obj).reshape(-1).view(np.uint8) if obj.size else b""
                self.fresh.append(raw)
                return msgpack.ExtType(EXT_ARRAY, msgpack.packb(
                    [len(self.arrays) + len(self.fresh), dtype, list(obj.shape)],
                    use_bin_type=True))
            if isinstance(obj, np.generic):
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
        except (TypeError, ValueError, OverflowError) as exc:
            raise self._refused(item, exc) from None
        if self.fresh:
            arrays, self.fresh = self.fresh, []
            return [_PREFIXES[1] + data, *arrays]
        return [_PREFIXES[1] + data]

    def _refused(self, item: Any, exc: Exception) -> EncodeError:
        self.fresh.clear()
        self.packer.reset()
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
        if self.tags is None:
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


# The start of a header, [version, [items...]] or [version, [items...], tags],
# up to the items' array header: fixed bytes, so the common small counts are
# precomputed.
_HEAD_PLAIN = b"\x92" + msgpack.packb(PROTOCOL_VERSION)
_HEAD_TAGGED = b"\x93" + msgpack.packb(PROTOCOL_VERSION)
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
    if len(frames) == 1:
        # A message without arrays (the common, small case) needs no closure over its frames.
        ext_hook = _ext_without_frames
    elif frames:
        ext_hook = _ext_with(frames)
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
            message = _lists(msgpack.unpackb(head, ext_hook=ext_hook, raw=False,
                                             strict_map_key=False, use_list=False))
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(f"not a zpipe data message: {type(exc).__name__}: {exc}") from None
    if type(message) is list and len(message) == 2 and message[0] == PROTOCOL_VERSION and \
            type(message[1]) is list:
        return message[1], None  # the usual message, checked in one go
    if not isinstance(message, list) or len(message) < 2 or not isinstance(message[1], list):
        raise DecodeError("not a zpipe data message: header is not [version, items]")
    if message[0] != PROTOCOL_VERSION:
        raise VersionMismatch(f"protocol version {message[0]!r} received, this zpipe speaks "
                              f"{PROTOCOL_VERSION}: run the same zpipe version in every stage")
    tags = message[2] if len(message) > 2 else None
    if tags is not None and (not isinstance(tags, list) or len(tags) != len(message[1])):
        raise DecodeError("not a zpipe data message: tags do not match items")
    return message[1], tags


def _ext_with(frames: Sequence[Any]) -> Callable[[int, bytes], Any]:
    def ext_hook(code: int, data: bytes) -> Any:
        if code == EXT_ARRAY:
            index, dtype, shape = msgpack.unpackb(data, use_list=True)
            if not 0 < index < len(frames):
                raise DecodeError(f"array refers to frame {index} of {len(frames)}")
            frame = frames[index]
            buffer = frame.buffer if hasattr(frame, "buffer") else frame
            dtype = _dtype_from_wire(dtype)
            if len(buffer) == 0:  # zero-size array, or a dtype of itemsize 0
                return _numpy().zeros(shape, dtype=dtype)
            return _numpy().frombuffer(buffer, dtype=dtype).reshape(shape)
        return _ext_without_frames(code, data)
    return ext_hook


def _ext_without_frames(code: int, data: bytes) -> Any:
    if code == EXT_SCALAR:
        dtype, raw = msgpack.unpackb(data, use_list=True)
        return _numpy().frombuffer(raw, dtype=_dtype_from_wire(dtype))[0]
    if code == EXT_ARRAY:
        index = msgpack.unpackb(data, use_list=True)[0]
        raise DecodeError(f"array refers to frame {index} of 1")
    return msgpack.ExtType(code, data)



def _lists(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return value
