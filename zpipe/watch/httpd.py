"""A small HTTP server in a thread of its own, for /metrics and the health endpoints.

One way to start one (with an error that names what and where) and to stop
one: stopping waits at most POLL seconds, so a replica or a launcher that
serves one still exits at once.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

POLL = 0.05  # seconds serve_forever waits between looks at whether to stop


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer's own asks the resolver for this host's full name, which
        # nothing here uses: where the host's name is not in /etc/hosts and
        # the DNS server does not answer, that held a replica's start for 6 s.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class Served:
    """A running server: ``port``, and ``close()`` (safe to call twice)."""

    def __init__(self, server: ThreadingHTTPServer, thread: threading.Thread):
        self.server, self.thread = server, thread
        self.port = int(server.server_address[1])

    def close(self) -> None:
        if self.thread is None:
            return
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()
        self.thread = None


def serve(handler: type[BaseHTTPRequestHandler], address: str, port: int,
          what: str, **attributes: object) -> Served:
    """Serve ``handler`` on ``address:port`` (0: a free port); ``attributes`` are set on
    the server for the handler to read. OSError saying ``what`` could not be served where."""
    try:
        # The address decides the family: "::" needs an IPv6 socket.
        family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
        server_class = type("Server", (_Server,), {"address_family": family})
        server = server_class((address, port), handler)
    except OSError as e:  # gaierror (a bad address) is an OSError too
        error = OSError(f"cannot serve {what} at {address}:{port}: {e.strerror or e}")
        error.errno = e.errno  # kept for callers that tell EADDRINUSE apart
        raise error from e
    for name, value in attributes.items():
        setattr(server, name, value)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": POLL},
                              name=f"zpipe-{what.split()[0]}", daemon=True)
    thread.start()
    return Served(server, thread)
