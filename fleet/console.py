"""The fleet console: a read-only web page of devices, releases and rollouts, served by the controller.

``edgepack fleet controller --http 127.0.0.1:8400`` serves, GET only:

* ``/`` — one HTML page (inline CSS, JS and SVG; nothing from a CDN, so it works offline) that
  polls the endpoints below every few seconds: the device table (filterable by profile and state),
  the releases, each rollout's waves as progress bars with why it paused or aborted and, per
  profile, the devices' decode tok/s and fidelity agreement before -> after; ``#device/ID`` is a
  device's page with its history.
* ``/api/overview`` — fleet counts and the latest rollouts (summary, wave progress, comparison).
* ``/api/devices?profile=&state=&q=&limit=&offset=`` and ``/api/devices/ID`` (record + history).
* ``/api/releases`` — per release and profile: bundle, precision, Δ perplexity, expected speed.
* ``/api/rollouts`` and ``/api/rollouts/ID`` — the ``rollout status --json`` document plus the
  console's ``progress`` and ``compare`` views of it.

Invariants:

- One source of truth: rollouts are read through :func:`fleet.rollout_ops.status` and
  :func:`fleet.rollout_ops.list_rollouts` (what ``edgepack rollout status --json`` prints), on
  their own reader connection; devices are the controller's own :class:`fleet.inventory.Inventory`;
  releases are the signed bytes in the controller's database, verified with its keyring. Nothing
  is written: any method but GET/HEAD is answered 405.
- Bounded: one :class:`_Snapshot` is built at most once per ``refresh`` seconds whatever the
  number of clients, at most ``max_connections`` handler threads (one more is answered 503), a
  request must arrive within ``read_timeout``, a device page holds at most ``max_devices`` rows,
  and only the latest ``max_rollouts`` rollouts are loaded.
- Nothing listens beyond loopback unless the address says so, and then only with a key: a bearer
  token (``Authorization: Bearer KEY``, for scripts) or basic auth with the key as the password
  (any user name, for browsers). :class:`ConsoleConfig` refuses a non-loopback address without one.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import socket
import socketserver
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final
from urllib.parse import parse_qs, unquote, urlsplit

from agent.bundle import Keyring
from agent.bundle.release import Release, verify_release
from agent.errors import EdgepackError, TransportError
from fleet._console_page import PAGE
from fleet.inventory import DeviceRecord
from fleet.rollout import ACTIVE, RolloutError
from fleet.rollout_ops import list_rollouts, status
from fleet.store import FleetStore

log = logging.getLogger("fleet.console")

LOOPBACK: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8400
_IN_FLIGHT: Final = ("dispatched", "downloading", "installed")
_FAILED: Final = ("failed", "rolled_back", "timed_out")
_HISTORY_TAIL: Final = 8  # rollout history lines in the overview


class ConsoleError(EdgepackError):
    """The console cannot be configured or started as asked."""


@dataclass(frozen=True)
class ConsoleConfig:
    """How the console listens and what it allows.

    Raises:
        ConsoleError: a value out of range, or a non-loopback address without a key.
    """

    host: str = LOOPBACK
    port: int = DEFAULT_PORT  # 0: any free port (the bound one is in Console.address)
    key: str | None = None  # bearer / basic-auth password; required beyond loopback
    refresh: float = 2.0  # seconds a snapshot of the controller's state is reused
    poll: float = 2.0  # seconds between the page's polls
    read_timeout: float = 10.0  # seconds a request may take to arrive (per read)
    max_connections: int = 32  # connections served at once (one thread each)
    max_devices: int = 1000  # device rows per page of /api/devices
    max_rollouts: int = 20  # latest rollouts loaded (status documents) per snapshot

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConsoleError(f"console port must be in [0, 65535], got {self.port}")
        if min(self.refresh, self.poll, self.read_timeout) <= 0:
            raise ConsoleError("console: refresh, poll and read_timeout must be > 0")
        if min(self.max_connections, self.max_devices, self.max_rollouts) < 1:
            raise ConsoleError("console: max_connections, max_devices and max_rollouts must be >= 1")
        if self.key is not None and not 1 <= len(self.key) <= 1024:
            raise ConsoleError("console: the key must be 1-1024 characters")
        if self.key is None and not is_loopback(self.host):
            raise ConsoleError(f"the console would listen on {self.host} without a key",
                               hint="Beyond loopback the console needs --http-key-file FILE (a bearer "
                                    "key; browsers log in with it as the basic-auth password), or "
                                    "keep it on 127.0.0.1 and reach it through an SSH tunnel.")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name that could resolve anywhere


# --- the read side: a snapshot of the controller's state ----------------------------------------


DevicesFn = Callable[[], list[DeviceRecord]]


@dataclass
class _Snapshot:
    at: float  # monotonic time it was built
    now: float  # epoch seconds it describes
    rows: list[dict[str, Any]]  # the device table, by device id
    summaries: list[dict[str, Any]]  # list_rollouts(), oldest first
    docs: dict[str, dict[str, Any]]  # status() of the latest rollouts, by id
    releases: list[dict[str, Any]]  # the releases those rollouts used, newest first


class FleetView:
    """The console's read-only view of one controller: its database, inventory and keyring.

    Args:
        db: the controller's SQLite database (read with its own connections, never the lock).
        fleet: the fleet id.
        devices: the controller's device table now (:meth:`fleet.inventory.Inventory.devices`).
        health: the devices' health table now, merged into ``devices`` by device id (None: none).
        keyring: the controller's keyring, to verify the releases shown.
        refresh: seconds one snapshot is reused.
        max_rollouts: latest rollouts loaded.
        clock: epoch seconds.
    """

    def __init__(self, db: Any, fleet: str, devices: DevicesFn, keyring: Keyring, *,
                 health: DevicesFn | None = None, refresh: float = 2.0, max_rollouts: int = 20,
                 clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.fleet = fleet
        self._devices = devices
        self._health = health
        self.keyring = keyring
        self.refresh = refresh
        self.max_rollouts = max_rollouts
        self.clock = clock
        self._lock = threading.Lock()
        self._snap: _Snapshot | None = None

    # --- endpoints --------------------------------------------------------------------------------

    def overview(self) -> dict[str, Any]:
        """Fleet counts and the latest rollouts, newest first (``/api/overview``)."""
        s = self.snapshot()
        by_state: dict[str, int] = {}
        by_profile: dict[str, int] = {}
        for row in s.rows:
            by_state[row["state"]] = by_state.get(row["state"], 0) + 1
            by_profile[row["profile"] or "?"] = by_profile.get(row["profile"] or "?", 0) + 1
        rollouts = [rollout_view(s.docs[i["rollout"]], full=False)
                    for i in reversed(s.summaries) if i["rollout"] in s.docs]
        return {"fleet": self.fleet, "now": s.now, "devices": {"total": len(s.rows), "by_state": by_state,
                                                               "by_profile": by_profile},
                "rollouts": rollouts, "rollout_count": len(s.summaries)}

    def devices(self, *, profile: str = "", state: str = "", q: str = "", limit: int = 1000,
                offset: int = 0) -> dict[str, Any]:
        """The device table filtered by profile, state and a device-id substring (``/api/devices``)."""
        s = self.snapshot()
        rows = [r for r in s.rows if (not profile or r["profile"] == profile)
                and (not state or r["state"] == state) and (not q or q in r["device"])]
        return {"now": s.now, "total": len(s.rows), "matched": len(rows), "offset": offset, "limit": limit,
                "profiles": sorted({r["profile"] for r in s.rows if r["profile"]}),
                "states": sorted({r["state"] for r in s.rows}), "devices": rows[offset:offset + limit]}

    def device(self, device_id: str) -> dict[str, Any] | None:
        """One device: its row, its full record and its history in the latest rollouts (newest
        first), or None if neither the inventory nor a rollout knows it."""
        s = self.snapshot()
        row = next((r for r in s.rows if r["device"] == device_id), None)
        history = []
        for summary in reversed(s.summaries):
            doc = s.docs.get(summary["rollout"])
            target = (doc or {}).get("devices", {}).get(device_id)
            if doc is None or target is None:
                continue
            notes = [h for h in doc["history"] if _mentions(h["text"], device_id)]
            history.append({"rollout": doc["rollout"], "release": doc["release"], "status": doc["status"],
                            "created": doc["created"], "target": target, "notes": notes})
        if row is None and not history:
            return None
        record = next((rec.to_dict() for rec in self._records() if rec.device == device_id), None)
        return {"now": s.now, "device": device_id, "row": row, "record": record, "history": history}

    def rollouts(self) -> list[dict[str, Any]]:
        """Every rollout's summary (:func:`fleet.rollout_ops.list_rollouts`), newest first."""
        return list(reversed(self.snapshot().summaries))

    def rollout(self, rollout_id: str) -> dict[str, Any] | None:
        """The ``rollout status --json`` document of one rollout with the console's views of it."""
        doc = self.snapshot().docs.get(rollout_id)
        if doc is None:
            if rollout_id not in {i["rollout"] for i in self.snapshot().summaries}:
                return None
            doc = status(self.db, rollout_id)  # older than the snapshot keeps: read on demand
        return rollout_view(doc, full=True)

    def releases(self) -> list[dict[str, Any]]:
        """Each release a rollout used, newest first: per profile bundle, precision, Δ perplexity
        and expected speed; ``verified`` says whether its signature checks with the keyring."""
        return self.snapshot().releases

    # --- building ---------------------------------------------------------------------------------

    def snapshot(self) -> _Snapshot:
        """The state at most ``refresh`` seconds old (built by the first caller that needs it)."""
        with self._lock:
            if self._snap is None or time.monotonic() - self._snap.at >= self.refresh:
                self._snap = self._build(self._snap)
            return self._snap

    def _build(self, old: _Snapshot | None) -> _Snapshot:
        now = self.clock()
        summaries = list_rollouts(self.db, self.fleet)
        docs: dict[str, dict[str, Any]] = {}
        for i in summaries[-self.max_rollouts:]:
            prev = old.docs.get(i["rollout"]) if old else None
            # A rollout that is no longer active changes no more once its last write is read.
            if prev is not None and prev["status"] not in ACTIVE and prev["updated"] == i["updated"] \
                    and prev["status"] == i["status"]:
                docs[i["rollout"]] = prev
            else:
                try:
                    docs[i["rollout"]] = status(self.db, i["rollout"])
                except RolloutError as e:  # one unreadable rollout must not blind the whole page
                    log.warning("console: rollout %s is not shown: %s", i["rollout"], e)
        latest = docs.get(summaries[-1]["rollout"]) if summaries else None
        rows = [device_row(rec, latest) for rec in self._records()]
        return _Snapshot(time.monotonic(), now, rows, summaries, docs, self._release_docs(summaries))

    def _records(self) -> list[DeviceRecord]:
        health = {h.device: h for h in _read(self._health)} if self._health else {}
        return [with_health(rec, health.get(rec.device)) for rec in _read(self._devices)]

    def _release_docs(self, summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # Verified on every snapshot, not cached: the stored bytes are what the controller checks.
        used: dict[str, list[str]] = {}
        for i in reversed(summaries):
            used.setdefault(i["release"], []).append(i["rollout"])
        with FleetStore(self.db) as store:
            return [{**self._release(*store.release(rid)[:2], rid), "rollouts": rollouts}
                    for rid, rollouts in used.items()]

    def _release(self, data: bytes, sig: bytes, release_id: str) -> dict[str, Any]:
        try:
            release, verified, problem = verify_release(data, sig, self.keyring), True, ""
        except EdgepackError as e:  # shown, not hidden: the controller refuses such a rollout
            verified, problem = False, str(e)
            try:
                release = Release.from_bytes(data)
            except EdgepackError:
                return {"release": release_id, "verified": False, "problem": problem, "profiles": []}
        return {"release": release_id, "model": release.model, "version": release.version,
                "created": release.created, "verified": verified, "problem": problem,
                "profiles": [release_profile(b.to_dict()) for _, b in sorted(release.bundles.items())]}


def _read(table: DevicesFn) -> list[DeviceRecord]:
    # The controller's loop folds messages into its tables while we read them. Inventory.devices()
    # copies the entries in one C-level sort under the GIL, and each entry's parts are replaced,
    # never mutated; the retry covers an interpreter where that copy is not atomic.
    for _ in range(3):
        try:
            return table()
        except RuntimeError:  # "dictionary changed size during iteration"
            time.sleep(0.01)
    return table()


# --- pure views -------------------------------------------------------------------------------------


_HEALTH_FIELDS: Final = ("health", "health_ts", "health_age_s", "cpu_percent", "rss_bytes", "temperature_c",
                         "disk_free_bytes", "last_decode_tok_s", "last_ttft_ms", "busy", "queue", "errors")


def with_health(rec: DeviceRecord, health: DeviceRecord | None) -> DeviceRecord:
    """The device's record (birth, state) with the health fields of its health table's record."""
    if health is None or health.health is None:
        return rec
    return dataclasses.replace(rec, **{k: getattr(health, k) for k in _HEALTH_FIELDS})


def device_row(rec: DeviceRecord, latest: dict[str, Any] | None) -> dict[str, Any]:
    """One line of the device table from an inventory record and the latest rollout's document."""
    cur = rec.current or {}
    digest = cur.get("digest")
    gate = cur.get("gate") if isinstance(cur.get("gate"), dict) else None
    if gate is None:  # health's ``current`` is short; the birth's bundle list has the gate report
        gate = next((b.get("gate") for b in rec.bundles if b.get("digest") == digest
                     and isinstance(b.get("gate"), dict)), None)
    health = rec.health or {}
    last = health.get("last_gate") if isinstance(health.get("last_gate"), dict) else gate
    target = ((latest or {}).get("devices") or {}).get(rec.device)
    bundle = " ".join(str(p) for p in (cur.get("model"), f"v{cur['version']}" if "version" in cur else None,
                                       cur.get("quant")) if p) or None
    return {
        "device": rec.device, "state": rec.state or "unknown", "profile": rec.profile,
        "bundle": bundle, "digest": digest if isinstance(digest, str) else None,
        "decode_tok_s": _first(rec.last_decode_tok_s, _num((gate or {}).get("decode_tok_s"))),
        "ttft_ms": _first(rec.last_ttft_ms, _num((gate or {}).get("ttft_ms"))),
        "rss_bytes": rec.rss_bytes, "temperature_c": rec.temperature_c, "health_age_s": rec.health_age_s,
        "last_gate": None if last is None else {
            "ok": last.get("ok"), "failures": list(last.get("failures") or [])[:3],
            "decode_tok_s": _num(last.get("decode_tok_s")), "ts": _num(last.get("ts"))},
        "rollout_state": target["state"] if target else None,
        "rollout": (latest or {}).get("rollout") if target else None,
    }


def release_profile(b: dict[str, Any]) -> dict[str, Any]:
    """The releases table's line of one profile's bundle (:class:`ReleaseBundle` as a dict)."""
    quality = b.get("quality") or {}
    expected = b.get("expected") or {}
    return {"profile": b["profile"], "bundle": b["file"], "model": b["model"], "version": b["version"],
            "runtime": b["runtime"], "precision": b["precision"], "quant": b["quant"],
            "size": b["size"], "delta_ppl_pct": _num(quality.get("delta_pct")),
            "top1_agreement": _num(quality.get("top1_agreement")),
            "expected_decode_tok_s": _num(expected.get("decode_tok_s")),
            "expected_ttft_ms": _num(expected.get("ttft_ms")),
            "fidelity_threshold": _num(b.get("fidelity_threshold"))}


def wave_progress(report: dict[str, Any]) -> dict[str, Any]:
    """A wave's bar: committed / failed / in flight / offline / pending out of its size."""
    c = report["counts"]
    return {"wave": report["wave"], "phase": report["phase"], "size": report["size"],
            "committed": c.get("committed", 0), "failed": sum(c.get(s, 0) for s in _FAILED),
            "in_flight": sum(c.get(s, 0) for s in _IN_FLIGHT), "offline": c.get("offline", 0),
            "pending": c.get("pending", 0), "median_regression": report["median_regression"],
            "median_agreement": report["median_agreement"]}


def compare(devices: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per profile, the committed devices' decode tok/s and fidelity agreement before -> after.

    Args:
        devices: the ``devices`` of a ``rollout status --json`` document.

    Returns:
        One entry per profile (sorted): ``devices`` (committed ones with figures) and, for
        ``decode_tok_s`` and ``agreement``, the median ``before`` / ``after``, their ``min`` / ``max``
        and ``n`` (devices with both figures).
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for t in devices.values():
        if t.get("state") == "committed" and (t.get("after") or t.get("before")):
            groups.setdefault(t.get("profile") or "?", []).append(t)
    out = []
    for profile, ts in sorted(groups.items()):
        entry: dict[str, Any] = {"profile": profile, "devices": len(ts)}
        for measure in ("decode_tok_s", "agreement"):
            before = [v for t in ts if (v := _num((t.get("before") or {}).get(measure))) is not None]
            after = [v for t in ts if (v := _num((t.get("after") or {}).get(measure))) is not None]
            entry[measure] = {
                "before": _median(before), "after": _median(after), "n_before": len(before),
                "n_after": len(after), "min": min(before + after) if before or after else None,
                "max": max(before + after) if before or after else None}
        out.append(entry)
    return out


def rollout_view(doc: dict[str, Any], *, full: bool) -> dict[str, Any]:
    """A status document with ``progress`` (per wave) and ``compare`` (per profile); without
    ``full`` the per-device map is left out and the history cut to its tail."""
    view = {k: v for k, v in doc.items() if full or k not in ("devices", "history", "spec")}
    view["progress"] = [wave_progress(w) for w in doc["wave_reports"]]
    view["compare"] = compare(doc.get("devices") or {})
    view["failures"] = [{"device": d, "state": t["state"], "code": t["code"], "reason": t["reason"]}
                        for d, t in (doc.get("devices") or {}).items() if t["state"] in _FAILED][:50]
    if not full:
        view["history"] = doc["history"][-_HISTORY_TAIL:]
        view["waves_spec"] = doc["spec"].get("waves")
    return view


def _mentions(text: str, device: str) -> bool:
    i = text.find(device)
    while i >= 0:  # "sim-0001" must not match inside "sim-00010"
        end = i + len(device)
        if end == len(text) or not (text[end].isalnum() or text[end] in "-_"):
            return True
        i = text.find(device, i + 1)
    return False


def _num(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _first(*values: float | None) -> float | None:
    return next((v for v in values if v is not None), None)


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


# --- the HTTP side ----------------------------------------------------------------------------------


class Console:
    """The console's HTTP server: :meth:`start` binds and serves from a thread, :meth:`stop` ends it.

    Args:
        config: address, key and limits.
        view: what it shows.
    """

    def __init__(self, config: ConsoleConfig, view: FleetView) -> None:
        self.config = config
        self.view = view
        self._server: _Server | None = None

    @classmethod
    def for_controller(cls, controller: Any, config: ConsoleConfig) -> Console:
        """The console of a :class:`fleet.controller.Controller` (its database, inventory, keyring);
        the controller is asked to follow the devices' health too."""
        health = controller.follow_health()
        inv = controller.inventory
        view = FleetView(controller.config.db, controller.config.fleet,
                         lambda: inv.devices(controller.clock()), controller.keyring,
                         health=lambda: health.devices(controller.clock()), refresh=config.refresh,
                         max_rollouts=config.max_rollouts, clock=controller.clock)
        return cls(config, view)

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port).

        Raises:
            ConsoleError: not started.
        """
        if self._server is None:
            raise ConsoleError("the console is not listening")
        return str(self._server.server_address[0]), int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """``http://HOST:PORT/`` of the page."""
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def start(self) -> None:
        """Bind and serve.

        Raises:
            TransportError: the address cannot be bound.
        """
        try:
            server = _Server(self)
        except OSError as e:
            raise TransportError(f"cannot listen on {self.config.host}:{self.config.port}: {e}",
                                 hint="Pick another address with --http HOST:PORT.") from e
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                         name="edgepack-console", daemon=True).start()
        self._server = server
        log.info("console: %s%s", self.url, " (key required)" if self.config.key else "")
        if not is_loopback(self.address[0]):
            log.warning("the console on %s is plain HTTP: its key crosses the network in clear "
                        "text (put a TLS proxy in front, or use an SSH tunnel)", self.url)

    def stop(self) -> None:
        """Stop serving; requests being answered finish on their own threads."""
        if self._server is not None:
            self._server.shutdown()  # waits for serve_forever to return
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Console:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    """A thread per request, at most ``max_connections`` at once (one more is answered 503)."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, console: Console) -> None:
        self.console = console
        self.address_family = socket.AF_INET6 if ":" in console.config.host else socket.AF_INET
        self._slots = threading.BoundedSemaphore(console.config.max_connections)
        super().__init__((console.config.host, console.config.port), _Handler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # not HTTPServer's: it calls getfqdn (DNS)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        if self._slots.acquire(blocking=False):
            super().process_request(request, client_address)  # its thread releases the slot
            return
        with contextlib.suppress(OSError):
            request.settimeout(1.0)
            request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 1\r\n"
                            b"Content-Length: 0\r\n\r\n")
        self.shutdown_request(request)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("console connection from %s ended with an error", client_address, exc_info=True)


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so idle keep-alives never hold the bounded threads.
    protocol_version = "HTTP/1.0"
    server_version = "edgepack-console"
    sys_version = ""
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.console.config.read_timeout)  # a slow client lets go

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._get(body=True)

    def do_HEAD(self) -> None:
        self._get(body=False)

    def _refuse_write(self) -> None:
        self._send(405, _dumps({"error": "the console is read-only: GET only"}), "application/json",
                   [("Allow", "GET, HEAD")])

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse_write

    def _get(self, *, body: bool) -> None:
        console = self.server.console
        url = urlsplit(self.path)
        path = unquote(url.path)
        try:
            self._authorize(console.config.key)
            if path in ("/", "/index.html"):
                page = PAGE.replace("__POLL_MS__", str(int(console.config.poll * 1000))).encode()
                self._send(200, page, "text/html; charset=utf-8", body=body,
                           headers=[("Content-Security-Policy", _CSP)])
                return
            doc = self._route(console, path, parse_qs(url.query))
            self._send_json(doc, body=body)
        except _HttpError as e:
            headers = [("WWW-Authenticate", 'Basic realm="edgepack console", charset="UTF-8"')] \
                if e.status == 401 else []
            self._send(e.status, _dumps({"error": str(e)}), "application/json", headers, body=body)
        except EdgepackError as e:  # the database is busy or damaged: say so, keep serving
            self._send(503, _dumps({"error": str(e)}), "application/json", body=body)
        except Exception as e:  # a bug in one request must not end serving
            log.exception("console GET %s failed", path)
            self._send(500, _dumps({"error": f"internal error: {e}"}), "application/json", body=body)

    def _route(self, console: Console, path: str, query: dict[str, list[str]]) -> Any:
        view = console.view
        if path == "/api/overview":
            return {**view.overview(), "poll_s": console.config.poll}
        if path == "/api/devices":
            limit = min(_int_arg(query, "limit", console.config.max_devices), console.config.max_devices)
            return view.devices(profile=_arg(query, "profile"), state=_arg(query, "state"),
                                q=_arg(query, "q"), limit=limit, offset=_int_arg(query, "offset", 0))
        if path == "/api/releases":
            return view.releases()
        if path == "/api/rollouts":
            return view.rollouts()
        for prefix, fn in (("/api/devices/", view.device), ("/api/rollouts/", view.rollout)):
            if path.startswith(prefix) and len(path) > len(prefix):
                doc = fn(path.removeprefix(prefix))
                if doc is None:
                    raise _HttpError(404, f"no {prefix.split('/')[2][:-1]} {path.removeprefix(prefix)!r}")
                return doc
        raise _HttpError(404, f"no route GET {path}")

    def _authorize(self, key: str | None) -> None:
        if key is None:
            return
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        given = token.strip()
        if scheme.lower() == "basic":
            try:
                given = base64.b64decode(given, validate=True).decode("utf-8").partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                given = ""
        elif scheme.lower() != "bearer":
            given = ""
        if given and hmac.compare_digest(given.encode("utf-8", "replace"), key.encode("utf-8")):
            return
        raise _HttpError(401, "a key is required: 'Authorization: Bearer KEY', or basic auth with "
                              "the key as the password")

    def _send_json(self, doc: Any, *, body: bool) -> None:
        data = _dumps(doc)
        etag = '"' + hashlib.sha256(data).hexdigest()[:20] + '"'
        if etag in (self.headers.get("If-None-Match") or ""):
            self._send(304, b"", None, [("ETag", etag)], body=False)
            return
        self._send(200, data, "application/json", [("ETag", etag)], body=body)

    def _send(self, status: int, data: bytes, ctype: str | None,
              headers: Iterable[tuple[str, str]] = (), *, body: bool = True) -> None:
        self.send_response(status)
        if ctype:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if body and data:
            with contextlib.suppress(OSError):  # a client that left does not get its answer
                self.wfile.write(data)


# The page loads nothing from elsewhere and is never framed.
_CSP: Final = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
               "img-src data:; connect-src 'self'; frame-ancestors 'none'")


def _arg(query: dict[str, list[str]], name: str) -> str:
    return (query.get(name) or [""])[0][:200]


def _int_arg(query: dict[str, list[str]], name: str, default: int) -> int:
    raw = _arg(query, name)
    try:
        return max(0, int(raw)) if raw else default
    except ValueError:
        raise _HttpError(400, f"{name} must be a whole number, got {raw!r:.40}") from None


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


__all__ = ["Console", "ConsoleConfig", "ConsoleError", "FleetView", "compare", "device_row",
           "is_loopback", "release_profile", "rollout_view", "wave_progress", "with_health"]
