"""The agent as a service: MQTT births, health, commands and streamed inference.

Threads and who owns what:
- paho's network thread delivers commands to :meth:`Agent._on_command`, which only validates,
  answers malformed input at once, and hands work to a queue — it never blocks.
- the **control worker** runs install / rollback / status / probe one at a time (queue of
  :data:`CONTROL_QUEUE`); the **infer worker** serves a bounded queue of inference requests; a full
  queue answers ``busy``.
- the main thread (:meth:`Agent.run`) publishes health every ``health_interval`` and pings the
  systemd watchdog.
One model is resident (``_runtime``), guarded by ``_model_lock``: a generation holds it, and an
install's load check takes it — so a new bundle is switched in between requests, never under one.

Install over MQTT: (1) download with resume into ``state/downloads`` (events: downloading),
(2) the store verifies the signed manifest, stages while hashing, switches (events: verified,
installed), (3) the load check swaps the resident model and benchmarks it against the manifest's
SLO (agent.gate; events: benchmarked, with the figures), (4) commit (events: committed, with the
figures) or roll back and reload the previous model (events: rolled_back, with the gate's figures
when it was the SLO; reply code ``slo_failed``). Every reply says what happened; health carries
the last gate report as ``last_gate``.

Duplicates: QoS 1 may deliver a command twice (e.g. around a broker restart); a bounded memory
of correlation ids drops the second copy, so nothing is executed twice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import __version__
from agent import _systemd as systemd
from agent.errors import (
    BundleFormatError,
    DigestMismatchError,
    DowngradeError,
    EdgepackError,
    GateFailedError,
    InferenceError,
    InstallError,
    InsufficientResourcesError,
    ManifestError,
    RuntimeUnavailableError,
    SignatureError,
    StoreError,
    TransportError,
)
from agent.gate import GateConfig, run_gate
from agent.protocol import (
    COMMANDS,
    CancelRequest,
    InferChunk,
    InferRequest,
    InstallRequest,
    ProbeRequest,
    ProtocolError,
    Reply,
    Topics,
    birth_payload,
    check_id,
    event_payload,
    health_payload,
    parse_command,
    state_payload,
)
from agent.store import InstalledBundle, Store
from agent.transport.mqtt import Message, MqttTransport, Will

log = logging.getLogger("agent.daemon")

CONTROL_QUEUE = 8  # install/rollback/status/probe waiting behind the running one
SEEN_CORRELATIONS = 4096  # duplicate suppression memory


def default_device_id() -> str:
    """This host's name, reduced to a valid device id."""
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    return name.lstrip("_")[:64] or "device"


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

    def __post_init__(self) -> None:
        check_id(self.device_id, "device id")
        check_id(self.fleet, "fleet")
        if self.device_id.startswith("_"):
            raise ProtocolError("device id must not start with '_'", code="bad_field")
        if self.health_interval <= 0 or self.infer_queue < 1:
            raise EdgepackError("health_interval must be > 0 and infer_queue >= 1")


def error_code(e: BaseException) -> str:
    """A stable machine code for an error, for replies and events.

    ``slo_failed``: the new model loaded but missed its SLO in the post-install gate and was
    rolled back (``install_failed`` is any other failed load check).
    """
    # The store wraps whatever the load check raised in InstallError(rolled_back=True); the
    # cause says whether it was the gate, which a rollout reacts to differently (the build is
    # too slow for the profile, not broken).
    if isinstance(e, InstallError) and isinstance(e.__cause__, GateFailedError):
        return "slo_failed"
    for cls, code in (
        (ProtocolError, ""), (DowngradeError, "downgrade"), (SignatureError, "signature"),
        (DigestMismatchError, "digest_mismatch"), (BundleFormatError, "bad_bundle"),
        (ManifestError, "bad_manifest"), (InsufficientResourcesError, "insufficient_resources"),
        (InstallError, "install_failed"), (TransportError, "download_failed"),
        (StoreError, "store"), (RuntimeUnavailableError, "runtime_unavailable"),
        (InferenceError, "inference_failed"),
    ):
        if isinstance(e, cls):
            return e.code if isinstance(e, ProtocolError) else code
    return "internal"


