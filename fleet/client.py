"""The host's remote control of a fleet: one MQTT session, commands out, replies and status in.

:class:`FleetClient` wraps one :class:`~agent.transport.mqtt.MqttTransport` (a throwaway session:
random client id, ``session_expiry=0``) and a :class:`~agent.transport.request.RequestClient`.
Every command returns the device's ``result`` or raises a :class:`DeviceCommandError` subclass
carrying the device's error ``code`` and message (see :func:`remote_error` for the mapping).

Install: (1) subscribe to the device's ``events`` so no progress is missed, (2) send the request,
(3) pass each event of this job (the agent names the job after the request's correlation data) to
``on_event`` while waiting for the one reply, (4) return its result or raise.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from agent._fs import file_digest
from agent.errors import EdgepackError, InferenceError, InstallError, TransportError, UntrustedDataError
from agent.protocol import (
    CancelRequest,
    Command,
    InferChunk,
    InferRequest,
    InstallRequest,
    KeyringRequest,
    ProbeRequest,
    ProtocolError,
    Reply,
    RollbackRequest,
    StatusRequest,
    Topics,
    fleet_filter,
    parse_status,
)
from agent.transport.mqtt import Message, MqttTransport
from agent.transport.request import RequestClient
from fleet.inventory import DeviceRecord, Inventory

__all__ = [
    "DeviceBusyError", "DeviceCommandError", "DeviceInferenceError", "DeviceInstallError",
    "FleetClient", "bundle_info", "client_for", "install_job_id", "remote_error",
]

log = logging.getLogger("fleet.client")

CONNECT_TIMEOUT = 10.0  # seconds to reach the broker
COMMAND_TIMEOUT = 10.0  # seconds for status / probe / rollback / cancel to answer
INSTALL_TIMEOUT = 900.0  # seconds for a whole install: download + verify + load check
INFER_TIMEOUT = 60.0  # seconds between two chunks (the first includes loading the model)
MAX_INDEX_BYTES = 4 << 20  # an index.json larger than this is not one of ours
HTTP_TIMEOUT = 30.0  # seconds for the index.json fetch
# Codes the agent answers a malformed request with (agent.protocol.ERROR_CODES).
_REQUEST_CODES = frozenset(
    ("bad_json", "not_object", "unknown_command", "bad_field", "missing_field", "unknown_field",
     "too_large"))


# --- errors --------------------------------------------------------------------------------------


class DeviceCommandError(EdgepackError):
    """A device answered a command with an error.

    Attributes:
        device: the device id; command: the command name; code: the device's error code
            (``busy``, ``not_found``, ``downgrade``, ``bad_field``, ``internal``, ...).
    """

    def __init__(self, message: str, *, device: str, command: str, code: str, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.device = device
        self.command = command
        self.code = code


class DeviceInstallError(DeviceCommandError, InstallError):
    """An install or rollback failed on the device; ``rolled_back`` is True when the install's
    ``failed`` event said the previous bundle is serving again."""


class DeviceInferenceError(DeviceCommandError, InferenceError):
    """The device could not generate (no model, runtime unavailable, inference failed)."""


class DeviceBusyError(DeviceCommandError, TransportError):
    """The device's queue is full; worth retrying later."""

    hint = "The device is busy with other requests; retry in a moment."


def remote_error(device: str, command: str, error: dict[str, str] | None, *,
                 rolled_back: bool = False) -> DeviceCommandError:
    """The exception for a device's ``{"code", "message"}`` error.

    Mapping: ``busy`` -> :class:`DeviceBusyError`; a refused request (protocol codes) ->
    :class:`DeviceCommandError` with a version hint; otherwise by command: install/rollback ->
    :class:`DeviceInstallError`, infer -> :class:`DeviceInferenceError`, the rest ->
    :class:`DeviceCommandError`.

    Args:
        device: the device id; command: the command name.
        error: the error object of a :class:`Reply` or :class:`InferChunk`.
        rolled_back: for installs, whether the device said it rolled back.

    Returns:
        The error to raise (not raised here).
    """
    code = (error or {}).get("code", "internal")
    text = f"{device}: {command} failed ({code}): {(error or {}).get('message', 'no reason given')}"
    if code == "busy":
        return DeviceBusyError(text, device=device, command=command, code=code)
    if code in _REQUEST_CODES:
        return DeviceCommandError(
            text, device=device, command=command, code=code,
            hint="The device refused the request as malformed; are host and agent versions compatible?")
    if command in ("install", "rollback"):
        e = DeviceInstallError(text, device=device, command=command, code=code)
        e.rolled_back = rolled_back
        e.step = code
        if rolled_back:
            e.hint = "The device rolled back: the previous bundle is serving again."
        return e
    if command == "infer":
        return DeviceInferenceError(text, device=device, command=command, code=code)
    return DeviceCommandError(text, device=device, command=command, code=code)


