"""A real HTTP server on 127.0.0.1 serving a directory (Python's http.server in a thread), with the misbehaviours
served datasets meet: a required Authorization header, a path that answers 503 before it works, a connection that
drops halfway through a file."""

from __future__ import annotations

import collections
import functools
import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class _Handler(http.server.SimpleHTTPRequestHandler):
    token: str | None = None
    flaky: int = 0
    """every path under /flaky/ answers 503 this many times before it is served"""
    seen: collections.Counter

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.seen[self.path] += 1
        if self.token is not None and self.headers.get("Authorization") != self.token:
            self.send_error(401, "Unauthorized")
            return
        if self.path.startswith("/flaky/"):
            if self.seen[self.path] <= self.flaky:
                self.send_error(503, "Service Unavailable")
                return
            self.path = self.path.removeprefix("/flaky")
        if self.path.startswith("/drop/"):
            self.path = self.path.removeprefix("/drop")
            if self.path.endswith(".tar"):  # the whole length announced, half of it sent, the connection closed
                self._send_half()
                return
        super().do_GET()

    def _send_half(self) -> None:
        data = Path(self.translate_path(self.path)).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True


@contextmanager
def serve(root: Path, *, token: str | None = None, flaky: int = 0) -> Iterator[tuple[str, collections.Counter]]:
    """``(base URL, requests per path)`` of a server of ``root`` on 127.0.0.1 for the ``with`` block."""
    seen: collections.Counter = collections.Counter()
    handler = type("Handler", (_Handler,), {"token": token, "flaky": flaky, "seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
