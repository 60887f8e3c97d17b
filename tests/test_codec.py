"""Unit tests of zpipe.wire.codec: items on the wire, a msgpack header plus one frame per
large array and per large bytes item (small arrays inline, in the header)."""

from __future__ import annotations

import json
import math
import random
import tracemalloc
import warnings
from collections.abc import Iterable

import msgpack
import numpy as np
import pytest
import zmq

from zpipe.errors import EncodeError
from zpipe.wire import codec
from zpipe.wire.codec import PROTOCOL_VERSION, DecodeError

# The wire's own numbers (docs/protocol.md), written out rather than read from codec.
EXT_BYTES, EXT_INLINE = 3, 4
FRAME_MIN = 64 * 1024  # arrays and top-level bytes items from this size on travel as frames


def roundtrip(item):
    (out,) = codec.decode(codec.encode([item]))
    return out


def assert_same_array(got, want):
    assert isinstance(got, np.ndarray)
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert got.tobytes() == np.ascontiguousarray(want).tobytes()


@pytest.fixture
def pair():
    """A connected inproc PAIR of sockets, closed afterwards."""
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://codec-test")
    b.connect("inproc://codec-test")
    yield a, b
    a.close(0)
    b.close(0)
    ctx.term()


def over_zmq(pair, items):
    a, b = pair
    a.send_multipart(codec.encode(items))
    frames = b.recv_multipart(copy=False)
    assert all(isinstance(f, zmq.Frame) for f in frames)
    return codec.decode(frames)


# --- plain values --------------------------------------------------------------------------

@pytest.mark.parametrize("item", [
    None, True, False, 0, 1, -1, 2**63 - 1, -2**63, 2**64 - 1, 0.0, -1.5, 1e300,
    math.inf, -math.inf, "", "text", "ünïcødé ✓", b"", b"\x00\xffbytes", [], {},
    [1, "a", None, [2, [3, [4]]]], {"a": {"b": {"c": [1, {"d": b"x"}]}}},
])
def test_plain_roundtrip(item):
    out = roundtrip(item)
    assert out == item
    assert type(out) is type(item)


def test_nan_roundtrip():
    assert math.isnan(roundtrip(math.nan))


def test_several_items_in_one_message():
    items = [1, "two", [3], {"four": 4}]
    assert codec.decode(codec.encode(items)) == items
    assert codec.decode(codec.encode(tuple(items))) == items
    assert codec.decode(codec.encode([])) == []


def test_tuples_arrive_as_lists():
    assert roundtrip((1, (2, 3), [4, (5,)])) == [1, [2, 3], [4, [5]]]
    assert roundtrip({"t": ()}) == {"t": []}


def test_bytes_and_str_stay_distinct():
    out = roundtrip({"s": "abc", "b": b"abc"})
    assert type(out["s"]) is str and type(out["b"]) is bytes


def test_non_string_dict_keys():
    item = {1: "one", -2: "minus two", 3.5: "f", None: "n", b"k": "bytes"}
    out = roundtrip(item)
    assert out == item
    assert 1 in out and -2 in out and b"k" in out


def test_header_frame_and_no_array_frames_for_plain_items():
    frames = codec.encode([{"a": 1}])
    assert len(frames) == 1
    assert msgpack.unpackb(frames[0]) == [PROTOCOL_VERSION, [{"a": 1}]]


# --- numpy arrays --------------------------------------------------------------------------

def sample(dtype, shape=(2, 3)):
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    if dtype.kind == "b":
        flat = np.arange(n) % 2 == 0
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        flat = (np.arange(n) * 37).astype(dtype)
        flat[0], flat[-1] = info.min, info.max
    elif dtype.kind == "f":
        flat = np.arange(n, dtype=dtype) * dtype.type(1.5) - dtype.type(2)
    elif dtype.kind == "c":
        flat = (np.arange(n) + 1j * np.arange(n)[::-1]).astype(dtype)
    elif dtype.kind == "M":
        flat = (np.datetime64("2024-02-29T12:00:00", "s")
                + np.arange(n).astype("m8[s]") * 3601).astype(dtype)
    elif dtype.kind == "m":
        flat = (np.arange(n) - 2).astype(dtype)
    elif dtype.kind == "U":
        flat = np.array([f"ü{i}" * (i % 3) for i in range(n)], dtype=dtype)
    elif dtype.kind == "S":
        flat = np.array([bytes([i, 0, 255])[: i % 4] for i in range(n)], dtype=dtype)
    elif dtype.kind == "V":
        flat = np.frombuffer(bytes(range(n * dtype.itemsize)), dtype=dtype).copy()
    else:  # pragma: no cover
        raise AssertionError(dtype)
    return flat.astype(dtype).reshape(shape)


DTYPES = ["?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16",
          "M8[ns]", "M8[D]", "M8[s]", "m8[ns]", "m8[h]", "U1", "U7", "S1", "S5", "V3", "V16"]
if hasattr(np, "longdouble") and np.dtype(np.longdouble).itemsize > 8:
    DTYPES += ["g", "G"]
BIG_ENDIAN = [">i2", ">i4", ">i8", ">u2", ">u8", ">f2", ">f4", ">f8", ">c8", ">c16",
              ">M8[us]", ">m8[s]", ">U4"]


def large(array):
    """``array`` repeated along a new first axis up to at least FRAME_MIN bytes (its own frame)."""
    rows = FRAME_MIN // max(array.nbytes, 1) + 1
    return np.ascontiguousarray(np.broadcast_to(array, (rows, *array.shape)))


@pytest.mark.parametrize("layout", ["inline", "framed"])
@pytest.mark.parametrize("dtype", DTYPES + BIG_ENDIAN)
def test_array_every_dtype_roundtrip(dtype, layout):
    array = sample(dtype) if layout == "inline" else large(sample(dtype))
    frames = codec.encode([array])
    assert len(frames) == (1 if layout == "inline" else 2)
    (out,) = codec.decode(frames)
    assert_same_array(out, array)
    assert out.dtype.byteorder == array.dtype.byteorder
    if array.dtype.kind not in "fc":
        assert (out == array).all()


def test_big_endian_values_are_right():
    array = np.arange(6, dtype=">i4").reshape(2, 3)
    out = roundtrip(array)
    assert out.dtype == np.dtype(">i4")
    assert out.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_float_values_and_specials():
    array = np.array([0.0, -0.0, 1.25, np.inf, -np.inf, np.nan], dtype="f8")
    out = roundtrip(array)
    np.testing.assert_array_equal(out, array)
    assert np.signbit(out[1])


def test_structured_dtype_with_nested_fields_and_subarrays():
    inner = np.dtype([("x", ">f8"), ("y", "u1", (2, 3))])
    dtype = np.dtype([("id", "<i4"), ("pos", inner), ("tag", "U3"), ("raw", "S2"),
                      ("when", "M8[ms]"), ("blob", "V5"), ("deep", [("a", [("b", "i2")])])])
    array = np.zeros((2, 2), dtype=dtype)
    array["id"] = [[1, 2], [3, 4]]
    array["pos"]["x"] = 1.5
    array["pos"]["y"] = np.arange(6).reshape(2, 3)
    array["tag"] = "abc"
    array["raw"] = b"zz"
    array["when"] = np.datetime64("2020-01-01T00:00:00.123")
    array["deep"]["a"]["b"] = -7
    out = roundtrip(array)
    assert_same_array(out, array)
    assert out.dtype.names == dtype.names
    assert out["pos"]["y"].shape == (2, 2, 2, 3)
    assert (out == array).all()


def test_aligned_structured_dtype_kept():
    dtype = np.dtype([("a", "u1"), ("b", "<i8")], align=True)
    out = roundtrip(np.zeros(3, dtype=dtype))
    assert out.dtype == dtype


def test_structured_dtype_with_out_of_order_offsets():
    dtype = np.dtype({"names": ["a", "b"], "formats": ["u1", "<i4"], "offsets": [4, 0],
                      "itemsize": 8})
    array = np.zeros(2, dtype=dtype)
    array["a"], array["b"] = 5, 9
    out = roundtrip(array)
    assert out.dtype == dtype and out["a"].tolist() == [5, 5]


@pytest.mark.parametrize("shape", [(0,), (0, 3), (2, 0), (0, 0, 0)])
@pytest.mark.parametrize("dtype", ["f8", "i1", "U3", "M8[s]", [("a", "i4"), ("b", "f4")]])
def test_empty_arrays(shape, dtype):
    array = np.zeros(shape, dtype=dtype)
    out = roundtrip(array)
    assert out.shape == shape
    assert out.dtype == np.dtype(dtype)


@pytest.mark.parametrize("value", [np.array(3.5), np.array(-7, dtype=">i8"), np.array("hé"),
                                   np.array(b"ab"), np.array(True),
                                   np.array(np.datetime64("2021-05-06")),
                                   np.zeros((), dtype=[("a", "i2"), ("b", "U2")])])
def test_zero_dimensional_arrays(value):
    out = roundtrip(value)
    assert isinstance(out, np.ndarray)
    assert out.shape == ()
    assert_same_array(out, value)


@pytest.mark.parametrize("width", [10, 20_000], ids=["inline", "mostly-framed"])
def test_non_contiguous_arrays(width):
    base = np.arange(6 * width, dtype="i4").reshape(6, width)
    cases = [base[::2, 1::3], base.T, base[:, 3], base[::-1], np.asfortranarray(base),
             np.asfortranarray(np.arange(24, dtype=">f8").reshape(2, 3, 4)),
             base.astype("U3")[1:4, ::-2], np.broadcast_to(base[0], (3, width)),
             np.broadcast_to(np.float32(1.5), (4, width))]
    for array in cases:
        out = roundtrip(array)
        assert_same_array(out, array)
        np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("size, frames_per_array", [(1, 0), (FRAME_MIN, 1)],
                         ids=["inline", "framed"])
def test_arrays_nested_inside_containers(size, frames_per_array):
    a, b = np.arange(3 * size), np.ones((2, 2 * size), dtype="f4")
    c = np.array(["x", "yz"] * size)
    item = {"a": a, "list": [b, {"deep": (c, 1)}], 7: None}
    frames = codec.encode([item, a])
    assert len(frames) == 1 + 4 * frames_per_array
    out_item, out_a = codec.decode(frames)
    assert_same_array(out_item["a"], a)
    assert_same_array(out_item["list"][0], b)
    assert_same_array(out_item["list"][1]["deep"][0], c)
    assert out_item["list"][1]["deep"][1] == 1
    assert out_item[7] is None
    assert_same_array(out_a, a)


def test_numpy_array_subclass_and_views_of_other_arrays():
    big = np.arange(100, dtype="u2")
    view = big[10:20]
    out = roundtrip(view)
    np.testing.assert_array_equal(out, view)


# --- numpy scalars -------------------------------------------------------------------------