def install_job_id(correlation: bytes) -> str:
    """The job id the agent puts in the ``events`` of an install sent with ``correlation``."""
    return correlation.hex()[:32]


# --- bundle lookup -------------------------------------------------------------------------------


def bundle_info(url: str, *, timeout: float = HTTP_TIMEOUT) -> tuple[str, int]:
    """The sha256 and size of a bundle, for an install request.

    Args:
        url: ``http(s)://host[:port]/[prefix/]NAME`` served by ``edgepack serve`` (looked up in
            ``index.json`` next to it: nothing is downloaded), or a local path / ``file://`` URL
            (hashed here).
        timeout: seconds for the HTTP request.

    Returns:
        ``(sha256 hex, size in bytes)``.

    Raises:
        TransportError: the index cannot be fetched, or does not list the bundle.
        UntrustedDataError: the index is not what ``edgepack serve`` writes.
        EdgepackError: a local file cannot be read.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("http", "https"):
        return _lookup_index(url, timeout)
    return _hash_local(local_path(url))


def local_path(spec: str) -> Path:
    """The path of a local path or ``file://`` URL (``~`` expanded, not resolved)."""
    if spec.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlsplit(spec).path))
    return Path(spec).expanduser()


def _lookup_index(url: str, timeout: float) -> tuple[str, int]:
    name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
    index_url = urllib.parse.urljoin(url, "index.json")
    hint = "Serve the folder with 'edgepack serve', or pass --sha256 and --size."
    try:
        with urllib.request.urlopen(index_url, timeout=timeout) as r:
            data = r.read(MAX_INDEX_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise TransportError(f"cannot fetch {index_url}: {e}", hint=hint) from e
    if len(data) > MAX_INDEX_BYTES:
        raise UntrustedDataError(f"{index_url} is larger than {MAX_INDEX_BYTES} bytes", hint=hint)
    try:
        doc = json.loads(data)
        entries = doc["bundles"]
        found = [b for b in entries if b["name"] == name]
    except (ValueError, KeyError, TypeError) as e:
        raise UntrustedDataError(f"{index_url} is not a bundle index: {e}", hint=hint) from e
    if not found:
        raise TransportError(f"{index_url} does not list {name!r}", hint=hint)
    sha, size = found[0].get("sha256"), found[0].get("size")
    if not isinstance(sha, str) or type(size) is not int:
        raise UntrustedDataError(f"{index_url}: bad entry for {name!r}", hint=hint)
    return sha, size


def _hash_local(path: Path) -> tuple[str, int]:
    try:
        return file_digest(path)
    except OSError as e:
        raise EdgepackError(f"cannot read bundle {path}: {e}") from e


# --- the client ----------------------------------------------------------------------------------


class FleetClient:
    """One host session with the fleet's broker; use as a context manager.

    Args:
        broker_url: ``mqtt://host:port`` or ``mqtts://host:port``.
        fleet: the fleet id.
        client_id: MQTT client id (names our reply topics); default a random ``host-<hex>``.
        username, password: broker credentials (a controller account under an ACL).
        ca_file: CA bundle for ``mqtts``.
        connect_timeout: seconds to reach the broker in :meth:`__enter__`.
        clock: epoch seconds, for the inventory's health ages.

    Raises:
        TransportError: a malformed broker URL, unreadable TLS files, or (on entry) no connection.
        ProtocolError: a malformed fleet or client id.
    """

    def __init__(self, broker_url: str, fleet: str = "default", *, client_id: str | None = None,
                 username: str | None = None, password: str | None = None, ca_file: str | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT,
                 clock: Callable[[], float] = time.time) -> None:
        self.fleet = fleet
        self.connect_timeout = connect_timeout
        self.clock = clock
        cid = client_id or f"host-{secrets.token_hex(6)}"
        # A throwaway session: nothing should be queued for a CLI that has exited.
        self.transport = MqttTransport(broker_url, cid, username=username, password=password,
                                       ca_file=ca_file, session_expiry=0)
        # Subscribes to our reply topic before connecting, so it is in place before any request.
        self.requests = RequestClient(self.transport, fleet)

    def __enter__(self) -> FleetClient:
        self.transport.start()
        try:
            self.transport.wait_connected(self.connect_timeout)
        except TransportError:
            self.transport.stop()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Disconnect cleanly."""
        self.transport.stop()

    # --- inventory ---------------------------------------------------------------------------------

    def devices(self, wait: float = 1.0) -> list[DeviceRecord]:
        """The fleet's devices, from their retained state/birth/health messages.

        Args:
            wait: seconds to collect (retained messages arrive at once on subscription; live health
                may add more). Bounded: returns after ``wait`` whatever arrived.

        Returns:
            The :class:`DeviceRecord` table, sorted by device id.

        Raises:
            TransportError: a subscription could not be made.
        """
        received: queue.SimpleQueue[Message] = queue.SimpleQueue()
        filters = [fleet_filter(self.fleet, k) for k in ("state", "birth", "health")]
        try:
            for f in filters:
                self.transport.subscribe(f, qos=1, handler=received.put)
            time.sleep(max(0.0, wait))
        finally:
            # Unsubscribed so a later call is a new subscription and gets the retained set again.
            for f in filters:
                self.transport.unsubscribe(f)
        inv = Inventory(self.fleet)
        while True:
            try:
                m = received.get_nowait()
            except queue.Empty:
                break
            inv.apply(m.topic, m.payload, now=self.clock())
        if inv.rejected:
            log.warning("ignored %d malformed status message(s); last: %s", inv.rejected,
                        inv.last_rejection)
        return inv.devices(now=self.clock())

    # --- commands ----------------------------------------------------------------------------------

    def status(self, device: str, *, timeout: float = COMMAND_TIMEOUT) -> dict[str, Any]:
        """The device's installed bundles, serving model, queue and counters.

        Raises:
            TransportError: no reply within ``timeout`` (device offline?).
            DeviceCommandError: the device answered with an error.
            ProtocolError: a malformed device id or reply.
        """
        return self._call(device, StatusRequest(), timeout)

    def probe(self, device: str, runtimes: bool = False, *,
              timeout: float = COMMAND_TIMEOUT) -> dict[str, Any]:
        """The device's hardware facts and matched profile (``runtimes``: also check runtimes,
        which is slow on the device — give it a longer ``timeout``).

        Raises:
            TransportError, DeviceCommandError, ProtocolError: as :meth:`status`.
        """
        return self._call(device, ProbeRequest(runtimes=runtimes), timeout)

    def rollback(self, device: str, *, timeout: float = COMMAND_TIMEOUT * 6) -> dict[str, Any]:
        """Switch the device back to its previous bundle.

        Raises:
            DeviceInstallError: nothing to roll back to, or the switch failed.
            TransportError, ProtocolError: as :meth:`status`.
        """
        return self._call(device, RollbackRequest(), timeout)

    def cancel(self, device: str, request_id: str, *, timeout: float = COMMAND_TIMEOUT) -> dict[str, Any]:
        """Cancel a running or queued inference by its ``request_id``.

        Raises:
            DeviceCommandError: ``not_found`` if no such request is running or queued.
            TransportError, ProtocolError: as :meth:`status`.
        """
        return self._call(device, CancelRequest(request_id), timeout)

    def keyring(self, device: str, document: bytes, *,
                timeout: float = COMMAND_TIMEOUT) -> dict[str, Any]:
        """Send a root-signed keyring (``edgepack keys generate --root|rotate|revoke``).

        Returns:
            ``{"keyring": {version, root_keys, release_keys, revoked, ...}, "changed": bool}``.

        Raises:
            DeviceCommandError: refused: ``downgrade`` (not newer than the device's),
                ``signature`` (not signed by the device's current root), ``bad_keyring``.
            TransportError, ProtocolError: as :meth:`status`.
        """
        return self._call(device, KeyringRequest(document.decode("utf-8", "replace")), timeout)

    def install(self, device: str, url: str, sha256: str, size: int, *,
                on_event: Callable[[dict[str, Any]], None] | None = None,
                timeout: float = INSTALL_TIMEOUT) -> dict[str, Any]:
        """Install a bundle on a device and wait for the outcome.

        Args:
            device: the device id.
            url: where the device downloads it (http, https, or file:// on the device itself).
            sha256, size: of the bundle file (see :func:`bundle_info`).
            on_event: called (on this thread) with each ``events`` payload of this install:
                ``{"job", "stage", "ts", ...}``, stage ``downloading`` ... ``committed`` /
                ``rolled_back`` / ``failed``.
            timeout: seconds for the whole install.

        Returns:
            The reply's result (``installed``, ``previous``, ``already_installed``, ``check``, ...).

        Raises:
            DeviceInstallError: the device refused or failed it (``code``, ``rolled_back``).
            DeviceBusyError: the device's command queue is full.
            TransportError: no reply within ``timeout``.
            ProtocolError: a malformed request field or reply.
        """
        req = InstallRequest(url, sha256, size)
        events: queue.SimpleQueue[Message] = queue.SimpleQueue()
        topic = Topics(self.fleet, device).events
        # (1) Subscribe before sending: the broker handles our SUBSCRIBE before our PUBLISH.
        self.transport.subscribe(topic, qos=1, handler=events.put)
        try:
            with self.requests.request(device, "install", req, timeout=timeout) as pending:
                job = install_job_id(pending.correlation)
                deadline = time.monotonic() + timeout
                rolled_back = False
                reply: Reply | None = None
                while reply is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TransportError(f"{device}: no install result within {timeout:.0f}s",
                                             hint="The install may still finish; check "
                                                  "'edgepack fleet status'.")
                    try:
                        # Short waits so events are shown while the install runs.
                        reply = Reply.from_bytes(pending.get(timeout=min(left, 0.2)).payload)
                    except TransportError:
                        reply = None
                    rolled_back |= self._drain_events(events, job, on_event)
                rolled_back |= self._drain_events(events, job, on_event)
        finally:
            self.transport.unsubscribe(topic)
        if not reply.ok:
            raise remote_error(device, "install", reply.error, rolled_back=rolled_back)
        return reply.result or {}

    def infer(self, device: str, request: InferRequest, *,
              timeout: float = INFER_TIMEOUT) -> Iterator[InferChunk]:
        """Stream a generation: chunks in order, through the one with ``done=True``.

        Stop iterating (or close the generator) to stop listening; the device keeps generating
        unless sent :meth:`cancel` with the request's ``request_id``.

        Args:
            device: the device id.
            request: the inference request.
            timeout: seconds to wait between two chunks.

        Yields:
            :class:`InferChunk` objects without error.

        Raises:
            DeviceInferenceError: the device ended the stream with an error.
            DeviceBusyError: the device's inference queue is full.
            TransportError: no chunk within ``timeout``.
            ProtocolError: a malformed chunk.
        """
        for chunk in self.requests.stream(device, request, timeout=timeout):
            if chunk.error is not None:
                raise remote_error(device, "infer", chunk.error)
            yield chunk

    # --- helpers -----------------------------------------------------------------------------------

    def _call(self, device: str, req: Command, timeout: float) -> dict[str, Any]:
        reply = self.requests.call(device, req.NAME, req, timeout=timeout)
        if not reply.ok:
            raise remote_error(device, req.NAME, reply.error)
        return reply.result or {}

    def _drain_events(self, events: queue.SimpleQueue[Message], job: str,
                      on_event: Callable[[dict[str, Any]], None] | None) -> bool:
        """Pass this job's queued events on; True if one said the device rolled back."""
        rolled_back = False
        while True:
            try:
                m = events.get_nowait()
            except queue.Empty:
                return rolled_back
            try:
                ev = parse_status(m.payload)
            except ProtocolError as e:  # tolerated: progress display is best effort
                log.debug("ignored a malformed event: %s", e)
                continue
            if ev.get("job") != job:
                continue  # another install's progress (the agent runs them one at a time)
            rolled_back |= ev.get("stage") == "rolled_back" or ev.get("rolled_back") is True
            if on_event is not None:
                on_event(ev)


def client_for(args: Any) -> FleetClient:
    """The host client that the ``fleet`` commands' common options describe (an argparse
    namespace with ``broker``, ``fleet``, ``username``, ``password``, ``ca_file``)."""
    return FleetClient(args.broker, args.fleet, username=args.username, password=args.password,
                       ca_file=args.ca_file)
