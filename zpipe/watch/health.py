"""Health endpoints for container engines: ``/livez`` and ``/readyz`` over plain HTTP.

Docker's HEALTHCHECK and Kubernetes' probes ask two different questions:

* **liveness** (``GET /livez``): is the process still responsive, or should it
  be killed and started again? The owning process calls ``beat()`` from the
  loop that does its work; if no beat came for ``stale_after`` seconds the
  answer is 503. Before the first beat it is 200: a starting process must not
  be killed for being slow to start.
* **readiness** (``GET /readyz``): should it be sent work now? 503 with the
  reason ("starting", "draining", ...) until ``ready(True)``.

A stdlib ThreadingHTTPServer in a daemon thread is enough for that: no
framework, and a probe never waits behind the pipeline's own work.
"""

from __future__ import annotations

import time
from http.server import BaseHTTPRequestHandler

from .httpd import Served, serve


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.answer(body=True)

    def do_HEAD(self) -> None:
        self.answer(body=False)

    def answer(self, body: bool) -> None:
        health: Health = self.server.health  # type: ignore[attr-defined]  # httpd.serve
        status, text = health.respond(self.path.split("?", 1)[0])
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        # HEAD announces the length GET would send, as HTTP says it should.
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass  # probes come every few seconds: a line each would drown the real output


class Health:
    """Liveness and readiness of one process, served at ``/livez`` and ``/readyz``."""

    stale_after: float = 10.0  # seconds without a beat() after which /livez says 503

    def __init__(self) -> None:
        # Plain attributes written by the owner and read by the HTTP threads:
        # each read or write is atomic in CPython, and a probe seeing the
        # previous value for a moment is harmless.
        self.is_ready = False
        self.why = "starting"
        self.last_beat: float | None = None  # time.monotonic() of the last beat()
        self.served: Served | None = None

    def ready(self, flag: bool, why: str = "") -> None:
        """Say whether this process should get work; ``why`` says why not."""
        self.why = why
        self.is_ready = flag

    def beat(self) -> None:
        """Record that the owning process is responsive."""
        self.last_beat = time.monotonic()

    def respond(self, path: str) -> tuple[int, str]:
        """The status and body for ``path``."""
        if path == "/livez":
            last = self.last_beat
            age = 0.0 if last is None else time.monotonic() - last
            if age < self.stale_after:
                return 200, "ok\n"
            return 503, f"no heartbeat for {age:.1f} s\n"
        if path == "/readyz":
            if self.is_ready:
                return 200, "ready\n"
            return 503, f"{self.why or 'not ready'}\n"
        return 404, "not found\n"

    def start(self, port: int, address: str = "0.0.0.0") -> int:
        """Serve on ``address:port`` (0: a free port); the port actually bound."""
        self.served = serve(_Handler, address, port, "health checks", health=self)
        return self.served.port

    def close(self) -> None:
        """Stop serving and release the port; safe to call twice."""
        if self.served is not None:
            self.served.close()


def probe(port: int, path: str = "/livez", host: str = "127.0.0.1",
          timeout: float = 5.0) -> tuple[int, str]:
    """GET ``path`` of a health port (`zpipe probe`, a compose healthcheck): (status,
    body); status 0 when nothing answers."""
    import http.client
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    except OSError as exc:
        return 0, f"no answer from {host}:{port}: {exc}"
    finally:
        connection.close()
