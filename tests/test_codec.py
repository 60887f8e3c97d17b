"""Unit tests of zpipe.codec: items on the wire, msgpack header plus one frame per array."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
import zmq

from zpipe import codec
from zpipe.codec import PROTOCOL_VERSION, DecodeError
from zpipe.errors import EncodeError


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
