"""Unit tests of zpipe.wire.protocol: control messages between supervisor and replicas."""

from __future__ import annotations

import json

import msgpack
import pytest

from zpipe.wire import protocol
from zpipe.wire.codec import PROTOCOL_VERSION

KINDS = [protocol.HELLO, protocol.READY, protocol.RECEIVED, protocol.ERROR, protocol.DONE,
         protocol.HEARTBEAT, protocol.START, protocol.DRAIN, protocol.STOP, protocol.EXIT,
         protocol.ABORT, protocol.PING]


def test_kinds_are_distinct_strings():
    assert all(isinstance(kind, str) for kind in KINDS)
    assert len(set(KINDS)) == len(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_roundtrip_without_fields(kind):
    data = protocol.pack(kind)
    assert isinstance(data, bytes)
    assert protocol.unpack(data) == (kind, {})


def test_roundtrip_with_fields():
    fields = {"pid": 1234, "host": "node-1", "version": "0.1.0", "received": 2**40,
              "sent": 0, "traceback": "Traceback (most recent call last):\n  ...\nValueError: ü",
              "item_type": None, "phase": "run", "ok": True, "ratio": 0.5, "raw": b"\x00\xff",
              "nested": {"a": [1, 2]}}
    kind, got = protocol.unpack(protocol.pack(protocol.ERROR, **fields))
    assert kind == protocol.ERROR
    assert got == fields


def test_wire_format_is_version_kind_fields():
    data = protocol.pack(protocol.DONE, received=3, sent=2)
    assert msgpack.unpackb(data) == [PROTOCOL_VERSION, "done", {"received": 3, "sent": 2}]


@pytest.mark.parametrize("version", [0, PROTOCOL_VERSION + 1, "1", None])
def test_version_mismatch(version):
    data = msgpack.packb([version, protocol.READY, {}])
    with pytest.raises(ValueError, match="version"):
        protocol.unpack(data)


@pytest.mark.parametrize("data", [
    b"", b"\xc1", b"garbage \xff\xfe", b"\x93\x01",
    msgpack.packb(5), msgpack.packb("ready"), msgpack.packb([PROTOCOL_VERSION, "ready"]),
    msgpack.packb([PROTOCOL_VERSION, "ready", {}, "extra"]),
    msgpack.packb([PROTOCOL_VERSION, 3, {}]),
    msgpack.packb([PROTOCOL_VERSION, "ready", [1, 2]]),
    msgpack.packb({"version": PROTOCOL_VERSION}),
    msgpack.packb([PROTOCOL_VERSION, "ready", {}]) + b"trailing",
])
def test_garbage_raises_value_error(data):
    with pytest.raises(ValueError, match="control message"):
        protocol.unpack(data)


def test_a_peer_of_another_version_is_a_clear_error(tmp_path):
    """A replica speaking protocol 2 fails the pipeline, naming the versions."""
    import msgpack
    import zmq

    from zpipe.config import PipelineSpec, StageSpec
    from zpipe.supervision.supervisor import Supervisor
    from zpipe.wire import codec as wire

    class NoProcesses:
        def exited(self):
            return {}

        def terminate(self, names):
            pass

        def kill(self, names):
            pass

        def pid(self, name):
            return None

    spec = PipelineSpec(name="p", stages=(StageSpec(name="src", run="m:f"),), grace=1)
    address = f"ipc://{tmp_path}/control"
    reports: list[str] = []
    ctx = zmq.Context()
    supervisor = Supervisor(spec, address, NoProcesses(), reports.append, ctx=ctx)
    peer = ctx.socket(zmq.DEALER)
    peer.setsockopt(zmq.IDENTITY, b"src-0")
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect(address)
    peer.send(msgpack.packb([wire.PROTOCOL_VERSION + 1, "hello", {}]))
    for _ in range(50):
        supervisor._tick()
        if supervisor.failures:
            break
    peer.close()
    supervisor.close()
    ctx.term()
    assert supervisor.failures
    assert f"protocol version {wire.PROTOCOL_VERSION + 1}" in supervisor.failures[0].message
    assert f"this zpipe speaks {wire.PROTOCOL_VERSION}" in supervisor.failures[0].message


def _port_pairs(count: int) -> list[int]:
    """``count`` ports p, each with p + 1 free as well (replica i listens on p + i)."""
    from test_launcher import free_ports, port_is_free

    found: list[int] = []
    while len(found) < count:
        port = free_ports(1)[0]
        if port < 65535 and port_is_free(port + 1) and not {port, port + 1} & {
                p + k for p in found for k in (0, 1)}:
            found.append(port)
    return found


@pytest.mark.parametrize("replicas", [1, 2], ids=["push-pull", "credits"])
def test_a_stage_written_with_only_pyzmq_and_msgpack_joins_a_pipeline(project, replicas):
    """docs/protocol.md is enough to write a stage in any language: with one replica
    per stage (PUSH/PULL), and with two, where the foreign stage takes credits
    from zpipe's source and gives them to zpipe's sink."""
    import subprocess
    import sys
    from pathlib import Path

    from test_launcher import toml

    control, relay, sink = _port_pairs(3)
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 3000 }',
        f'name = "foreign"\nrun = "stages:unused"\nreplicas = {replicas}\n'
        f'address = "tcp://127.0.0.1:{relay}"',
        f'name = "sink"\nrun = "stages:record"\nreplicas = {replicas}\n'
        f'address = "tcp://127.0.0.1:{sink}"',
        extra=f'control = "tcp://127.0.0.1:{control}"'),
        "import json, os\nfrom typing import Iterable\n"
        "def numbers(count):\n    yield from range(count)\n"
        "def unused(x):\n    return x\n"
        "def record(items: Iterable):\n"
        "    with open(f'out-{os.getpid()}.txt', 'w') as f:\n"
        "        f.write(json.dumps(list(items)))\n")
    zpipe_cmd = [sys.executable, "-m", "zpipe"]
    procs = [subprocess.Popen([*zpipe_cmd, "supervise", str(project.toml)], cwd=project.root,
                              stderr=subprocess.PIPE, text=True)]
    procs += [subprocess.Popen([*zpipe_cmd, "stage", str(project.toml), "source"],
                               cwd=project.root)]
    procs += [subprocess.Popen([*zpipe_cmd, "stage", str(project.toml), "sink", "--replica",
                                str(r)], cwd=project.root) for r in range(replicas)]
    sinks = ",".join(f"tcp://127.0.0.1:{sink + r}" for r in range(replicas))
    procs += [subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("foreign_stage.py")),
         f"tcp://127.0.0.1:{control}", f"tcp://127.0.0.1:{relay + r}", sinks, f"foreign-{r}",
         str(replicas)], cwd=project.root) for r in range(replicas)]
    try:
        _, err = procs[0].communicate(timeout=60)
        codes = [p.wait(30) for p in procs[1:]]
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == 0, err
    assert codes == [0] * (1 + 2 * replicas), err
    import json
    outputs = [json.loads(path.read_text()) for path in project.root.glob("out-*.txt")]
    assert len(outputs) == replicas and all(outputs)  # every replica had a share
    assert sorted(x for out in outputs for x in out) == [10 * x for x in range(3000)]
    assert "stage 'foreign' finished: 3000 in, 3000 out" in err


