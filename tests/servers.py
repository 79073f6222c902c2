"""Servers the tests and benchmarks start themselves, on 127.0.0.1 only: a folder over HTTP with byte ranges,
and a proxy that adds latency and injects faults in front of any HTTP server (the range server, moto S3).

Both run in daemon threads of this process, serve HTTP/1.1 with keep-alive, and stop on ``close()``
(or as context managers). Sockets time out after 30 s, so a stuck client cannot hold a thread forever.
Accepted sockets set ``TCP_NODELAY`` (as production servers do; moto's handler too when started from
:func:`main`): with ``http.server``'s default, Nagle's algorithm held back each response's last segment
until the client's delayed ACK, about 9 ms per request on 127.0.0.1 (one 120 KB range: 9.9 ms → 0.6 ms).

Fault kinds of :class:`FaultProxy` (each drawn per request from a seeded generator, at ``rate``):

* ``reset``: the connection is closed with a TCP reset before any response;
* ``503``: ``503 Service Unavailable`` with an S3-style ``SlowDown`` XML body (botocore and aiohttp both
  see throttling);
* ``truncate``: the upstream's status and headers (full ``Content-Length``), half the body, then a reset.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import http.server
import os
import random
import re
import socket
import struct
import threading
import time
from collections import Counter

FAULT_KINDS = ("reset", "503", "truncate")


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # listen backlog: socketserver's 5 drops connections opened at once (1 s SYN retry)

    def handle_error(self, request, client_address) -> None:  # a client that went away (or a reset we made)
        pass


class _Server:
    """A ``ThreadingHTTPServer`` in a daemon thread; ``url`` is ``http://127.0.0.1:<port>``."""

    def __init__(self, handler, port: int = 0):
        self.httpd = _QuietServer(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder (``directory=``) with single ``Range: bytes=a-b`` / ``a-`` / ``-n`` requests answered 206."""

    protocol_version = "HTTP/1.1"
    timeout = 30
    disable_nagle_algorithm = True  # TCP_NODELAY, as real servers set

    def log_message(self, *args):  # keep the test output clean
        pass

    def send_head(self):
        path = self.translate_path(self.path)
        spec = self.headers.get("Range")
        if not spec or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", spec.strip())
        if not m or (not m.group(1) and not m.group(2)):
            self.send_error(400, "bad Range")
            return None
        if m.group(1):
            start = int(m.group(1))
            stop = min(size, int(m.group(2)) + 1) if m.group(2) else size
        else:
            start, stop = max(0, size - int(m.group(2))), size
        if start >= size or stop <= start:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        f = open(path, "rb")  # noqa: SIM115 (closed by SimpleHTTPRequestHandler.do_GET via copyfile)
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
        self.send_header("Content-Length", str(stop - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        return _Limited(f, stop - start)


class _Limited:
    """A file object that reads at most ``n`` bytes (what ``copyfile`` sends for a range)."""

    def __init__(self, f, n: int):
        self.f, self.left = f, n

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.f.close()


class RangeServer(_Server):
    """``folder`` over HTTP with byte ranges."""

    def __init__(self, folder, port: int = 0):
        super().__init__(functools.partial(RangeHandler, directory=str(folder)), port)


def _reset(handler: http.server.BaseHTTPRequestHandler) -> None:
    """Close the handler's connection with a TCP reset (SO_LINGER 0) rather than an orderly FIN."""
    handler.close_connection = True
    with contextlib.suppress(OSError):
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    handler.rfile.close()  # drops the makefile reference, so close() below really closes the socket
    handler.connection.close()


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30
    disable_nagle_algorithm = True
    proxy: FaultProxy

    def log_message(self, *args):
        pass

    def _forward(self) -> None:
        p = self.proxy
        body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        fault = p.draw(self.command, self.path, self.headers.get("Range"))
        try:
            self._answer(p, fault, body)
        finally:
            p.count("in_flight", -1)

    def _answer(self, p: FaultProxy, fault: str | None, body: bytes) -> None:
        if p.latency_s:
            time.sleep(p.latency_s)
        if fault == "reset":
            _reset(self)
            return
        if fault == "503":
            xml = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(xml)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(xml)
            return
        up = getattr(self, "_up", None) or http.client.HTTPConnection(p.upstream_host, p.upstream_port, timeout=30)
        self._up = up
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
        try:
            up.request(self.command, self.path, body=body or None, headers=headers)
            r = up.getresponse()
            data = r.read()
        except (OSError, http.client.HTTPException):
            up.close()
            self._up = None
            raise
        p.count("bytes", len(data))
        self.send_response(r.status, r.reason)
        for k, v in r.getheaders():
            if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length"):
                self.send_header(k, v)
        length = r.getheader("Content-Length") if self.command == "HEAD" else None  # HEAD: the upstream's
        self.send_header("Content-Length", length or str(len(data)))
        self.end_headers()
        if fault == "truncate" and len(data) > 1:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            _reset(self)
            return
        if self.command != "HEAD":
            self.wfile.write(data)

    def finish(self) -> None:
        if getattr(self, "_up", None) is not None:
            self._up.close()
        with contextlib.suppress(OSError, ValueError):
            super().finish()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward


class FaultProxy(_Server):
    """A reverse proxy to ``upstream`` (``http://127.0.0.1:<port>``) adding ``latency_s`` per request and faults.

    Args:
        upstream: the server to forward to (127.0.0.1 only).
        latency_s: seconds added before each request is answered (or failed).
        rate: probability that a request of ``methods`` gets a fault, drawn from ``random.Random(seed)``.
        kinds: fault kinds to choose from (see the module docstring).
        methods: HTTP methods that may get faults (setup uploads pass untouched by default).
        max_faults: stop injecting after this many (None: no limit).
        only: inject faults only into requests whose path contains this string.
        port: listen on this port (0: a free one).

    Attributes:
        counts: ``Counter`` of ``requests``, ``bytes`` forwarded, one entry per fault kind injected, and
            ``max_in_flight``: the most requests the proxy held at once (received, not yet answered).
        log: ``(method, path, Range header or None)`` of every request, in arrival order.
    """

    def __init__(
        self,
        upstream: str,
        latency_s: float = 0.0,
        rate: float = 0.0,
        kinds=FAULT_KINDS,
        methods=("GET",),
        max_faults: int | None = None,
        only: str | None = None,
        seed: int = 0,
        port: int = 0,
    ):
        m = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/?", upstream)
        if not m:
            raise ValueError(f"upstream must be http://127.0.0.1:<port>, got {upstream!r}")
        self.upstream_host, self.upstream_port = "127.0.0.1", int(m.group(1))
        self.latency_s, self.rate, self.kinds, self.methods = latency_s, rate, tuple(kinds), tuple(methods)
        self.max_faults, self.only = max_faults, only
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.log: list[tuple[str, str, str | None]] = []
        handler = type("Handler", (_ProxyHandler,), {"proxy": self})
        super().__init__(handler, port)

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n

    def faults(self) -> int:
        return sum(self.counts[k] for k in FAULT_KINDS)

    def draw(self, method: str, path: str, byte_range: str | None = None) -> str | None:
        """Log the request (it is in flight until :meth:`count` ``("in_flight", -1)``) and draw its fault, or None."""
        with self.lock:
            self.counts["requests"] += 1
            self.log.append((method, path, byte_range))
            self.counts["in_flight"] += 1
            self.counts["max_in_flight"] = max(self.counts["max_in_flight"], self.counts["in_flight"])
            if method not in self.methods or not self.rate or not self.kinds or (self.only or "") not in path:
                return None
            if self.max_faults is not None and sum(self.counts[k] for k in FAULT_KINDS) >= self.max_faults:
                return None
            if self.rng.random() >= self.rate:
                return None
            kind = self.rng.choice(self.kinds)
            self.counts[kind] += 1
            return kind


def main(argv=None) -> None:
    """Run one server in the foreground (benchmarks start them in other processes); prints its URL first."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    sub = ap.add_subparsers(dest="kind", required=True)
    sub.add_parser("range", help="serve a folder with byte ranges").add_argument("folder")
    p = sub.add_parser("proxy", help="latency- and fault-adding proxy in front of an http://127.0.0.1:<port> server")
    p.add_argument("upstream")
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--rate", type=float, default=0.0)
    sub.add_parser("moto", help="moto S3 in server mode")
    args = ap.parse_args(argv)
    if args.kind == "moto":
        from moto.moto_server.threaded_moto_server import MotoRequestHandler
        from moto.server import ThreadedMotoServer

        MotoRequestHandler.disable_nagle_algorithm = True  # TCP_NODELAY, as real servers set (see module docstring)

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        url = f"http://127.0.0.1:{port}"
    elif args.kind == "range":
        server = RangeServer(args.folder)
        url = server.url
    else:
        server = FaultProxy(args.upstream, latency_s=args.latency_ms / 1000, rate=args.rate)
        url = server.url
    print(url, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
