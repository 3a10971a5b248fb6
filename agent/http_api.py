"""The HTTP door: an OpenAI-compatible API for local apps, served by the agent's resident model.

``edgepack-agent run --http 127.0.0.1:8000`` serves:

* ``GET /v1/models`` — the current bundle as OpenAI's model list (plus version, quant, runtime,
  context, digest); ``GET /v1/models/<id>`` one entry.
* ``POST /v1/chat/completions`` and ``POST /v1/completions`` — JSON with ``usage``, or with
  ``"stream": true`` Server-Sent Events (``data: {chunk}``, ending ``data: [DONE]``). The request
  mapping (which fields are mapped, refused or ignored) is :mod:`agent._openai_compat`'s.
* ``GET /health`` — ready, model loaded, queue depth, busy, the shared counters (200 when a bundle
  is installed, 503 when not). It needs no key, so a local supervisor can probe it.

One engine, two doors: a request becomes an :class:`~agent.serving.InferJob` on the same
:class:`~agent.serving.InferenceServer` the MQTT door uses — one bounded queue, one resident model,
one set of counters; an install swaps the model between requests for both. Per request: (1) read
the request line, headers and body within ``read_timeout`` *in total* (a slow sender cannot hold a
thread), body at most ``max_body_bytes``; (2) check the bearer key (``/v1/*``); (3) map the body
or answer 400 naming the field; (4) submit (a full queue answers 429 with ``Retry-After``); (5)
wait for the worker — it says which bundle serves before the first token, so a stream's status
line is sent only once it can succeed (no model: 503, a too-long prompt: 400); (6) answer,
streaming each chunk as it comes. While it waits and between chunks the handler checks that the
client is still there: one that went away (EOF or reset) cancels its job, freeing the model for
the next request within a token.

Invariants: stdlib only (no web framework on the device); at most ``max_connections`` handler
threads (one more connection is answered 503 at once and closed); a handler never blocks the
inference worker (chunks go through a per-request queue); errors are OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``; nothing listens beyond loopback unless the
address says so.
"""

from __future__ import annotations

import contextlib
import hmac
import io
import json
import logging
import queue
import secrets
import select
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote, urlsplit

from agent import __version__
from agent._counters import Counters
from agent._openai_compat import (
    Answer,
    ApiError,
    Call,
    error_body,
    failure,
    fingerprint,
    finish_reason,
    model_body,
    parse_chat,
    parse_completion,
)
from agent.errors import EdgepackError, TransportError
from agent.protocol import InferChunk, ProtocolError, decode_object
from agent.serving import InferJob

if TYPE_CHECKING:
    from agent.serving import InferenceServer
    from agent.store import InstalledBundle

log = logging.getLogger("agent.http")

LOOPBACK: Final = "127.0.0.1"
COUNTERS: Final = ("http_requests", "http_rejected", "http_disconnects")
_MAX_KEY_FILE_BYTES: Final = 4096
_LINGER_BYTES: Final = 8 << 20  # unread body drained before closing, so the client reads our answer
_LINGER_SECONDS: Final = 2.0