def _trim_heap() -> None:
    """Give the heap freed after start-up (imports, probe, profile parsing) back to the OS.

    glibc keeps freed memory in its arenas; on a small device that is resident memory the model
    could use. Elsewhere (musl, macOS) this is a no-op.
    """
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class _Job:
    msg: Message
    request: Any
    cancel: threading.Event = field(default_factory=threading.Event)


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
        from agent.cli import load_keyring

        self.config = config
        self.clock = clock
        self.topics = Topics(config.fleet, config.device_id)
        self.store = Store(config.state_dir, load_keyring(config.keyring))
        self.started_at = time.monotonic()
        self._model_lock = threading.Lock()
        self._runtime: Any = None  # the one resident Runtime
        self._runtime_slot: str | None = None
        self._control: queue.Queue[_Job | None] = queue.Queue(CONTROL_QUEUE)
        self._infer: queue.Queue[_Job | None] = queue.Queue(config.infer_queue)
        self._running: dict[str, _Job] = {}  # request_id -> running or queued inference
        self._running_lock = threading.Lock()
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._seen_lock = threading.Lock()
        self._stop = threading.Event()
        self._busy = threading.Event()
        self._ready = threading.Event()
        self.counters: dict[str, int] = {"commands": 0, "rejected": 0, "busy": 0, "duplicates": 0,
                                         "infer_errors": 0, "install_errors": 0}
        self.last_usage: dict[str, Any] = {}
        self.last_install: dict[str, Any] | None = None
        self.last_gate: dict[str, Any] | None = None  # the last post-install benchmark's report
        self._facts: dict[str, Any] | None = None
        self._threads: list[threading.Thread] = []
        self.transport = transport_factory(
            config.broker_url, config.device_id, username=config.username,
            password=config.password, ca_file=config.ca_file, cert_file=config.cert_file,
            key_file=config.key_file,
            will=Will(self.topics.state, state_payload("lost"), qos=1, retain=True),
            on_connect=self._on_connect,
        )
        self.transport.subscribe(self.topics.cmd_filter, qos=1, handler=self._on_command)

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the workers and connect (returns at once; see :meth:`wait_ready`)."""
        for name, target in (("control", self._control_worker), ("infer", self._infer_worker)):
            t = threading.Thread(target=target, name=f"edgepack-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        self.transport.start()

    def wait_ready(self, timeout: float) -> bool:
        """True once connected and the birth was published."""
        return self._ready.wait(timeout)

    def run(self) -> None:
        """Serve until :meth:`request_stop`: health messages and watchdog pings from this thread."""
        self.start()
        notified = False
        watchdog = systemd.watchdog_interval(os.environ)
        next_health = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if self._ready.is_set() and not notified:
                systemd.ready(f"serving {self.topics.base} on {self.config.broker_url}")
                notified = True
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

    def stop(self) -> None:
        """Publish ``offline``, stop the workers (finishing the running request) and disconnect."""
        self._stop.set()
        with self._running_lock:
            for job in self._running.values():
                job.cancel.set()
        if self._runtime is not None:
            self._runtime.cancel()
        for q in (self._control, self._infer):
            with contextlib.suppress(queue.Full):
                q.put_nowait(None)
        for t in self._threads:
            t.join(timeout=10)
        if self.transport.connected:
            with contextlib.suppress(TransportError):
                self.transport.publish(self.topics.state, state_payload("offline", ts=self.clock()),
                                       qos=1, retain=True, timeout=2.0)
        self.transport.stop()
        with self._model_lock:
            if self._runtime is not None:
                self._runtime.close()
                self._runtime = None

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
                "recovered": self.store.recovered}

    def health(self) -> dict[str, Any]:
        import psutil

        proc = psutil.Process()
        temp = None
        with contextlib.suppress(AttributeError, OSError, RuntimeError):
            readings = [t.current for ts in psutil.sensors_temperatures().values() for t in ts]
            temp = max(readings) if readings else None
        cur = self.store.current()
        return {
            "cpu_percent": psutil.cpu_percent(interval=None),
            "rss_bytes": proc.memory_info().rss,
            "temperature_c": temp,
            "disk_free_bytes": psutil.disk_usage(str(self.config.state_dir)).free,
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            "current": ({"slot": cur.slot, "digest": cur.digest, "model": cur.manifest.model_name,
                         "version": cur.manifest.version, "quant": cur.manifest.target.quant}
                        if cur else None),
            "model_loaded": self._runtime_slot,
            "last_decode_tok_s": self.last_usage.get("decode_tok_s"),
            "last_ttft_ms": self.last_usage.get("ttft_ms"),
            "last_install": self.last_install,
            "last_gate": self.last_gate,
            "busy": self._busy.is_set(),
            "queue": self._infer.qsize(),
            "errors": dict(self.counters),
        }

    def publish_health(self) -> None:
        try:
            self.transport.publish(self.topics.health, health_payload(self.health(), ts=self.clock()),
                                   qos=0, retain=True)
        except EdgepackError as e:
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
            _trim_heap()
        self._ready.set()

    def _event(self, job: str, stage: str, **detail: Any) -> None:
        try:
            self.transport.publish(self.topics.events,
                                   event_payload(job, stage, ts=self.clock(), detail=detail), qos=1)
        except EdgepackError as e:
            log.warning("event %s/%s not published: %s", job, stage, e)

    # --- commands --------------------------------------------------------------------------------

    def _reply(self, msg: Message, reply: Reply) -> None:
        if not msg.response_topic:
            return  # fire-and-forget command: nobody to answer
        try:
            self.transport.publish(msg.response_topic, reply.to_bytes(), qos=1,
                                   correlation_data=msg.correlation_data)
        except EdgepackError as e:
            log.warning("reply to %s not sent: %s", msg.response_topic, e)

    def _chunk(self, msg: Message, chunk: InferChunk) -> None:
        if msg.response_topic:
            self.transport.publish(msg.response_topic, chunk.to_bytes(), qos=1,
                                   correlation_data=msg.correlation_data)

    def _duplicate(self, msg: Message) -> bool:
        if not msg.correlation_data:
            return False
        with self._seen_lock:
            if msg.correlation_data in self._seen:
                return True
            self._seen[msg.correlation_data] = None
            while len(self._seen) > SEEN_CORRELATIONS:
                self._seen.popitem(last=False)
        return False

    def _on_command(self, msg: Message) -> None:
        """Validate and dispatch one command. Never raises: every failure becomes a reply."""
        try:
            self.counters["commands"] += 1
            name = msg.topic.rsplit("/", 1)[-1]
            if self._duplicate(msg):
                self.counters["duplicates"] += 1
                log.info("dropped a duplicate %s command", name)
                return
            try:
                if name not in COMMANDS:
                    raise ProtocolError(f"unknown command {name!r} (known: {', '.join(COMMANDS)})",
                                        code="unknown_command")
                req = parse_command(name, msg.payload)
            except ProtocolError as e:
                self.counters["rejected"] += 1
                self._answer_error(msg, name, e.code, str(e))
                return
            if isinstance(req, CancelRequest):
                self._reply(msg, self._cancel(req))
            elif isinstance(req, InferRequest):
                job = _Job(msg, req)
                if req.request_id:
                    with self._running_lock:
                        self._running[req.request_id] = job
                try:
                    self._infer.put_nowait(job)
                except queue.Full:
                    self._forget(req)
                    self.counters["busy"] += 1
                    self._chunk(msg, InferChunk.failure(
                        0, "busy", f"{self.config.infer_queue} requests are already waiting; retry later"))
            else:
                try:
                    self._control.put_nowait(_Job(msg, req))
                except queue.Full:
                    self.counters["busy"] += 1
                    self._reply(msg, Reply.failure("busy", "the agent is busy with other commands"))
        except Exception as e:  # the network thread must survive anything; log it loudly
            log.exception("command handling failed")
            self.counters["rejected"] += 1
            with contextlib.suppress(Exception):
                self._reply(msg, Reply.failure("internal", f"internal error: {e}"))

    def _answer_error(self, msg: Message, name: str, code: str, text: str) -> None:
        if name == "infer":
            self._chunk(msg, InferChunk.failure(0, code, text))
        else:
            self._reply(msg, Reply.failure(code, text))

    def _forget(self, req: InferRequest) -> None:
        if req.request_id:
            with self._running_lock:
                self._running.pop(req.request_id, None)

    def _cancel(self, req: CancelRequest) -> Reply:
        with self._running_lock:
            job = self._running.get(req.request_id)
        if job is None:
            return Reply.failure("not_found", f"no running or queued request {req.request_id!r}")
        # The serving loop checks this between tokens; a queued job is skipped when its turn comes.
        job.cancel.set()
        return Reply.success({"cancelled": req.request_id})

    # --- control worker ----------------------------------------------------------------------------

    def _control_worker(self) -> None:
        while (job := self._control.get()) is not None:
            req = job.request
            try:
                if isinstance(req, InstallRequest):
                    result = self._install(job)
                elif req.NAME == "rollback":
                    result = self._rollback()
                elif req.NAME == "status":
                    result = self.status()
                elif isinstance(req, ProbeRequest):
                    from agent.probe import probe

                    facts = probe(runtimes=req.runtimes, disk_path=self.config.state_dir)
                    result = {"facts": facts, "profile": self._profile()}
                else:  # parse_command only returns the types above
                    raise ProtocolError(f"unhandled command {req.NAME}", code="unknown_command")
                self._reply(job.msg, Reply.success(result))
            except EdgepackError as e:
                log.warning("%s failed: %s", req.NAME, e)
                hint = e.diagnostics()
                self._reply(job.msg, Reply.failure(error_code(e), f"{e}" + (f" ({hint})" if hint else "")))
            except Exception as e:  # keep serving: a bug in one command must not kill the agent
                log.exception("%s crashed", req.NAME)
                self._reply(job.msg, Reply.failure("internal", f"internal error: {e}"))

    def status(self) -> dict[str, Any]:
        cur, prev = self.store.current(), self.store.previous()
        return {"agent_version": __version__, "device": self.config.device_id,
                "current": cur.summary() if cur else None,
                "previous": prev.summary() if prev else None,
                "model_loaded": self._runtime_slot, "busy": self._busy.is_set(),
                "queue": self._infer.qsize(), "last_usage": self.last_usage,
                "last_install": self.last_install, "last_gate": self.last_gate,
                "counters": dict(self.counters)}

    def _install(self, job: _Job) -> dict[str, Any]:
        from agent.fetch import fetch

        req: InstallRequest = job.request
        job_id = (job.msg.correlation_data or secrets.token_bytes(8)).hex()[:32]
        downloads = self.config.state_dir / "downloads"
        downloads.mkdir(parents=True, exist_ok=True)
        dest = downloads / f"{req.sha256}.bundle"
        t0 = time.monotonic()
        last = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if now - last[0] >= 1.0 or done == total:
                last[0] = now
                self._event(job_id, "downloading", bytes=done, total=total)

        self._event(job_id, "downloading", url=req.url, total=req.size)
        try:
            path = fetch(req.url, dest, sha256=req.sha256, size=req.size, progress=progress,
                         timeout=self.config.download_timeout, cancel=self._stop)

            gate: dict[str, Any] = {}  # this install's gate report, for the rolled_back event

            def on_gate(report: dict[str, Any]) -> None:
                gate.update(report)
                self._event(job_id, "benchmarked", **report)

            def on_store_event(name: str, data: dict[str, Any]) -> None:
                stage = {"verified": "verified", "switched": "installed", "committed": "committed",
                         "rolled_back": "rolled_back"}.get(name)
                if stage == "rolled_back" and gate:
                    data = {**data, "gate": dict(gate)}  # the measured numbers that failed
                if stage:
                    self._event(job_id, stage, **data)

            def check(bundle: InstalledBundle) -> dict[str, Any]:
                return self._swap_in(bundle, on_gate=on_gate)

            res = self.store.install(path, load_check=check if self.config.load_check else None,
                                     on_event=on_store_event)
        except EdgepackError as e:
            self.counters["install_errors"] += 1
            rolled_back = isinstance(e, InstallError) and e.rolled_back
            if rolled_back:
                self._reload_current()  # the resident model was swapped: put the old one back
            self._event(job_id, "failed", code=error_code(e), reason=str(e), rolled_back=rolled_back)
            self.last_install = {"ok": False, "code": error_code(e), "reason": str(e), "ts": self.clock()}
            raise
        finally:
            if dest.exists():
                dest.unlink()  # the verified copy lives in its slot now (or was refused)
        if not self.config.load_check:
            self._reload_current()
        result = {"installed": res.bundle.summary(),
                  "previous": res.previous.summary() if res.previous else None,
                  "already_installed": res.already_installed, "check": res.check,
                  "seconds": round(time.monotonic() - t0, 2)}
        self.last_install = {"ok": True, "slot": res.bundle.slot, "ts": self.clock()}
        with contextlib.suppress(EdgepackError):
            self._publish_birth()  # inventory must see the new bundle set
        return result

    def _rollback(self) -> dict[str, Any]:
        b = self.store.rollback()
        self._reload_current()
        with contextlib.suppress(EdgepackError):
            self._publish_birth()
        return {"current": b.summary()}

    # --- the resident model -------------------------------------------------------------------------

    def _load_locked(self, bundle: InstalledBundle) -> dict[str, Any]:
        from agent.cli import _runtime_for

        if self._runtime is not None:  # one model resident: close before loading the next
            self._runtime.close()
            self._runtime, self._runtime_slot = None, None
        rt, opts = _runtime_for(bundle, self.config.threads)
        t0 = time.perf_counter()
        rt.load(bundle.entrypoint, opts)
        self._runtime, self._runtime_slot = rt, bundle.slot
        return {"load_ms": round((time.perf_counter() - t0) * 1000, 1)}

    def _swap_in(self, bundle: InstalledBundle, *,
                 on_gate: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """The install's load check: wait for the running generation, load the new bundle as the
        resident model and run the benchmark gate on it (agent.gate).

        Args:
            bundle: the freshly switched (pending) bundle.
            on_gate: receives the gate's report ({ok, ttft_ms, decode_tok_s, peak_rss_mb, tokens,
                failures, thresholds}), pass or fail, before this returns or raises.

        Returns:
            ``load_ms`` plus the gate's figures; the store commits with them.

        Raises:
            GateFailedError: an SLO was missed (the store rolls back; :meth:`_install` then
                drops the resident model so the previous one is loaded again).
            InferenceError: the model does not load or generates nothing.
            RuntimeUnavailableError: the bundle's runtime cannot run here.
        """
        gate_cfg = self.config.gate
        with self._model_lock:
            figures = self._load_locked(bundle)
            try:
                checked = run_gate(self._runtime, bundle.manifest.slo, gate_cfg)
            except GateFailedError as e:
                report: dict[str, Any] = {"ok": False, **e.figures, "failures": list(e.failures),
                                          "thresholds": e.thresholds}
                self._record_gate(bundle, report, on_gate)
                raise
            if gate_cfg.enabled:
                self._record_gate(bundle, checked, on_gate)
            return {**figures, **checked}

    def _record_gate(self, bundle: InstalledBundle, report: dict[str, Any],
                     on_gate: Callable[[dict[str, Any]], None] | None) -> None:
        self.last_gate = {"slot": bundle.slot, **report, "ts": self.clock()}
        if on_gate is not None:
            on_gate(report)

    def _reload_current(self) -> None:
        with self._model_lock:
            if self._runtime is not None:
                self._runtime.close()
                self._runtime, self._runtime_slot = None, None
            # The next inference loads the current bundle lazily.

    # --- infer worker --------------------------------------------------------------------------------

    def _infer_worker(self) -> None:
        while (job := self._infer.get()) is not None:
            try:
                self._serve(job)
            finally:
                self._forget(job.request)

    def _serve(self, job: _Job) -> None:
        from agent.runtimes import GenerationParams

        req: InferRequest = job.request
        seq = 0
        if job.cancel.is_set():
            self._chunk(job.msg, InferChunk(0, "", True, {"finish_reason": "cancelled",
                                                            "completion_tokens": 0}))
            return
        self._busy.set()
        try:
            with self._model_lock:
                cur = self.store.current()
                if cur is None:
                    raise StoreError("no bundle is installed on this device")
                if self._runtime is None or self._runtime_slot != cur.slot:
                    self._load_locked(cur)
                params = GenerationParams(
                    max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                    top_k=req.top_k, repeat_penalty=req.repeat_penalty, stop=req.stop, seed=req.seed)
                # The first token goes out at once (TTFT); later ones are coalesced for
                # chunk_interval, so one QoS 1 message per token does not take CPU from the
                # decode loop on a 2-core device (bench/results/mqtt.md measures both).
                pending, last_sent = "", 0.0
                for chunk in self._runtime.stream(req.prompt, params, chat=req.chat):
                    if job.cancel.is_set():
                        self._runtime.cancel()
                    pending += chunk.text
                    now = time.monotonic()
                    if chunk.done:
                        usage = chunk.usage.to_dict() if chunk.usage else None
                        if usage:
                            self.last_usage = usage
                        self._chunk(job.msg, InferChunk(seq, pending, True, usage))
                        return
                    if pending and (seq == 0 or now - last_sent >= self.config.chunk_interval):
                        self._chunk(job.msg, InferChunk(seq, pending))
                        seq, pending, last_sent = seq + 1, "", now
        except EdgepackError as e:
            self.counters["infer_errors"] += 1
            code = "no_model" if isinstance(e, StoreError) else error_code(e)
            self._chunk(job.msg, InferChunk.failure(seq, code, str(e)))
        except Exception as e:  # keep serving
            log.exception("inference crashed")
            self.counters["infer_errors"] += 1
            self._chunk(job.msg, InferChunk.failure(seq, "internal", f"internal error: {e}"))
        finally:
            self._busy.clear()
