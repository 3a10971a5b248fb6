"""One simulated device: the agent's protocol behaviour without a model, a store or a thread.

It answers what the real agent answers (:mod:`agent.daemon`, :mod:`agent.dispatch`,
:mod:`agent.installer`, :mod:`agent.jobs`) with payloads built by :mod:`agent.protocol`:

- every command goes through :func:`agent.protocol.parse_command`; a malformed one is answered at
  once with its error code (an ``infer`` with an error chunk); a duplicate delivery of an unnamed
  command (same correlation data) is dropped, as the dispatcher does;
- install, rollback, status and probe run one at a time (the agent's control worker) with
  :data:`agent.dispatch.CONTROL_QUEUE` waiting behind the running one, then ``busy``;
- a named job (``job``) that finished is answered with the recorded reply and not run again; a
  replayed install re-publishes its final event with ``replayed: true``;
- an install publishes ``downloading``, ``verified``, ``installed``, ``benchmarked`` and then
  ``committed`` — or ``rolled_back`` + ``failed`` — on ``events`` with the job id, replies on the
  Response Topic with the Correlation Data, and re-publishes the retained birth (also after a
  failure, as the agent does). Steps are spaced over ``install_seconds`` with loop timers.

Behaviours (``ok``, ``fail``, ``garbage``, ``slow``) decide how installs end; see
:class:`SimDevice`. The store is two pointers (current, previous) over at most two bundles, with
the per-model version high-water mark of the real store (a known release bundle older than what
the device had is refused with ``downgrade``).
"""

from __future__ import annotations

import random
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, Final, Protocol

from agent import __version__
from agent.dispatch import CONTROL_QUEUE
from agent.jobs import MAX_JOBS
from agent.profiles import DeviceProfile
from agent.protocol import (
    CancelRequest,
    Command,
    InferChunk,
    InferRequest,
    InstallRequest,
    ProbeRequest,
    ProtocolError,
    Reply,
    RollbackRequest,
    StatusRequest,
    Topics,
    birth_payload,
    event_payload,
    health_payload,
    parse_command,
)
from agent.transport.mqtt import Message
from fleet._epoll import Timer
from fleet._simdata import Bundle, Catalog, Hardware, baseline, facts, gate_report

AGENT_VERSION: Final = f"{__version__}+sim"  # a simulated agent says so in every birth
BEHAVIOURS: Final = ("ok", "fail", "garbage", "slow")
SEEN_CORRELATIONS = 256  # duplicate suppression memory per device (the agent keeps 4096)
_RESTORED_HINT = "The previous model is still installed and serving."
# The install's steps as fractions of install_seconds: download, verify + switch, gate, commit.
_AT_DOWNLOADED, _AT_SWITCHED, _AT_GATED = 0.6, 0.7, 0.95


class Host(Protocol):
    """What a device needs from the simulator around it."""

    catalog: Catalog
    install_seconds: float
    slow_factor: float

    def later(self, delay: float, fn: Callable[..., Any], *args: Any) -> Timer: ...

    def publish(self, dev: SimDevice, topic: str, payload: bytes, *, qos: int = 1,
                retain: bool = False, correlation_data: bytes | None = None) -> None: ...

    def count(self, name: str, n: int = 1) -> None: ...

    def epoch(self) -> float: ...