def test_malformed_messages_are_counted_logged_and_dropped(project):
    """A stranger's garbage on a stage's port neither crashes it nor corrupts a count."""
    import json
    import subprocess
    import sys

    import zmq
    from test_launcher import free_ports, toml

    control, relay = free_ports(2)
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 500 }',
        f'name = "relay"\nrun = "stages:relay"\naddress = "tcp://127.0.0.1:{relay}"',
        'name = "sink"\nrun = "stages:record"'),
        "import json, os, time\nfrom typing import Iterable\n"
        "def numbers(count):\n"
        "    while not os.path.exists('garbage-sent'):\n"
        "        time.sleep(0.01)\n"
        "    yield from range(count)\n"
        "def relay(x):\n    return x\n"
        "def record(items: Iterable):\n"
        "    with open('out.txt', 'w') as f:\n"
        "        f.write(json.dumps(list(items)))\n")
    launcher = subprocess.Popen([sys.executable, "-m", "zpipe", "launch", str(project.toml)],
                                cwd=project.root, stderr=subprocess.PIPE, text=True)
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.PUSH)
    rogue.setsockopt(zmq.LINGER, 30000)
    try:
        rogue.connect(f"tcp://127.0.0.1:{relay}")
        # (version 0, which no zpipe speaks: [0, []])
        for junk in ([b"\xc1garbage"], [b"\x92\x00\x90"], [b"\x92\x01\x91\xc7\x05\x01abcde"],
                     [b"not msgpack", b"extra frame"]):
            rogue.send_multipart(junk)
        rogue.close()
        ctx.term()  # returns once the garbage is delivered (the relay may still be starting)
        (project.root / "garbage-sent").touch()
        _, err = launcher.communicate(timeout=60)
    finally:
        launcher.kill()
    assert launcher.returncode == 0, err
    assert json.loads(project.read("out.txt")) == list(range(500))
    assert "stage 'relay' dropped a malformed message (4 so far)" in err
    assert "stage 'relay' finished: 500 in, 500 out" in err


