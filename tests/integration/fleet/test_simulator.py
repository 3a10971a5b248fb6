"""The fleet simulator against a real mosquitto: births, installs, failures, journal, scale.

The host side of every test is the product's own MQTT transport and protocol helpers (the
controller's view): births are folded by :class:`fleet.inventory.Inventory`, replies parsed with
:meth:`agent.protocol.Reply.from_bytes`, events with :func:`agent.protocol.parse_status`.
The simulator is a fleet-scale stand-in; the agent itself is tested against the real daemon.
"""

from __future__ import annotations

import collections
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from brokerkit import Broker

from agent.protocol import (
    SCHEMA,
    InferChunk,
    InstallRequest,
    ProbeRequest,
    Reply,
    RollbackRequest,
    StatusRequest,
    Topics,
    fleet_filter,
    parse_state,
    parse_status,
    reply_filter,
)
from agent.transport.mqtt import Message, MqttTransport
from fleet.inventory import Inventory
from fleet.rollout import regression_of
from fleet.simulator import Simulator

pytestmark = pytest.mark.integration

FLEET = "lab"
HOST_ID = "sim-test-host"
WAIT = 20.0  # seconds for anything a handful of devices does


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# A stand-in with the shape of agent.bundle.release.Release.bundles: profile -> bundle.
RELEASE: dict[str, dict[str, dict[str, Any]]] = {"bundles": {
    p: {"file": f"gemma-{p}.bundle", "sha256": _sha(f"file/{p}"), "size": 123_456_789,
        "manifest_digest": _sha(f"manifest/{p}"), "model": "gemma-3-270m-it", "version": 7,
        "quant": q}
    for p, q in (("raspberry-pi-5", "Q4_K_M"), ("intel-core-ultra", ""), ("x86-64-cpu", "Q8_0"))}}