class SimDevice:
    """A simulated device of one profile with one behaviour.

    Behaviours:
        ``ok``: installs commit with figures within a few percent of its own baseline.
        ``fail``: the new model does not load: ``rolled_back`` + ``failed`` (``install_failed``).
        ``garbage``: the model loads and is fast but its output disagrees with the reference:
            the gate's fidelity check fails (agreement far below the threshold) — ``benchmarked``
            (``ok: false``), ``rolled_back``, ``failed`` with code ``fidelity_failed``.
        ``slow``: the gate passes, but decode tok/s x ``slow_factor`` and TTFT / ``slow_factor``:
            for the rollout's regression check to catch.

    Args:
        host: the simulator.
        fleet, device: ids.
        profile: the real profile it plays; hw: its hardware.
        behaviour: one of :data:`BEHAVIOURS`.
        seed: the simulation's seed (facts, figures and jitter derive from it and the id).
    """

    def __init__(self, host: Host, fleet: str, device: str, profile: DeviceProfile, hw: Hardware,
                 behaviour: str, seed: int | str) -> None:
        self.host = host
        self.id = device
        self.topics = Topics(fleet, device)
        self.profile = profile
        self.hw = hw
        self.behaviour = behaviour
        self._seed = f"{seed}/{device}"
        rng = random.Random(self._seed)
        self._facts_seed = rng.random()
        self.baseline = baseline(hw, rng)
        first = host.catalog.initial(profile.name)
        self.bundles: dict[str, Bundle] = {first.slot: first}
        self.gates: dict[str, dict[str, Any]] = {first.slot: {
            "load_ms": round(rng.uniform(150, 900), 1),
            **gate_report(self.baseline, profile, rng), "ts": host.epoch()}}
        self.current: str | None = first.slot
        self.previous: str | None = None
        self.high_water: dict[str, tuple[int, str]] = {first.model: (first.version, first.digest)}
        self.journal: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._queue: deque[tuple[Command, Message]] = deque()
        self._running = False
        self.last_install: dict[str, Any] | None = None
        self.last_gate: dict[str, Any] | None = None
        self.last_usage: dict[str, Any] = {}
        self.started = time.monotonic()
        # The agent's own counters (status / health ``errors``) and the simulator's tallies.
        self.errors = dict.fromkeys(("commands", "rejected", "busy", "duplicates", "replayed",
                                     "infer_errors", "install_errors", "health_errors"), 0)
        self.installs = 0  # installs executed (not replays): "installed exactly once"
        self.rollbacks = 0  # rollbacks executed
        # Connection bookkeeping, owned by the simulator.
        self.link: Any = None
        self.phase = "new"
        self.health_timer: Timer | None = None
        self.attempts = 0

    # --- status payloads ------------------------------------------------------------------------

    def facts(self, *, runtimes: bool = False) -> dict[str, Any]:
        return facts(self.profile.name, self.hw, self.id, random.Random(self._facts_seed), runtimes=runtimes)

    def _summary(self, slot: str | None) -> dict[str, Any] | None:
        return self.bundles[slot].summary(self.gates.get(slot)) if slot else None

    def birth(self) -> bytes:
        """The retained birth, as ``Agent.birth()`` shapes it."""
        roles = {self.current: "current", self.previous: "previous"}
        return birth_payload({
            "agent_version": AGENT_VERSION, "device": self.id, "fleet": self.topics.fleet,
            "facts": self.facts(), "profile": self.profile.name,
            "bundles": [{**b.summary(self.gates.get(s)), "role": roles.get(s, "")}
                        for s, b in sorted(self.bundles.items())],
            "current": self._summary(self.current), "recovered": None, "simulated": True})

    def health(self) -> bytes:
        """A health message, as ``Agent.health()`` shapes it."""
        rng = random.Random()
        cur = self.bundles.get(self.current or "")
        gate = self.gates.get(self.current or "") or {}
        return health_payload({
            "cpu_percent": round(rng.uniform(2, 25), 1),
            "rss_bytes": int(gate.get("peak_rss_mb", 300) * 2**20 * 0.8),
            "temperature_c": round(rng.uniform(38, 62), 1), "disk_free_bytes": 40 << 30,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "current": ({"slot": cur.slot, "digest": cur.digest, "model": cur.model, "version": cur.version,
                         "quant": cur.quant} if cur else None),
            "model_loaded": self.current, "last_decode_tok_s": self.last_usage.get("decode_tok_s"),
            "last_ttft_ms": self.last_usage.get("ttft_ms"), "last_install": self.last_install,
            "last_gate": self.last_gate, "busy": False, "queue": len(self._queue),
            "errors": dict(self.errors)}, ts=self.host.epoch())

    def status(self) -> dict[str, Any]:
        """The ``status`` result, as ``Agent.status()`` shapes it."""
        return {"agent_version": AGENT_VERSION, "device": self.id,
                "current": self._summary(self.current), "previous": self._summary(self.previous),
                "model_loaded": self.current, "busy": False, "queue": len(self._queue),
                "last_usage": self.last_usage, "last_install": self.last_install,
                "last_gate": self.last_gate, "counters": dict(self.errors)}

    # --- commands (the dispatcher) --------------------------------------------------------------

    def on_command(self, msg: Message) -> None:
        """Validate and route one command; every failure becomes a reply."""
        name = msg.topic.rsplit("/", 1)[-1]
        self.errors["commands"] += 1
        self.host.count("commands")
        try:
            req = parse_command(name, msg.payload)
        except ProtocolError as e:
            if not self._first_delivery(msg, None):
                return
            self.errors["rejected"] += 1
            self.host.count("rejected")
            if name == "infer":
                self._chunk(msg, InferChunk.failure(0, e.code, str(e)))
            else:
                self._reply(msg, Reply.failure(e.code, str(e)))
            return
        if not self._first_delivery(msg, getattr(req, "job", None)):
            self.errors["duplicates"] += 1
            self.host.count("duplicates")
            return
        if isinstance(req, CancelRequest):
            # Simulated generations end at once: there is never anything left to cancel.
            self._reply(msg, Reply.failure("not_found", f"no running or queued request {req.request_id!r}"))
        elif isinstance(req, InferRequest):
            self._infer(msg, req)
        elif len(self._queue) >= CONTROL_QUEUE:
            self.errors["busy"] += 1
            self.host.count("busy")
            self._reply(msg, Reply.failure("busy", "the agent is busy with other commands"))
        else:
            self._queue.append((req, msg))
            self._next()

    def _first_delivery(self, msg: Message, job: str | None) -> bool:
        if job is not None or not msg.correlation_data:
            return True
        if msg.correlation_data in self._seen:
            return False
        self._seen[msg.correlation_data] = None
        while len(self._seen) > SEEN_CORRELATIONS:
            self._seen.popitem(last=False)
        return True

    def _reply(self, msg: Message, reply: Reply) -> None:
        if msg.response_topic:
            self.host.publish(self, msg.response_topic, reply.to_bytes(), qos=1,
                              correlation_data=msg.correlation_data)
            self.host.count("replies")

    def _chunk(self, msg: Message, chunk: InferChunk) -> None:
        if msg.response_topic:
            self.host.publish(self, msg.response_topic, chunk.to_bytes(), qos=1,
                              correlation_data=msg.correlation_data)

    def _event(self, job: str, stage: str, **detail: Any) -> None:
        self.host.publish(self, self.topics.events,
                          event_payload(job, stage, ts=self.host.epoch(), detail=detail), qos=1)
        self.host.count("events")

    def announce(self) -> None:
        """Publish the retained birth (on connect, and after every install or rollback)."""
        self.host.publish(self, self.topics.birth, self.birth(), qos=1, retain=True)
        self.host.count("births")

    def _infer(self, msg: Message, req: InferRequest) -> None:
        gate = self.gates.get(self.current or "") or {}
        n = min(req.max_tokens, 8)
        usage = {"prompt_tokens": max(1, len(req.prompt) // 4), "completion_tokens": n,
                 "ttft_ms": gate.get("ttft_ms", 0.0), "decode_tok_s": gate.get("decode_tok_s", 0.0),
                 "finish_reason": "length"}
        self._chunk(msg, InferChunk(0, " simulated" * n))
        self._chunk(msg, InferChunk(1, "", True, usage))
        self.last_usage = usage

    # --- the control worker -----------------------------------------------------------------------

    def _next(self) -> None:
        if self._running or not self._queue:
            return
        req, msg = self._queue.popleft()
        self._running = True
        job = getattr(req, "job", None)
        recorded = self._finished(job) if job else None
        if job and recorded is not None:
            self.errors["replayed"] += 1
            self.host.count("replays")
            if isinstance(req, InstallRequest):
                if recorded.get("ok"):
                    self._event(job, "committed", replayed=True, **(recorded.get("result") or {}))
                else:
                    err = recorded.get("error") or {}
                    self._event(job, "failed", replayed=True, code=err.get("code"), reason=err.get("message"))
            self._done(req, msg, None, Reply(bool(recorded.get("ok")), recorded.get("result"),
                                             recorded.get("error")))
            return
        if job:
            self.journal.pop(job, None)
            self.journal[job] = {"command": req.NAME, "state": "running", "ts": self.host.epoch()}
        if isinstance(req, InstallRequest):
            _Install(self, req, msg).start()
        elif isinstance(req, RollbackRequest):
            reply = self._rollback(req)
            self.announce()
            self._done(req, msg, job, reply)
        elif isinstance(req, StatusRequest):
            self._done(req, msg, job, Reply.success(self.status()))
        elif isinstance(req, ProbeRequest):
            self._done(req, msg, job, Reply.success({"facts": self.facts(runtimes=req.runtimes),
                                                     "profile": self.profile.name}))
        else:  # e.g. cmd/keyring: simulated devices hold no keyring; answer, never wedge the queue
            self._done(req, msg, job, Reply.failure("unknown_command",
                                                    f"a simulated device does not do {req.NAME}"))

    def _finished(self, job: str) -> dict[str, Any] | None:
        entry = self.journal.get(job)
        if entry is None or entry.get("state") not in ("done", "failed"):
            return None
        reply = entry.get("reply")
        return reply if isinstance(reply, dict) else None

    def _done(self, req: Command, msg: Message, job: str | None, reply: Reply) -> None:
        """Record a job's reply (when it ran now), answer, and start the next command."""
        if job:
            entry = self.journal.setdefault(job, {"command": req.NAME})
            entry.update(state="done" if reply.ok else "failed", ts=self.host.epoch(),
                         reply={"ok": reply.ok, "result": reply.result, "error": reply.error})
            while len(self.journal) > MAX_JOBS:
                self.journal.popitem(last=False)
        self._reply(msg, reply)
        self._running = False
        if self._queue:
            self.host.later(0, self._next)

    def _rollback(self, req: RollbackRequest) -> Reply:
        """Installer.rollback: conditional on ``from_digest``; needs a previous bundle."""
        self.rollbacks += 1
        self.host.count("rollbacks")
        cur = self.bundles.get(self.current or "")
        if req.from_digest is not None and (cur is None or cur.digest != req.from_digest):
            return Reply.success({"current": self._summary(self.current), "rolled_back": False,
                                  "reason": f"the bundle {req.from_digest[:16]} is not current here; "
                                            "nothing changed"})
        if not self.previous or self.previous not in self.bundles:
            return Reply.failure("store", "there is no previous bundle to roll back to")
        self.current, self.previous = self.previous, self.current
        return Reply.success({"current": self._summary(self.current), "rolled_back": True})

    def serving(self) -> str:
        b = self.bundles.get(self.current or "")
        return f"{b.model} v{b.version} (slot {b.slot})" if b else "nothing (no model is installed)"


class _Install:
    """One install job, its steps spaced by loop timers (Installer.install + Store.install)."""

    def __init__(self, dev: SimDevice, req: InstallRequest, msg: Message) -> None:
        self.dev, self.req, self.msg = dev, req, msg
        self.named = req.job
        self.job = req.job or (msg.correlation_data or secrets.token_bytes(8)).hex()[:32]
        self.t0 = time.monotonic()
        host = dev.host
        self.rng = random.Random(f"{dev._seed}/{self.job}")
        # A little jitter, so a wave's replies do not all land in the same millisecond.
        self.seconds = host.install_seconds * self.rng.uniform(0.8, 1.2)
        self.bundle, self.known = host.catalog.lookup(req.sha256, req.size, dev.profile.name)
        self.old = dev.current

    def start(self) -> None:
        self.dev.installs += 1
        self.dev.host.count("installs")
        self.dev._event(self.job, "downloading", url=self.req.url, total=self.req.size)
        self._after(_AT_DOWNLOADED, self._downloaded)

    def _after(self, fraction: float, step: Callable[[], None]) -> None:
        if self.seconds > 0:
            self.dev.host.later(self.seconds * fraction, self._guarded, step)
        else:
            self._guarded(step)

    def _guarded(self, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception as e:  # a bug here must still answer the job, as the agent's worker does
            self._fail("internal", f"internal error: {e}", rolled_back=False)
            raise

    def _downloaded(self) -> None:
        dev, b = self.dev, self.bundle
        dev._event(self.job, "downloading", bytes=self.req.size, total=self.req.size)
        # (1) verify: the signature (simulated: always good), then the version rule.
        hw = dev.high_water.get(b.model)
        older = hw is not None and (b.version < hw[0] or (b.version == hw[0] and b.digest != hw[1]))
        if self.known and older and hw is not None:
            self._fail("downgrade", f"{b.model} v{b.version} is older than (or reuses) v{hw[0]} "
                                    "installed here", rolled_back=False)
            return
        dev._event(self.job, "verified", model=b.model, version=b.version, digest=b.digest, signer=b.signer)
        if self.old == b.slot:
            self._answer(Reply.success({"installed": dev._summary(b.slot),
                                        "previous": dev._summary(dev.previous), "already_installed": True,
                                        "check": None, "seconds": self._seconds()}))
            dev.last_install = {"ok": True, "slot": b.slot, "ts": dev.host.epoch()}
            return
        # (2) requirements, then stage and (3) switch (pending until the gate passes).
        if b.arch and b.arch != dev.hw.arch:
            self._fail("install_failed", f"bundle is for {b.arch}; this device is {dev.hw.arch} "
                                         "(Build for this device's profile (edgepack-agent probe shows it).)",
                       rolled_back=False)
            return
        dev._event(self.job, "installed", slot=b.slot, previous=self.old)
        self._after(_AT_SWITCHED, self._switched)

    def _switched(self) -> None:
        self._after(_AT_GATED - _AT_SWITCHED, self._gate)

    def _gate(self) -> None:
        dev, b = self.dev, self.bundle
        if dev.behaviour == "fail":
            # The load check raised before the benchmark: the model does not load here.
            self._rolled_back("install_failed", "the model failed to load: simulated load failure", None)
            return
        slow = dev.host.slow_factor if dev.behaviour == "slow" else 1.0
        report = gate_report(dev.baseline, dev.profile, self.rng, slow_factor=slow,
                             garbage=dev.behaviour == "garbage", fidelity_threshold=b.fidelity_threshold)
        dev.last_gate = {"slot": b.slot, **report, "ts": dev.host.epoch()}
        dev._event(self.job, "benchmarked", **report)
        if report["failures"]:
            # The gate's errors: FidelityError whenever fidelity failed, else GateFailedError.
            fidelity = not report["fidelity"]["ok"]
            what = "computes other tokens than the build host" if fidelity else "misses its SLO"
            self._rolled_back("fidelity_failed" if fidelity else "slo_failed",
                              f"the model {what} on this device: " + "; ".join(report["failures"]), report)
            return
        self._after(1.0 - _AT_GATED, lambda: self._commit(report))

    def _commit(self, report: dict[str, Any]) -> None:
        dev, b = self.dev, self.bundle
        check = {"load_ms": round(self.rng.uniform(150, 900), 1), **report}
        dev.bundles = {s: x for s, x in dev.bundles.items() if s in (b.slot, self.old)}  # the store's gc
        dev.bundles[b.slot] = b
        dev.gates = {s: g for s, g in dev.gates.items() if s in dev.bundles}
        dev.gates[b.slot] = {**check, "ts": dev.host.epoch()}
        dev.current, dev.previous = b.slot, self.old
        hw = dev.high_water.get(b.model)
        if hw is None or b.version >= hw[0]:
            dev.high_water[b.model] = (b.version, b.digest)
        dev._event(self.job, "committed", slot=b.slot, version=b.version, check=check)
        dev.last_install = {"ok": True, "slot": b.slot, "ts": dev.host.epoch()}
        self._answer(Reply.success({"installed": dev._summary(b.slot), "previous": dev._summary(self.old),
                                    "already_installed": False, "check": check,
                                    "seconds": self._seconds()}))

    def _rolled_back(self, code: str, why: str, report: dict[str, Any] | None) -> None:
        detail: dict[str, Any] = {"slot": self.bundle.slot, "reason": why, "serving": self.old}
        if report is not None:
            detail["gate"] = report
        self.dev._event(self.job, "rolled_back", **detail)
        self._fail(code, f"the new bundle failed its load check and was rolled back: {why} "
                         f"({_RESTORED_HINT})", rolled_back=True)

    def _fail(self, code: str, reason: str, *, rolled_back: bool) -> None:
        dev = self.dev
        dev.errors["install_errors"] += 1
        dev.host.count("install_failures")
        serving = dev.serving()
        dev._event(self.job, "failed", code=code, reason=reason, rolled_back=rolled_back, serving=serving)
        dev.last_install = {"ok": False, "code": code, "reason": reason, "serving": serving,
                            "ts": dev.host.epoch()}
        self._answer(Reply.failure(code, reason))

    def _answer(self, reply: Reply) -> None:
        self.dev.announce()
        self.dev._done(self.req, self.msg, self.named, reply)

    def _seconds(self) -> float:
        return round(time.monotonic() - self.t0, 2)


__all__ = ["AGENT_VERSION", "BEHAVIOURS", "Host", "SimDevice"]