@dataclass(frozen=True)
class HttpConfig:
    """How the HTTP door listens and what it allows.

    Raises:
        EdgepackError: a value out of range.
    """

    host: str = LOOPBACK
    port: int = 8000  # 0: any free port (the bound one is in HttpApi.address)
    api_key: str | None = None  # bearer key for /v1/*; None: no key
    max_body_bytes: int = 256 << 10  # a request body; more is answered 413
    read_timeout: float = 10.0  # seconds to read a whole request (line, headers, body); also idle keep-alive
    write_timeout: float = 30.0  # seconds one write may stall before the client counts as gone
    max_connections: int = 16  # connections served at once (one thread each)
    retry_after: int = 1  # seconds, in Retry-After of a 429
    poll_interval: float = 0.1  # seconds between checks that a waiting client is still there

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise EdgepackError(f"http port must be in [0, 65535], got {self.port}")
        if self.max_body_bytes < 1024 or self.max_connections < 1 or self.retry_after < 1:
            raise EdgepackError("http: max_body_bytes >= 1024, max_connections >= 1, retry_after >= 1")
        if min(self.read_timeout, self.write_timeout, self.poll_interval) <= 0:
            raise EdgepackError("http: timeouts and poll_interval must be > 0")
        if self.api_key is not None and not _valid_key(self.api_key):
            raise EdgepackError("http: the API key must be 1-1024 printable ASCII characters")


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` or ``PORT`` -> (host, port); no host is loopback.

    Raises:
        EdgepackError: not an address with a port.
    """
    text = value.strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535 or (":" in host and not value.strip().startswith("[")):
        raise EdgepackError(f"--http {value!r} is not HOST:PORT",
                            hint="e.g. --http 127.0.0.1:8000, --http 8000 or --http [::1]:8000")
    return host or LOOPBACK, number


def read_key_file(path: Path) -> str:
    """The bearer key in ``path`` (surrounding whitespace stripped).

    Raises:
        EdgepackError: unreadable, empty, too long or not printable ASCII.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_KEY_FILE_BYTES + 1)
    except OSError as e:
        raise EdgepackError(f"cannot read the HTTP key file {path}: {e}") from e
    key = raw.decode("ascii", "replace").strip()
    if len(raw) > _MAX_KEY_FILE_BYTES or not _valid_key(key):
        raise EdgepackError(f"the HTTP key file {path} must hold one key of 1-1024 printable "
                            "ASCII characters")
    return key


def _valid_key(key: str) -> bool:
    return 1 <= len(key) <= 1024 and all(33 <= ord(c) < 127 for c in key)


HealthFn = Callable[[], dict[str, Any]]


class HttpApi:
    """The HTTP door of one agent.

    Args:
        config: address, key and limits.
        serving: the inference server every door shares.
        current: the bundle that serves now (None: nothing installed), for ``/v1/models``.
        health: the ``/health`` body; its ``ready`` decides 200 or 503.
        counters: ``http_requests``, ``http_rejected`` (answered 4xx before generating) and
            ``http_disconnects`` (clients that went away mid-request) are counted here.
        clock: epoch seconds, for ``created``.
    """

    def __init__(self, config: HttpConfig, serving: InferenceServer,
                 current: Callable[[], InstalledBundle | None], health: HealthFn, *,
                 counters: Counters | None = None, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.serving = serving
        self.current = current
        self.health = health
        self.counters = counters or Counters(COUNTERS)
        self.clock = clock
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the configured ones before :meth:`start`."""
        if self._server is None:
            return self.config.host, self.config.port
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> None:
        """Bind and serve from a background thread.

        Raises:
            TransportError: the address cannot be bound (in use, not ours, no permission).
        """
        try:
            self._server = _Server(self)
        except OSError as e:
            raise TransportError(f"cannot listen on {self.config.host}:{self.config.port}: {e}",
                                 hint="Pick another address with --http HOST:PORT.") from e
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="edgepack-http", daemon=True)
        self._thread.start()
        if self._server.server_address[0] not in (LOOPBACK, "::1", "localhost") \
                and self.config.api_key is None:
            log.warning("the HTTP API listens on %s without a key: anyone who can reach it can "
                        "use the model (set --http-key-file)", self.url)
        log.info("http: listening on %s", self.url)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting; connections being served end with their job (the server stops those)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout)


class _Server(HTTPServer):
    """HTTPServer with at most ``max_connections`` handler threads and TCP_NODELAY."""

    daemon_threads = True

    def __init__(self, api: HttpApi) -> None:
        self.api = api
        host = api.config.host
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._slots = threading.BoundedSemaphore(api.config.max_connections)
        super().__init__((host, api.config.port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind also resolves the host name (getfqdn), which can wait on DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, addr = self.socket.accept()
        # Without it a small SSE write waits for the ACK of the previous one (40 ms and more).
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, addr

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.api.counters.incr("http_rejected")
            _refuse(request, self.api.config.max_connections)
            self.shutdown_request(request)
            return
        threading.Thread(target=self._serve_one, args=(request, client_address),
                         name="edgepack-http-conn", daemon=True).start()

    def _serve_one(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that resets its connection is routine; anything else is worth a traceback.
        log.debug("http connection from %s ended with an error", client_address, exc_info=True)


def _refuse(sock: socket.socket, limit: int) -> None:
    body = json.dumps(error_body(f"{limit} connections are already being served; retry later",
                                 type="server_error", code="too_many_connections")).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
    with contextlib.suppress(OSError):
        sock.settimeout(1.0)
        sock.sendall(head + body)


class _DeadlineReader(io.RawIOBase):
    """Socket reads that share one deadline: a request must arrive whole before it."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the request was not read in time")
            self._sock.settimeout(left)
        return self._sock.recv_into(b)


class _ClientGoneError(Exception):
    """The client closed or reset its connection (internal control flow, never escapes)."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"edgepack-agent/{__version__}"
    sys_version = ""
    server: _Server

    # --- connection ------------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        self.api = self.server.api
        self.cfg = self.api.config
        self.rfile.close()
        self._reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader, 64 << 10)
        self._poll = select.poll()
        self._poll.register(self.connection, select.POLLIN)
        self._unread = 0  # body bytes the client sent that we did not read

    def handle_one_request(self) -> None:
        self._reader.deadline = time.monotonic() + self.cfg.read_timeout
        self._unread = 0
        super().handle_one_request()
        if self._unread:
            self.close_connection = True
            self._linger()

    def _done_reading(self) -> None:
        # The request is in: from here on only writes, each with its own time limit.
        self._reader.deadline = None
        self.connection.settimeout(self.cfg.write_timeout)

    def _linger(self) -> None:
        # Closing with unread input makes the kernel send RST, and the client may lose the answer
        # we just wrote: half-close, then drain what it still sends (bounded in bytes and time).
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_WR)
            end = time.monotonic() + _LINGER_SECONDS
            drained = 0
            while drained < _LINGER_BYTES and (left := end - time.monotonic()) > 0:
                self.connection.settimeout(left)
                n = len(self.connection.recv(64 << 10))
                if not n:
                    break
                drained += n

    def _client_gone(self) -> bool:
        # Readable with nothing to read is EOF; a pipelined next request is data, not a goodbye.
        # (A client that half-closes its side after sending counts as gone.)
        events = self._poll.poll(0)
        if not events:
            return False
        if events[0][1] & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
            return True
        try:
            return self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # --- routes ----------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self.api.counters.incr("http_requests")
        self._unread = max(0, _declared_length(self.headers.get("Content-Length")))
        self._done_reading()
        path = unquote(urlsplit(self.path).path)
        try:
            if path == "/health":
                body = self.api.health()
                self._json(200 if body.get("ready") else 503, body)
                return
            self._authorize()
            if path == "/v1/models":
                self._json(200, {"object": "list", "data": self._models()})
            elif path.startswith("/v1/models/"):
                wanted = path.removeprefix("/v1/models/")
                found = [m for m in self._models() if m["id"] == wanted]
                if not found:
                    raise ApiError(404, f"The model {wanted!r} does not exist on this device",
                                   param="model", code="model_not_found")
                self._json(200, found[0])
            else:
                raise ApiError(404, f"no route GET {path}", code="not_found")
        except ApiError as e:
            self._error(e)
        except Exception as e:  # a bug must not kill the connection thread silently
            log.exception("GET %s failed", path)
            self._error(ApiError(500, f"internal error: {e}", type="server_error", code="internal"))

    def do_POST(self) -> None:
        self.api.counters.incr("http_requests")
        path = unquote(urlsplit(self.path).path)
        parse, prefix = _POST_ROUTES.get(path, (None, ""))
        self._unread = max(0, _declared_length(self.headers.get("Content-Length")))
        try:
            self._authorize()
            if parse is None:
                raise ApiError(404, f"no route POST {path}", code="not_found")
            body = self._read_body()
            try:
                obj = decode_object(body, limit=self.cfg.max_body_bytes)
            except ProtocolError as e:
                raise ApiError(400, f"We could not parse the JSON body of your request: {e}",
                               code="invalid_json") from None
            call = parse(obj, f"{prefix}-{secrets.token_hex(12)}")
            self._run(call)
        except ApiError as e:
            if e.status < 500:
                self.api.counters.incr("http_rejected")
            self._error(e)
        except _ClientGoneError:
            self.close_connection = True
        except Exception as e:  # a bug in one request must not end serving
            log.exception("POST %s failed", path)
            self.close_connection = True
            self._error(ApiError(500, f"internal error: {e}", type="server_error", code="internal"))

    def _models(self) -> list[dict[str, Any]]:
        cur = self.api.current()
        if cur is None:
            return []
        m = cur.manifest
        return [model_body(cur.summary(), context=int(m.generation.get("context", 2048)),
                           created=_epoch(m.created))]

    # --- requests --------------------------------------------------------------------------------

    def _authorize(self) -> None:
        key = self.cfg.api_key
        if key is None:
            return
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
                token.strip().encode("latin-1", "replace"), key.encode("ascii")):
            return
        raise ApiError(401, "Incorrect API key provided" if token else
                       "Missing bearer key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise ApiError(411, "send the body with a Content-Length (chunked request bodies are "
                                "not accepted)", code="length_required")
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise ApiError(411, "a Content-Length is required", code="length_required")
        n = _declared_length(raw)
        if n < 0:
            self.close_connection = True
            raise ApiError(400, f"bad Content-Length {raw!r:.40}", code="invalid_request")
        if n > self.cfg.max_body_bytes:
            raise ApiError(413, f"the request body of {n} bytes exceeds {self.cfg.max_body_bytes}",
                           code="request_too_large")
        body = self.rfile.read(n)
        self._unread = 0
        if len(body) != n:
            raise _ClientGoneError()
        self._done_reading()
        return body

    # --- generation ------------------------------------------------------------------------------

    def _run(self, call: Call) -> None:
        items: queue.SimpleQueue[InferChunk | InstalledBundle] = queue.SimpleQueue()
        job = InferJob(call.request, items.put, messages=call.messages, on_start=items.put)
        if not self.api.serving.submit(job):
            raise ApiError(429, f"{self.api.serving.queue_size} requests are already waiting; "
                                "retry later", type="rate_limit_error", code="queue_full")
        waiter = _Waiter(self, job, items)
        try:
            self._answer(call, waiter)
        except _ClientGoneError:
            waiter.abandon()
            raise

    def _answer(self, call: Call, waiter: _Waiter) -> None:
        first = waiter.next()
        if isinstance(first, InferChunk):  # it ended before it started: no model, load failure
            raise _ended(first, call.kind)
        m = first.manifest
        answer = Answer(call.kind, call.request.request_id or "", int(self.api.clock()),
                        m.model_name, fingerprint(m.model_name, m.version, first.digest))
        if call.stream:
            self._stream(call, answer, waiter)
            return
        texts = []
        while True:
            chunk = waiter.chunk()
            texts.append(chunk.text)
            if chunk.done:
                break
        if chunk.error or finish_reason(chunk.usage) is None:
            raise _ended(chunk, call.kind)
        self._json(200, answer.body("".join(texts), chunk.usage))

    def _stream(self, call: Call, answer: Answer, waiter: _Waiter) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        usage = call.include_usage
        if call.kind == "chat":
            self._events([answer.chunk("", role=True, with_usage=usage)])
        while True:
            chunk = waiter.chunk()
            events: list[dict[str, Any] | str] = []
            if chunk.text:
                events.append(answer.chunk(chunk.text, with_usage=usage))
            if not chunk.done:
                self._events(events)
                continue
            reason = finish_reason(chunk.usage)
            if chunk.error or reason is None:
                events.append(_ended(chunk, call.kind).body())
            else:
                events.append(answer.chunk(None, finish=reason, with_usage=usage))
                if usage:
                    events.append(answer.usage_chunk(chunk.usage))
            self._events([*events, "[DONE]"], last=True)
            return

    def _events(self, events: Iterable[dict[str, Any] | str], *, last: bool = False) -> None:
        data = b"".join(b"data: " + (e.encode() if isinstance(e, str) else _dumps(e)) + b"\n\n"
                        for e in events)
        frame = (b"%x\r\n%s\r\n" % (len(data), data)) if data else b""
        if last:
            frame += b"0\r\n\r\n"  # the end of the chunked body
        if not frame:
            return
        if self._client_gone():
            raise _ClientGoneError()
        try:
            self.wfile.write(frame)
        except OSError:  # reset, broken pipe, or a client that stopped reading (write_timeout)
            raise _ClientGoneError() from None

    # --- answers ---------------------------------------------------------------------------------

    def _json(self, status: int, body: dict[str, Any], headers: Iterable[tuple[str, str]] = ()) -> None:
        data = _dumps(body)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        if self.close_connection or self._unread:
            self.send_header("Connection", "close")
        self.end_headers()
        with contextlib.suppress(OSError):  # a client that left does not get its answer
            self.wfile.write(data)

    def _error(self, e: ApiError) -> None:
        headers: list[tuple[str, str]] = []
        if e.status == 401:
            headers.append(("WWW-Authenticate", "Bearer"))
        elif e.status == 429:
            headers.append(("Retry-After", str(self.cfg.retry_after)))
        self._json(e.status, e.body(), headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server's own refusals (bad request line, headers too large, unknown method) in
        # OpenAI's shape instead of its HTML page.
        self.close_connection = True
        self._unread = 0
        with contextlib.suppress(OSError):
            self._json(code, error_body(message or HTTPStatus(code).phrase,
                                        code=HTTPStatus(code).phrase.lower().replace(" ", "_")))


class _Waiter:
    """What one handler waits for — the serving bundle, then chunks — while it watches the client."""

    def __init__(self, handler: _Handler, job: InferJob,
                 items: queue.SimpleQueue[InferChunk | InstalledBundle]) -> None:
        self._handler = handler
        self._job = job
        self._items = items
        self._interval = handler.cfg.poll_interval
        self._checked = time.monotonic()

    def next(self) -> InferChunk | InstalledBundle:
        """The next item; raises _ClientGoneError if the client left meanwhile."""
        while True:
            now = time.monotonic()
            if now - self._checked >= self._interval:
                self._checked = now
                if self._handler._client_gone():
                    raise _ClientGoneError()
            try:
                return self._items.get(timeout=self._interval)
            except queue.Empty:
                continue

    def chunk(self) -> InferChunk:
        item = self.next()
        assert isinstance(item, InferChunk), "the worker starts a job once"
        return item

    def abandon(self) -> None:
        """The client left: cancel its job (skipped if queued, stopped within a token if running)."""
        self._job.cancel.set()
        self._handler.api.counters.incr("http_disconnects")
        log.info("http client went away: cancelled %s", self._job.request.request_id)


def _ended(chunk: InferChunk, kind: str) -> ApiError:
    if chunk.error:
        return failure(chunk.error["code"], chunk.error["message"], kind)
    return ApiError(503, "the generation was cancelled (the agent is stopping)", type="server_error",
                    code="cancelled")


def _declared_length(raw: str | None) -> int:
    if raw is None:
        return 0
    try:
        n = int(raw.strip())
    except ValueError:
        return -1
    return n if n >= 0 else -1


def _epoch(iso: str) -> int:
    try:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


_POST_ROUTES: Final[dict[str, tuple[Callable[..., Call], str]]] = {
    "/v1/chat/completions": (parse_chat, "chatcmpl"),
    "/v1/completions": (parse_completion, "cmpl"),
}

__all__ = ["COUNTERS", "HttpApi", "HttpConfig", "parse_listen", "read_key_file"]