@pytest.mark.parametrize("value", [np.int8(-3), np.int64(-2**63), np.uint64(2**64 - 1),
                                   np.uint8(255), np.float16(1.5), np.float32(2.25),
                                   np.complex64(1 - 2j), np.complex128(3 + 4j), np.bool_(True),
                                   np.datetime64("2020-01-01T10:00"), np.timedelta64(5, "s")])
def test_numpy_scalars_keep_type(value):
    out = roundtrip(value)
    assert type(out) is type(value)
    assert out.dtype == value.dtype
    assert out == value


@pytest.mark.parametrize("value, base", [(np.float64(2.5), float), (np.str_("hé"), str),
                                         (np.bytes_(b"x\x00y"), bytes)])
def test_numpy_scalars_that_are_python_subclasses_keep_value(value, base):
    # msgpack packs these as the Python type they derive from
    out = roundtrip(value)
    assert out == value
    assert isinstance(out, base)


def test_numpy_structured_scalar():
    record = np.array([(1, 2.5)], dtype=[("a", "i4"), ("b", ">f8")])[0]
    out = roundtrip(record)
    assert out.dtype == record.dtype
    assert out["a"] == 1 and out["b"] == 2.5


# --- over a real socket --------------------------------------------------------------------

def test_arrays_from_zmq_frames_are_writable(pair):
    arrays = [np.arange(12, dtype="i8").reshape(3, 4), np.zeros((2, 0)),
              np.array([("a", 1)], dtype=[("s", "U1"), ("n", ">u4")]),
              np.asfortranarray(np.arange(6, dtype="f4").reshape(2, 3))]
    out = over_zmq(pair, [arrays, {"x": arrays[0]}])
    for got, want in zip(out[0], arrays):
        assert_same_array(got, want)
        assert got.flags.writeable
    got = out[1]["x"]
    assert got.flags.writeable
    got[0, 0] = 99  # writing really works
    assert got[0, 0] == 99
    assert arrays[0][0, 0] == 0


def test_plain_items_from_zmq_frames(pair):
    items = [{"a": [1, (2, 3)], 4: b"b"}, None, "s"]
    assert over_zmq(pair, items) == [{"a": [1, [2, 3]], 4: b"b"}, None, "s"]


def test_large_array_over_zmq(pair):
    array = np.random.default_rng(0).standard_normal((256, 512))
    (out,) = over_zmq(pair, [array])
    np.testing.assert_array_equal(out, array)


# --- what cannot be sent -------------------------------------------------------------------

class Custom:
    pass


@pytest.mark.parametrize("item, type_name", [
    ({1, 2}, "set"),
    (frozenset(), "frozenset"),
    ({"deep": [{"x": {1}}]}, "set"),
    (Custom(), "Custom"),
    ([Custom()], "Custom"),
    (np.array([1, "a", None], dtype=object), "object"),
    ({"arr": np.array([{}], dtype=object)}, "object"),
    (np.zeros(2, dtype=[("a", "i4"), ("o", "O")]), "object"),
    (object(), "object"),
    (1 + 2j, "complex"),
    (range(3), "range"),
])
def test_encode_error_names_the_type(item, type_name):
    with pytest.raises(EncodeError) as info:
        codec.encode([item])
    assert type_name in str(info.value)
    assert isinstance(info.value, TypeError)  # EncodeError is also a TypeError


def test_encode_error_for_custom_class_names_module_and_class():
    with pytest.raises(EncodeError, match=r"test_codec\.Custom"):
        codec.encode([{"k": Custom()}])


def test_encode_error_for_int_out_of_range():
    with pytest.raises(EncodeError, match="int"):
        codec.encode([2**64])
    with pytest.raises(EncodeError, match="int"):
        codec.encode([-2**63 - 1])


def test_encode_error_for_unencodable_string():
    with pytest.raises(EncodeError, match="str"):
        codec.encode(["\ud800"])


# --- what cannot be decoded ----------------------------------------------------------------

@pytest.mark.parametrize("frames", [
    [b"\xc1"],                                   # never valid msgpack
    [b""],
    [b"\x92\x01"],                               # truncated array
    [b"garbage that is not msgpack at all \xff\xfe"],
    [msgpack.packb(7)],                          # valid msgpack, wrong shape
    [msgpack.packb([PROTOCOL_VERSION])],
    [msgpack.packb([PROTOCOL_VERSION, "items"])],
    [msgpack.packb({"version": 1})],
    [msgpack.packb([PROTOCOL_VERSION, []]) + b"extra"],
    # [version, ...] in its first two bytes, and still no data message
    [msgpack.packb([PROTOCOL_VERSION, {"items": [1]}])],
    [msgpack.packb([PROTOCOL_VERSION, None])],
    [b"\x92" + msgpack.packb(PROTOCOL_VERSION) + b"\xc1"],
    [msgpack.packb([PROTOCOL_VERSION, [msgpack.ExtType(codec.EXT_ARRAY, b"\x90")]])],
])
def test_decode_garbage(frames):
    with pytest.raises(DecodeError):
        codec.decode(frames)


def test_decode_error_is_a_value_error():
    assert issubclass(DecodeError, ValueError)


def test_decode_empty_message():
    with pytest.raises(DecodeError, match="empty"):
        codec.decode([])


@pytest.mark.parametrize("version", [0, PROTOCOL_VERSION + 1, "1", None])
def test_decode_wrong_version(version):
    frames = [msgpack.packb([version, [1, 2]])]
    with pytest.raises(DecodeError, match="version"):
        codec.decode(frames)


def _array_header(index, dtype="<i4", shape=(2,)):
    ext = msgpack.ExtType(codec.EXT_ARRAY, msgpack.packb([index, dtype, list(shape)]))
    return msgpack.packb([PROTOCOL_VERSION, [ext]])


@pytest.mark.parametrize("index", [0, 2, 5, -1])
def test_decode_bad_frame_index(index):
    frames = [_array_header(index), np.arange(2, dtype="<i4").tobytes()]
    with pytest.raises(DecodeError, match="frame"):
        codec.decode(frames)


def test_decode_missing_array_frame():
    with pytest.raises(DecodeError):
        codec.decode([_array_header(1)])


def test_decode_frame_size_mismatch():
    with pytest.raises(DecodeError):
        codec.decode([_array_header(1, shape=(3,)), np.arange(2, dtype="<i4").tobytes()])
    with pytest.raises(DecodeError):
        codec.decode([_array_header(1), b"\x00\x01\x02"])


def test_decode_bad_dtype():
    with pytest.raises(DecodeError):
        codec.decode([_array_header(1, dtype="not-a-dtype"), b"\x00" * 8])


def test_decode_bad_scalar():
    ext = msgpack.ExtType(codec.EXT_SCALAR, b"\xc1")
    with pytest.raises(DecodeError):
        codec.decode([msgpack.packb([PROTOCOL_VERSION, [ext]])])


def test_decode_accepts_handmade_message():
    frames = [_array_header(1), np.array([5, 6], dtype="<i4").tobytes()]
    (out,) = codec.decode(frames)
    assert out.tolist() == [5, 6]


@pytest.mark.parametrize("item", [{(1, 2): "tuple key"}, {"k": {(): 1}},
                                  np.zeros(3, dtype=[])])
def test_what_encodes_also_decodes(item):
    try:
        frames = codec.encode([item])
    except EncodeError:
        return  # refusing at the producer is fine
    codec.decode(frames)


# --- what a stranger may send: DecodeError, and nothing allocated by a claimed size ----------
#
# Anyone who reaches a socket can send it well-formed msgpack of the wrong
# structure. Decoding must raise DecodeError, and nothing else, for every
# message that is not a valid data message, and must check each size against
# the bytes received before it allocates anything.

def ext(code: int, payload) -> msgpack.ExtType:
    """An extension value; its payload is ``payload`` packed (bytes are taken as they are)."""
    return msgpack.ExtType(code, payload if isinstance(payload, bytes)
                           else msgpack.packb(payload, use_bin_type=True))


def array_ext(index=1, dtype="<i4", shape=(2,)) -> msgpack.ExtType:
    return ext(codec.EXT_ARRAY, [index, dtype, list(shape) if isinstance(shape, tuple) else shape])


def scalar_ext(dtype="<i4", raw=b"\x01\x00\x00\x00") -> msgpack.ExtType:
    return ext(codec.EXT_SCALAR, [dtype, raw])


def inline_ext(dtype="<i4", shape=(2,), raw=None) -> msgpack.ExtType:
    """An inline array (by default array_ext()'s, [0, 1], with its bytes inside)."""
    return ext(EXT_INLINE, [dtype, list(shape) if isinstance(shape, tuple) else shape,
                            I4 if raw is None else raw])


def bytes_ext(index=1) -> msgpack.ExtType:
    return ext(EXT_BYTES, [index])


def packed(*parts) -> bytes:
    return msgpack.packb(list(parts), use_bin_type=True)


def plain(*items) -> bytes:
    return packed(PROTOCOL_VERSION, list(items))


def tagged(items, tags) -> bytes:
    return packed(PROTOCOL_VERSION, list(items), tags)


I4 = np.arange(2, dtype="<i4").tobytes()  # the frame of array_ext()'s default array


def struct(names=("a",), formats=("<i4",), offsets=(0,), itemsize=4, **extra) -> dict:
    wire = {"names": list(names) if isinstance(names, tuple) else names,
            "formats": list(formats) if isinstance(formats, tuple) else formats,
            "offsets": list(offsets) if isinstance(offsets, tuple) else offsets,
            "itemsize": itemsize, "aligned": False}
    wire.update(extra)
    return {k: v for k, v in wire.items() if v is not _MISSING}


_MISSING = object()


def _nested_struct(depth: int) -> dict:
    wire: object = "<i4"
    for _ in range(depth):
        wire = struct(formats=[wire])
    return wire  # type: ignore[return-value]


