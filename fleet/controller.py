"""``edgepack fleet controller``: the host service that owns a fleet's rollouts.

Thin I/O around the state machine (:mod:`fleet.rollout`): MQTT in, SQLite, MQTT out.

- One MQTT session with a fixed client id (``edgepack-controller-<fleet>``) and a persistent
  session (a day by default): replies and install events that arrive while the controller is
  down are queued by the broker and delivered when it returns. It follows the fleet's retained
  ``birth`` and ``state`` (the inventory), every device's ``events``, and its replies
  (``<device>/reply/<client id>``: the device level says who answered).
- Each loop: (1) take the messages that arrived (paho's thread only queues them), (2) fold births
  and states into the inventory and feed every event to its rollout, (3) apply operator commands
  and start new rollouts (``edgepack rollout start`` writes them to the database), (4) tick the
  active rollouts, (5) write every changed rollout and target in ONE transaction, (6) only then
  publish the installs and rollbacks the state machine asked for. A kill -9 at any point leaves
  the database at a committed batch; on start, in-flight jobs are sent again under the same job
  names and the agents answer them from their journals.
- A new rollout is planned against the inventory only after the retained births have settled
  (no new device for :data:`SETTLE_SECONDS`), so a controller that just connected does not plan
  against half a fleet.
- A rollout whose stored release no longer verifies against the controller's keyring (tampered
  in the database, or signed by a key it does not trust) is aborted with the reason; nothing of
  it is dispatched.
- Keyrings: the fleet's desired root-signed keyring (``edgepack fleet keyring push`` records it)
  is sent as ``cmd/keyring`` to every device that reports an older one; :mod:`fleet.keyring_push`
  decides who and when, and each outcome is written before the next send, as for rollouts.
- Bundles: the rollout's ``--base-url``, else the controller's, else the controller serves the
  release's folder itself with :class:`fleet.serve.BundleServer` (Range, so downloads resume) on
  ``--serve-host`` (loopback unless told otherwise).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import _systemd as systemd
from agent.bundle import load_keyring
from agent.bundle.release import verify_release
from agent.errors import EdgepackError, TransportError
from agent.protocol import (
    COMMAND_EXPIRY,
    InstallRequest,
    KeyringRequest,
    ProtocolError,
    Reply,
    RollbackRequest,
    Topics,
    decode_object,
    fleet_filter,
    parse_topic,
    reply_filter,
)
from agent.transport.mqtt import Message, MqttTransport
from fleet.inventory import DeviceRecord, Inventory
from fleet.keyring_push import KeyringDevice, KeyringPush, KeyringSync
from fleet.keyring_push import parse_job as parse_keyring_job
from fleet.rollout import (
    ACTIVE,
    NEW,
    Action,
    BundleRef,
    DeviceInfo,
    Dispatch,
    Rollback,
    Rollout,
    RolloutError,
    parse_job,
)
from fleet.store import FleetStore

log = logging.getLogger("fleet.controller")

SETTLE_SECONDS = 1.0  # quiet time after the last new birth before a new rollout is planned
MAX_BATCH = 20_000  # messages handled per loop before the batch is written
BATCH_LINGER = 0.05  # seconds to gather more messages into one transaction
SESSION_EXPIRY = 86_400  # seconds the broker keeps our session (and what is sent to us) offline


@dataclass
class ControllerConfig:
    """Everything ``edgepack fleet controller`` needs; flags and EDGEPACK_* env vars fill it."""

    db: Path
    broker_url: str
    fleet: str
    keyring: list[Path]
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    client_id: str = ""  # default edgepack-controller-<fleet>
    base_url: str | None = None  # where devices download bundles; None: serve them ourselves
    serve_host: str = "127.0.0.1"  # when serving bundles ourselves
    serve_port: int = 0  # 0: a free port
    tick: float = 1.0  # seconds between timer checks
    session_expiry: int = SESSION_EXPIRY
    extra: dict[str, Any] = field(default_factory=dict)


class Controller:
    """The rollout controller of one fleet.

    Args:
        config: the configuration.
        transport_factory: builds the MQTT transport (the real one by default).
        clock: epoch seconds.

    Raises:
        StoreError: another controller owns the database.
        KeyringError: the keyring cannot be read.
    """

    def __init__(self, config: ControllerConfig, *,
                 transport_factory: Callable[..., MqttTransport] = MqttTransport,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.keyring = load_keyring(config.keyring)
        self.store = FleetStore(config.db, writer=True)
        self.inventory = Inventory(config.fleet)
        self.health: Inventory | None = None  # the devices' health, once follow_health() asked
        self.client_id = config.client_id or f"edgepack-controller-{config.fleet}"
        self.reply_filter = reply_filter(config.fleet, self.client_id)
        self.rollouts: dict[str, Rollout] = {}
        self._inbox: queue.Queue[Message] = queue.Queue()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._last_new_device = 0.0
        self._resumed = False  # in-flight jobs of restored rollouts sent again (once settled)
        self._marks: list[tuple[int, str]] = []  # applied commands, written with the next batch
        self._servers: dict[Path, Any] = {}  # release folder -> BundleServer
        self._base_urls: dict[str, str] = {}  # rollout id -> base URL
        self.keyrings = KeyringSync()  # the fleet's desired keyring and its pushes
        self._keyring_pushes: list[KeyringPush] = []  # sent after the next write
        self.counters = {"messages": 0, "dispatched": 0, "rollbacks": 0, "rejected": 0,
                         "keyring_pushes": 0}
        self.transport = transport_factory(
            config.broker_url, self.client_id, username=config.username, password=config.password,
            ca_file=config.ca_file, session_expiry=config.session_expiry,
            # The session survives a restart but the inventory does not: the retained births and
            # states must come again, or every pending device would look offline.
            replay_retained=True)
        for kind in ("birth", "state", "events"):
            self.transport.subscribe(fleet_filter(config.fleet, kind), qos=1, handler=self._inbox.put)
        self.transport.subscribe(self.reply_filter, qos=1, handler=self._inbox.put)

    # --- lifecycle ---------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until :meth:`request_stop`."""
        try:
            self.start()
            watchdog = systemd.watchdog_interval(os.environ)
            systemd.ready(f"controller of fleet {self.config.fleet} on {self.config.broker_url}")
            self._ready.set()
            next_tick = 0.0
            while not self._stop.is_set():
                self._step(block=min(self.config.tick, max(0.0, next_tick - time.monotonic())))
                if time.monotonic() >= next_tick:
                    self._timers()
                    next_tick = time.monotonic() + self.config.tick
                if watchdog:
                    systemd.watchdog()
        finally:
            systemd.stopping("stopping")
            self.stop()

    def start(self) -> None:
        """Load the active rollouts, connect, and resend what they had in flight."""
        now = self.clock()
        for rid in self.store.rollout_ids(ACTIVE - {NEW}, fleet=self.config.fleet):
            r = self.store.load(rid)
            if self._release_ok(r, now):
                self.rollouts[rid] = r
        desired = self.store.desired_keyring(self.config.fleet)
        if desired is not None:
            self.keyrings = KeyringSync(desired, self.store.keyring_targets(desired.fleet, desired.version))
        self.transport.start()
        self.transport.wait_connected(30)
        # Settling counts from the subscriptions, not from zero: the retained births come only
        # after them, and a rollout planned before they arrive would have no targets.
        self._last_new_device = self.clock()
        log.info("controller %s: %d active rollout(s)", self.client_id, len(self.rollouts))

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def follow_health(self) -> Inventory:
        """Also follow the devices' retained health (the console shows it), in a table of its own:
        what the rollouts see (births and states in :attr:`inventory`) does not change."""
        if self.health is None:
            self.health = Inventory(self.config.fleet)
            self.transport.subscribe(fleet_filter(self.config.fleet, "health"), qos=0,
                                     handler=self._inbox.put)
        return self.health

    def request_stop(self) -> None:
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(EdgepackError):
            self.transport.stop()
        for server in self._servers.values():
            server.stop()
        self.store.close()

    # --- one loop -------------------------------------------------------------------------------------

    def _step(self, *, block: float) -> None:
        try:
            msgs = [self._inbox.get(timeout=block)] if block > 0 else []
        except queue.Empty:
            msgs = []
        # Group commit: once something arrived, gather what follows for up to BATCH_LINGER, so a
        # wave's replies cost a few transactions (each one fsynced), not one per reply.
        linger_until = time.monotonic() + BATCH_LINGER
        while msgs and len(msgs) < MAX_BATCH:
            try:
                msgs.append(self._inbox.get(timeout=max(0.0, linger_until - time.monotonic())))
            except queue.Empty:
                break
        if not msgs:
            return
        now = self.clock()
        actions: list[tuple[Rollout, Action]] = []
        for m in msgs:
            self.counters["messages"] += 1
            try:
                actions += self._handle(m, now)
            except (ProtocolError, RolloutError) as e:  # one bad message must not stop a rollout
                self.counters["rejected"] += 1
                log.warning("ignored a message on %s: %s", m.topic, e)
        self._commit_and_act(actions)

    def _timers(self) -> None:
        now = self.clock()
        actions: list[tuple[Rollout, Action]] = []
        settled = now - self._last_new_device >= SETTLE_SECONDS
        if settled and not self._resumed:
            self._resumed = True
            for r in self.rollouts.values():
                actions += [(r, a) for a in r.resume(now)]
        for cid, rid, command, reason in self.store.pending_commands():
            actions += self._command(cid, rid, command, reason, now)
        if settled:
            for rid in self.store.rollout_ids({NEW}, fleet=self.config.fleet):
                actions += self._start_rollout(rid, now)
        for r in list(self.rollouts.values()):
            actions += [(r, a) for a in r.tick(now)]
        desired = self.store.desired_keyring(self.config.fleet)
        if desired is not None:
            self._keyring_pushes += self.keyrings.want(desired, now)
        self._keyring_pushes += self.keyrings.tick(now)
        self._commit_and_act(actions)

    def _commit_and_act(self, actions: list[tuple[Rollout, Action]]) -> None:
        # (5) every transition is written before it is acted on ...
        changed = [r for r in self.rollouts.values() if r.changed or r.dirty]
        keyring_rows = self.keyrings.rows()
        if changed or self._marks or keyring_rows:
            with self.store.transaction() as db:
                for r in changed:
                    self.store.save(db, r)
                for cid, outcome in self._marks:
                    self.store.mark_command(db, cid, outcome)
                self.store.save_keyring_targets(db, self.config.fleet, keyring_rows)
            for r in changed:
                r.dirty.clear()
                r.changed = False
            self._marks = []
            self.keyrings.dirty.clear()
        # (6) ... and only then acted on.
        for r, a in actions:
            try:
                self._act(r, a)
            except EdgepackError as e:  # the job times out and is retried by the state machine
                log.warning("could not send %s to %s: %s", type(a).__name__, a.device, e)
        pushes, self._keyring_pushes = self._keyring_pushes, []
        for p in pushes:
            try:
                self._push_keyring(p)
            except EdgepackError as e:  # sent again on a reply timeout or the device's next birth
                log.warning("could not send keyring v%d to %s: %s", p.version, p.device, e)
        for rid in [rid for rid, r in self.rollouts.items() if r.status not in ACTIVE]:
            del self.rollouts[rid]  # finished or aborted: nothing more to drive

    # --- messages ---------------------------------------------------------------------------------------

    def _handle(self, m: Message, now: float) -> list[tuple[Rollout, Action]]:
        info = parse_topic(m.topic)
        if info.kind == "reply":
            return self._reply(m, now, info.device) if info.name == self.client_id else []
        if info.kind == "health":  # only when the console asked for it (follow_health)
            if self.health is not None:
                self.health.apply(m.topic, m.payload, now=now)
            return []
        if info.kind in ("birth", "state"):
            known = (info.fleet, info.device) in self.inventory
            self.inventory.apply(m.topic, m.payload, now=now)
            if not known:
                self._last_new_device = now
            rec = self.inventory.record(info.fleet, info.device)
            if rec is None:
                return []
            self._keyring_pushes += self.keyrings.device(_keyring_device(rec), now)
            dev = _device_info(rec)
            return [(r, a) for r in self.rollouts.values() for a in r.device(dev, now)]
        if info.kind == "events" and m.payload:
            ev = decode_object(m.payload)
            job = ev.get("job")
            owner = parse_job(job) if isinstance(job, str) else None
            if owner is None or owner[0] not in self.rollouts or owner[1] != info.device:
                return []
            r = self.rollouts[owner[0]]
            return [(r, a) for a in r.install_event(info.device, str(job), str(ev.get("stage")), ev, now)]
        return []

    def _reply(self, m: Message, now: float, sender: str) -> list[tuple[Rollout, Action]]:
        job = (m.correlation_data or b"").decode("ascii", "replace")
        if (pushed := parse_keyring_job(job)) is not None:
            if sender != pushed[1]:  # as below: only the device asked may answer
                raise ProtocolError(f"reply to {pushed[1]}'s keyring push came from {sender}",
                                    code="bad_field", field="topic")
            reply = Reply.from_bytes(m.payload)
            self.keyrings.reply(sender, job, reply.ok, reply.result, reply.error, now)
            return []
        owner = parse_job(job)
        if owner is None or owner[0] not in self.rollouts:
            return []
        device = owner[1]
        if sender != device:
            # Only the job's device may publish on its reply topic (ACL): another device that
            # names this job answers for it, which is never accepted.
            raise ProtocolError(f"reply to {device}'s job {job} came from {sender}", code="bad_field",
                                field="topic")
        r = self.rollouts[owner[0]]
        reply = Reply.from_bytes(m.payload)
        if job.split(".")[-1].startswith("rb"):
            return [(r, a) for a in r.rollback_reply(device, reply.ok, reply.result, reply.error, now)]
        return [(r, a) for a in r.install_reply(device, job, reply.ok, reply.result, reply.error, now)]

    # --- rollouts -----------------------------------------------------------------------------------------

    def _release_ok(self, r: Rollout, now: float) -> bool:
        try:
            data, sig, _ = self.store.release(r.spec.release_id)
            verify_release(data, sig, self.keyring)
        except EdgepackError as e:
            log.error("rollout %s refused: its release does not verify: %s", r.spec.rollout_id, e)
            if r.status in ACTIVE:
                r.command("abort", now, reason=f"the release does not verify: {e}")
                with self.store.transaction() as db:
                    self.store.save(db, r)
            return False
        return True

    def _start_rollout(self, rid: str, now: float) -> list[tuple[Rollout, Action]]:
        r = self.store.load(rid)
        if not self._release_ok(r, now):
            return []
        self.rollouts[rid] = r
        devices = [_device_info(rec) for rec in self.inventory.devices(now)]
        log.info("starting rollout %s of %s on %d known device(s)", rid, r.spec.release_id, len(devices))
        return [(r, a) for a in r.start(devices, now)]

    def _command(self, cid: int, rid: str, command: str, reason: str,
                 now: float) -> list[tuple[Rollout, Action]]:
        marks = self._marks
        r = self.rollouts.get(rid)
        if r is None:
            try:
                r = self.store.load(rid)
            except RolloutError as e:
                marks.append((cid, f"refused: {e}"))
                return []
        try:
            actions = r.command(command, now, reason=reason)
        except RolloutError as e:
            marks.append((cid, f"refused: {e}"))
            return []
        if r.status in ACTIVE:
            self.rollouts[rid] = r
        elif rid not in self.rollouts:
            with self.store.transaction() as db:  # a new (never started) rollout aborted
                self.store.save(db, r)
        marks.append((cid, f"applied: {r.status}"))
        return [(r, a) for a in actions]

    # --- acting ---------------------------------------------------------------------------------------

    def _act(self, r: Rollout, a: Action) -> None:
        topics = Topics(r.spec.fleet, a.device)
        if isinstance(a, Dispatch):
            req = InstallRequest(url=self._bundle_url(r, a.bundle), sha256=a.bundle.sha256,
                                 size=a.bundle.size, job=a.job)
            self.transport.publish(topics.cmd("install"), req.to_bytes(), qos=1,
                                   response_topic=topics.reply(self.client_id),
                                   correlation_data=a.job.encode(), expiry=COMMAND_EXPIRY["install"])
            self.counters["dispatched"] += 1
        elif isinstance(a, Rollback):
            rb = RollbackRequest(job=a.job, from_digest=a.from_digest or None)
            self.transport.publish(topics.cmd("rollback"), rb.to_bytes(), qos=1,
                                   response_topic=topics.reply(self.client_id),
                                   correlation_data=a.job.encode(), expiry=COMMAND_EXPIRY["rollback"])
            self.counters["rollbacks"] += 1

    def _push_keyring(self, p: KeyringPush) -> None:
        desired = self.keyrings.desired
        if desired is None or desired.version != p.version:
            return
        topics = Topics(self.config.fleet, p.device)
        req = KeyringRequest(desired.document.decode("utf-8"))
        self.transport.publish(topics.cmd("keyring"), req.to_bytes(), qos=1,
                               response_topic=topics.reply(self.client_id),
                               correlation_data=p.job.encode(), expiry=COMMAND_EXPIRY["keyring"])
        self.counters["keyring_pushes"] += 1

    def _bundle_url(self, r: Rollout, b: BundleRef) -> str:
        rid = r.spec.rollout_id
        base = self._base_urls.get(rid)
        if base is None:
            base = self.store.base_url(rid) or self.config.base_url or self._serve(r)
            self._base_urls[rid] = base = base if base.endswith("/") else base + "/"
        return base + b.file

    def _serve(self, r: Rollout) -> str:
        from fleet.serve import BundleServer

        _, _, directory = self.store.release(r.spec.release_id)
        server = self._servers.get(directory)
        if server is None:
            port = self.config.serve_port if not self._servers else 0
            try:
                server = BundleServer(directory, host=self.config.serve_host, port=port)
            except OSError as e:
                raise TransportError(f"cannot serve {directory} on {self.config.serve_host}:{port}: {e}",
                                     hint="Pass --base-url, or another --serve-port.") from e
            server.start()
            self._servers[directory] = server
            log.info("serving %s at %s", directory, server.url_for(""))
        return str(server.url_for(""))


def _device_info(rec: DeviceRecord) -> DeviceInfo:
    cur = rec.current or {}
    gate = cur.get("gate")
    return DeviceInfo(rec.device, rec.profile, rec.state == "online",
                      cur.get("digest") if isinstance(cur.get("digest"), str) else None,
                      gate if isinstance(gate, dict) else None)


def _keyring_device(rec: DeviceRecord) -> KeyringDevice:
    return KeyringDevice(rec.device, rec.state == "online", rec.keyring_version)


__all__ = ["Controller", "ControllerConfig"]
