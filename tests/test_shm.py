"""Large arrays and bytes items through shared memory on ipc links (shm.py): intact,
writable and frozen as sent, forged names refused, and no segment left after any end."""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import uuid
from pathlib import Path
from typing import Iterable

import msgpack
import numpy as np
import pytest
from conftest import wait_until
from test_launcher import free_ports, toml
from test_recovery import replica_pids

from zpipe.errors import EncodeError
from zpipe.wire import codec, shm

MIB = 2**20


# -- in one process: the codec with a folder of segments ---------------------------

@pytest.fixture
def folder():
    """A run's shared-memory folder, removed whatever the test did."""
    path = shm.make_folder(f"/tmp/zpipe-shmtest-{uuid.uuid4().hex[:12]}")
    assert path is not None
    yield path
    shutil.rmtree(path, ignore_errors=True)


def send(segments: shm.Segments, *items) -> list:
    batch = codec.Batch(copy_arrays=False, segments=segments)
    for item in items:
        batch.add(item)
    return batch.frames()


def names(folder: str) -> list[str]:
    return sorted(os.listdir(folder))


def test_an_array_goes_as_a_segment_name_and_arrives_writable_and_frozen(folder):
    segments, attached = shm.Segments(folder), shm.Attached(folder)
    source = np.arange(MIB // 4, dtype=np.float32)
    frames = send(segments, {"frame": source, "n": 1})
    assert len(frames) == 1 and len(frames[0]) < 200  # the header names the segment
    source[:] = -1  # after the send: what arrives is what was sent
    item = codec.decode(frames, attached)[0]
    array = item["frame"]
    assert isinstance(array.base, __import__("mmap").mmap)
    assert array.flags.writeable and np.array_equal(array, np.arange(MIB // 4, dtype=np.float32))
    array[:] = 7  # the receiver's own
    assert names(folder) == [segments.busy[0].name]
    del item, array
    gc.collect()
    assert names(folder) == [segments.busy[0].name + ".free"]  # given back once gone
    again = send(segments, source)  # the sender takes the same segment back
    assert names(folder) == [segments.busy[0].name] and len(segments.busy) == 1
    assert np.array_equal(codec.decode(again, attached)[0], source)


def test_bytes_and_odd_arrays_round_trip(folder):
    segments, attached = shm.Segments(folder), shm.Attached(folder)
    data = os.urandom(MIB + 3)
    strided = np.arange(4 * MIB // 8, dtype=np.int64).reshape(1024, -1)[:, ::2].T
    record = np.zeros(MIB // 16, dtype=[("a", "<i4"), ("b", "<f8", (1,)), ("c", "S4")])
    record["a"] = np.arange(len(record))
    got = codec.decode(send(segments, data, strided, record), attached)
    assert type(got[0]) is bytes and got[0] == data
    assert np.array_equal(got[1], strided) and got[1].flags.c_contiguous
    assert got[2].dtype == record.dtype and np.array_equal(got[2], record)
    # The bytes item's segment was released at once, the arrays' are held.
    assert sum(name.endswith(".free") for name in names(folder)) == 1


def test_small_items_keep_frames_or_the_header(folder):
    segments = shm.Segments(folder)
    frames = send(segments, np.zeros(shm.SHM_MIN // 8, dtype=np.float32),
                  bytes(shm.SHM_MIN - 1))
    assert len(frames) == 3 and names(folder) == []


def test_a_tuple_key_decodes_twice_with_the_same_segment(folder):
    segments, attached = shm.Segments(folder), shm.Attached(folder)
    array = np.ones(MIB, dtype=np.uint8)
    item = codec.decode(send(segments, {(1, 2): array}), attached)[0]
    assert list(item) == [(1, 2)] and np.array_equal(item[(1, 2)], array)
    # The tuple key first, the segment after it: found in the second decode.
    keyed, got = codec.decode(send(segments, {(1, 2): "x"}, array), attached)
    assert keyed == {(1, 2): "x"} and np.array_equal(got, array)


def test_no_room_sends_frames_and_a_failed_item_gives_its_segment_back(folder, monkeypatch):
    segments = shm.Segments(folder)
    with pytest.raises(EncodeError):
        send(segments, [np.ones(MIB, dtype=np.uint8), object()])
    assert not segments.busy and len(segments.free) == 1
    monkeypatch.setattr(shm, "POOL_BYTES", MIB)
    frames = send(segments, np.ones(MIB, dtype=np.uint8), np.ones(MIB, dtype=np.uint8))
    assert len(frames) == 2  # the first in the one segment there is room for, then a frame
    assert np.array_equal(codec.decode(frames, shm.Attached(folder))[1], np.ones(MIB, "u1"))
    monkeypatch.setattr(shm, "POOL_BYTES", 100 * MIB)
    segments.most = 3  # as Segments(folder, 3) would have it
    frames = send(segments, *[np.ones(MIB, dtype=np.uint8)] * 4)
    # The one from before (given back when its array went) and two more, then a frame.
    assert len(frames) == 2 and len(segments.busy) == 3


def test_a_sender_holds_no_more_segments_than_its_link_has_on_the_way(folder):
    # Under backpressure, names would also queue in the kernel's socket buffer: the
    # segments behind them are bounded by what the link's hwm lets be on the way.
    segments = shm.Segments(folder, in_flight=2)
    frames = send(segments, *[np.ones(MIB, dtype=np.uint8)] * 3)
    assert len(frames) == 2 and len(segments.busy) == 2  # two segments, then a frame
    assert shm.Segments(folder, in_flight=10_000).most == shm.POOL_SEGMENTS


def test_a_replica_that_ends_removes_the_segments_nobody_holds(folder):
    segments, attached = shm.Segments(folder), shm.Attached(folder)
    kept = codec.decode(send(segments, np.ones(MIB, "u1"), np.ones(MIB, "u1")), attached)
    del kept[0]
    gc.collect()
    segments.close()
    attached.close()
    assert names(folder) == [f"{os.getpid()}-2"]  # the one still held
    del kept
    gc.collect()
    assert names(folder) == [f"{os.getpid()}-2.free"]  # given back by path, all the same


def forged(name, shape=(MIB,), dtype="|u1") -> list[bytes]:
    inner = msgpack.packb([name, dtype, list(shape)])
    return [msgpack.packb([codec.PROTOCOL_VERSION, [msgpack.ExtType(codec.EXT_SHM_ARRAY,
                                                                    inner)]])]


def test_forged_segment_names_are_decode_errors(folder, tmp_path):
    segments, attached = shm.Segments(folder), shm.Attached(folder)
    frames = send(segments, np.ones(MIB, dtype=np.uint8))
    real = segments.busy[0].name
    outside = tmp_path / "secret"
    outside.write_bytes(bytes(MIB))
    os.symlink(outside, os.path.join(folder, "9-9"))
    os.mkdir(os.path.join(folder, "8-8"))
    for bad in ["../" + real, "/dev/shm/" + real, str(outside), "9-9", "8-8", real + ".free",
                "7-7", "abc", "", "1-1\n", 5, None, b"1-1", ["1-1"]]:
        with pytest.raises(codec.DecodeError):
            codec.decode(forged(bad), attached)
    with pytest.raises(codec.DecodeError, match="has 1048576 bytes"):
        codec.decode(forged(real, shape=(MIB + 1,)), attached)
    with pytest.raises(codec.DecodeError, match="0 bytes"):
        codec.decode(forged(real, shape=(0,)), attached)
    # A name while this process holds it, or twice in one message.
    held = codec.decode(frames, attached)[0]
    with pytest.raises(codec.DecodeError, match="already held"):
        codec.decode(frames, attached)
    send(segments, np.ones(MIB, dtype=np.uint8))
    other = segments.busy[1].name
    with pytest.raises(codec.DecodeError, match="already held"):
        codec.decode([msgpack.packb([codec.PROTOCOL_VERSION, [
            msgpack.ExtType(codec.EXT_SHM_ARRAY, msgpack.packb([other, "|u1", [MIB]]))] * 2])],
            attached)
    # On a link that takes no segments (tcp, inproc, leased), any is malformed.
    with pytest.raises(codec.DecodeError, match="shared memory"):
        codec.decode(frames)
    bytes_item = [msgpack.packb([codec.PROTOCOL_VERSION, [
        msgpack.ExtType(codec.EXT_SHM_BYTES, msgpack.packb([real, -1]))]])]
    with pytest.raises(codec.DecodeError):
        codec.decode(bytes_item, attached)
    assert outside.read_bytes() == bytes(MIB) and held.sum() == MIB


def test_garbage_in_segment_headers_is_only_ever_decode_error(folder):
    attached = shm.Attached(folder)
    shm.Segments(folder).put_bytes(bytes(MIB))
    rng = np.random.default_rng(7)
    headers = [msgpack.packb(v) for v in
               (["1-1"], [1, 2, 3], {"a": 1}, ["1-1", "<f4"], ["1-1", "<f4", [2**62, 2**62]],
                ["1-1", "O", [4]], ["1-1", "|u1", [-1]], [os.getpid(), "|u1", [MIB]])]
    headers += [rng.bytes(int(rng.integers(0, 40))) for _ in range(300)]
    for code in (codec.EXT_SHM_ARRAY, codec.EXT_SHM_BYTES):
        for header in headers:
            message = [msgpack.packb([codec.PROTOCOL_VERSION,
                                      [msgpack.ExtType(code, header)]])]
            try:
                codec.decode(message, attached)
            except codec.DecodeError:
                pass


# -- through `zpipe launch`: real processes, real ipc links ---------------------------

STAGES = """
import json, mmap, os, time
from typing import Iterable

import numpy as np

MIB = 2**20

def arrays(count, pause=0.0):
    frame = np.zeros((MIB // 2, 2), dtype=np.float32)
    for i in range(count):
        frame[:] = i  # one object, changed after each send
        yield {"i": i, "frame": frame, "blob": bytes([i % 256]) * (MIB + i)}
        if pause:
            time.sleep(pause)

def relay(item):
    return item

def meddling_relay(items: Iterable):
    # Forwards each received array, then scribbles on it: what the sink gets must not change.
    for item in items:
        yield item
        item["frame"][:] = -1

def fail_at(item, at):
    if item["i"] == at:
        raise ValueError("a failing stage")
    return item

def check(items: Iterable, path, pause=0.0):
    with open(path, "a") as out:
        for item in items:
            frame = item["frame"]
            ok = bool((frame == item["i"]).all()) and frame.shape == (MIB // 2, 2)
            blob = item["blob"] == bytes([item["i"] % 256]) * (MIB + item["i"])
            writable = bool(frame.flags.writeable)
            frame[:] = 0  # the receiver's own: allowed
            out.write(json.dumps([item["i"], ok, blob, writable,
                                  isinstance(frame.base, mmap.mmap)]) + "\\n")
            out.flush()
            if pause:
                time.sleep(pause)
"""


@pytest.fixture
def run_name():
    """A pipeline name of this test's own; its shared-memory folders are looked for
    (and removed, so a failing test leaves none) once the test ends."""
    name = f"shm-{uuid.uuid4().hex[:10]}"
    yield name
    left = list(Path(shm.ROOT).glob(f"zpipe-{name}-*"))
    for path in left:
        shutil.rmtree(path, ignore_errors=True)
    assert not left, f"shared-memory folders left behind: {left}"


def shm_folders(name: str) -> list[Path]:
    return list(Path(shm.ROOT).glob(f"zpipe-{name}-*"))


def segment_files(name: str) -> list[Path]:
    return [f for folder in shm_folders(name) for f in folder.iterdir()]


def checked(project) -> list[list]:
    return sorted(json.loads(line) for line in project.lines("out.jsonl"))


def pipeline(project, name: str, middle: str = 'run = "stages:relay"', sink: str = "",
             source: str = "params = { count = 40 }", pause: float = 0.0) -> None:
    project.pipeline(toml(f'name = "source"\nrun = "stages:arrays"\n{source}',
                          f'name = "relay"\n{middle}',
                          f'name = "sink"\nrun = "stages:check"\n'
                          f'params = {{ path = "out.jsonl", pause = {pause} }}\n{sink}',
                          name=name), STAGES)


def test_arrays_and_bytes_arrive_intact_writable_and_in_shared_memory(project, run_name):
    pipeline(project, run_name)
    result = project.launch()
    assert result.returncode == 0, result.stderr
    assert checked(project) == [[i, True, True, True, True] for i in range(40)]
    assert not shm_folders(run_name)


def test_a_relay_that_changes_what_it_forwarded_changes_nothing_downstream(project, run_name):
    pipeline(project, run_name, middle='run = "stages:meddling_relay"')
    result = project.launch()
    assert result.returncode == 0, result.stderr
    assert checked(project) == [[i, True, True, True, True] for i in range(40)]


def test_tcp_links_keep_frames(project, run_name):
    relay, sink = free_ports(2)
    pipeline(project, run_name, middle=f'run = "stages:relay"\naddress = "tcp://127.0.0.1:{relay}"',
             sink=f'address = "tcp://127.0.0.1:{sink}"')
    result = project.launch()
    assert result.returncode == 0, result.stderr
    assert checked(project) == [[i, True, True, True, False] for i in range(40)]


def test_leased_links_keep_frames_and_ipc_before_them_takes_segments(project, run_name):
    # restart on the sink leases the link into it: frames there, segments before it.
    pipeline(project, run_name, sink='restart = "on-failure"')
    result = project.launch()
    assert result.returncode == 0, result.stderr
    assert checked(project) == [[i, True, True, True, False] for i in range(40)]


def test_a_failing_stage_leaves_no_segment(project, run_name):
    pipeline(project, run_name, middle='run = "stages:fail_at"\nparams = { at = 20 }')
    result = project.launch()
    assert result.returncode == 1 and "a failing stage" in result.stderr
    assert not shm_folders(run_name)


def _segments_in_use(name: str) -> bool:
    return any(f.suffix != ".free" for f in segment_files(name))


@pytest.mark.parametrize("restart", [False, True])
def test_a_replica_killed_mid_run_leaves_no_segment(project, run_name, restart):
    # The sink is slow: segments wait in flight and in its hands when the kill comes.
    pipeline(project, run_name, source="params = { count = 60 }", pause=0.05,
             sink='restart = "on-failure"' if restart else '')
    launcher = project.start()
    try:
        wait_until(lambda: len(project.lines("out.jsonl")) >= 5, what="items at the sink")
        # restart on: the sink's input is leased (frames); the relay, fed by segments, dies.
        victim = "relay" if not restart else "sink"
        assert _segments_in_use(run_name)
        os.kill(replica_pids(project, victim)[0], signal.SIGKILL)
        status, err = launcher.finish(60)
    finally:
        launcher.kill()
    if restart:
        assert status == 0, err
        assert {line[0] for line in checked(project)} == set(range(60))
    else:
        assert status == 1, err
    assert not shm_folders(run_name)


def test_the_launcher_killed_mid_run_leaves_no_segment(project, run_name):
    pipeline(project, run_name, source="params = { count = 1000 }", pause=0.05)
    launcher = project.start()
    try:
        wait_until(lambda: len(project.lines("out.jsonl")) >= 3, what="items at the sink")
        assert _segments_in_use(run_name)
        launcher.proc.send_signal(signal.SIGKILL)
        wait_until(lambda: not project.processes(), timeout=15, what="stages to exit")
        wait_until(lambda: not shm_folders(run_name), timeout=15,
                   what="the watcher to remove the segments")
    finally:
        launcher.kill()


def mib_source():
    for i in range(8):
        yield np.full(MIB, i, dtype=np.uint8)


def same(item):
    return item


def note_arrays(items: Iterable, path):
    import mmap
    with open(path, "w") as out:
        for item in items:
            out.write(json.dumps([int(item[0]), isinstance(item.base, mmap.mmap)]) + "\n")


def test_zpipe_run_in_process_mode_uses_segments_and_leaves_none(tmp_path, run_name):
    import zpipe

    out = tmp_path / "out.jsonl"
    outcome = zpipe.run([zpipe.Task(mib_source), zpipe.Task(same),
                         zpipe.Task(note_arrays, params={"path": str(out)})],
                        mode="process", name=run_name)
    assert outcome.status == "ok"
    assert [json.loads(line) for line in out.read_text().splitlines()] == \
        [[i, True] for i in range(8)]
    assert not shm_folders(run_name)