SECURE_STAGES = """
import json
from typing import Iterable

def numbers(count):
    yield from range(count)

def relay(x):
    return x

def record(items: Iterable):
    with open('out.txt', 'w') as f:
        f.write(json.dumps(list(items)))
"""


def secure_pipeline(project, count: int, replicas: int = 1) -> tuple[int, int]:
    import subprocess
    import sys

    from test_launcher import toml

    control, relay = _port_pairs(2)
    keys = subprocess.run([sys.executable, "-m", "zpipe", "keys", str(project.root / "keys")],
                          capture_output=True, text=True, timeout=60)
    assert keys.returncode == 0 and "client.key_secret" in keys.stdout
    project.pipeline(toml(
        f'name = "source"\nrun = "stages:numbers"\nparams = {{ count = {count} }}',
        f'name = "relay"\nrun = "stages:relay"\naddress = "tcp://127.0.0.1:{relay}"\n'
        f'replicas = {replicas}',
        'name = "sink"\nrun = "stages:record"',
        extra=f'control = "tcp://127.0.0.1:{control}"\nkeys = "keys"'), SECURE_STAGES)
    return control, relay


@pytest.mark.parametrize("replicas", [1, 2], ids=["push-pull", "credits"])
def test_curve_keys_encrypt_and_keep_strangers_out(project, replicas):
    """With keys, a peer without them (or with others) can neither inject nor connect,
    whether the relay's input is a PULL (one replica) or a ROUTER (two)."""
    import json
    import subprocess
    import sys
    import time

    import zmq
    import zmq.auth

    _, relay = secure_pipeline(project, 300, replicas)
    ctx = zmq.Context()
    strangers = []
    # One stranger with no keys at all, one with a key pair of its own, each
    # of a type the input would talk to.
    kind = zmq.PUSH if replicas == 1 else zmq.DEALER
    plain = ctx.socket(kind)
    strangers.append(plain)
    forged = ctx.socket(kind)
    public, secret = zmq.auth.create_certificates(project.root, "stranger")
    forged.curve_publickey, forged.curve_secretkey = zmq.auth.load_certificate(secret)
    forged.curve_serverkey = zmq.auth.load_certificate(project.root / "keys" / "server.key")[0]
    strangers.append(forged)
    launcher = subprocess.Popen([sys.executable, "-m", "zpipe", "launch", str(project.toml)],
                                cwd=project.root, stderr=subprocess.PIPE, text=True)
    try:
        for sock in strangers:
            sock.setsockopt(zmq.LINGER, 0)
            for replica in range(replicas):
                sock.connect(f"tcp://127.0.0.1:{relay + replica}")
        injected = msgpack.packb([PROTOCOL_VERSION, ["injected"]])  # a well-formed message
        sent = 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and launcher.poll() is None:
            for sock in strangers:
                try:
                    sock.send(injected, zmq.NOBLOCK)
                    sent += 1
                except zmq.Again:
                    pass  # no handshake, no pipe: nothing can go through
            time.sleep(0.01)
        _, err = launcher.communicate(timeout=60)
    finally:
        launcher.kill()
        for sock in strangers:
            sock.close()
        ctx.term()
    assert launcher.returncode == 0, err
    assert sorted(json.loads(project.read("out.txt"))) == list(range(300))  # replicas reorder
    assert "stage 'relay' finished: 300 in, 300 out" in err
    assert "malformed" not in err


def test_curve_keys_missing_is_a_clear_error(project):
    secure_pipeline(project, 1)
    (project.root / "keys" / "client.key_secret").unlink()
    result = project.run("validate", str(project.toml))
    assert result.returncode == 2
    assert "field 'keys'" in result.stderr and "lacks client.key_secret" in result.stderr


