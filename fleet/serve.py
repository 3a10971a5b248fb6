"""Serve the bundles of one folder over HTTP, read-only, with byte ranges so devices can resume.

Only plain file names directly inside the folder are served (no sub-folders, no hidden files,
no symlinks, no ``..`` however it is encoded); everything else is 404. ``GET /`` lists the file
names as plain text; ``GET /index.json`` is ``{"bundles": [{"name", "size", "sha256"}, ...]}`` for
the ``*.bundle`` files, so ``edgepack fleet install`` can name a bundle by URL alone (each file is
hashed once and cached by name, mtime and size; a file named ``index.json`` is shadowed).
One ``Range: bytes=...`` spec is honoured (``a-b``, ``a-``, ``-n``) with
206 + ``Content-Range``; an unsatisfiable one gets 416; several ranges or a malformed header are
ignored and the whole file is sent (RFC 9110 allows both). The server binds loopback unless told
otherwise: exposing bundles to a network is a deliberate choice of ``host``.

Fault injection exists for tests only and only through constructor arguments, so the agent's
resume path is exercised against a real socket: ``drop_after_bytes`` cuts one response after N
body bytes, ``ignore_range`` answers 200 to range requests, ``send_content_length=False`` sends
bodies without a length (closing the connection to end them).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import os
import re
import socket
import stat
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from agent._fs import file_digest

log = logging.getLogger("fleet.serve")

__all__ = ["BundleServer", "ServedRequest"]

CHUNK_BYTES = 1 << 20
INDEX_PATH = "/index.json"
CLIENT_TIMEOUT_S = 60.0  # a stalled client frees its thread after this
_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass(frozen=True)
class ServedRequest:
    """One answered request, recorded for tests and logs."""

    method: str
    path: str
    range: str | None
    status: int
    body_bytes: int  # body bytes actually written to the socket


class BundleServer:
    """A threaded HTTP server for the files of one folder.

    Args:
        directory: the folder whose regular files are served.
        host: address to bind; loopback by default. ``"::1"`` or another IPv6 address works too.
        port: TCP port; 0 picks a free one (see :attr:`port` after :meth:`start`).
        drop_after_bytes: tests only: cut the first response that reaches this many body bytes.
        stall_after_bytes: tests only: the first response that reaches this many body bytes stops
            sending there and holds its connection until :meth:`release` (or a minute), then cuts
            it; :meth:`wait_stalled` tells when a client has all the bytes before the stall.
        ignore_range: tests only: answer every request with the whole file (200).
        send_content_length: tests only: False omits ``Content-Length`` and closes to end a body.
    """

    def __init__(
        self,
        directory: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        drop_after_bytes: int | None = None,
        stall_after_bytes: int | None = None,
        ignore_range: bool = False,
        send_content_length: bool = True,
    ) -> None:
        self.directory = Path(directory).resolve()
        if not self.directory.is_dir():
            raise NotADirectoryError(f"{self.directory} is not a folder")
        self.host = host
        self.ignore_range = ignore_range
        self.send_content_length = send_content_length
        self.requests: list[ServedRequest] = []
        self._drop_after = drop_after_bytes  # armed until one response is cut
        self._stall_after = stall_after_bytes  # armed until one response stalls
        self._stalled = threading.Event()
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._hash_lock = threading.Lock()  # serializes hashing: one pass per file, not per request
        self._hashes: dict[str, tuple[int, int, str]] = {}  # name -> (mtime_ns, size, sha256)
        self._recorded = threading.Condition(self._lock)
        self._httpd = _Server((host, port), _Handler, self)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound TCP port."""
        return int(self._httpd.server_address[1])

    @property
    def bytes_served(self) -> int:
        """Body bytes written to clients so far, over all requests."""
        with self._lock:
            return sum(r.body_bytes for r in self.requests)

    def url_for(self, filename: str) -> str:
        """The URL of ``filename`` in the served folder.

        Returns:
            ``http://host:port/<quoted filename>``.
        """
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/{urllib.parse.quote(filename)}"

    def start(self) -> BundleServer:
        """Serve in a background (daemon) thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                name=f"bundle-server:{self.port}", daemon=True,
            )
            self._thread.start()
            log.info("serving %s at http://%s:%d/", self.directory, self.host, self.port)
        return self

    def wait_stalled(self, timeout: float = 30.0) -> bool:
        """Wait until a response stalled at ``stall_after_bytes``; False on timeout."""
        return self._stalled.wait(timeout)

    def release(self) -> None:
        """End a stalled response (its connection is cut, as a dropped link would)."""
        self._released.set()

    def stop(self) -> None:
        """Stop serving and close the listening socket (waits at most a few seconds)."""
        self._released.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5.0)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> BundleServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # --- used by the handler ------------------------------------------------------------------

    def wait_requests(self, count: int, timeout: float = 5.0) -> bool:
        """Wait until ``count`` requests are recorded (a client may finish reading before the
        handler thread records its request); returns False on timeout."""
        with self._recorded:
            return self._recorded.wait_for(lambda: len(self.requests) >= count, timeout=timeout)

    def _record(self, entry: ServedRequest) -> None:
        with self._recorded:
            self.requests.append(entry)
            self._recorded.notify_all()

    def _claim_drop(self, sent: int, chunk: int) -> tuple[int, bool] | None:
        """If this response should be cut within the next ``chunk`` bytes, return where and
        whether it stalls there first."""
        with self._lock:
            for stall, limit in ((False, self._drop_after), (True, self._stall_after)):
                if limit is not None and sent + chunk >= limit:
                    # Once only: the retry must succeed.
                    if stall:
                        self._stall_after = None
                    else:
                        self._drop_after = None
                    return max(limit - sent, 0), stall
            return None

    def _resolve(self, raw_path: str) -> Path | None:
        """The file a request path names, or None unless it is a plain regular file here."""
        name = urllib.parse.unquote(urllib.parse.urlsplit(raw_path).path)
        name = name[1:] if name.startswith("/") else name
        # Decode first, then judge: "..%2f" must be seen as "../". Only bare names pass.
        if (not name or "/" in name or "\\" in name or "\0" in name or name.startswith(".")):
            return None
        path = self.directory / name
        try:
            st = os.lstat(path)  # lstat: a symlink could point out of the folder
        except OSError:
            return None
        return path if stat.S_ISREG(st.st_mode) else None

    def _index(self) -> bytes:
        names = sorted(p.name for p in self.directory.iterdir()
                       if not p.name.startswith(".") and p.is_file() and not p.is_symlink())
        return "".join(f"{n}\n" for n in names).encode()

    def bundle_names(self) -> list[str]:
        """The ``*.bundle`` files that are served (hidden files and symlinks are not), sorted."""
        return sorted(p.name for p in self.directory.glob("*.bundle")
                      if self._resolve("/" + urllib.parse.quote(p.name)) is not None)

    def bundle_index(self) -> dict[str, list[dict[str, object]]]:
        """The ``*.bundle`` files served here with their size and sha256 (what ``/index.json`` says).

        Returns:
            ``{"bundles": [{"name", "size", "sha256"}, ...]}`` sorted by name; a file that vanishes
            while being listed is left out.
        """
        out: list[dict[str, object]] = []
        with self._hash_lock:
            seen: set[str] = set()
            for name in self.bundle_names():
                try:
                    digest, size = self._hash_cached(self.directory / name)
                except OSError:  # tolerated: removed or replaced while listing; the next GET sees it
                    continue
                seen.add(name)
                out.append({"name": name, "size": size, "sha256": digest})
            for gone in set(self._hashes) - seen:
                del self._hashes[gone]
        return {"bundles": out}

    def _hash_cached(self, path: Path) -> tuple[str, int]:
        """(sha256, size) of ``path``, hashed again only when its mtime or size changed."""
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            hit = self._hashes.get(path.name)
            if hit is not None and hit[:2] == (st.st_mtime_ns, st.st_size):
                return hit[2], st.st_size
            digest, size = file_digest(f)
            after = os.fstat(f.fileno())
        # A file still being written must not be cached under a hash of half of it.
        if (after.st_mtime_ns, after.st_size) == (st.st_mtime_ns, size):
            self._hashes[path.name] = (st.st_mtime_ns, size, digest)
        return digest, size


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True  # a stuck client must not block stop()

    def __init__(self, address: tuple[str, int], handler: type[_Handler], owner: BundleServer) -> None:
        self.owner = owner
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "edgepack-bundle-server"
    timeout = CLIENT_TIMEOUT_S
    server: _Server

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s - " + format, self.address_string(), *args)

    def _serve(self, *, body: bool) -> None:
        owner = self.server.owner
        range_header = self.headers.get("Range")
        sent = 0
        status = 500
        try:
            if urllib.parse.urlsplit(self.path).path == "/":
                status = 200
                sent = self._send_bytes(owner._index(), "text/plain; charset=utf-8", body)
                return
            if urllib.parse.urlsplit(self.path).path == INDEX_PATH:
                status = 200
                data = json.dumps(owner.bundle_index(), separators=(",", ":")).encode()
                sent = self._send_bytes(data, "application/json", body)
                return
            path = owner._resolve(self.path)
            if path is None:
                status = 404
                sent = self._send_bytes(b"not found\n", "text/plain; charset=utf-8", body, status=404)
                return
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                span = None if owner.ignore_range else _parse_range(range_header, size)
                if span == "unsatisfiable":
                    status = 416
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                first, last = span if isinstance(span, tuple) else (0, size - 1)
                status = 206 if isinstance(span, tuple) else 200
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Last-Modified", self.date_time_string(int(os.fstat(f.fileno()).st_mtime)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
                if owner.send_content_length:
                    self.send_header("Content-Length", str(last - first + 1))
                else:
                    self.close_connection = True  # the end of the body is the end of the connection
                    self.send_header("Connection", "close")
                self.end_headers()
                if body:
                    sent = self._copy(f, first, last - first + 1)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # tolerated: the client went away; nothing to answer
        finally:
            owner._record(ServedRequest(self.command, self.path, range_header, status, sent))

    def _send_bytes(self, data: bytes, ctype: str, body: bool, status: int = 200) -> int:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)
            return len(data)
        return 0

    def _copy(self, f: BinaryIO, offset: int, length: int) -> int:
        f.seek(offset)
        sent = 0
        while sent < length:
            chunk = f.read(min(CHUNK_BYTES, length - sent))
            if not chunk:
                break  # the file shrank while serving; the client sees a short body
            claim = self.server.owner._claim_drop(sent, len(chunk))
            if claim is not None:
                cut, stall = claim
                self.wfile.write(chunk[:cut])
                self.wfile.flush()
                sent += cut
                if stall:
                    self.server.owner._stalled.set()
                    self.server.owner._released.wait(60.0)  # bounded: a test that forgot still ends
                self._cut_connection()
                return sent
            self.wfile.write(chunk)
            sent += len(chunk)
        return sent

    def _cut_connection(self) -> None:
        # Fault injection: end the TCP stream mid-body, as a dropped link would.
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


def _parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """One byte range as ``(first, last)`` inclusive, ``"unsatisfiable"``, or None to send it all."""
    if not header:
        return None
    m = _RANGE_RE.fullmatch(header.strip())
    if not m or (not m[1] and not m[2]):
        return None  # several ranges or a malformed spec: ignoring the header is allowed
    if not m[1]:  # suffix: the last n bytes
        n = int(m[2])
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(size - n, 0), size - 1
    first = int(m[1])
    last = int(m[2]) if m[2] else size - 1
    if m[2] and last < first:
        return None  # an invalid range-spec is ignored, not refused (RFC 9110 14.2)
    if first >= size:
        return "unsatisfiable"
    return first, min(last, size - 1)
