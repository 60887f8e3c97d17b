"""Sockets: finite LINGER everywhere, HWMs applied, connection wait with a way out."""

from __future__ import annotations

import socket

import pytest
import zmq

from zpipe.wire import transport


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.term()  # hangs if any socket were left with an infinite LINGER


def nothing() -> None:
    pass


def test_every_socket_has_a_finite_linger_and_the_hwm(ctx, tmp_path):
    pull = transport.pull(ctx, f"ipc://{tmp_path}/in", hwm=7)
    push = transport.push(ctx, (f"ipc://{tmp_path}/in",), 7, nothing, timeout=10)
    router = transport.router(ctx, f"ipc://{tmp_path}/ctl")
    dealer = transport.dealer(ctx, f"ipc://{tmp_path}/ctl", "stage-0")
    try:
        for sock in (pull, push, router, dealer):
            assert 0 <= sock.getsockopt(zmq.LINGER) <= transport.LINGER_MS
        assert pull.getsockopt(zmq.RCVHWM) == 7 and push.getsockopt(zmq.SNDHWM) == 7
        assert dealer.getsockopt(zmq.IDENTITY) == b"stage-0"
    finally:
        for sock in (pull, push, router, dealer):
            sock.close()


def test_push_blocks_when_the_link_is_full_instead_of_dropping(ctx, tmp_path):
    pull = transport.pull(ctx, f"ipc://{tmp_path}/in", hwm=2)
    push = transport.push(ctx, (f"ipc://{tmp_path}/in",), 2, nothing, timeout=10)
    try:
        sent = 0
        while True:
            try:
                push.send(b"x" * 100000, zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                break
            assert sent < 1000, "HWM not applied"
        received = 0
        while received < sent and pull.poll(5000):
            pull.recv()
            received += 1
        assert received == sent
    finally:
        pull.close()
        push.close()


def test_bind_failure_names_the_address(ctx):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    first = transport.pull(ctx, address, hwm=1)
    try:
        with pytest.raises(OSError, match=f"cannot bind {address}: Address already in use"):
            transport.pull(ctx, address, hwm=1)
    finally:
        first.close()


def test_push_waits_for_every_peer_and_has_a_way_out(ctx, tmp_path):
    pulls = [transport.pull(ctx, f"ipc://{tmp_path}/in{i}", hwm=1) for i in range(3)]
    try:
        push = transport.push(ctx, tuple(f"ipc://{tmp_path}/in{i}" for i in range(3)), 1,
                              nothing, timeout=10)
        push.close()
        missing = (f"ipc://{tmp_path}/in0", f"ipc://{tmp_path}/nobody")
        with pytest.raises(TimeoutError, match="connected to 1 of 2"):
            transport.push(ctx, missing, 1, nothing, timeout=0.5)

        class GiveUp(Exception):
            pass

        def give_up():
            raise GiveUp
        with pytest.raises(GiveUp):
            transport.push(ctx, missing, 1, give_up, timeout=10)
    finally:
        for sock in pulls:
            sock.close()


def test_messages_of_several_frames_go_and_come_whole(ctx):
    """send_frames, recv_rest and recv_message: the backend's calls under pyzmq's
    multipart ones (leased links, arrays): every frame, in order, large ones
    unchanged without a copy, small ones copied; nothing waiting raises Again."""
    sender, receiver = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    receiver.bind("inproc://frames")
    sender.connect("inproc://frames")
    large = bytearray(b"y" * (zmq.COPY_THRESHOLD * 2))
    try:
        with pytest.raises(zmq.Again):
            transport.recv_message(receiver, transport.NOBLOCK)
        transport.send_frames(sender, [b"id", b"lease", bytes(large)], transport.NOBLOCK)
        transport.send_frames(sender, [b"alone"])
        transport.send_frames(sender, [b"a", memoryview(large), b"z"])
        head = receiver.recv(copy=False)
        frames = transport.recv_rest(receiver, head)
        assert [f.bytes for f in frames] == [b"id", b"lease", bytes(large)]
        assert transport.recv_message(receiver) == [b"alone"]
        assert transport.recv_message(receiver) == [b"a", bytes(large), b"z"]
        with pytest.raises(zmq.Again):  # the next message's frames were not taken early
            transport.recv_message(receiver, transport.NOBLOCK)
    finally:
        sender.close(0)
        receiver.close(0)