class Wiretap:
    """A TCP forwarder that keeps every byte it passes on: what an eavesdropper sees."""

    def __init__(self, listen: int, target: int):
        import socket
        import threading
        self.seen = bytearray()
        self.server = socket.create_server(("127.0.0.1", listen))
        self.target = target
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import socket
        import threading
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = None
            for _ in range(200):  # the real peer may not be listening yet
                try:
                    upstream = socket.create_connection(("127.0.0.1", self.target))
                    break
                except OSError:
                    threading.Event().wait(0.05)
            if upstream is None:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source, sink) -> None:
        try:
            while data := source.recv(65536):
                self.seen += data
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.server.close()


@pytest.mark.parametrize("with_keys", [True, False])
def test_an_eavesdropper_reads_nothing_when_links_have_keys(project, with_keys):
    """Items cross a wiretapped link: in clear without keys, unreadable with them."""
    import json
    import os
    import subprocess
    import sys

    from test_launcher import free_ports, toml

    control, real, tapped = free_ports(3)
    if with_keys:
        subprocess.run([sys.executable, "-m", "zpipe", "keys", str(project.root / "keys")],
                       check=True, capture_output=True, timeout=60)
    project.pipeline(toml(
        'name = "source"\nrun = "stages:secrets"\nparams = { count = 50 }',
        f'name = "sink"\nrun = "stages:record"\naddress = "tcp://127.0.0.1:{real}"',
        extra=f'control = "tcp://127.0.0.1:{control}"' + ('\nkeys = "keys"' if with_keys else "")),
        SECURE_STAGES + "\ndef secrets(count):\n"
                        "    for i in range(count):\n"
                        "        yield f'TOP-SECRET-{i}'\n")
    tap = Wiretap(tapped, real)
    zpipe_cmd = [sys.executable, "-m", "zpipe"]
    # The source reaches the sink through the tap; the sink binds the real port.
    via_tap = {**os.environ, "ZPIPE_ADDRESS_SINK": f"tcp://127.0.0.1:{tapped}"}
    procs = [subprocess.Popen([*zpipe_cmd, "supervise", str(project.toml)], cwd=project.root,
                              stderr=subprocess.PIPE, text=True),
             subprocess.Popen([*zpipe_cmd, "stage", str(project.toml), "source"],
                              cwd=project.root, env=via_tap),
             subprocess.Popen([*zpipe_cmd, "stage", str(project.toml), "sink"], cwd=project.root)]
    try:
        _, err = procs[0].communicate(timeout=60)
        for p in procs[1:]:
            p.wait(30)
    finally:
        for p in procs:
            p.kill()
        tap.close()
    assert procs[0].returncode == 0, err
    assert json.loads(project.read("out.txt")) == [f"TOP-SECRET-{i}" for i in range(50)]
    assert len(tap.seen) > 0
    assert (b"TOP-SECRET" in tap.seen) is (not with_keys)


# -- what does not belong on a link is dropped, and never counted ----------------------------

def _acceptable(link: str, frames: list[bytes]) -> bool:
    """Whether a message may be a valid data message on ``link``: "plain" (untagged),
    "into-ordered" (every tag [seq, LAST]) or "after-ordered" (tagged: whether it is
    valid depends on what came before, so any tagged one may be)."""
    from zpipe.wire import codec

    try:
        _, tags = codec.decode_tagged(frames)
    except Exception:  # noqa: BLE001 - whatever fails to decode is garbage
        return False
    if link == "plain":
        return tags is None
    if link == "into-ordered":
        return tags is not None and all(tag[1] == codec.TAG_LAST for tag in tags)
    return tags is not None


def malformed_for(link: str, count: int, seed: int) -> list[list[bytes]]:
    """``count`` messages that are no valid data message on ``link``: the table of
    test_codec, valid messages of the other kinds of link, then seeded random ones."""
    from test_codec import MALFORMED, Wrong

    from zpipe.wire import codec

    candidates = [frames for _, frames in MALFORMED]
    candidates += [codec.encode(["plain"]), codec.encode(["tagged"], [[0, codec.TAG_LAST]]),
                   codec.encode(["unfinished"], [[0, 0]]),
                   codec.encode([None], [[0, codec.TAG_LAST | codec.TAG_MARKER]])]
    chosen = [frames for frames in candidates if not _acceptable(link, frames)]
    wrong = Wrong(seed)
    while len(chosen) < count:
        frames = wrong.message()
        if not _acceptable(link, frames):
            chosen.append(frames)
    return chosen[:count]


