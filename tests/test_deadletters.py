"""Dead letters: the file format, concurrent appends, damage; `zpipe dead-letters` and `zpipe replay`."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import msgpack
import numpy as np
import pytest

from zpipe.replica import deadletters
from zpipe.replica.deadletters import append, make_record, read

FAILED = {"exc_type": "ValueError", "message": "bad item", "traceback": "Traceback ...\n"}


def test_a_record_round_trips_with_numpy_arrays_and_scalars(tmp_path: Path) -> None:
    structured = np.zeros(3, dtype=[("x", "<f4"), ("name", "U5")])
    structured["x"] = [1, 2, 3]
    item = {"image": np.arange(24, dtype=np.uint16).reshape(2, 3, 4),
            "big_endian": np.arange(5, dtype=">i8"),
            "when": np.array(["2024-01-02T03:04"], dtype="M8[m]"),
            "table": structured,
            "scalars": [np.float32(1.5), np.int64(-7), np.bool_(True), np.datetime64("2024-05-06"),
                        np.str_("text")],
            "plain": [None, True, 3, 2.5, "s", b"\x00\xff", {"nested": [1, 2]}]}
    path = tmp_path / "letters" / "square.msgpack"  # the folder is made on the first append
    append(path, make_record(item, "square", 1, FAILED, when=1700000000.5))
    [record] = read(path).records
    assert set(record) == set(deadletters.KEYS)
    assert (record["stage"], record["replica"], record["exc_type"], record["message"],
            record["traceback"], record["time"]) == \
        ("square", 1, "ValueError", "bad item", "Traceback ...\n", 1700000000.5)
    got = record["item"]
    for key in ("image", "big_endian", "when", "table"):
        assert got[key].dtype == item[key].dtype and np.array_equal(got[key], item[key])
    assert got["image"].flags.writeable  # as items arrive in a stage
    got["image"][0, 0, 0] = 99
    # numpy's str_ is a str, and msgpack keeps it as one.
    assert [type(v) for v in got["scalars"]] == [type(v) for v in item["scalars"][:4]] + [str]
    assert got["scalars"] == item["scalars"]
    assert got["plain"] == [None, True, 3, 2.5, "s", b"\x00\xff", {"nested": [1, 2]}]


def test_an_item_msgpack_cannot_carry_still_leaves_a_record_with_its_repr(tmp_path: Path) -> None:
    path = tmp_path / "s.msgpack"
    append(path, make_record({"a set": {1, 2}}, "s", 0, FAILED))
    [record] = read(path).records
    assert record["item"] is None and "{'a set': {1, 2}}" in record[deadletters.ITEM_REPR]


def _append_many(path: str, writer: int, count: int) -> None:
    rng = np.random.default_rng(writer)
    for i in range(count):
        # Up to 200 kB: far more than one pipe buffer or page, so a write that
        # was not atomic would show.
        size = int(rng.integers(1, 50_000))
        append(path, make_record({"writer": writer, "i": i,
                                  "data": np.full(size, writer * 1000 + i, dtype=np.int32)},
                                 "s", writer, FAILED))


def test_replicas_appending_at_once_never_mix_their_records(tmp_path: Path) -> None:
    path = tmp_path / "s.msgpack"
    fork = multiprocessing.get_context("fork")
    writers = [fork.Process(target=_append_many, args=(str(path), w, 150)) for w in range(4)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(60)
        assert process.exitcode == 0
    letters = read(path)
    assert letters.problem is None and letters.truncated == 0
    seen: dict[int, list[int]] = {w: [] for w in range(4)}
    for record in letters.records:
        item = record["item"]
        assert record["replica"] == item["writer"]
        assert (item["data"] == item["writer"] * 1000 + item["i"]).all()
        seen[item["writer"]].append(item["i"])
    # Each writer's records whole and in its own order.
    assert seen == {w: list(range(150)) for w in range(4)}


def test_a_last_record_cut_short_is_reported_not_fatal(tmp_path: Path, project) -> None:
    folder = tmp_path / "letters"
    path = folder / "square.msgpack"
    for i in range(3):
        append(path, make_record(i, "square", 0, FAILED))
    size = path.stat().st_size
    os.truncate(path, size - 7)
    letters = read(path)
    assert [r["item"] for r in letters.records] == [0, 1]
    assert letters.truncated > 0 and letters.problem is None
    assert "cut short" in letters.warnings()[0]
    listed = project.run("dead-letters", str(folder))
    assert listed.returncode == 0, listed.stderr
    assert "square: 2 item(s)" in listed.stdout and "cut short" in listed.stderr


def test_damage_is_reported_and_an_object_array_is_never_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "s.msgpack"
    append(path, make_record(1, "s", 0, FAILED))
    with open(path, "ab") as out:
        out.write(msgpack.packb([1, 2, 3]))
    letters = read(path)
    assert [r["item"] for r in letters.records] == [1]
    assert "not a map" in letters.problem
    # What msgpack-numpy writes for an array of objects: a pickle. Reading must refuse it.
    evil = tmp_path / "evil.msgpack"
    marker = tmp_path / "pwned"
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    record = make_record(None, "evil", 0, FAILED)
    record["item"] = {b"nd": True, b"type": "|O", b"kind": b"O", b"shape": [1], b"data": payload}
    evil.write_bytes(msgpack.packb(record, use_bin_type=True))
    letters = read(evil)
    assert letters.records == [] and "dtype object" in letters.problem
    assert not marker.exists()


# -- zpipe dead-letters and zpipe replay, as a user runs them ---------------------------

STAGES = """
import json, os, time
from typing import Iterable