MALFORMED: list[tuple[str, list[bytes]]] = [
    # the header
    ("version-true", [packed(True, [1])]),
    ("version-float", [packed(2.0, [1])]),
    ("version-str", [packed("2", [1])]),
    ("version-numpy-scalar", [packed(scalar_ext("<f8", np.float64(2).tobytes()), [1])]),
    ("version-one-element-array", [packed(array_ext(1, "<i8", [1]), [1]),
                                   np.array([2], dtype="<i8").tobytes()]),
    ("version-array", [packed(array_ext(1, "<i8", [2]), [1]), np.array([2, 2], "<i8").tobytes()]),
    ("header-four-elements", [packed(PROTOCOL_VERSION, [1], [[0, 1]], "extra")]),
    ("header-nil-tags", [packed(PROTOCOL_VERSION, [1], None)]),
    ("header-items-dict", [packed(PROTOCOL_VERSION, {"a": 1})]),
    # tags
    ("tags-int", [packed(PROTOCOL_VERSION, [1], 5)]),
    ("tags-dict", [packed(PROTOCOL_VERSION, [1], {"0": 1})]),
    ("tags-fewer", [tagged([1, 2], [[0, 1]])]),
    ("tags-more", [tagged([1], [[0, 1], [1, 1]])]),
    ("tag-int", [tagged([1], [7])]),
    ("tag-str", [tagged([1], ["ab"])]),
    ("tag-nil", [tagged([1], [None])]),
    ("tag-one-element", [tagged([1], [[0]])]),
    ("tag-three-elements", [tagged([1], [[0, 1, 0]])]),
    ("tag-dict", [tagged([1], [{"seq": 0, "flags": 1}])]),
    ("seq-str", [tagged([1], [["0", 1]])]),
    ("seq-float", [tagged([1], [[0.0, 1]])]),
    ("seq-bool", [tagged([1], [[True, 1]])]),
    ("seq-nil", [tagged([1], [[None, 1]])]),
    ("seq-list", [tagged([1], [[[0], 1]])]),
    ("seq-negative", [tagged([1], [[-1, 1]])]),
    ("flags-str", [tagged([1], [[0, "1"]])]),
    ("flags-float", [tagged([1], [[0, 1.0]])]),
    ("flags-unknown-bit", [tagged([1], [[0, 4]])]),
    ("flags-negative", [tagged([1], [[0, -1]])]),
    ("marker-with-an-item", [tagged([5], [[0, codec.TAG_LAST | codec.TAG_MARKER]])]),
    ("marker-without-last", [tagged([None], [[0, codec.TAG_MARKER]])]),
    # extension types other than zpipe's two, at any depth
    *[(f"ext-{code}", [plain(ext(code, b"x"))]) for code in (0, 5, 6, 42, 127)],
    # msgpack reserves the negative codes (-1 is its timestamp); ExtType cannot make them
    *[(f"ext-minus-{-code}", [b"\x92\x02\x91\xd4" + code.to_bytes(1, "big", signed=True) + b"x"])
      for code in (-2, -5, -128)],
    ("ext-nested", [plain({"a": [1, {"b": ext(9, b"")}]})]),
    ("ext-as-key", [plain({ext(9, b"k"): 1})]),
    ("ext-in-tags", [tagged([1], [[0, ext(9, b"")]])]),
    ("inline-array-in-tags", [tagged([1], [[0, inline_ext("<i8", [1], b"\x01" + b"\x00" * 7)]])]),
    ("bytes-in-tags", [tagged([1], [[0, bytes_ext()]]), b"x"]),
    ("timestamp-bad-length", [b"\x92\x02\x91\xd4\xff\x01"]),
    # an array's header
    ("array-header-int", [plain(ext(codec.EXT_ARRAY, 7)), I4]),
    ("array-header-dict", [plain(ext(codec.EXT_ARRAY, {"index": 1})), I4]),
    ("array-header-short", [plain(ext(codec.EXT_ARRAY, [1, "<i4"])), I4]),
    ("array-header-long", [plain(ext(codec.EXT_ARRAY, [1, "<i4", [2], 0])), I4]),
    ("array-header-not-msgpack", [plain(ext(codec.EXT_ARRAY, b"\xc1")), I4]),
    ("array-header-empty", [plain(ext(codec.EXT_ARRAY, b"")), I4]),
    ("array-in-a-one-frame-message", [plain(array_ext())]),
    ("scalar-array-in-a-one-frame-message", [plain(array_ext(1, "<i4", []))]),
    # its frame index
    *[(f"index-{name}", [plain(array_ext(index)), I4]) for name, index in [
        ("str", "1"), ("float", 1.0), ("bool", True), ("nil", None), ("list", [1]),
        ("zero", 0), ("negative", -1), ("past-the-end", 2), ("huge", 2**64 - 1)]],
    ("index-twice", [plain(array_ext(1), array_ext(1)), I4]),
    ("index-twice-two-frames", [plain(array_ext(1), array_ext(1)), I4, I4]),
    ("index-out-of-order", [plain(array_ext(2), array_ext(1)), I4, I4]),
    ("frame-without-an-array", [plain(array_ext(1)), I4, b"\x00" * 8]),
    ("frames-without-arrays", [plain(1, 2), I4]),
    # its dtype
    ("dtype-object", [plain(array_ext(1, "|O", [1])), b"\x00" * 8]),
    ("dtype-object-empty", [plain(array_ext(1, "|O", [0])), b""]),
    ("dtype-object-no-order", [plain(array_ext(1, "O", [0])), b""]),
    ("dtype-object-named", [plain(array_ext(1, "object", [0])), b""]),
    ("dtype-stringdtype", [plain(array_ext(1, "T", [0])), b""]),
    ("dtype-stringdtype-bytes", [plain(array_ext(1, "T", [1])), b"\x00" * 16]),
    ("dtype-unsized-unicode", [plain(array_ext(1, "<U0", [2**26])), b""]),
    ("dtype-unsized-unicode-bare", [plain(array_ext(1, "U", [3])), b""]),
    ("dtype-unsized-bytes", [plain(array_ext(1, "|S0", [2**26])), b""]),
    ("dtype-name", [plain(array_ext(1, "float64", [1])), b"\x00" * 8]),
    ("dtype-comma-string", [plain(array_ext(1, "<i4,<i4", [1])), I4]),
    ("dtype-subarray-string", [plain(array_ext(1, "(2,)<i4", [1])), I4]),
    ("dtype-trailing-space", [plain(array_ext(1, "<i4 ", [2])), I4]),
    ("dtype-not-a-dtype", [plain(array_ext(1, "not-a-dtype", [2])), I4]),
    ("dtype-bad-unit", [plain(array_ext(1, "<M8[zz]", [1])), b"\x00" * 8]),
    ("dtype-huge-unit", [plain(array_ext(1, f"<M8[{2**70}s]", [1])), b"\x00" * 8]),
    ("dtype-int", [plain(array_ext(1, 5, [2])), I4]),
    ("dtype-nil", [plain(array_ext(1, None, [2])), I4]),
    ("dtype-bytes", [plain(array_ext(1, b"<i4", [2])), I4]),
    ("dtype-list-of-fields", [plain(array_ext(1, [["a", "<i4"]], [2])), I4]),
    ("dtype-ext", [plain(array_ext(1, ext(3, b"<i4"), [2])), I4]),
    ("dtype-subarray-at-top", [plain(array_ext(1, {"base": "<i4", "shape": [2]}, [1])), I4]),
    # a structured dtype's description
    ("struct-names-int", [plain(array_ext(1, struct(names=5), [2])), I4]),
    ("struct-names-not-str", [plain(array_ext(1, struct(names=[1]), [2])), I4]),
    ("struct-names-duplicate", [plain(array_ext(1, struct(("a", "a"), ("<i2", "<i2"), (0, 2)),
                                                [2])), I4]),
    ("struct-formats-str", [plain(array_ext(1, struct(formats="<i4"), [2])), I4]),
    ("struct-formats-object", [plain(array_ext(1, struct(formats=["|O"], itemsize=8), [0])), b""]),
    ("struct-formats-nested-object", [plain(array_ext(1, struct(formats=[
        struct(formats=["|O"], itemsize=8)], itemsize=8), [0])), b""]),
    ("struct-formats-bad-dict", [plain(array_ext(1, struct(formats=[{"x": 1}]), [2])), I4]),
    ("struct-formats-fewer", [plain(array_ext(1, struct(formats=[]), [2])), I4]),
    ("struct-offsets-negative", [plain(array_ext(1, struct(offsets=[-4]), [2])), I4]),
    ("struct-offsets-str", [plain(array_ext(1, struct(offsets=["0"]), [2])), I4]),
    ("struct-offsets-past-the-end", [plain(array_ext(1, struct(offsets=[8]), [2])), I4]),
    ("struct-itemsize-str", [plain(array_ext(1, struct(itemsize="4"), [2])), I4]),
    ("struct-itemsize-negative", [plain(array_ext(1, struct(itemsize=-4), [2])), I4]),
    ("struct-itemsize-huge", [plain(array_ext(1, struct(itemsize=2**62), [1])), b""]),
    ("struct-aligned-str", [plain(array_ext(1, struct(aligned="yes"), [2])), I4]),
    ("struct-missing-offsets", [plain(array_ext(1, struct(offsets=_MISSING), [2])), I4]),
    ("struct-extra-key", [plain(array_ext(1, struct(titles=["t"]), [2])), I4]),
    ("struct-nested-too-deep", [plain(array_ext(1, _nested_struct(40), [2])), I4]),
    ("struct-nested-far-too-deep", [plain(array_ext(1, _nested_struct(400), [2])), I4]),
    ("subarray-shape-negative", [plain(array_ext(1, struct(formats=[
        {"base": "<i4", "shape": [-1]}]), [2])), I4]),
    ("subarray-shape-str", [plain(array_ext(1, struct(formats=[
        {"base": "<i4", "shape": "1"}]), [2])), I4]),
    ("subarray-shape-huge", [plain(array_ext(1, struct(formats=[
        {"base": "<i4", "shape": [2**40, 2**40]}]), [1])), b""]),
    ("subarray-extra-key", [plain(array_ext(1, struct(formats=[
        {"base": "<i4", "shape": [1], "x": 1}]), [2])), I4]),
    # its shape
    ("shape-int", [plain(array_ext(1, "<i4", 2)), I4]),
    ("shape-str", [plain(array_ext(1, "<i4", "2")), I4]),
    ("shape-nil", [plain(array_ext(1, "<i4", None)), I4]),
    ("shape-float", [plain(array_ext(1, "<i4", [2.0])), I4]),
    ("shape-bool", [plain(array_ext(1, "<i4", [True, 2])), I4]),
    ("shape-nested", [plain(array_ext(1, "<i4", [[2]])), I4]),
    ("shape-minus-one", [plain(array_ext(1, "<i4", [-1])), I4]),
    ("shape-negative", [plain(array_ext(1, "<i4", [-2])), I4]),
    ("shape-negatives", [plain(array_ext(1, "<i4", [-1, -2])), I4]),
    ("shape-too-many-dims", [plain(array_ext(1, "<i4", [1] * 65 + [2])), I4]),
    ("shape-dim-too-large", [plain(array_ext(1, "|V0", [2**63])), b""]),
    ("shape-dim-huge", [plain(array_ext(1, "|V0", [2**64 - 1])), b""]),
    ("shape-count-too-large", [plain(array_ext(1, "|V0", [2**32, 2**32])), b""]),
    ("shape-huge-dims-and-a-zero", [plain(array_ext(1, "<f8", [2**62, 2**62, 0])), b""]),
    # sizes: what the header claims against the bytes received
    ("claims-1-GB-of-an-empty-frame", [plain(array_ext(1, "|u1", [2**30])), b""]),
    ("claims-8-GB-of-8-bytes", [plain(array_ext(1, "<f8", [2**30])), b"\x00" * 8]),
    ("claims-2-of-1", [plain(array_ext(1, "<i4", [2])), b"\x00" * 4]),
    ("claims-2-of-3", [plain(array_ext(1, "<i4", [2])), b"\x00" * 12]),
    ("claims-2-of-a-ragged-frame", [plain(array_ext(1, "<i4", [2])), b"\x00" * 9]),
    ("claims-none-of-some", [plain(array_ext(1, "<i4", [0])), I4]),
    ("claims-itemsize-0-of-some", [plain(array_ext(1, "|V0", [3])), b"\x01"]),
    # bytes that are no value of their dtype (numpy fails on every read of them)
    ("unicode-past-U+10FFFF", [plain(array_ext(1, "<U1", [1])), b"\xff\xff\xff\xff"]),
    ("unicode-past-U+10FFFF-big-endian", [plain(array_ext(1, ">U1", [1])), b"\x00\x11\x00\x00"]),
    ("unicode-past-U+10FFFF-in-a-field", [plain(array_ext(1, struct(formats=["<U1"]), [1])),
                                          b"\x00\x00\x11\x00"]),
    ("unicode-past-U+10FFFF-in-a-subarray", [plain(array_ext(1, struct(
        formats=[{"base": "<U1", "shape": [2]}], itemsize=8), [1])), b"a\0\0\0\xff\xff\xff\xff"]),
    ("datetime-generic-not-nat", [plain(array_ext(1, "<M8", [1])), b"\x00" * 8]),
    # numpy scalars
    ("scalar-int", [plain(ext(codec.EXT_SCALAR, 5))]),
    ("scalar-one-element", [plain(ext(codec.EXT_SCALAR, ["<i4"]))]),
    ("scalar-three-elements", [plain(ext(codec.EXT_SCALAR, ["<i4", b"\0\0\0\0", 1]))]),
    ("scalar-not-msgpack", [plain(ext(codec.EXT_SCALAR, b"\xc1"))]),
    ("scalar-str-bytes", [plain(ext(codec.EXT_SCALAR, ["<i4", "abcd"]))]),
    ("scalar-too-few-bytes", [plain(scalar_ext("<i4", b"\x01"))]),
    ("scalar-too-many-bytes", [plain(scalar_ext("<i4", b"\x01" * 8))]),
    ("scalar-no-bytes", [plain(scalar_ext("<i4", b""))]),
    ("scalar-object", [plain(scalar_ext("|O", b"\x00" * 8))]),
    ("scalar-subarray", [plain(scalar_ext({"base": "<i4", "shape": [2]}, I4))]),
    ("scalar-bad-dtype", [plain(scalar_ext("nope", b"\x00"))]),
    ("scalar-unicode-past-U+10FFFF", [plain(scalar_ext("<U1", b"\xff\xff\xff\xff"))]),
    ("scalar-struct-unicode-past-U+10FFFF", [plain(scalar_ext(struct(formats=["<U1"]),
                                                              b"\xff\xff\xff\xff"))]),
    ("scalar-datetime-generic-not-nat", [plain(scalar_ext("<M8", b"\x00" * 8))]),
    # a large bytes item's header, and its frame
    ("bytes-header-int", [plain(ext(EXT_BYTES, 1)), b"x"]),
    ("bytes-header-dict", [plain(ext(EXT_BYTES, {"index": 1})), b"x"]),
    ("bytes-header-empty-list", [plain(ext(EXT_BYTES, [])), b"x"]),
    ("bytes-header-long", [plain(ext(EXT_BYTES, [1, 0])), b"x"]),
    ("bytes-header-not-msgpack", [plain(ext(EXT_BYTES, b"\xc1")), b"x"]),
    ("bytes-header-empty", [plain(ext(EXT_BYTES, b"")), b"x"]),
    ("bytes-in-a-one-frame-message", [plain(bytes_ext())]),
    *[(f"bytes-index-{name}", [plain(bytes_ext(index)), b"x"]) for name, index in [
        ("str", "1"), ("float", 1.0), ("bool", True), ("nil", None), ("list", [1]),
        ("zero", 0), ("negative", -1), ("past-the-end", 2), ("huge", 2**64 - 1)]],
    ("bytes-twice", [plain(bytes_ext(1), bytes_ext(1)), b"x"]),
    ("bytes-twice-two-frames", [plain(bytes_ext(1), bytes_ext(1)), b"x", b"y"]),
    ("bytes-out-of-order", [plain(bytes_ext(2), bytes_ext(1)), b"x", b"y"]),
    ("bytes-and-array-on-one-frame", [plain(bytes_ext(1), array_ext(1)), I4]),
    ("array-and-bytes-on-one-frame", [plain(array_ext(1), bytes_ext(1)), I4]),
    ("bytes-frame-without-a-bytes-item", [plain(bytes_ext(1)), b"x", b"y"]),
    ("bytes-nested-missing-frame", [plain({"a": [bytes_ext(1)]})]),
    # an inline array
    ("inline-int", [plain(ext(EXT_INLINE, 7))]),
    ("inline-dict", [plain(ext(EXT_INLINE, {"dtype": "<i4"}))]),
    ("inline-short", [plain(ext(EXT_INLINE, ["<i4", [2]]))]),
    ("inline-long", [plain(ext(EXT_INLINE, ["<i4", [2], I4, 0]))]),
    ("inline-not-msgpack", [plain(ext(EXT_INLINE, b"\xc1"))]),
    ("inline-empty", [plain(ext(EXT_INLINE, b""))]),
    ("inline-truncated", [plain(ext(EXT_INLINE, msgpack.packb(["<i4", [2], I4])[:-3]))]),
    ("inline-bytes-str", [plain(inline_ext(raw="\x00" * 8))]),
    ("inline-bytes-nil", [plain(ext(EXT_INLINE, ["<i4", [0], None]))]),
    ("inline-bytes-list", [plain(ext(EXT_INLINE, ["<i4", [2], [0, 1]]))]),
    ("inline-bytes-ext", [plain(ext(EXT_INLINE, ["<i4", [2], ext(4, I4)]))]),
    ("inline-dtype-object", [plain(inline_ext("|O", [1], b"\x00" * 8))]),
    ("inline-dtype-object-empty", [plain(inline_ext("|O", [0], b""))]),
    ("inline-dtype-name", [plain(inline_ext("float64", [1], b"\x00" * 8))]),
    ("inline-dtype-nil", [plain(inline_ext(None))]),
    ("inline-dtype-int", [plain(inline_ext(5))]),
    ("inline-dtype-unsized-unicode", [plain(inline_ext("<U0", [2**26], b""))]),
    ("inline-dtype-subarray-at-top", [plain(inline_ext({"base": "<i4", "shape": [2]}, [1]))]),
    ("inline-dtype-struct-object", [plain(inline_ext(struct(formats=["|O"], itemsize=8), [0],
                                                     b""))]),
    ("inline-dtype-struct-too-deep", [plain(inline_ext(_nested_struct(40)))]),
    ("inline-dtype-struct-bad", [plain(inline_ext(struct(offsets=[-4])))]),
    ("inline-shape-int", [plain(inline_ext(shape=2))]),
    ("inline-shape-nil", [plain(inline_ext(shape=None))]),
    ("inline-shape-negative", [plain(inline_ext(shape=[-2]))]),
    ("inline-shape-bool", [plain(inline_ext(shape=[True, 2]))]),
    ("inline-shape-too-many-dims", [plain(inline_ext(shape=[1] * 65 + [2]))]),
    ("inline-shape-count-too-large", [plain(inline_ext("|V0", [2**32, 2**32], b""))]),
    ("inline-claims-1-GB-of-nothing", [plain(inline_ext("|u1", [2**30], b""))]),
    ("inline-claims-8-GB-of-8-bytes", [plain(inline_ext("<f8", [2**30], b"\x00" * 8))]),
    ("inline-claims-more", [plain(inline_ext(shape=[3]))]),
    ("inline-claims-fewer", [plain(inline_ext(shape=[1]))]),
    ("inline-claims-ragged", [plain(inline_ext(raw=b"\x00" * 9))]),
    ("inline-claims-none-of-some", [plain(inline_ext(shape=[0]))]),
    ("inline-claims-itemsize-0-of-some", [plain(inline_ext("|V0", [3], b"\x01"))]),
    ("inline-unicode-past-U+10FFFF", [plain(inline_ext("<U1", [1], b"\xff\xff\xff\xff"))]),
    ("inline-unicode-past-U+10FFFF-in-a-field", [plain(inline_ext(
        struct(formats=["<U1"]), [1], b"\x00\x00\x11\x00"))]),
    ("inline-datetime-generic-not-nat", [plain(inline_ext("<M8", [1], b"\x00" * 8))]),
    ("inline-as-version", [packed(inline_ext("<i8", [], PROTOCOL_VERSION.to_bytes(8, "little")),
                                  [1])]),
    ("inline-as-a-key", [plain({inline_ext(): 1})]),
    ("inline-with-frames-left", [plain(inline_ext()), I4]),
    # nesting: msgpack's own limit, and tuples as keys deeper than Python recurses
    ("nested-past-msgpack-limit", [b"\x92\x02\x91" + b"\x91" * 2000 + b"\xc0"]),
    ("tuple-key-nested-deeply", [b"\x92\x02\x91" + b"\x91" * 990 + b"\x81\x91\x01\x01"]),
]