def _inbox(ctx, name: str):
    import zmq

    from zpipe.replica.control import Control
    from zpipe.replica.inbox import Inbox

    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.bind(f"inproc://{name}")
    push.connect(f"inproc://{name}")
    control = ctx.socket(zmq.DEALER)
    control.connect("inproc://nobody")
    return push, Inbox(pull, Control(control), name, 10)


def _take_all(push, inbox, messages) -> list:
    """Send every message, then take every item (with its number, on a numbered link)."""
    for frames in messages:
        push.send_multipart(frames)
    inbox.control.stopped = True  # the input ends once it is empty
    return [(item, inbox.seq) for item in inbox]


def test_a_plain_link_drops_tagged_and_malformed_messages():
    import zmq

    from zpipe.wire import codec

    garbage = malformed_for("plain", 300, seed=11)
    ctx = zmq.Context()
    try:
        push, inbox = _inbox(ctx, "plain")
        messages = [codec.encode([0, 1]), *garbage[:150], codec.encode([2]), *garbage[150:],
                    codec.encode([{"three": 3}])]
        assert [item for item, _ in _take_all(push, inbox, messages)] == [0, 1, 2, {"three": 3}]
        assert (inbox.received, inbox.malformed) == (4, 300)
    finally:
        ctx.destroy(linger=0)


def test_the_input_of_an_ordered_stage_takes_only_numbered_inputs():
    import zmq

    from zpipe.replica.outbox import Outbox
    from zpipe.wire import codec

    last = codec.TAG_LAST
    ctx = zmq.Context()
    try:
        push, inbox = _inbox(ctx, "into-ordered")
        outbox = Outbox(None, inbox.control, source=False, ordered_by=inbox)  # the stage's own
        assert inbox.numbered
        garbage = malformed_for("into-ordered", 200, seed=12)
        messages = [codec.encode(["a"], [[0, last]]), codec.encode(["untagged"]), *garbage,
                    codec.encode(["not last"], [[1, 0]]),
                    codec.encode([None], [[1, last | codec.TAG_MARKER]]),
                    codec.encode(["b", "c"], [[1, last], [2, last]])]
        assert _take_all(push, inbox, messages) == [("a", 0), ("b", 1), ("c", 2)]
        assert (inbox.received, inbox.malformed) == (3, 203)
        outbox.close()
    finally:
        ctx.destroy(linger=0)


def test_the_input_after_an_ordered_stage_takes_only_what_fits_its_order():
    import zmq

    from zpipe.replica.inbox import Reorder
    from zpipe.wire import codec

    last, marker = codec.TAG_LAST, codec.TAG_MARKER
    ctx = zmq.Context()
    try:
        push, inbox = _inbox(ctx, "after-ordered")
        inbox.reorder = Reorder()
        garbage = malformed_for("after-ordered", 200, seed=13)
        messages = [codec.encode(["c"], [[2, last]]),            # input 2 is complete
                    codec.encode(["late"], [[2, 0]]),             # ... so nothing more for it
                    codec.encode(["untagged"]),
                    *garbage,
                    codec.encode(["a", "twice"], [[0, last], [0, last]]),
                    codec.encode(["a", "b"], [[0, 0], [0, last]]),  # input 0, released
                    codec.encode(["again"], [[0, last]]),           # ... so nothing more for it
                    codec.encode([None], [[1, last | marker]])]     # input 1 had no output
        assert [item for item, _ in _take_all(push, inbox, messages)] == ["a", "b", "c"]
        assert inbox.received == 4 and inbox.reorder.markers == 1
        assert inbox.malformed == 204
    finally:
        ctx.destroy(linger=0)


# -- end to end: a stranger floods a running pipeline with garbage ---------------------------

FLOWING_STAGES = """
import json, os, time
from typing import Iterable

def numbers(count):
    deadline = time.monotonic() + 120
    for i in range(count):
        if i == 100:
            open('flowing', 'w').close()
        if i >= 100 and not os.path.exists('garbage-taken'):
            time.sleep(0.002)  # pacing: items keep flowing while the stranger sends
        yield i
    while not os.path.exists('garbage-taken'):  # the end waits for the stranger's last
        if time.monotonic() > deadline:
            raise TimeoutError('the garbage was never all taken')
        time.sleep(0.01)

def relay(x):
    return x

def tenfold(x):
    return 10 * x

def record(items: Iterable):
    with open('out.json', 'w') as f:
        json.dump(list(items), f)
"""


