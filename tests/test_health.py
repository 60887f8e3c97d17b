"""The health endpoints, asked over real HTTP as a container engine's probe would."""

from __future__ import annotations

import http.client
import time

import pytest

from zpipe.watch.health import Health


def ask(port: int, path: str, method: str = "GET") -> tuple[int, str, dict[str, str]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.read().decode(), dict(response.getheaders())
    finally:
        connection.close()


@pytest.fixture
def health():
    h = Health()
    h.port = h.start(0, "127.0.0.1")
    yield h
    h.close()


def test_readiness_follows_ready(health):
    status, body, headers = ask(health.port, "/readyz")
    assert status == 503 and "starting" in body
    health.ready(True)
    status, body, headers = ask(health.port, "/readyz")
    assert (status, body) == (200, "ready\n")
    assert headers["Content-Type"].startswith("text/plain")
    assert headers["Content-Length"] == str(len(body))
    health.ready(False, "draining")
    status, body, _ = ask(health.port, "/readyz")
    assert status == 503 and "draining" in body


def test_liveness_follows_beats(health):
    # Before any beat the process is starting: alive, not to be killed.
    assert ask(health.port, "/livez")[:2] == (200, "ok\n")
    health.beat()
    assert ask(health.port, "/livez")[:2] == (200, "ok\n")
    health.stale_after = 0.5
    health.last_beat = time.monotonic() - 30  # a beat long ago, without waiting for it
    status, body, _ = ask(health.port, "/livez")
    assert status == 503 and "30" in body
    health.beat()
    assert ask(health.port, "/livez")[0] == 200


def test_head_and_unknown_paths(health):
    health.ready(True)
    status, body, headers = ask(health.port, "/readyz", "HEAD")
    assert (status, body) == (200, "") and headers["Content-Length"] == str(len("ready\n"))
    assert ask(health.port, "/livez?verbose=1")[0] == 200  # a query string is ignored
    assert ask(health.port, "/")[0] == 404
    assert ask(health.port, "/metrics")[0] == 404


def test_close_frees_the_port():
    first = Health()
    port = first.start(0, "127.0.0.1")
    assert ask(port, "/livez")[0] == 200
    first.close()
    first.close()  # twice is harmless
    with pytest.raises(ConnectionRefusedError):
        ask(port, "/livez")
    second = Health()
    try:
        assert second.start(port, "127.0.0.1") == port
        assert ask(port, "/livez")[0] == 200
    finally:
        second.close()