@pytest.mark.parametrize("frames", [frames for _, frames in MALFORMED],
                         ids=[name for name, _ in MALFORMED])
def test_malformed_messages_raise_decode_error_and_allocate_nothing(frames):
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError):
            codec.decode_tagged(frames)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20  # nothing made to the size a header claims


def test_malformed_names_are_unique():
    names = [name for name, _ in MALFORMED]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("exc_type", [MemoryError, OverflowError, RecursionError, KeyError,
                                      IndexError, AttributeError, ZeroDivisionError,
                                      SystemError, LookupError, RuntimeError])
@pytest.mark.parametrize("where, frames", [
    ("_dtype_from_wire", [plain(array_ext()), I4]),     # inside the ext hook of an array
    ("_dtype_from_wire", [plain(inline_ext())]),         # ... of an inline array
    ("_count", [plain(inline_ext("<i4", (1, 2)))]),      # its shape (not 1-d: that is quicker)
    ("_Arrays._bytes", [plain(bytes_ext()), b"abc"]),    # inside the ext hook of a bytes item
    ("_scalar", [plain(scalar_ext())]),                  # inside the ext hook of a scalar
    ("_unusual", [tagged([1], [[0, 1]])]),               # after msgpack, on the header
    ("_lists", [plain({(1, 2): "tuple key"})]),          # the second decode, with tuples
])
def test_any_exception_while_decoding_is_a_decode_error(monkeypatch, exc_type, where, frames):
    codec.decode_tagged(frames)  # decodes as it is

    def failing(*args, **kwargs):
        raise exc_type("from deep inside")

    # What the decoder keeps of what it decoded before would skip the call.
    monkeypatch.setattr(codec, "_ARRAY_DTYPES", {})
    monkeypatch.setattr(codec, "_INLINE_RECEIVED", {})
    owner, _, name = where.rpartition(".")
    monkeypatch.setattr(getattr(codec, owner) if owner else codec, name, failing)
    with pytest.raises(DecodeError, match=exc_type.__name__):
        codec.decode_tagged(frames)


