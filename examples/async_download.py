"""An async download stage: ``fetch`` is an ``async def`` that awaits an HTTP GET, and
``concurrency=16`` keeps sixteen downloads in flight in its one replica.

Nothing leaves this machine: the program serves its own pages from a small HTTP
server on 127.0.0.1 (stdlib http.server, in a thread), each response held back
50 to 100 ms as a distant server would, and downloads them with asyncio streams
(a minimal HTTP/1.0 GET). No dependency beyond zpipe.

Run: python examples/async_download.py [process|thread]
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlsplit

import zpipe

PAGES = 100
CONCURRENCY = 16


# -- the pipeline's stages ---------------------------------------------------------

def urls(base: str, count: int) -> Iterator[str]:
    """The source: the address of every page."""
    for i in range(count):
        yield f"{base}/page/{i}"


async def fetch(url: str, timeout: float = 10.0) -> dict:
    """GET ``url`` over asyncio streams (HTTP/1.0: the server closes after the body)."""
    parts = urlsplit(url)
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(parts.hostname, parts.port), timeout)
    try:
        writer.write(f"GET {parts.path} HTTP/1.0\r\nHost: {parts.netloc}\r\n\r\n".encode())
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].decode("latin-1")
    if status.split()[1:2] != ["200"]:
        raise RuntimeError(f"GET {url}: {status!r}")
    return {"name": parts.path.rsplit("/", 1)[-1], "body": body}


def save(page: dict, folder: str) -> None:
    """The sink: each page into its own file."""
    (Path(folder) / f"page-{page['name']}.html").write_bytes(page["body"])


# -- the pages' server (the stand-in for the outside world) ------------------------

def delay_of(i: int) -> float:
    """Each page's artificial delay: 50 to 100 ms, the same every run."""
    return 0.050 + (zlib.crc32(b"delay %d" % i) % 51) / 1000


def page_of(i: int) -> bytes:
    """Each page's HTML: 2 to 20 kB."""
    words = b"lorem ipsum dolor sit amet " * (80 + zlib.crc32(b"size %d" % i) % 660)
    return b"<html><body><h1>Page %d</h1><p>%s</p></body></html>\n" % (i, words)


class Pages(BaseHTTPRequestHandler):
    served: ClassVar[list[float]] = []  # the time each response took, request to last byte

    def do_GET(self) -> None:
        started = time.perf_counter()
        name = self.path.rsplit("/", 1)[-1]
        if not self.path.startswith("/page/") or not name.isdigit():
            self.send_error(404)
            return
        time.sleep(delay_of(int(name)))
        body = page_of(int(name))
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.served.append(time.perf_counter() - started)

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: one line per request would drown the result


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # 16 connections at once must not overflow the backlog


def main(mode: str = "process") -> None:
    server = Server(("127.0.0.1", 0), Pages)
    serving = threading.Thread(target=server.serve_forever, name="pages", daemon=True)
    serving.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with tempfile.TemporaryDirectory(prefix="async-download-") as folder:
            started = time.perf_counter()
            zpipe.run([
                zpipe.Task(urls, params={"base": base, "count": PAGES}),
                zpipe.Task(fetch, concurrency=CONCURRENCY),
                zpipe.Task(save, params={"folder": folder}),
            ], mode=mode)
            elapsed = time.perf_counter() - started
            files = list(Path(folder).iterdir())
            total = sum(f.stat().st_size for f in files)
    finally:
        server.shutdown()
        server.server_close()
        serving.join()
    one_at_a_time = sum(Pages.served)
    print(f"downloaded {len(files)} pages, {total:,} bytes, in {elapsed:.2f} s "
          f"(async def fetch, concurrency={CONCURRENCY}; start-up included)")
    print(f"one at a time would take {one_at_a_time:.2f} s (the server's time for each of "
          f"the {len(Pages.served)} responses, summed): {one_at_a_time / elapsed:.1f}x as long")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "process")
