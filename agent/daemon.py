"""The agent as a service: lifecycle, births and health over MQTT, and the parts it wires together.

Parts, each in its own module:
- :class:`~agent.dispatch.CommandDispatcher` — paho's network thread hands it every command; it
  validates, drops duplicates, answers malformed input at once and routes the rest.
- :class:`~agent.serving.InferenceServer` — the bounded inference queue and its worker.
- :class:`~agent.installer.Installer` — install / rollback on command (the control worker runs
  them one at a time, with status and probe).
- :class:`~agent.resident.ResidentModel` — the one loaded model; an install swaps it between
  requests, never under one.
- :class:`~agent.http_api.HttpApi` (only with ``AgentConfig.http``) — the OpenAI-compatible HTTP
  door for local apps: the same inference server, model and counters as the MQTT door. It serves
  whether or not the broker is reachable, and is imported only when configured (idle RSS).
This module owns the lifecycle: :meth:`Agent.run` (the main thread) publishes health every
``health_interval`` and pings the systemd watchdog; every (re)connect publishes the retained birth
and ``online`` state; :meth:`Agent.stop` says ``offline`` and stops the parts.

Invariant: nothing that goes wrong while gathering health (a vanished state folder, a psutil
error, a sensor that fails) stops the main loop; the field reads as unknown and it is logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from agent import __version__
from agent import _systemd as systemd
from agent._counters import Counters
from agent.bundle.trust import signer_revoked
from agent.dispatch import CommandDispatcher
from agent.errors import EdgepackError, TransportError
from agent.gate import GateConfig
from agent.installer import Installer
from agent.jobs import JobJournal
from agent.protocol import (
    Command,
    InstallRequest,
    KeyringRequest,
    ProbeRequest,
    ProtocolError,
    RollbackRequest,
    StatusRequest,
    Topics,
    birth_payload,
    check_id,
    default_device_id,
    event_payload,
    health_payload,
    state_payload,
)
from agent.resident import ResidentModel
from agent.serving import InferenceServer
from agent.store import Store
from agent.transport.mqtt import Message, MqttTransport, Will
from agent.trust_store import TrustStore

if TYPE_CHECKING:
    from agent.http_api import HttpApi, HttpConfig

log = logging.getLogger("agent.daemon")
_T = TypeVar("_T")

COUNTERS = ("commands", "rejected", "busy", "duplicates", "replayed", "infer_errors",
            "install_errors", "health_errors", "expired", "bad_response_topic")


@dataclass
class AgentConfig:
    """Everything ``edgepack-agent run`` needs; flags and EDGEPACK_* env vars fill it."""

    state_dir: Path
    keyring: list[Path]
    broker_url: str = "mqtt://127.0.0.1:1883"
    device_id: str = field(default_factory=default_device_id)
    fleet: str = "default"
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    health_interval: float = 10.0  # seconds between health messages
    infer_queue: int = 4  # waiting inference requests before ``busy``
    threads: int | None = None  # override the profile's thread count
    load_check: bool = True  # load + generate before committing an install
    gate: GateConfig = field(default_factory=GateConfig)  # the load check's benchmark vs the SLO
    download_timeout: float = 30.0  # seconds without progress before a download retry
    chunk_interval: float = 0.05  # seconds of tokens coalesced per streamed chunk after the first
    http: HttpConfig | None = None  # the OpenAI-compatible HTTP door (None: MQTT only)

    def __post_init__(self) -> None:
        check_id(self.device_id, "device id")
        check_id(self.fleet, "fleet")
        if self.device_id.startswith("_"):
            raise ProtocolError("device id must not start with '_'", code="bad_field")
        if self.health_interval <= 0 or self.infer_queue < 1:
            raise EdgepackError("health_interval must be > 0 and infer_queue >= 1")


def _trim_heap() -> None:
    """Give the heap freed after start-up (imports, probe, profile parsing) back to the OS.

    glibc keeps freed memory in its arenas; on a small device that is resident memory the model
    could use. Elsewhere (musl, macOS) this is a no-op.
    """
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Agent:
    """The device daemon. ``start()`` connects and serves; ``stop()`` says goodbye and stops.

    Args:
        config: the agent configuration.
        transport_factory: builds the MQTT transport (the real one by default).
        clock: seconds since the epoch, for payload timestamps.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        transport_factory: Callable[..., MqttTransport] = MqttTransport,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.clock = clock
        self.topics = Topics(config.fleet, config.device_id)
        # The root-signed keyring (STATE_DIR/trust.json) once there is one, else --keyring files.
        self.trust = TrustStore(config.state_dir, config.keyring)
        self.store = Store(config.state_dir, self.trust.release_keyring())
        self.started_at = time.monotonic()
        http_counters: tuple[str, ...] = ()
        if config.http is not None:
            from agent.http_api import COUNTERS as http_counters
        self.counters = Counters(COUNTERS + http_counters)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._facts: dict[str, Any] | None = None
        self.model = ResidentModel(threads=config.threads)
        self.serving = InferenceServer(self.model, self.store.current, queue_size=config.infer_queue,
                                       chunk_interval=config.chunk_interval, counters=self.counters)
        self.installer = Installer(self.store, self.model, events=self._event, gate=config.gate,
                                   load_check=config.load_check,
                                   download_timeout=config.download_timeout, stop=self._stop,
                                   counters=self.counters, clock=clock)
        self.transport = transport_factory(
            config.broker_url, config.device_id, username=config.username,
            password=config.password, ca_file=config.ca_file, cert_file=config.cert_file,
            key_file=config.key_file,
            will=Will(self.topics.state, state_payload("lost"), qos=1, retain=True),
            on_connect=self._on_connect,
        )
        self.journal = JobJournal(config.state_dir / "jobs.json")
        self.dispatcher = CommandDispatcher(self.transport.publish, self.serving, self._control,
                                            topics=self.topics,
                                            journal=self.journal, on_replay=self._replayed,
                                            counters=self.counters, clock=clock)
        self.transport.subscribe(self.topics.cmd_filter, qos=1, handler=self.dispatcher.on_command)
        self.http: HttpApi | None = None
        if config.http is not None:
            from agent.http_api import HttpApi

            self.http = HttpApi(config.http, self.serving, self.store.current, self.http_health,
                                counters=self.counters, clock=clock)

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the workers, listen for HTTP if configured, connect (returns at once; see
        :meth:`wait_ready`).

        Raises:
            TransportError: the HTTP address cannot be bound (before anything is announced).
        """
        self.dispatcher.start()
        self.serving.start()
        if self.http is not None:
            self.http.start()
        self.transport.start()

    def wait_ready(self, timeout: float) -> bool:
        """True once connected and the birth was published."""
        return self._ready.wait(timeout)

    def run(self) -> None:
        """Serve until :meth:`request_stop`: health messages and watchdog pings from this thread.

        systemd hears READY as soon as the agent serves locally, whether or not the broker is
        reachable: a device that boots while its broker is down must not be killed at the start
        timeout and restarted in a loop. The broker's state goes in STATUS, updated as it changes.
        """
        self.start()
        watchdog = systemd.watchdog_interval(os.environ)
        systemd.ready(self._systemd_status(False))
        told_connected = False
        next_health = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            connected = self._ready.is_set() and self.transport.connected
            if connected != told_connected:
                systemd.status(self._systemd_status(connected))
                told_connected = connected
            if now >= next_health and self.transport.connected:
                self.publish_health()
                next_health = now + self.config.health_interval
            if watchdog:
                systemd.watchdog()  # the main loop is alive; a hung loop stops pinging
            self._stop.wait(min(watchdog or 1.0, 1.0, max(0.05, next_health - time.monotonic())))
        systemd.stopping("stopping")
        self.stop()

    def request_stop(self) -> None:
        self._stop.set()

    def _systemd_status(self, connected: bool) -> str:
        http = f", HTTP API on {self.http.url}" if self.http is not None else ""
        if connected:
            return f"serving {self.topics.base} on {self.config.broker_url}{http}"
        why = self.transport.last_error or "connecting"
        return f"serving locally{http}; broker {self.config.broker_url} not connected ({why})"

    def stop(self) -> None:
        """Publish ``offline``, stop the workers (finishing the running request) and disconnect."""
        self._stop.set()
        if self.http is not None:
            self.http.stop()  # no new HTTP requests; the running ones end with serving.stop()
        self.serving.stop()
        self.dispatcher.stop()
        if self.transport.connected:
            with contextlib.suppress(TransportError):
                self.transport.publish(self.topics.state, state_payload("offline", ts=self.clock()),
                                       qos=1, retain=True, timeout=2.0)
        self.transport.stop()
        self.model.drop()

    # --- status messages -------------------------------------------------------------------------

    def facts(self) -> dict[str, Any]:
        """Probe facts, probed once per process (the probe is cheap but not free)."""
        if self._facts is None:
            from agent.probe import probe

            self._facts = probe(disk_path=self.config.state_dir)
        return self._facts

    def _profile(self) -> str | None:
        from agent.profiles import load_profiles, match_profile

        try:
            return match_profile(self.facts(), load_profiles()).best
        except EdgepackError as e:
            log.warning("profile matching failed: %s", e)
            return None

    def birth(self) -> dict[str, Any]:
        cur = self.store.current()
        return {"agent_version": __version__, "device": self.config.device_id,
                "fleet": self.config.fleet, "facts": self.facts(), "profile": self._profile(),
                "bundles": [{**b.summary(), "role": role} for b, role in self.store.list()],
                "current": cur.summary() if cur else None,
                "recovered": self.store.recovered, "keyring": self._keyring_summary()}

    def _reading(self, what: str, fn: Callable[[], _T]) -> _T | None:
        # One health field: whatever fails (psutil.Error, OSError, a damaged store) reads as
        # unknown, is counted and logged, and the other fields still go out.
        try:
            return fn()
        except Exception as e:
            self.counters.incr("health_errors")
            log.warning("health: cannot read %s: %s", what, e)
            return None

    def health(self) -> dict[str, Any]:
        """The periodic health body. Never raises: a field that cannot be read is None."""
        import psutil

        def temperature() -> float | None:
            with contextlib.suppress(AttributeError):  # no sensors API on this platform
                readings = [t.current for ts in psutil.sensors_temperatures().values() for t in ts]
                return max(readings) if readings else None
            return None

        def current() -> dict[str, Any] | None:
            cur = self.store.current()
            return ({"slot": cur.slot, "digest": cur.digest, "model": cur.manifest.model_name,
                     "version": cur.manifest.version, "quant": cur.manifest.target.quant,
                     "signer_revoked": self._signer_revoked(cur.manifest.signer_key_id)}
                    if cur else None)

        usage = self.serving.last_usage
        return {
            "cpu_percent": self._reading("cpu", lambda: psutil.cpu_percent(interval=None)),
            "rss_bytes": self._reading("rss", lambda: psutil.Process().memory_info().rss),
            "temperature_c": self._reading("temperature", temperature),
            "disk_free_bytes": self._reading(
                "disk", lambda: psutil.disk_usage(str(self.config.state_dir)).free),
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            "current": self._reading("current bundle", current),
            "model_loaded": self.model.slot,
            "last_decode_tok_s": usage.get("decode_tok_s"),
            "last_ttft_ms": usage.get("ttft_ms"),
            "last_install": self.installer.last_install,
            "last_gate": self.installer.last_gate,
            "busy": self.serving.busy,
            "queue": self.serving.depth,
            "errors": self.counters.snapshot(),
            "keyring_version": self._reading("keyring", self._keyring_version),
        }

    def http_health(self) -> dict[str, Any]:
        """The HTTP door's ``GET /health``: cheap (no psutil, no probe), never raises.

        ``ready``: a bundle is installed, so requests can be served (the model loads on the first
        one if it is not ``model_loaded`` yet).
        """
        def current() -> dict[str, Any] | None:
            cur = self.store.current()
            return ({"model": cur.manifest.model_name, "version": cur.manifest.version,
                     "quant": cur.manifest.target.quant, "runtime": cur.manifest.target.runtime,
                     "slot": cur.slot, "digest": cur.digest} if cur else None)

        cur = self._reading("current bundle", current)
        return {"status": "ok" if cur else "no_model", "ready": cur is not None,
                "model_loaded": self.model.slot is not None, "loaded_slot": self.model.slot,
                "current": cur, "busy": self.serving.busy, "queue": self.serving.depth,
                "queue_size": self.serving.queue_size, "mqtt_connected": self.transport.connected,
                "last_usage": self.serving.last_usage, "counters": self.counters.snapshot()}

    def publish_health(self) -> None:
        """Publish one health message; never raises (a failure is logged and counted)."""
        try:
            body = self.health()
            self.transport.publish(self.topics.health, health_payload(body, ts=self.clock()),
                                   qos=0, retain=True)
        except Exception as e:  # the main loop must outlive any one health message
            self.counters.incr("health_errors")
            log.warning("health not published: %s", e)

    def _publish_birth(self) -> None:
        self.transport.publish(self.topics.birth, birth_payload(self.birth()), qos=1, retain=True)

    def _on_connect(self, session_present: bool) -> None:
        # Runs on every (re)connect: the retained birth and state must describe us now.
        try:
            self._publish_birth()
            self.transport.publish(self.topics.state, state_payload("online", ts=self.clock()),
                                   qos=1, retain=True)
        except EdgepackError as e:
            log.error("cannot announce ourselves: %s", e)
            return
        log.info("online as %s (session present: %s)", self.topics.base, session_present)
        if not self._ready.is_set():
            self._tell_interrupted()
            _trim_heap()
        self._ready.set()

    def _tell_interrupted(self) -> None:
        # An install the previous process died in never replies: say so once, so a rollout sends
        # it again now (and it resumes what was staged) instead of waiting for its timeout.
        told = []
        for job, command in self.journal.interrupted:
            if command == "install":
                self._event(job, "failed", code="interrupted", rolled_back=False,
                            serving=self.store.serving(),
                            reason="the agent stopped during this install (a crash, a power cut "
                                   "or a kill); sent again, it continues from what it staged")
            told.append(job)
        self.journal.told(told)

    def _event(self, job: str, stage: str, **detail: Any) -> None:
        try:
            self.transport.publish(self.topics.events,
                                   event_payload(job, stage, ts=self.clock(), detail=detail), qos=1)
        except EdgepackError as e:
            log.warning("event %s/%s not published: %s", job, stage, e)

    # --- control commands (the dispatcher's worker thread) ---------------------------------------

    def _control(self, req: Command, msg: Message) -> dict[str, Any]:
        if isinstance(req, InstallRequest):
            job_id = req.job or (msg.correlation_data or secrets.token_bytes(8)).hex()[:32]
            self._refresh_keys()  # `edgepack-agent keyring update` may have changed it meanwhile
            try:
                return self.installer.install(req, job_id)
            finally:
                self._announce_bundles()
        if isinstance(req, RollbackRequest):
            try:
                return self.installer.rollback(from_digest=req.from_digest)
            finally:
                self._announce_bundles()
        if isinstance(req, StatusRequest):
            return self.status()
        if isinstance(req, KeyringRequest):
            # Verified against the keyring held here (never trust-on-first-use over the network).
            trusted, changed = self.trust.update(req.keyring.encode("utf-8"))
            self._refresh_keys()
            if changed:
                log.info("keyring updated to v%d", trusted.version)
                self._announce_bundles()
            return {"keyring": trusted.summary(), "changed": changed}
        if isinstance(req, ProbeRequest):
            from agent.probe import probe

            return {"facts": probe(runtimes=req.runtimes, disk_path=self.config.state_dir),
                    "profile": self._profile()}
        raise ProtocolError(f"unhandled command {req.NAME}", code="unknown_command")

    def _replayed(self, job: str, req: Command, recorded: dict[str, Any]) -> None:
        # A host that lost the first answer may also have lost the job's events: say again how
        # it ended, marked as a replay.
        if isinstance(req, InstallRequest):
            if recorded.get("ok"):
                self._event(job, "committed", replayed=True, **(recorded.get("result") or {}))
            else:
                err = recorded.get("error") or {}
                self._event(job, "failed", replayed=True, code=err.get("code"), reason=err.get("message"))

    def _announce_bundles(self) -> None:
        with contextlib.suppress(EdgepackError):
            self._publish_birth()  # inventory must see the new bundle set

    def status(self) -> dict[str, Any]:
        cur, prev = self.store.current(), self.store.previous()
        return {"agent_version": __version__, "device": self.config.device_id,
                "current": cur.summary() if cur else None,
                "previous": prev.summary() if prev else None,
                "model_loaded": self.model.slot, "busy": self.serving.busy,
                "queue": self.serving.depth, "last_usage": self.serving.last_usage,
                "last_install": self.installer.last_install, "last_gate": self.installer.last_gate,
                "partial_install": self.store.kept_partial(),
                "counters": self.counters.snapshot(), "keyring": self._keyring_summary(),
                "current_signer_revoked": bool(cur) and self._signer_revoked(
                    cur.manifest.signer_key_id if cur else None)}

    # --- trust (agent.trust_store) ---------------------------------------------------------------

    def _refresh_keys(self) -> None:
        self.store.keyring = self.trust.release_keyring()

    def _keyring_version(self) -> int | None:
        trusted = self.trust.load()
        return trusted.version if trusted else None

    def _keyring_summary(self) -> dict[str, Any] | None:
        try:
            trusted = self.trust.load()
        except EdgepackError as e:
            log.warning("keyring: %s", e)
            return {"error": str(e)}
        return trusted.summary() if trusted else None

    def _signer_revoked(self, key_id: str | None) -> bool:
        # A current bundle signed by a since-revoked key keeps serving (policy: revocation refuses
        # new installs; replacing what serves is the fleet's decision), but says so.
        try:
            trusted = self.trust.load()
        except EdgepackError:
            return False
        return signer_revoked(key_id, trusted)


__all__ = ["Agent", "AgentConfig"]