def test_keyboard_interrupt_is_not_a_decode_error(monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(codec, "_dtype_from_wire", interrupted)
    monkeypatch.setattr(codec, "_ARRAY_DTYPES", {})
    monkeypatch.setattr(codec, "_INLINE_RECEIVED", {})
    with pytest.raises(KeyboardInterrupt):
        codec.decode_tagged([plain(array_ext()), I4])
    with pytest.raises(KeyboardInterrupt):
        codec.decode_tagged([plain(inline_ext())])


def test_a_decode_error_message_stays_short():
    frames = [plain(array_ext(1, "x" * 100_000, [1])), b"\x00"]
    with pytest.raises(DecodeError) as info:
        codec.decode_tagged(frames)
    assert len(str(info.value)) < 500  # a stranger's bytes go into the log


# The valid edge cases next to the malformed ones: they decode, as before.

@pytest.mark.parametrize("frames, shape, dtype", [
    ([plain(array_ext(1, "|V0", [2**40])), b""], (2**40,), "|V0"),
    ([plain(array_ext(1, struct((), (), (), 0), [5, 2**30])), b""], (5, 2**30), []),
    ([plain(array_ext(1, "<f8", [0, 2**40])), b""], (0, 2**40), "<f8"),
    ([plain(array_ext(1, "<U3", [2**40, 0])), b""], (2**40, 0), "<U3"),
    ([plain(array_ext(1, "<i4", [1] * 32 + [2])), I4], (1,) * 32 + (2,), "<i4"),
    ([plain(array_ext(1, "<M8", [2])), b"\x00\x00\x00\x00\x00\x00\x00\x80" * 2], (2,), "<M8"),
])
def test_arrays_without_bytes_or_at_the_limits_decode_without_allocating(frames, shape, dtype):
    tracemalloc.start()
    try:
        (out,) = codec.decode(frames)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.shape == shape and out.dtype == np.dtype(dtype)
    assert out.nbytes == len(frames[1])
    assert peak < 2**20
    repr(out)  # every value readable


def test_structured_arrays_with_text_and_generic_datetimes_still_decode():
    dtype = np.dtype([("s", "<U2"), ("t", ">U1", (2,)), ("when", "<M8"),
                      ("inner", [("u", "<U1")])])
    array = np.zeros(3, dtype=dtype)
    array["s"] = ["ab", "ü", "✓"]
    array["when"] = np.datetime64("NaT")
    out = roundtrip(array)
    assert_same_array(out, array)
    assert out["s"].tolist() == ["ab", "ü", "✓"]


def test_a_msgpack_timestamp_is_a_msgpack_value():
    assert roundtrip(msgpack.Timestamp(1, 2)) == msgpack.Timestamp(1, 2)


# -- a seeded generator of well-formed msgpack with the wrong structure ------------------------

_INTS = [0, 1, 2, 3, -1, -2, 7, 255, 65535, 2**30, 2**31, 2**32, 2**40, 2**62, 2**63 - 1,
         -2**63, 2**64 - 1]
_STRS = ["", "a", "<f4", "|u1", "<i8", ">u2", "|b1", "<c16", "|O", "O", "<U0", "|S0", "<U1",
         ">U2", "|S3", "|V0", "|V3", "T", "<f4,<i4", "(2,)<f4", "float64", "<M8", "<M8[ns]",
         "<m8[10s]", "names", "base", "\x00", "<f16"]
_EXT_CODES = [0, 1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 42, 127]


class Wrong:
    """Random well-formed msgpack of the wrong structure, from one seed."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        # (dtype, shape) of the array extensions of the message so far; (None, None)
        # for a bytes item's
        self.arrays: list = []

    def value(self, depth: int = 0):
        r = self.rng
        kind = r.randrange(16 if depth < 3 else 6)
        if kind == 0:
            return None
        if kind == 1:
            return r.random() < 0.5
        if kind == 2:
            return r.choice(_INTS)
        if kind == 3:
            return r.choice([0.0, -1.5, 2.0, 1e300, math.inf, math.nan])
        if kind == 4:
            return r.choice(_STRS)
        if kind == 5:
            return r.randbytes(r.randrange(17))
        if kind in (6, 7):
            return [self.value(depth + 1) for _ in range(r.randrange(4))]
        if kind == 8:
            return {r.choice(_STRS + [1, None]): self.value(depth + 1)
                    for _ in range(r.randrange(3))}
        if kind == 9:
            code = r.choice(_EXT_CODES)
            payload = r.randbytes(r.randrange(13)) if r.random() < 0.3 else self.value(depth + 1)
            return ext(code, payload)
        if kind in (10, 11):
            dtype, shape = self.dtype(depth + 1), self.shape()
            self.arrays.append((dtype, shape))
            index = len(self.arrays) if r.random() < 0.8 else self.index()
            return array_ext(index, dtype, shape)
        if kind == 13:
            dtype, shape = self.dtype(depth + 1), self.shape()
            return inline_ext(dtype, shape, self.frame(dtype, shape) if r.random() < 0.8
                              else self.value(depth + 1))
        if kind == 14:
            self.arrays.append((None, None))
            return bytes_ext(len(self.arrays) if r.random() < 0.8 else self.index())
        return scalar_ext(self.dtype(depth + 1),
                          r.randbytes(r.choice([0, 1, 2, 4, 8, 16])) if r.random() < 0.8
                          else self.value(depth + 1))

    def index(self):
        return self.rng.choice([1, 1, 1, 2, 3, 0, -1, True, 1.0, "1", None, 2**64 - 1])

    def shape(self):
        r = self.rng
        if r.random() < 0.1:
            return self.value(3)
        if r.random() < 0.05:
            return [1] * r.choice([33, 64, 65, 200])
        if r.random() < 0.6:
            return [r.randrange(4) for _ in range(r.randrange(4))]
        return [r.choice(_INTS[:8] + [2**30, 2**40, 2**63, -1, True])
                for _ in range(r.randrange(4))]

    def dtype(self, depth: int):
        r = self.rng
        roll = r.random()
        if roll < 0.5 or depth > 4:
            return r.choice(_STRS)
        if roll < 0.6:
            return self.value(2)
        if roll < 0.85:
            count = r.randrange(3)
            wire = {"names": [r.choice(["a", "b", "c", 1]) for _ in range(count)],
                    "formats": [self.dtype(depth + 1) for _ in range(count)],
                    "offsets": [r.choice([0, 4, 8, -1, 2**40]) for _ in range(count)],
                    "itemsize": r.choice([0, 4, 8, 16, -1, 2**40, "8"]),
                    "aligned": r.choice([False, True, 1, "no"])}
            for key in list(wire):
                if r.random() < 0.1:
                    del wire[key]
            if r.random() < 0.1:
                wire[r.choice(["titles", "base", "x"])] = self.value(2)
            return wire
        return {"base": self.dtype(depth + 1), "shape": self.shape()}

    def tags(self, count: int):
        r = self.rng
        if r.random() < 0.2:
            return self.value(1)
        return [[r.choice(_INTS[:8] + ["0", None, 1.5, True]),
                 r.choice([0, 1, 2, 3, 4, -1, 1, 1, "1", None])] if r.random() < 0.9
                else self.value(2)
                for _ in range(count + r.choice([0, 0, 0, 1, -1]))]

    def frame(self, dtype, shape) -> bytes:
        """Mostly the bytes the header claims (so that the checks past the size run)."""
        r = self.rng
        if dtype is not None and r.random() < 0.7:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    size = np.dtype(dtype).itemsize * math.prod(shape)
            except Exception:  # noqa: BLE001 - not a dtype or shape: any length then
                size = -1
            if type(size) is int and 0 <= size <= 4096:
                return r.randbytes(size)
        return r.randbytes(r.choice([0, 1, 4, 8, 12, 16, 32, 64]))

    def message(self) -> list[bytes]:
        r = self.rng
        self.arrays = []
        items = [self.value() for _ in range(r.randrange(4))]
        version = r.choice([PROTOCOL_VERSION] * 6 + [1, 3, True, 2.0, "2", None])
        shape = r.randrange(10)
        if shape < 5:
            header = [version, items]
        elif shape < 8:
            header = [version, items, self.tags(len(items))]
        elif shape == 8:
            header = [version, items, self.tags(len(items)), self.value(1)]
        else:
            header = self.value(1)
        frames = [msgpack.packb(header, use_bin_type=True)]
        if r.random() < 0.8:
            frames += [self.frame(dtype, shape) for dtype, shape in self.arrays]
        for _ in range(r.choice([0, 0, 0, 0, 1, 2])):
            frames.append(r.randbytes(r.choice([0, 1, 4, 8, 12, 16, 32, 64])))
        return frames


def _walk(value):
    """Every value inside a decoded item."""
    yield value
    if isinstance(value, list):
        for v in value:
            yield from _walk(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(k)
            yield from _walk(v)


def assert_a_valid_message(items, tags, frames):
    """What decode_tagged returns is a data message: plain values, arrays on their frames."""
    assert type(items) is list
    if tags is not None:
        assert type(tags) is list and len(tags) == len(items)
        for item, tag in zip(items, tags):
            assert type(tag) is list and len(tag) == 2
            assert type(tag[0]) is int and tag[0] >= 0 and tag[1] in (0, 1, 3)
            assert item is None or tag[1] != 3
    sizes = []  # of the arrays and bytes, in the order the header has them
    for value in _walk(items):
        assert not isinstance(value, (msgpack.ExtType, tuple))
        if isinstance(value, np.ndarray):
            assert not value.dtype.hasobject and value.dtype.kind in "biufcmMUSV"
            sizes.append(value.nbytes)
        elif isinstance(value, bytes):
            sizes.append(len(value))
        repr(value)  # readable
    # Each frame after the header is one of them, in order (the others are in the header).
    left = iter(sizes)
    assert all(any(size == len(frame) for size in left) for frame in frames[1:])


def test_random_wrong_structures_raise_decode_error_only():
    """Thousands of seeded well-formed msgpack messages of the wrong structure:
    each is a DecodeError or a valid data message, never another exception
    and never an allocation beyond what the bytes hold."""
    wrong = Wrong(20240229)
    refused = 0
    tracemalloc.start()
    try:
        for case in range(5000):
            frames = wrong.message()
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            try:
                items, tags = codec.decode_tagged(frames)
            except DecodeError:
                refused += 1
            else:
                assert_a_valid_message(items, tags, frames)
                del items, tags
            peak = tracemalloc.get_traced_memory()[1] - before
            assert peak < 2**20, f"case {case}: {peak} bytes for {sum(map(len, frames))} received"
    finally:
        tracemalloc.stop()
    assert refused > 3500  # the generator makes mostly wrong messages, as meant


# -- what a sender sends: its own copy of each array, made once -------------------------------

def test_a_large_array_is_frozen_when_added():
    """A source may reuse one array: what left is what it was when yielded."""
    array = np.arange(100_000, dtype="f8")  # 800 kB: over pyzmq's copy threshold
    batch = codec.Batch()
    batch.add(array)
    array[:] = -1
    (out,) = codec.decode(batch.frames())
    assert out.tolist() == list(range(100_000))
    assert not np.shares_memory(batch.frames()[1], array)


@pytest.mark.parametrize("make", [
    lambda: np.arange(2**20, dtype="f8"),                                     # contiguous
    lambda: np.arange(2**21, dtype="f8")[::2],                                # strided
    lambda: np.asfortranarray(np.arange(2**20, dtype="f8").reshape(1024, 1024)),
], ids=["contiguous", "strided", "fortran"])
def test_a_large_array_is_copied_once(make):
    array = make()
    nbytes = array.nbytes  # 8 MB
    tracemalloc.start()
    try:
        frames = codec.encode([array])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert nbytes <= peak < 1.5 * nbytes  # one copy, not two
    assert not np.shares_memory(frames[1], array)
    np.testing.assert_array_equal(codec.decode(frames)[0], array)


def test_a_small_array_is_frozen_inline_when_added():
    """Under FRAME_MIN an array is copied into the header as it is added."""
    array = np.arange(1000, dtype="f8")
    assert array.nbytes < FRAME_MIN
    batch = codec.Batch(copy_arrays=False)  # as over ipc and tcp: no Outbox wait for it
    batch.add(array)
    array[:] = -1
    frames = batch.frames()
    assert len(frames) == 1 and not batch.arrays
    assert codec.decode(frames)[0].tolist() == list(range(1000))


def test_arrays_sent_without_a_copy_over_inproc_are_the_receivers_own(pair):
    """Over inproc a frame sent with copy=False is the sender's very memory: the
    sender's changes after the send must not reach the receiver, nor the other way."""
    a, b = pair
    array = np.zeros(50_000)  # 400 kB
    a.send_multipart(codec.encode([array, {"same": array}]), copy=False)
    array[:] = 7
    got, holder = codec.decode(b.recv_multipart(copy=False))
    assert not got.any() and not holder["same"].any()
    got += 1
    assert (array == 7).all()
    assert not np.shares_memory(got, holder["same"])


def test_an_array_over_max_size_fails_before_it_is_copied():
    """A broadcast array of 3 GB is refused by its size, without being made."""
    huge = np.broadcast_to(np.zeros(1), (3 * 2**30 // 8,))
    batch = codec.Batch(max_size=1000)
    tracemalloc.start()
    try:
        with pytest.raises(EncodeError, match="3221225472 bytes"):
            batch.add({"x": [huge]})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20
    batch.add(np.arange(10))  # the batch is whole again
    assert codec.decode(batch.frames())[0].tolist() == list(range(10))


def test_the_outbox_names_the_stage_that_refuses_an_array_before_copying_it():
    from zpipe.replica.control import Control
    from zpipe.replica.outbox import Outbox

    ctx = zmq.Context()
    try:
        push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
        pull.bind("inproc://capped")
        push.connect("inproc://capped")
        control = ctx.socket(zmq.DEALER)
        control.connect("inproc://nobody")
        outbox = Outbox(push, Control(control), source=True)
        outbox.max_size, outbox.downstream = 1000, "sink"
        try:
            huge = np.broadcast_to(np.zeros(1), (2**24,))  # 128 MB if it were made
            tracemalloc.start()
            try:
                with pytest.raises(EncodeError, match=r"array of 134217728 bytes is larger than "
                                   r"stage 'sink' accepts \(max_message_size 1000\)"):
                    outbox.put(huge)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert peak < 2**20
            outbox.put(np.arange(3))
            outbox.flush()
            assert pull.poll(5000)
            assert codec.decode(pull.recv_multipart())[0].tolist() == [0, 1, 2]
        finally:
            outbox.close()
    finally:
        ctx.destroy(linger=0)


@pytest.mark.parametrize("array", [np.zeros(3, dtype="M8"),
                                   np.frombuffer(b"\xff\xff\xff\xff", dtype="<U1")],
                         ids=["generic-datetime", "bad-unicode"])
def test_an_array_of_no_values_is_refused_by_its_sender(array):
    # The receiver would drop it (numpy fails on every read of its values).
    with pytest.raises(EncodeError, match="no value"):
        codec.encode([array])


# -- large bytes items: a frame each; small arrays: inline, in the header ---------------------

def test_the_wire_numbers():
    assert (codec.EXT_ARRAY, codec.EXT_SCALAR, codec.EXT_BYTES, codec.EXT_INLINE) == \
        (1, 2, EXT_BYTES, EXT_INLINE)
    assert codec.FRAME_MIN == FRAME_MIN == zmq.COPY_THRESHOLD  # pyzmq copies smaller frames


def some_bytes(size: int) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[:size]


@pytest.mark.parametrize("size", [0, 1, 100, FRAME_MIN - 1, FRAME_MIN, FRAME_MIN + 1, 2**20,
                                  10 * 2**20])
def test_bytes_items_below_at_and_above_frame_min(size):
    item = some_bytes(size)
    frames = codec.encode([item])
    if size < FRAME_MIN:
        assert len(frames) == 1
    else:
        assert len(frames) == 2
        assert frames[1] is item       # the object itself: no copy on the way out
        assert len(frames[0]) < 16     # and none of it in the header
    (out,) = codec.decode(frames)
    assert type(out) is bytes and out == item


@pytest.mark.parametrize("make", [bytes, bytearray, memoryview, zmq.Frame,
                                  lambda b: np.frombuffer(b, dtype="u1")],
                         ids=["bytes", "bytearray", "memoryview", "Frame", "array"])
def test_a_bytes_frame_arrives_as_bytes_whatever_holds_it(make):
    item = some_bytes(FRAME_MIN)
    header, frame = codec.encode([item])
    (out,) = codec.decode([header, make(frame)])
    assert type(out) is bytes and out == item


def test_large_bytes_items_over_zmq_arrive_as_bytes(pair):
    a, b = pair
    big, other = b"\xa5" * 2**20, some_bytes(FRAME_MIN + 7)
    items = [big, "small", other, b"tiny"]
    a.send_multipart(codec.encode(items), copy=False)
    frames = b.recv_multipart(copy=False)
    assert len(frames) == 3
    out = codec.decode(frames)
    assert out == items and type(out[0]) is bytes and type(out[2]) is bytes
    assert out[0][:2].hex() == "a5a5" and out[2].decode("latin-1")[1] == "\x01"


def test_large_bytes_inside_containers_stay_in_the_header():
    big = some_bytes(2 * FRAME_MIN)
    items = [{"k": big}, [big, 1], (big,)]
    frames = codec.encode(items)
    assert len(frames) == 1
    assert codec.decode(frames) == [{"k": big}, [big, 1], [big]]


def test_frames_of_arrays_and_bytes_in_header_order():
    big_array, small_array = np.arange(FRAME_MIN // 4, dtype="f8"), np.arange(5)
    big_bytes, other_bytes = some_bytes(FRAME_MIN), b"o" * (3 * FRAME_MIN)
    items = [big_bytes, {"a": big_array, "s": small_array}, b"small", other_bytes,
             [small_array, big_array * 2], big_bytes]
    frames = codec.encode(items)
    assert len(frames) == 1 + 5
    assert frames[1] is big_bytes and frames[3] is other_bytes and frames[5] is big_bytes
    out = codec.decode(frames)
    assert out[0] == big_bytes and out[2] == b"small" and out[3] == other_bytes
    assert out[5] == big_bytes
    np.testing.assert_array_equal(out[1]["a"], big_array)
    np.testing.assert_array_equal(out[1]["s"], small_array)
    np.testing.assert_array_equal(out[4][0], small_array)
    np.testing.assert_array_equal(out[4][1], big_array * 2)


def test_a_tagged_and_stamped_message_with_frames():
    batch = codec.Batch()
    big = some_bytes(FRAME_MIN)
    batch.add(big, [0, codec.TAG_LAST])
    batch.add(np.ones(FRAME_MIN), [1, 0])
    batch.add(np.ones(3), [1, codec.TAG_LAST])
    batch.origin = 1234.5
    items, tags, origin = codec.decode_stamped(batch.frames())
    assert items[0] == big and items[1].shape == (FRAME_MIN,) and items[2].tolist() == [1] * 3
    assert tags == [[0, 1], [1, 0], [1, 1]] and origin == 1234.5


def test_a_large_bytes_item_alone_is_its_own_frame():
    batch = codec.Batch()
    item = some_bytes(FRAME_MIN)
    batch.add(item)
    frames = batch.frames()
    assert len(frames) == 2 and frames[1] is item and not batch.fresh
    assert codec.decode(frames) == [item]
    batch.clear()
    batch.add(b"small")
    assert codec.decode(batch.frames()) == [b"small"]


def test_a_bytes_frame_counts_as_a_frame_not_as_header():
    batch = codec.Batch(max_size=10**7)
    big = some_bytes(3 * FRAME_MIN)
    batch.add(big)
    batch.add(np.zeros(100, dtype="u1"))  # inline: into the header
    assert batch.arrays == [big]
    assert batch.header_bytes < 300 and batch.largest_frame() == len(big)
    _, _, frames = batch.pop(1)  # the inline array: no frame of its own
    assert frames == [] and batch.arrays == [big]
    batch.clear()
    batch.add(big)
    data, tag, frames = batch.pop(0)
    batch.push(data, tag, frames)
    assert codec.decode(batch.frames()) == [big]


def test_a_batch_of_100_small_arrays_is_one_frame():
    batch = codec.Batch(copy_arrays=False)
    for i in range(100):
        batch.add(np.full(25, i, dtype="f4"))  # 100 bytes each
    assert not batch.arrays
    frames = batch.frames()
    assert len(frames) == 1
    out = codec.decode(frames)
    assert [a.tolist() for a in out] == [[float(i)] * 25 for i in range(100)]


@pytest.mark.parametrize("nbytes", [0, 8, FRAME_MIN - 8, FRAME_MIN, FRAME_MIN + 8])
def test_arrays_below_frame_min_travel_inline(nbytes):
    array = np.arange(nbytes // 8, dtype="<f8")
    frames = codec.encode([array])
    assert len(frames) == (1 if nbytes < FRAME_MIN else 2)
    (out,) = codec.decode(frames)
    assert_same_array(out, array)


def test_inline_arrays_are_writable_and_their_own(pair):
    """Each inline array the receiver makes is writable, in memory of its own: not
    the sender's, not the header's, not another item's (one array sent twice)."""
    a = np.arange(10, dtype="i4")
    record = np.zeros(2, dtype=[("s", "U2"), ("n", ">u4"), ("x", "f8", (2,))])
    items = [a, a, {"x": a, "y": [a]}, np.broadcast_to(a, (3, 10)), np.asfortranarray(
        np.arange(6.0).reshape(2, 3)), np.array(5.0), np.zeros((2, 0)), record, a[::3]]
    sent = codec.encode(items)
    assert len(sent) == 1
    for out in (codec.decode(sent), over_zmq(pair, items)):
        arrays = [out[0], out[1], out[2]["x"], out[2]["y"][0], out[3], out[4], out[5], out[6],
                  out[7], out[8]]
        for got in arrays:
            assert got.flags.writeable
            assert not np.shares_memory(got, a)
        for i, x in enumerate(arrays):
            for y in arrays[i + 1:]:
                assert not np.shares_memory(x, y)
        out[0][0] = 99
        out[3][1, 1] = -5  # a broadcast array arrives as a whole one
        out[5][()] = 7.0
        out[7]["n"] = 3
        assert out[1][0] == 0 and out[2]["x"][0] == 0 and out[2]["y"][0][0] == 0
        assert out[3][0, 1] == 1 and a[0] == 0 and a[1] == 1
        assert out[4].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
        assert out[8].tolist() == [0, 3, 6, 9]
        assert record["n"].tolist() == [0, 0]


# -- a message of small arrays alike, made in one go (codec._inline_run) -------------------

def run_of_arrays(dtype, shape, count=40):
    """``count`` different arrays of one dtype and shape, and their message."""
    base = np.arange(count * math.prod(shape)).reshape(count, *shape)
    arrays = [np.ascontiguousarray(row).astype(dtype) for row in base]
    return arrays, codec.encode(arrays)


@pytest.mark.parametrize("dtype, shape", [
    ("<f4", (25,)), (">i8", (3, 4)), ("?", (7,)), ("<c16", (1, 1, 2)),
    ([("a", "<i2"), ("b", ">f8", (2,))], (5,))], ids=str)
def test_a_run_of_small_arrays_arrives_as_arrays_of_their_own(dtype, shape):
    """A message whose every item is a small array of one dtype and shape seen
    before is made in one go; each array is as sent, writable, and shares no
    memory with another item or with the header."""
    arrays, frames = run_of_arrays(dtype, shape)
    codec.decode(frames)  # the first of its kind: checked and made one by one
    assert codec._inline_run(frames[0]) is not None  # the next ones are runs
    out = codec.decode(frames)
    assert len(out) == len(arrays)
    for got, want in zip(out, arrays):
        assert_same_array(got, want)
        assert got.flags.writeable and got.flags.aligned
        assert not np.shares_memory(got, frames[0])
    for i, x in enumerate(out):
        for y in out[i + 1:i + 3]:
            assert not np.shares_memory(x, y)
    out[0][...] = arrays[1]
    assert out[1].tobytes() == arrays[1].tobytes()
    assert codec.decode(frames)[0].tobytes() == arrays[0].tobytes()


def test_small_arrays_of_shapes_and_dtypes_in_turns_keep_their_own():
    """The packer remembers the last small array's dtype and shape: arrays that
    differ from it in one of them, or in a dtype equal but not the same, are
    packed as what they are."""
    a = np.arange(24, dtype="<f4")
    items = [a, a.reshape(4, 6), a, a.view("<i4"), a.astype(np.dtype("<f4").newbyteorder(">")),
             a, a.reshape(6, 4), a[:12], a.view([("x", "<f4")]), a]
    batch = codec.Batch()
    for item in items:
        batch.add(item)
    for got, want in zip(codec.decode(batch.frames()), items, strict=True):
        assert_same_array(got, want)


def test_a_small_array_like_the_last_one_still_meets_max_size():
    batch = codec.Batch()
    batch.add(np.ones(25, dtype="f4"))
    batch.add(np.ones(25, dtype="f4"))  # (the first of its shape is packed the long way)
    batch.max_size = 50
    with pytest.raises(codec.FrameTooLarge):
        batch.add(np.ones(25, dtype="f4"))


@pytest.mark.parametrize("case", ["mixed-dtypes", "mixed-shapes", "a-bytes-item-as-long",
                                  "zero-dimensional", "text", "tagged", "first-of-its-kind"])
def test_messages_that_are_no_run_decode_as_before(case):
    """What only looks like a run (or is one that _inline_run leaves alone) is decoded
    by msgpack item by item, to the same items."""
    arrays, _ = run_of_arrays("<f4", (25,))
    codec.decode(codec.encode(arrays))  # its start is known from here on
    tags = None
    if case == "mixed-dtypes":
        items = arrays[:20] + [arrays[20].view("<i4")] + arrays[21:]
    elif case == "mixed-shapes":
        items = arrays[:20] + [arrays[20].reshape(5, 5)] + arrays[21:]
    elif case == "a-bytes-item-as-long":
        # as long as an array's encoding, and the same length in the header
        items = arrays[:20] + [bytes(len(codec.encode([arrays[0]])[0]) - 6)] + arrays[21:]
    elif case == "zero-dimensional":
        items = [np.array(float(i)) for i in range(40)]
    elif case == "text":
        items = [np.array(["ab", str(i)]) for i in range(40)]
        codec.decode(codec.encode(items))
        # one character that is none (above U+10FFFF) makes the message malformed
        head = codec.encode(items[:5] + [np.array(["ab", "Z"])] + items[6:])[0]
        bad = head.replace(b"Z\x00\x00\x00", b"\x00\x00\x11\x00")
        assert codec._inline_run(bad) is None
        with pytest.raises(DecodeError, match="no value of it"):
            codec.decode([bad])
    elif case == "tagged":
        items, tags = arrays, [[i, codec.TAG_LAST] for i in range(40)]
    else:
        items = [a.astype("<u2") for a in arrays]
    frames = codec.encode(items, tags)
    if case != "first-of-its-kind":
        codec.decode_tagged(frames)
    assert codec._inline_run(frames[0]) is None
    out, got_tags = codec.decode_tagged(frames)
    assert got_tags == tags
    for got, want in zip(out, items, strict=True):
        assert type(got) is type(want)
        if isinstance(want, np.ndarray):
            assert_same_array(got, want)
        else:
            assert got == want


def test_mutated_runs_decode_as_item_by_item():
    """Every byte of a run's message changed, one at a time, and a few cut short:
    each decodes to what msgpack item by item makes of it, or is a DecodeError
    both ways."""
    arrays, frames = run_of_arrays("<i2", (20,), count=24)
    codec.decode(frames)
    head = bytes(frames[0])
    rng = random.Random(7)
    cases = [head[:cut] for cut in range(len(head) - 40, len(head))]
    for at in range(len(head)):
        mutated = bytearray(head)
        mutated[at] = (mutated[at] + rng.randrange(1, 256)) % 256
        cases.append(bytes(mutated))
    taken = 0
    for case in cases:
        taken += codec._inline_run(case) is not None
        try:
            fast = codec.decode([case])
        except DecodeError:
            fast = DecodeError
        try:
            slow = item_by_item(case)
        except DecodeError:
            slow = DecodeError
        if fast is DecodeError or slow is DecodeError:
            assert fast is slow
        else:
            assert [(a.dtype, a.shape, a.tobytes()) for a in fast] == \
                [(a.dtype, a.shape, a.tobytes()) for a in slow]
    assert taken > len(head) // 2  # most changes fall in the arrays' own bytes


def item_by_item(head):
    """codec.decode of a one-frame message, without _inline_run."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(codec, "_RUN_MIN_BYTES", 2**62)
        return codec.decode([head])


@pytest.mark.parametrize("dtype", ["f8", "i1", "U3", "M8[s]", "V0", [],
                                   [("a", "i4"), ("b", "f4", (2,))]], ids=str)
@pytest.mark.parametrize("shape", [(0,), (3, 0), (), (2, 3), (1, 1, 1, 2)], ids=str)
def test_inline_arrays_of_every_shape(dtype, shape):
    array = np.zeros(shape, dtype=dtype)
    frames = codec.encode([array, {"in": [array]}])
    assert len(frames) == 1
    out, holder = codec.decode(frames)
    for got in (out, holder["in"][0]):
        assert_same_array(got, array)
        assert got.flags.writeable


def test_inline_arrays_of_one_dtype_or_one_shape_keep_theirs():
    """What the encoder keeps per (dtype, shape) is kept apart for each."""
    items = [np.arange(3, dtype="<f4"), np.arange(3, dtype="<f8"), np.arange(3, dtype=">f4"),
             np.arange(3, dtype="<f4").reshape(3, 1), np.arange(6, dtype="<f4"),
             np.arange(3).astype("<M8[s]"), np.arange(3).astype("<M8[ms]"), np.array(["ab", "c"]),
             np.array(["abc", "d"]), np.arange(3, dtype="<f4")[::-1]]
    for _ in range(2):  # a second time from what was kept
        out = codec.decode(codec.encode(items))
        for got, want in zip(out, items):
            assert_same_array(got, want)


def test_inline_arrays_like_ones_received_before_are_still_checked():
    """The decoder keeps the start of inline arrays it received: one that starts
    the same and is as long differs only in its bytes, which are still checked."""
    good = [plain(inline_ext("<U1", [2], "ab".encode("utf-32-le")))]
    assert codec.decode(good)[0].tolist() == ["a", "b"]
    bad = [plain(inline_ext("<U1", [2], b"a\0\0\0\xff\xff\xff\xff"))]
    assert len(bad[0]) == len(good[0])
    for _ in range(2):
        with pytest.raises(DecodeError, match="no value"):
            codec.decode(bad)
    # Another dtype and shape of the same length: decoded as what it says.
    first = [plain(inline_ext("<i4", [2], np.array([1, 2], "<i4").tobytes()))]
    other = [plain(inline_ext("<u8", [1], np.array([7], "<u8").tobytes()))]
    assert len(first[0]) == len(other[0])
    for _ in range(2):
        assert codec.decode(first)[0].dtype == np.dtype("<i4")
        (got,) = codec.decode(other)
        assert got.dtype == np.dtype("<u8") and got.tolist() == [7]
    # One byte more or less: not taken for the one before.
    for raw in (b"\0" * 7, b"\0" * 9):
        with pytest.raises(DecodeError, match="needs 8 bytes"):
            codec.decode([plain(inline_ext("<i4", [2], raw))])
    # Two received arrays from one message are each their own memory.
    a, b = codec.decode(codec.encode([np.arange(3), np.arange(3)]))
    a[0] = 5
    assert b[0] == 0


def test_pack_and_add_packed_for_a_caller_that_appends_itself():
    batch = codec.Batch()
    data = batch.pack({"x": 1})
    assert not batch.encoded and not batch.fresh
    batch.encoded.append(data)           # appended directly, as the Outbox's fast path does
    big = some_bytes(FRAME_MIN)
    data = batch.pack(big)
    assert batch.fresh == [big] and not batch.arrays
    batch.add_packed(data)
    assert batch.arrays == [big] and not batch.fresh
    with pytest.raises(TypeError):
        batch.pack({1, 2})
    batch.forget()
    assert not batch.fresh
    assert codec.decode(batch.frames()) == [{"x": 1}, big]


def test_measure_counts_what_was_appended_directly():
    batch = codec.Batch()
    batch.add("a" * 10)
    batch.encoded.append(batch.pack("b" * 20))
    assert batch.header_bytes == 11 and batch.measure() == 11 + 21
    batch.encoded.append(batch.pack("c" * 30))
    assert batch.measure() == 11 + 21 + 31 == batch.header_bytes
    batch.pop(0)
    assert batch.measure() == 11 + 21
    batch.clear()
    assert batch.measure() == 0


def test_counted_spares_measure_a_count_only_where_it_is_exact():
    batch = codec.Batch()
    batch.encoded.append(batch.pack("a" * 10))
    assert batch.measure() == 11
    run = [batch.pack("b" * 20), batch.pack("c" * 30)]
    batch.encoded.extend(run)
    batch.counted(2, 21 + 31)
    assert batch._measured == (3, 11 + 21 + 31) and batch.measure() == 11 + 21 + 31
    # Not what followed the counted items (two came, one is said): measure() counts.
    batch.encoded.extend([batch.pack("d" * 20), batch.pack("e" * 25)])
    batch.counted(1, 26)
    assert batch.measure() == 11 + 21 + 31 + 21 + 26


def test_squeeze_leaves_a_map_stages_none_outputs_out():
    batch = codec.Batch()
    batch.encoded.extend(map(batch.pack, [1, None, 2, None, None, 3]))
    assert batch.squeeze() == 6  # only a map stage's runs pack None for no output
    batch.holds_nothing = True
    encoded = batch.encoded
    assert batch.outputs() == 3
    assert batch.squeeze(4) == 2 and batch.encoded is encoded  # in place: a run appends
    assert codec.decode(batch.frames()) == [1, 2, None, 3]
    assert batch.squeeze() == 3 and codec.decode(batch.frames()) == [1, 2, 3]


def test_frames_of_the_first_items_and_drop():
    batch = codec.Batch()
    for i in range(5):
        batch.add(i)
    batch.origin = 12.5
    encoded = batch.encoded
    frames = batch.frames(3)
    batch.encoded.append(batch.pack(5))  # appended while those were sent
    batch.drop(3)
    assert codec.decode_stamped(frames) == ([0, 1, 2], None, 12.5)
    assert batch.encoded is encoded and batch.origin is None
    assert codec.decode(batch.frames()) == [3, 4, 5] and batch.measure() == 3
    tagged = codec.Batch()
    for i in range(4):
        tagged.add(i, [i, codec.TAG_LAST])
    assert codec.decode_tagged(tagged.frames(2)) == ([0, 1], [[0, 1], [1, 1]])
    tagged.drop(2)
    assert codec.decode_tagged(tagged.frames()) == ([2, 3], [[2, 1], [3, 1]])


def test_a_handmade_inline_array_decodes():
    (out,) = codec.decode([plain(inline_ext("<i4", [2], np.array([5, 6], "<i4").tobytes()))])
    assert out.tolist() == [5, 6] and out.dtype == np.dtype("<i4") and out.flags.writeable
    (out,) = codec.decode([plain(inline_ext(">f8", [], np.array(2.5, ">f8").tobytes()))])
    assert out.shape == () and out == 2.5


@pytest.mark.parametrize("wire, shape", [("|V0", [2**40]), (struct((), (), (), 0), [5, 2**30]),
                                         ("<f8", [0, 2**40]), ("<U3", [2**40, 0])])
def test_inline_arrays_without_bytes_decode_without_allocating(wire, shape):
    frames = [plain(inline_ext(wire, shape, b""))]
    tracemalloc.start()
    try:
        (out,) = codec.decode(frames)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert list(out.shape) == shape and out.nbytes == 0
    assert peak < 2**20


def test_a_received_inline_array_is_copied_once_from_the_header():
    """About its size allocated (its bytearray; the payload msgpack hands the hook),
    not several copies of it."""
    array = np.arange(FRAME_MIN // 8 - 1, dtype="f8")  # just under: inline
    (frame,) = codec.encode([array])
    tracemalloc.start()
    try:
        (out,) = codec.decode([frame])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3.5 * array.nbytes
    assert_same_array(out, array)


def test_inline_arrays_count_toward_the_header_and_max_size():
    batch = codec.Batch(max_size=10**6)
    batch.add(np.zeros(1000, dtype="u1"))
    batch.add(np.zeros(2000, dtype="u1"))
    assert not batch.arrays and batch.header_bytes > 3000
    assert batch.largest_frame() >= batch.header_bytes
    small = codec.Batch(max_size=1000)
    with pytest.raises(codec.FrameTooLarge, match="2000 bytes"):
        small.add({"x": np.zeros(2000, dtype="u1")})
    small.add(np.arange(10))  # whole again
    assert codec.decode(small.frames())[0].tolist() == list(range(10))


class _Recorder:
    def __init__(self):
        self.waits = 0

    def __call__(self, tracker):
        self.waits += 1


def _capped_outbox(ctx, name, max_size=None, copy_arrays=True):
    from zpipe.replica.control import Control
    from zpipe.replica.outbox import Outbox

    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    pull.bind(f"inproc://{name}")
    push.connect(f"inproc://{name}")
    control = ctx.socket(zmq.DEALER)
    control.connect("inproc://nobody")
    outbox = Outbox(push, Control(control), source=True, copy_arrays=copy_arrays)
    outbox.max_size, outbox.downstream = max_size, "sink"
    return outbox, pull


def _received(pull, count):
    messages = []
    while sum(len(codec.decode(m)) for m in messages) < count:
        assert pull.poll(5000)
        messages.append(pull.recv_multipart(copy=False))
    return messages


def test_the_outbox_waits_for_zeromq_on_large_arrays_only(monkeypatch):
    """Over ipc and tcp (copy_arrays False) a large array is waited for, a large
    bytes item is not (bytes never change), and small arrays share a message."""
    from zpipe.replica import outbox as outbox_module
    from zpipe.replica.outbox import _tracked

    big = some_bytes(FRAME_MIN)
    frames, tracker = _tracked([b"header", big])
    assert tracker is None and frames[1] is big
    frames, tracker = _tracked([b"header", big, np.zeros(FRAME_MIN, dtype="u1"), big])
    assert tracker is not None and frames[1] is big and frames[3] is big
    assert isinstance(frames[2], zmq.Frame)

    ctx = zmq.Context()
    try:
        recorder = _Recorder()
        monkeypatch.setattr(outbox_module.Outbox, "_wait_released", recorder)
        outbox, pull = _capped_outbox(ctx, "tracked", copy_arrays=False)
        try:
            outbox.put(big)
            outbox.put(big)
            outbox.flush()
            assert recorder.waits == 0
            got = [m for message in _received(pull, 2) for m in codec.decode(message)]
            assert got == [big, big]
            outbox.put(np.ones(FRAME_MIN))
            outbox.flush()
            assert recorder.waits == 1
            assert codec.decode(_received(pull, 1)[0])[0].shape == (FRAME_MIN,)
            for i in range(50):
                outbox.put(np.full(10, i))
            outbox.flush()
            assert recorder.waits == 1
            messages = _received(pull, 50)
            assert len(messages) < 50 and all(len(m) == 1 for m in messages)
            arrays = [a for message in messages for a in codec.decode(message)]
            assert [a[0] for a in arrays] == list(range(50))
        finally:
            outbox.close()
    finally:
        ctx.destroy(linger=0)


def test_the_outbox_under_max_size_with_bytes_frames_and_inline_arrays():
    ctx = zmq.Context()
    try:
        outbox, pull = _capped_outbox(ctx, "capped-frames", max_size=100_000)
        try:
            with pytest.raises(EncodeError, match=r"an item of 200\d\d\d bytes is larger than "
                               r"stage 'sink' accepts \(max_message_size 100000\)"):
                outbox.put(b"x" * 200_000)
            item = some_bytes(99_000)
            outbox.put(item)
            for _ in range(3):
                outbox.put(np.zeros(40_000, dtype="u1"))  # inline: 2 fit in one header
            outbox.flush()
            messages = _received(pull, 4)
            assert all(len(frame) <= 100_000 for m in messages for frame in m)
            got = [x for m in messages for x in codec.decode(m)]
            assert got[0] == item and [a.nbytes for a in got[1:]] == [40_000] * 3
            assert len(messages[0]) == 2 and len(messages) == 3
        finally:
            outbox.close()
    finally:
        ctx.destroy(linger=0)


# -- the receiver owns what it receives, in every mode ----------------------------------------

SOURCE_ARRAYS: list[np.ndarray] = []


def one_array_mutated(size: int):
    """A source that yields one array three times, changing it in between."""
    array = np.zeros(size)
    SOURCE_ARRAYS.append(array)
    for value in (1.0, 2.0, 3.0):
        array[:] = value
        yield array


def collect_then_modify(items: Iterable, path: str):
    arrays = list(items)  # all three first: aliases would all show the last value
    seen = [sorted(set(a.tolist())) for a in arrays]
    for a in arrays:
        a += 100  # the sink owns what it received
    with open(path, "w") as out:
        json.dump(seen, out)


@pytest.mark.parametrize("size", [50_000, 1000], ids=["400kB", "8kB"])
@pytest.mark.parametrize("mode", ["process", "thread"])
def test_results_do_not_depend_on_the_mode(tmp_path, mode, size):
    import zpipe

    SOURCE_ARRAYS.clear()
    path = tmp_path / "seen.json"
    zpipe.run([zpipe.Task(one_array_mutated, params={"size": size}),
               zpipe.Task(collect_then_modify, params={"path": str(path)})],
              mode=mode, inactivity_timeout=60)
    assert json.loads(path.read_text()) == [[1.0], [2.0], [3.0]]
    if mode == "thread":  # the source's own array, untouched by the sink
        (array,) = SOURCE_ARRAYS
        assert (array == 3.0).all()