def _dropped(stderr: str) -> dict[str, int]:
    """Replica name -> the latest count of its "dropped a malformed message" lines."""
    import re

    counts: dict[str, int] = {}
    for name, count in re.findall(r"(?m)^(\S+)\s+\|.* dropped a malformed message \((\d+) so "
                                  r"far\)", stderr):
        counts[name] = max(counts.get(name, 0), int(count))
    return counts


def _flood(project, targets: list[tuple[int, str, list[list[bytes]], str]]) -> str:
    """Run the pipeline; once items flow, send each target (port, socket type,
    messages, the replica listening there) its garbage, wait until every replica
    has dropped all it was sent, let the source end, and return the launcher's
    stderr once it exited 0."""
    import os
    import signal

    import zmq
    from conftest import wait_until

    launched = project.start()
    ctx = zmq.Context()
    try:
        wait_until(lambda: (project.root / "flowing").exists() or launched.proc.poll() is not None,
                   60, what="the first items")
        assert launched.proc.poll() is None, launched.stderr
        strangers = []  # open until all is taken (a closed socket drops what it holds)
        for port, kind, messages, _ in targets:
            stranger = ctx.socket(getattr(zmq, kind))
            strangers.append(stranger)
            stranger.setsockopt(zmq.LINGER, 0)
            stranger.setsockopt(zmq.SNDTIMEO, 20_000)
            stranger.connect(f"tcp://127.0.0.1:{port}")
            for frames in messages:
                stranger.send_multipart(frames)
        wanted = {name: len(messages) for _, _, messages, name in targets}
        try:
            wait_until(lambda: _dropped(launched.stderr) == wanted or
                       launched.proc.poll() is not None, 90, what=f"{wanted} dropped")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; dropped {_dropped(launched.stderr)}:\n"
                                 f"{launched.stderr[-3000:]}") from None
        (project.root / "garbage-taken").touch()
        code, err = launched.finish(60)
    finally:
        if launched.proc.poll() is None:  # a failure above: the launcher and its stages
            os.killpg(launched.pid, signal.SIGKILL)
        launched.kill()
        ctx.destroy(linger=0)
    assert code == 0, err[-5000:]
    assert _dropped(err) == wanted, err[-5000:]
    return err


def test_a_stranger_flooding_a_relay_with_garbage_changes_nothing(project):
    """Thousands of messages that are not zpipe messages (wrong tags and types, unknown
    ext types, bad arrays, shapes claiming gigabytes) sent to a relay's tcp port while
    the real items flow: the run ends well, every item arrives once, the relay says
    how many it dropped."""
    from test_launcher import free_ports, toml

    (relay,) = free_ports(1)
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 3000 }',
        f'name = "relay"\nrun = "stages:relay"\naddress = "tcp://127.0.0.1:{relay}"',
        'name = "sink"\nrun = "stages:record"'), FLOWING_STAGES)
    garbage = malformed_for("plain", 3000, seed=1)
    err = _flood(project, [(relay, "PUSH", garbage, "relay-0")])
    assert json.loads(project.read("out.json")) == list(range(3000))
    assert "stage 'relay' finished: 3000 in, 3000 out" in err
    # The first few say why, then a line per thousand or when the input falls idle:
    # 3000 bad messages are not 3000 lines.
    assert 5 < err.count("dropped a malformed message") < 200, err[-3000:]


def test_a_stranger_flooding_an_ordered_stage_and_its_sink_changes_nothing(project):
    """The same on numbered links: into the replicas of an ``ordered`` stage (ROUTER
    inputs) and into the stage after it, which puts the outputs back in order."""
    from test_launcher import toml

    work, sink = _port_pairs(2)
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 3000 }',
        f'name = "work"\nrun = "stages:tenfold"\nreplicas = 2\nordered = true\n'
        f'address = "tcp://127.0.0.1:{work}"',
        f'name = "sink"\nrun = "stages:record"\naddress = "tcp://127.0.0.1:{sink}"'),
        FLOWING_STAGES)
    err = _flood(project, [
        (work, "DEALER", malformed_for("into-ordered", 1000, seed=2), "work-0"),
        (work + 1, "DEALER", malformed_for("into-ordered", 1200, seed=3), "work-1"),
        # The sink's input is a ROUTER too: its link is leased (delivery.py).
        (sink, "DEALER", malformed_for("after-ordered", 1400, seed=4), "sink-0")])
    assert json.loads(project.read("out.json")) == [10 * i for i in range(3000)]
    assert "stage 'work' finished: 3000 in, 3000 out" in err
