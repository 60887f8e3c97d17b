"""Unit tests of zpipe.wire.codec: items on the wire, msgpack header plus one frame per array."""

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


@pytest.mark.parametrize("dtype", DTYPES + BIG_ENDIAN)
def test_array_every_dtype_roundtrip(dtype):
    array = sample(dtype)
    out = roundtrip(array)
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


def test_non_contiguous_arrays():
    base = np.arange(60, dtype="i4").reshape(6, 10)
    cases = [base[::2, 1::3], base.T, base[:, 3], base[::-1], np.asfortranarray(base),
             np.asfortranarray(np.arange(24, dtype=">f8").reshape(2, 3, 4)),
             base.astype("U3")[1:4, ::-2]]
    for array in cases:
        out = roundtrip(array)
        assert_same_array(out, array)
        np.testing.assert_array_equal(out, array)


def test_arrays_nested_inside_containers():
    a, b, c = np.arange(3), np.ones((2, 2), dtype="f4"), np.array(["x", "yz"])
    item = {"a": a, "list": [b, {"deep": (c, 1)}], 7: None}
    frames = codec.encode([item, a])
    assert len(frames) == 1 + 4
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
    *[(f"ext-{code}", [plain(ext(code, b"x"))]) for code in (0, 3, 5, 42, 127)],
    # msgpack reserves the negative codes (-1 is its timestamp); ExtType cannot make them
    *[(f"ext-minus-{-code}", [b"\x92\x02\x91\xd4" + code.to_bytes(1, "big", signed=True) + b"x"])
      for code in (-2, -5, -128)],
    ("ext-nested", [plain({"a": [1, {"b": ext(9, b"")}]})]),
    ("ext-as-key", [plain({ext(9, b"k"): 1})]),
    ("ext-in-tags", [tagged([1], [[0, ext(3, b"")]])]),
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
    ("_scalar", [plain(scalar_ext())]),                  # inside the ext hook of a scalar
    ("_unusual", [tagged([1], [[0, 1]])]),               # after msgpack, on the header
    ("_lists", [plain({(1, 2): "tuple key"})]),          # the second decode, with tuples
])
def test_any_exception_while_decoding_is_a_decode_error(monkeypatch, exc_type, where, frames):
    codec.decode_tagged(frames)  # decodes as it is

    def failing(*args, **kwargs):
        raise exc_type("from deep inside")

    monkeypatch.setattr(codec, where, failing)
    with pytest.raises(DecodeError, match=exc_type.__name__):
        codec.decode_tagged(frames)


def test_keyboard_interrupt_is_not_a_decode_error(monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(codec, "_dtype_from_wire", interrupted)
    with pytest.raises(KeyboardInterrupt):
        codec.decode_tagged([plain(array_ext()), I4])


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
_EXT_CODES = [0, 1, 1, 1, 2, 2, 3, 42, 127]


class Wrong:
    """Random well-formed msgpack of the wrong structure, from one seed."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.arrays: list = []  # (dtype, shape) of the array extensions of the message so far

    def value(self, depth: int = 0):
        r = self.rng
        kind = r.randrange(13 if depth < 3 else 6)
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
        if r.random() < 0.7:
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
    arrays = []
    for value in _walk(items):
        assert not isinstance(value, (msgpack.ExtType, tuple))
        if isinstance(value, np.ndarray):
            assert not value.dtype.hasobject and value.dtype.kind in "biufcmMUSV"
            arrays.append(value)
        repr(value)  # readable
    assert [a.nbytes for a in arrays] == [len(f) for f in frames[1:]]


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


def test_a_small_array_is_left_to_pyzmqs_copy():
    # Under COPY_THRESHOLD pyzmq copies a frame sent with copy=False itself.
    array = np.arange(1000, dtype="f8")
    assert array.nbytes < zmq.COPY_THRESHOLD
    assert np.shares_memory(codec.encode([array])[1], array)


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