import numpy as np
import zpipe


def numbers(count):
    yield from range(count)


def poison(x, bad=3):
    if x % bad == 0 and not os.path.exists("fixed"):
        raise ValueError(f"bad item {x}")
    return x


def check_array(item):
    if item["i"] % 4 == 1 and not os.path.exists("fixed"):
        raise KeyError(f"no {item['i']}")
    return {"i": item["i"], "sum": int(item["a"].sum())}


def arrays(count):
    for i in range(count):
        yield {"i": i, "a": np.full((3, 4), i, dtype=np.float32)}


def plus(x):
    return x + 1000


def record(items: Iterable, path):
    with open(path, "w") as out:
        for item in items:
            out.write(json.dumps(item) + "\\n")
"""

PIPELINE = """
[pipeline]
name = "letters"

[[stages]]
name = "source"
run = "stages:numbers"
params = {{ count = {count} }}

[[stages]]
name = "check"
run = "stages:poison"
on_error = "dead-letter"
replicas = {replicas}

[[stages]]
name = "plus"
run = "stages:plus"

[[stages]]
name = "sink"
run = "stages:record"
params = {{ path = "out.txt" }}
"""


def test_dead_letters_are_listed_and_replayed_through_the_rest_of_the_pipeline(project) -> None:
    project.pipeline(PIPELINE.format(count=30, replicas=2), STAGES)
    launched = project.launch()
    assert launched.returncode == 0, launched.stderr
    bad = list(range(0, 30, 3))
    assert sorted(int(x) for x in project.lines("out.txt")) == \
        [x + 1000 for x in range(30) if x % 3]
    assert "stage 'check': 10 item(s) dead-lettered" in launched.stderr

    listed = project.run("dead-letters", "dead-letters", "--show", "2")
    assert listed.returncode == 0, listed.stderr
    assert "check: 10 item(s)" in listed.stdout
    assert "    10  ValueError" in listed.stdout
    assert listed.stdout.count("ValueError: bad item") == 2  # --show 2
    assert "item: 0" in listed.stdout or "item: 3" in listed.stdout

    # Still broken: the items fail again and are dead-lettered anew.
    again = project.run("replay", "dead-letters", "check", str(project.toml))
    assert again.returncode == 0, again.stderr
    assert "10 failed again" in again.stderr
    assert len(read(project.root / "dead-letters" / "check.msgpack").records) == 10

    (project.root / "fixed").touch()
    replayed = project.run("replay", "dead-letters", "check", str(project.toml))
    assert replayed.returncode == 0, replayed.stderr
    assert "replay of 10 dead letter(s) of stage 'check': ok" in replayed.stderr
    # In the order they were recorded: per replica in input order.
    assert sorted(int(x) for x in project.lines("out.txt")) == [x + 1000 for x in bad]
    assert not list((project.root / "dead-letters").iterdir())  # moved aside, then removed

    none_left = project.run("replay", "dead-letters", "check", str(project.toml))
    assert none_left.returncode == 2 and "no dead letters of stage 'check'" in none_left.stderr


def test_replay_keeps_the_letters_when_it_fails(project) -> None:
    project.pipeline(PIPELINE.format(count=6, replicas=1).replace(
        'run = "stages:plus"', 'run = "stages:plus"\nparams = { }'), STAGES)
    assert project.launch().returncode == 0
    # Break the next stage: the replay fails there, and keeps what it replayed.
    project.write("stages.py", STAGES.replace("return x + 1000", "raise RuntimeError('down')"))
    (project.root / "fixed").touch()
    failed = project.run("replay", "dead-letters", "check", str(project.toml))
    assert failed.returncode == 1, failed.stderr
    assert "stage 'plus' replica plus-0 failed" in failed.stderr
    kept = [p for p in (project.root / "dead-letters").iterdir() if ".replaying-" in p.name]
    assert len(kept) == 1 and kept[0].name in failed.stderr
    assert [r["item"] for r in read(kept[0]).records] == [0, 3]
    listed = project.run("dead-letters", "dead-letters")
    assert "moved aside by a replay" in listed.stderr


def test_replay_refuses_what_it_cannot_replay_with_exit_2(project) -> None:
    project.pipeline(PIPELINE.format(count=6, replicas=1), STAGES)
    folder = project.root / "dead-letters"
    cases = {"no such folder": ("nowhere", "check"),
             "no stage named 'nope'": ("dead-letters", "nope"),
             "is the first stage": ("dead-letters", "source"),
             "no dead letters of stage 'plus'": ("dead-letters", "plus")}
    folder.mkdir()
    for expected, (where, stage) in cases.items():
        result = project.run("replay", where, stage, str(project.toml))
        assert result.returncode == 2 and expected in result.stderr, (expected, result.stderr)
        assert result.stderr.startswith("zpipe: error: ")
    (folder / "check.msgpack").write_bytes(b"\xc1 not msgpack")
    bad = project.run("replay", "dead-letters", "check", str(project.toml))
    assert bad.returncode == 2 and "not a dead letter at byte 0" in bad.stderr
    assert (folder / "check.msgpack").exists()  # nothing moved
    listed = project.run("dead-letters", "nowhere")
    assert listed.returncode == 2 and "no such folder" in listed.stderr
    (folder / "check.msgpack").unlink()
    empty = project.run("dead-letters", "dead-letters")
    assert empty.returncode == 0 and "no dead letters" in empty.stdout


def test_items_with_arrays_are_dead_lettered_and_replayed_intact(project) -> None:
    project.pipeline("""
        [pipeline]
        name = "arrays"
        dead_letters = "letters"

        [[stages]]
        name = "source"
        run = "stages:arrays"
        params = { count = 12 }

        [[stages]]
        name = "check"
        run = "stages:check_array"
        on_error = "dead-letter"

        [[stages]]
        name = "sink"
        run = "stages:record"
        params = { path = "out.txt" }
        """, STAGES)
    assert project.launch().returncode == 0
    records = read(project.root / "letters" / "check.msgpack").records
    assert [r["item"]["i"] for r in records] == [1, 5, 9]
    assert all(r["exc_type"] == "KeyError" and r["replica"] == 0 for r in records)
    assert np.array_equal(records[1]["item"]["a"], np.full((3, 4), 5, dtype=np.float32))
    (project.root / "fixed").touch()
    replayed = project.run("replay", "letters", "check", str(project.toml))
    assert replayed.returncode == 0, replayed.stderr
    assert [json.loads(line) for line in project.lines("out.txt")] == \
        [{"i": i, "sum": 12 * i} for i in (1, 5, 9)]


@pytest.mark.parametrize("show", ["0", "5"])
def test_dead_letters_lists_counts_per_stage_and_exception_type(tmp_path: Path, project,
                                                                 show: str) -> None:
    folder = tmp_path / "letters"
    for i in range(3):
        append(folder / "a.msgpack", make_record(i, "a", 0, FAILED))
    append(folder / "a.msgpack", make_record("x" * 500, "a", 1,
                                            {**FAILED, "exc_type": "KeyError",
                                             "message": "line one\nline two"}))
    append(folder / "b.msgpack", make_record({"k": np.zeros((100, 100))}, "b", 2, FAILED))
    listed = project.run("dead-letters", str(folder), "--show", show)
    assert listed.returncode == 0, listed.stderr
    out = listed.stdout
    assert f"a: 4 item(s) in {folder / 'a.msgpack'}" in out
    assert "     3  ValueError" in out and "     1  KeyError" in out
    assert "b: 1 item(s)" in out and "5 dead letter(s) of 2 stage(s)" in out
    if show == "0":
        assert "item:" not in out
    else:
        assert "a-1 at " in out and "KeyError: line one line two" in out
        assert "b-2 at " in out and "array(shape=(100, 100), dtype=float64)" in out
        longest = max(len(line) for line in out.splitlines())
        assert longest < 300  # items are cut short