class _Host:
    """A host client: records every fleet message and every reply to it."""

    def __init__(self, url: str, client_id: str = HOST_ID, *, watch: bool = True) -> None:
        self.client_id = client_id
        self.messages: list[Message] = []
        self.replies: dict[bytes, list[bytes]] = collections.defaultdict(list)
        self._cond = threading.Condition()
        self.t = MqttTransport(url, client_id, session_expiry=0)
        for kind in ("state", "birth", "health", "events") if watch else ():  # not "#": our replies
            self.t.subscribe(fleet_filter(FLEET, kind), qos=1, handler=self._got)
        self.t.subscribe(reply_filter(FLEET, client_id), qos=1, handler=self._reply)
        self.t.start()
        self.t.wait_connected(10)

    def _got(self, m: Message) -> None:
        with self._cond:
            self.messages.append(m)
            self._cond.notify_all()

    def _reply(self, m: Message) -> None:
        with self._cond:
            self.replies[m.correlation_data or b""].append(m.payload)
            self._cond.notify_all()

    def wait(self, pred: Callable[[], bool], timeout: float = WAIT) -> None:
        """Until ``pred()``: re-checked on every message and every 20 ms (it may read the simulator)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred():
                assert time.monotonic() < deadline, "timed out"
                self._cond.wait(0.02)

    def send(self, device: str, name: str, payload: bytes, corr: bytes) -> None:
        self.t.publish(Topics(FLEET, device).cmd(name) if name != "reboot" else
                       f"{Topics(FLEET, device).base}/cmd/{name}", payload, qos=1,
                       response_topic=Topics(FLEET, device).reply(self.client_id),
                       correlation_data=corr)

    def request(self, device: str, name: str, payload: bytes, corr: bytes) -> Reply:
        n = len(self.replies[corr])
        self.send(device, name, payload, corr)
        self.wait(lambda: len(self.replies[corr]) > n)
        return Reply.from_bytes(self.replies[corr][n])

    def events(self, device: str, job: str) -> list[dict[str, Any]]:
        topic = Topics(FLEET, device).events
        with self._cond:
            evs = [parse_status(m.payload) for m in self.messages if m.topic == topic]
        return [e for e in evs if e["job"] == job]

    def births(self, device: str) -> list[dict[str, Any]]:
        topic = Topics(FLEET, device).birth
        with self._cond:
            return [parse_status(m.payload) for m in self.messages if m.topic == topic and m.payload]

    def inventory(self) -> Inventory:
        inv = Inventory(FLEET)
        with self._cond:
            for m in self.messages:
                inv.apply(m.topic, m.payload, now=time.time())
        return inv

    def close(self) -> None:
        self.t.stop()


@pytest.fixture
def host(broker: Broker) -> Iterator[_Host]:
    h = _Host(broker.url)
    try:
        yield h
    finally:
        h.close()


def _install(host: _Host, device: str, profile: str, job: str | None, corr: bytes) -> None:
    b = RELEASE["bundles"][profile]
    req = InstallRequest(url=f"http://127.0.0.1:9/{b['file']}", sha256=str(b["sha256"]), size=int(b["size"]),
                         job=job)
    host.send(device, "install", req.to_bytes(), corr)


def _final(host: _Host, device: str, job: str) -> list[str]:
    host.wait(lambda: any(e["stage"] in ("committed", "failed") for e in host.events(device, job)))
    return [e["stage"] for e in host.events(device, job)]


# --- births and state --------------------------------------------------------------------------------


def test_fifty_devices_announce_births_and_state_with_the_profile_mix(broker: Broker) -> None:
    with Simulator(broker.url, FLEET, devices=50, seed=3, health_interval=0.5) as sim:
        assert sim.wait_online(WAIT), sim.last_error
        host = _Host(broker.url)  # after the fact: everything below is retained
        try:
            host.wait(lambda: len(host.inventory()) == 50 and all(
                r.health is not None for r in host.inventory().devices()))
            records = host.inventory().devices()
            birth = parse_status(sim.device("sim-00001").birth())
        finally:
            host.close()
    assert [r.device for r in records] == [f"sim-{i:05d}" for i in range(1, 51)]
    assert collections.Counter(r.profile for r in records) == {
        "raspberry-pi-5": 30, "intel-core-ultra": 15, "x86-64-cpu": 5}
    arch = {"raspberry-pi-5": "aarch64", "intel-core-ultra": "x86_64", "x86-64-cpu": "x86_64"}
    for r in records:
        assert r.state == "online" and r.agent_version and r.agent_version.endswith("+sim")
        assert r.arch == arch[r.profile or ""] and r.ram_bytes and r.cpu_model
        cur = r.current or {}
        assert len(cur["digest"]) == 64 and cur["model"] and cur["version"] >= 1
        assert r.bundles and r.bundles[0]["role"] == "current"
        assert r.errors["commands"] == 0  # health: the agent's counters
    # Birth's current carries the full summary and the device's own gate figures (the baseline).
    gate = birth["current"]["gate"]
    assert gate["ok"] is True and gate["decode_tok_s"] > 0 and gate["ttft_ms"] > 0
    assert gate["peak_rss_mb"] > 0 and gate["tokens"] > 0 and gate["fidelity"]["ok"] is True
    # The same seed gives the same fleet.
    again = Simulator(broker.url, FLEET, devices=50, seed=3)
    assert [again.device(r.device).profile.name for r in records] == [r.profile for r in records]


def test_offline_devices_and_late_joiners(broker: Broker, host: _Host) -> None:
    with Simulator(broker.url, FLEET, devices=20, offline_rate=0.25, offline_seconds=1.5,
                   join_late=3, join_after=0.5, seed=1) as sim:
        assert sim.wait_online(WAIT), sim.last_error
        assert len(sim.offline_at_start) == 5 and sim.online_count == 15
        host.wait(lambda: len(host.inventory()) == 20 and all(r.state and r.current
                                                              for r in host.inventory().devices()))
        inv = host.inventory()
        offline = {r.device for r in inv.devices() if r.state == "offline"}
        assert offline == set(sim.offline_at_start)
        assert all(r.profile and r.current for r in inv.devices())  # births retained for all 20
        late = sim.join_late_ids
        assert late == ["sim-00021", "sim-00022", "sim-00023"]
        assert not any(host.births(d) for d in late)
        host.wait(lambda: all(host.births(d) for d in late))  # provisioning mid-run
        assert sim.wait_online(WAIT, count=23)  # the offline five are back too
        host.wait(lambda: all(r.state == "online" for r in host.inventory().devices()))
        assert len(host.inventory()) == 23


def test_a_device_cut_off_is_lost_then_comes_back(broker: Broker, host: _Host) -> None:
    with Simulator(broker.url, FLEET, devices=3) as sim:
        assert sim.wait_online(WAIT)

        def last_state(device: str) -> str:
            got = [m for m in host.messages if m.topic == Topics(FLEET, device).state]
            return parse_state(got[-1].payload) if got else ""

        host.wait(lambda: last_state("sim-00002") == "online")
        sim.take_offline(["sim-00002"], clean=False)
        host.wait(lambda: last_state("sim-00002") == "lost")  # the broker published the last will
        sim.bring_online(["sim-00002"])
        host.wait(lambda: last_state("sim-00002") == "online")
        sim.take_offline(["sim-00003"])
        host.wait(lambda: last_state("sim-00003") == "offline")


def test_devices_reconnect_after_a_broker_restart(broker: Broker) -> None:
    with Simulator(broker.url, FLEET, devices=20) as sim:
        assert sim.wait_online(WAIT)
        broker.restart()
        deadline = time.monotonic() + WAIT
        while sim.online_count == 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sim.wait_online(WAIT), sim.last_error  # back, with jittered backoff
        assert sim.counters()["connects"] >= 40
        assert sim.call(lambda: sorted({d.phase for d in map(sim.device, sim.device_ids)})) == ["online"]


# --- installs ------------------------------------------------------------------------------------------


def test_install_is_answered_with_events_and_a_reply_of_the_agents_shape(broker: Broker, host: _Host) -> None:
    with Simulator(broker.url, FLEET, devices=1, release=RELEASE, profiles="x86-64-cpu") as sim:
        assert sim.wait_online(WAIT)
        dev = "sim-00001"
        before = sim.device(dev).birth()
        _install(host, dev, "x86-64-cpu", "r1.sim-00001.1", b"r1.sim-00001.1")
        assert _final(host, dev, "r1.sim-00001.1") == [
            "downloading", "downloading", "verified", "installed", "benchmarked", "committed"]
        host.wait(lambda: bool(host.replies[b"r1.sim-00001.1"]))
        reply = Reply.from_bytes(host.replies[b"r1.sim-00001.1"][0])
        host.wait(lambda: any(b["current"]["version"] == 7 for b in host.births(dev)))
        # The same bundle again, as an unnamed command: already installed, nothing switched.
        b = RELEASE["bundles"]["x86-64-cpu"]
        again = host.request(dev, "install", InstallRequest(
            url="http://127.0.0.1:9/x", sha256=str(b["sha256"]), size=1).to_bytes(), b"again")
        assert again.ok and again.result is not None and again.result["already_installed"] is True
        assert again.result["check"] is None and again.result["installed"]["digest"] == b["manifest_digest"]
        assert sim.installs() == {dev: 2}
    assert reply.ok and reply.result is not None
    res = reply.result
    assert set(res) == {"installed", "previous", "already_installed", "check", "seconds"}
    assert res["installed"]["digest"] == b["manifest_digest"] and res["installed"]["version"] == 7
    assert res["installed"]["quant"] == "Q8_0" and res["installed"]["gate"]["decode_tok_s"] > 0
    assert res["previous"]["digest"] == parse_status(before)["current"]["digest"]
    assert res["already_installed"] is False and res["seconds"] >= 0
    check = res["check"]
    assert check["ok"] is True and {"decode_tok_s", "ttft_ms", "peak_rss_mb", "tokens"} <= set(check)
    assert check["fidelity"]["ok"] and check["fidelity"]["agreement"] >= check["fidelity"]["threshold"]
    events = host.events("sim-00001", "r1.sim-00001.1")
    assert all(e["schema"] == SCHEMA for e in events)
    assert events[2]["digest"] == b["manifest_digest"] and events[-1]["check"] == check
    birth = host.births("sim-00001")[-1]
    assert birth["current"]["digest"] == b["manifest_digest"]
    assert {x["role"] for x in birth["bundles"]} == {"current", "previous"}


def test_fail_garbage_and_slow_devices_end_as_specified(broker: Broker, host: _Host) -> None:
    roles = {"sim-00001": "fail", "sim-00002": "garbage", "sim-00003": "slow", "sim-00004": "ok"}
    with Simulator(broker.url, FLEET, devices=4, release=RELEASE, profiles="raspberry-pi-5",
                   behaviours=roles, slow_factor=0.5, install_seconds=0.2) as sim:
        assert sim.wait_online(WAIT)
        baseline = {d: parse_status(sim.device(d).birth())["current"] for d in roles}
        for d in roles:
            _install(host, d, "raspberry-pi-5", f"r1.{d}.1", f"r1.{d}.1".encode())
        stages = {d: _final(host, d, f"r1.{d}.1") for d in roles}
        host.wait(lambda: all(host.replies[f"r1.{d}.1".encode()] for d in roles))
        replies = {d: Reply.from_bytes(host.replies[f"r1.{d}.1".encode()][0]) for d in roles}
        assert sim.installs() == dict.fromkeys(roles, 1)
    ev = {d: host.events(d, f"r1.{d}.1") for d in roles}

    assert stages["sim-00001"] == ["downloading", "downloading", "verified", "installed", "rolled_back",
                                   "failed"]
    assert ev["sim-00001"][-1]["code"] == "install_failed" and ev["sim-00001"][-1]["rolled_back"] is True
    assert not replies["sim-00001"].ok and replies["sim-00001"].error == {
        "code": "install_failed", "message": ev["sim-00001"][-1]["reason"]}

    assert stages["sim-00002"][-3:] == ["benchmarked", "rolled_back", "failed"]
    bench = ev["sim-00002"][-3]
    assert bench["ok"] is False and bench["fidelity"]["ok"] is False
    assert bench["fidelity"]["agreement"] < bench["fidelity"]["threshold"] / 2
    assert ev["sim-00002"][-2]["gate"]["fidelity"] == bench["fidelity"]
    assert replies["sim-00002"].error is not None and replies["sim-00002"].error["code"] == "fidelity_failed"
    assert "rolled back" in replies["sim-00002"].error["message"]

    for d in ("sim-00001", "sim-00002"):  # still on what they had
        assert host.births(d)[-1]["current"]["digest"] == baseline[d]["digest"]

    assert stages["sim-00003"][-1] == "committed" and replies["sim-00003"].ok
    slow = replies["sim-00003"].result["check"]  # type: ignore[index]
    base = baseline["sim-00003"]["gate"]
    assert 0.44 < slow["decode_tok_s"] / base["decode_tok_s"] < 0.56
    assert 1.8 < slow["ttft_ms"] / base["ttft_ms"] < 2.25
    # ... which is what the rollout's regression check measures, and it stands out:
    assert regression_of(slow, base)["decode"] > 0.4
    ok = replies["sim-00004"].result["check"]  # type: ignore[index]
    assert abs(regression_of(ok, baseline["sim-00004"]["gate"])["decode"]) < 0.08


def test_a_job_sent_again_is_answered_from_the_journal_and_runs_once(broker: Broker, host: _Host) -> None:
    with Simulator(broker.url, FLEET, devices=2, release=RELEASE, profiles="intel-core-ultra",
                   install_seconds=0.3) as sim:
        assert sim.wait_online(WAIT)
        job = "r9.sim-00001.1"
        _install(host, "sim-00001", "intel-core-ultra", job, job.encode())
        _install(host, "sim-00001", "intel-core-ultra", job, job.encode())  # while it runs
        host.wait(lambda: len(host.replies[job.encode()]) == 2)
        _install(host, "sim-00001", "intel-core-ultra", job, job.encode())  # after it finished
        host.wait(lambda: len(host.replies[job.encode()]) == 3)
        host.wait(lambda: sum(e.get("replayed") is True for e in host.events("sim-00001", job)) == 2)
        # An unnamed command delivered twice (same correlation data) is dropped the second time.
        host.send("sim-00002", "status", StatusRequest().to_bytes(), b"dup")
        host.send("sim-00002", "status", StatusRequest().to_bytes(), b"dup")
        host.wait(lambda: sim.device("sim-00002").errors["duplicates"] == 1)
        assert sim.installs() == {"sim-00001": 1, "sim-00002": 0}
        assert sim.device("sim-00001").errors["replayed"] == 2 and sim.counters()["replays"] == 2
    first, *again = [Reply.from_bytes(p) for p in host.replies[job.encode()]]
    assert first.ok and all(r == first for r in again)
    stages = [e["stage"] for e in host.events("sim-00001", job)]
    assert stages.count("committed") == 3 and stages.count("installed") == 1
    replayed = [e for e in host.events("sim-00001", job) if e.get("replayed")]
    assert all(e["stage"] == "committed" and e["installed"] == first.result["installed"]  # type: ignore[index]
               for e in replayed)
    assert len(host.replies[b"dup"]) == 1


def test_rollback_status_and_probe(broker: Broker, host: _Host) -> None:
    with Simulator(broker.url, FLEET, devices=1, release=RELEASE, profiles="raspberry-pi-5") as sim:
        assert sim.wait_online(WAIT)
        d = "sim-00001"
        first = parse_status(sim.device(d).birth())["current"]["digest"]
        none = host.request(d, "rollback", RollbackRequest().to_bytes(), b"rb0")
        assert none.error is not None and none.error["code"] == "store"
        _install(host, d, "raspberry-pi-5", "r1.sim-00001.1", b"i1")
        host.wait(lambda: bool(host.replies[b"i1"]))
        new = RELEASE["bundles"]["raspberry-pi-5"]["manifest_digest"]
        skip = host.request(d, "rollback", RollbackRequest(job="r1.sim-00001.rb1",
                                                           from_digest=first).to_bytes(), b"rb1")
        assert skip.ok and skip.result is not None and skip.result["rolled_back"] is False
        assert skip.result["current"]["digest"] == new
        rb2 = RollbackRequest(job="r1.sim-00001.rb2", from_digest=new).to_bytes()
        back = host.request(d, "rollback", rb2, b"rb2")
        assert back.ok and back.result is not None and back.result["rolled_back"] is True
        assert back.result["current"]["digest"] == first
        # The same rollback job again is answered from the journal: no second swap.
        again = host.request(d, "rollback", rb2, b"rb2")
        assert again == back and sim.device(d).rollbacks == 3
        host.wait(lambda: bool(host.births(d)) and host.births(d)[-1]["current"]["digest"] == first)
        status = host.request(d, "status", StatusRequest().to_bytes(), b"st")
        assert status.ok and status.result is not None
        assert status.result["current"]["digest"] == first and status.result["previous"]["digest"] == new
        assert {"agent_version", "device", "model_loaded", "busy", "queue", "last_install", "last_gate",
                "counters"} <= set(status.result)
        probe = host.request(d, "probe", ProbeRequest(runtimes=True).to_bytes(), b"pr")
        assert probe.ok and probe.result is not None and probe.result["profile"] == "raspberry-pi-5"
        assert probe.result["facts"]["arch"] == "aarch64" and probe.result["facts"]["runtimes"]


def test_malformed_commands_get_protocol_error_replies(broker: Broker, host: _Host) -> None:
    with Simulator(broker.url, FLEET, devices=1) as sim:
        assert sim.wait_online(WAIT)
        d = "sim-00001"
        cases = {
            b"m1": ("install", b"{not json"), b"m2": ("install", b"[1]"),
            b"m3": ("install", b'{"url":"http://h/b","sha256":"00","size":1}'),
            b"m4": ("status", b'{"verbose":true}'), b"m5": ("reboot", b"{}"),
            b"m6": ("install", b'{"url":"http://h/b","size":1}'),
        }
        for corr, (name, payload) in cases.items():
            host.send(d, name, payload, corr)
        host.send(d, "infer", b'{"prompt":""}', b"m7")
        host.wait(lambda: all(host.replies[c] for c in (*cases, b"m7")))
        codes = {c: Reply.from_bytes(host.replies[c][0]).error["code"] for c in cases}  # type: ignore[index]
        assert codes == {b"m1": "bad_json", b"m2": "not_object", b"m3": "bad_field", b"m4": "unknown_field",
                         b"m5": "unknown_command", b"m6": "missing_field"}
        chunk = InferChunk.from_bytes(host.replies[b"m7"][0])
        assert chunk.done and chunk.error is not None and chunk.error["code"] == "bad_field"
        assert sim.device(d).errors["rejected"] == 7 and sim.installs() == {d: 0}
        # ... and the device still works.
        assert host.request(d, "status", StatusRequest().to_bytes(), b"ok").ok


# --- scale -----------------------------------------------------------------------------------------


def test_two_thousand_devices_come_online_in_one_process(broker: Broker, host: _Host) -> None:
    t0 = time.monotonic()
    with Simulator(broker.url, FLEET, devices=2000, seed=5) as sim:
        assert sim.wait_online(60), f"{sim.online_count} online; {sim.last_error}"
        elapsed = time.monotonic() - t0
        # Far past select()'s limit: the sockets of one process have fds above 1024.
        assert len(os.listdir("/proc/self/fd")) > 2000
        last = sim.device_ids[-1]
        reply = host.request(last, "status", StatusRequest().to_bytes(), b"last")
        assert reply.ok and reply.result is not None and reply.result["device"] == last
        host.wait(lambda: len(host.inventory()) == 2000, timeout=30)
        assert all(r.state == "online" for r in host.inventory().devices())
        # A select()-based client that connects now still gets a low fd: the simulator keeps
        # its own sockets at fd >= 1024.
        late = _Host(broker.url, "sim-test-late", watch=False)
        try:
            assert late.request(sim.device_ids[0], "status", StatusRequest().to_bytes(), b"late").ok
        finally:
            late.close()
        c = sim.counters()
        assert c["connects"] == 2000 and c["connect_failures"] == 0
    print(f"2000 devices online in {elapsed:.1f}s")
