"""httpd.py: the servers behind /metrics and the health endpoints."""

from __future__ import annotations

import socket
import urllib.request
from http.server import BaseHTTPRequestHandler

import pytest

from zpipe.watch.httpd import serve


class Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        data = self.server.greeting.encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_busy_port_says_what_and_where():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot serve metrics at 127.0.0.1:{port}"):
            serve(Hello, "127.0.0.1", port, "metrics")


def test_it_serves_its_attributes_and_stops_at_once_freeing_the_port():
    served = serve(Hello, "127.0.0.1", 0, "greetings", greeting="hello")
    port = served.port
    assert urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read() == b"hello"
    served.close()
    served.close()  # twice: nothing
    again = serve(Hello, "127.0.0.1", port, "greetings", greeting="again")
    try:
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read() == b"again"
    finally:
        again.close()


def test_starting_asks_the_resolver_nothing(monkeypatch):
    # http.server's own bind looks up the host's full name: with a DNS server that
    # does not answer, that held every replica's start for seconds.
    asked = []
    for name in ("gethostbyaddr", "getfqdn", "gethostbyname"):
        monkeypatch.setattr(socket, name, lambda *args, name=name: asked.append(name))
    served = serve(Hello, "0.0.0.0", 0, "greetings", greeting="hi")
    try:
        assert urllib.request.urlopen(f"http://127.0.0.1:{served.port}/", timeout=5).read() == b"hi"
    finally:
        served.close()
    assert asked == []
