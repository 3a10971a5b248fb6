"""The agent as a service, for real: a mosquitto broker, the daemon as a process, the sample model.

Covers births and the last will, install over MQTT from the HTTP bundle server (events), streamed
inference in order, cancel, busy, rollback, a load-check rollback, commands sent while the agent is
down, broker restarts during an inference and an install, and a fuzz of malformed commands.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import secrets
import socket
import time
from pathlib import Path

import pytest
from agentkit import AgentProcess, Host, topics
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent._fs import file_digest
from agent.protocol import (
    COMMANDS,
    CancelRequest,
    InferChunk,
    InferRequest,
    InstallRequest,
    Reply,
    RollbackRequest,
    StatusRequest,
)
from fleet.client import install_job_id
from fleet.serve import BundleServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEV = "dev-a"


@pytest.fixture(scope="module")
def served(tmp_path_factory, agent_bundles) -> Path:
    """One flat folder of bundles, as `edgepack serve DIR` serves them."""
    d = tmp_path_factory.mktemp("served")
    for key in ("v1", "v2", "broken_v3"):
        os.link(agent_bundles[key], d / agent_bundles[key].name)
    return d


@pytest.fixture
def server(served):
    with BundleServer(served) as s:
        yield s


def install_req(server: BundleServer, bundle: Path) -> InstallRequest:
    digest, size = file_digest(bundle)
    return InstallRequest(url=server.url_for(bundle.name), sha256=digest, size=size)


@pytest.fixture
def host(broker):
    h = Host(broker.url)
    yield h
    h.close()


@pytest.fixture
def agent(tmp_path, broker, agent_bundles, host):
    a = AgentProcess(tmp_path / "state", agent_bundles["keyring"], broker.url, device=DEV).start()
    try:
        host.wait_for(DEV, "state", lambda m: m["state"] == "online", timeout=30)
    except AssertionError:
        raise AssertionError(a.tail()) from None
    yield a
    a.stop()


def call(host: Host, command: str, req, timeout: float = 120.0) -> Reply:
    return host.requests.call(DEV, command, req, timeout=timeout)


def stream(host: Host, req: InferRequest, timeout: float = 60.0) -> list[InferChunk]:
    return list(host.requests.stream(DEV, req, timeout=timeout))


def installed(host: Host, server: BundleServer, bundle: Path) -> Reply:
    r = call(host, "install", install_req(server, bundle))
    assert r.ok, r.error
    return r


def test_birth_health_and_last_will_on_kill(agent, host):
    birth = host.wait_for(DEV, "birth", lambda m: True)
    assert birth["device"] == DEV and birth["agent_version"]
    assert birth["facts"]["arch"] and birth["profile"]
    health = host.wait_for(DEV, "health", lambda m: "rss_bytes" in m)
    assert health["rss_bytes"] > 0 and "disk_free_bytes" in health and "errors" in health
    agent.kill()  # SIGKILL: no goodbye, the broker must publish the will
    host.wait_for(DEV, "state", lambda m: m["state"] == "lost", timeout=15)


def test_clean_stop_says_offline(agent, host):
    assert agent.stop() == 0
    host.wait_for(DEV, "state", lambda m: m["state"] == "offline", timeout=15)


def test_install_over_mqtt_streams_events_and_answers(agent, host, server, agent_bundles):
    r = installed(host, server, agent_bundles["v1"])
    assert r.result["installed"]["version"] == 1 and r.result["installed"]["quant"] == "Q4_K_M"
    stages = [e["stage"] for e in host.status.get((DEV, "events"), [])]
    for stage in ("downloading", "verified", "installed", "committed"):
        assert stage in stages, stages
    assert stages.index("verified") < stages.index("installed") < stages.index("committed")
    birth = host.wait_for(DEV, "birth", lambda m: m.get("current") is not None)
    assert birth["current"]["version"] == 1


def test_streamed_inference_in_order_with_usage(agent, host, server, agent_bundles):
    installed(host, server, agent_bundles["v1"])
    chunks = stream(host, InferRequest(prompt="Once upon a time", max_tokens=24, temperature=0.0))
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert chunks[-1].done and not any(c.done for c in chunks[:-1])
    usage = chunks[-1].usage
    assert usage["completion_tokens"] > 0 and usage["ttft_ms"] > 0 and usage["decode_tok_s"] > 0
    text = "".join(c.text for c in chunks)
    assert len(text.split()) >= 5
    health = host.wait_for(DEV, "health", lambda m: m.get("last_decode_tok_s"))
    assert health["last_decode_tok_s"] > 0


def test_infer_without_a_model_says_so(agent, host):
    chunks = stream(host, InferRequest(prompt="hi", max_tokens=4))
    assert chunks[-1].done and chunks[-1].error["code"] == "no_model"


def test_cancel_stops_a_running_generation(agent, host, server, agent_bundles):
    installed(host, server, agent_bundles["v1"])
    req = InferRequest(prompt="Write a very long story about the sea.", max_tokens=2000,
                       request_id="long-1")
    with host.requests.request(DEV, "infer", req, timeout=60) as pending:
        first = InferChunk.from_bytes(pending.get().payload)
        assert first.seq == 0 and not first.done
        r = call(host, "cancel", CancelRequest(request_id="long-1"))
        assert r.ok
        chunks = [first]
        while not chunks[-1].done:
            chunks.append(InferChunk.from_bytes(pending.get().payload))
    assert chunks[-1].usage["finish_reason"] == "cancelled"
    assert chunks[-1].usage["completion_tokens"] < 2000
    assert not call(host, "cancel", CancelRequest(request_id="long-1")).ok  # nothing left


def test_busy_when_the_queue_is_full(tmp_path, broker, agent_bundles, host, server):
    a = AgentProcess(tmp_path / "state", agent_bundles["keyring"], broker.url, device=DEV,
                     extra=("--queue", "1")).start()
    try:
        host.wait_for(DEV, "state", lambda m: m["state"] == "online", timeout=30)
        installed(host, server, agent_bundles["v1"])
        req = InferRequest(prompt="Tell me about rivers.", max_tokens=200)
        pendings = [host.requests.request(DEV, "infer", req, timeout=120) for _ in range(5)]
        finals = []
        for p in pendings:
            with p:
                while True:
                    c = InferChunk.from_bytes(p.get().payload)
                    if c.done:
                        finals.append(c)
                        break
        busy = [c for c in finals if c.error and c.error["code"] == "busy"]
        served = [c for c in finals if not c.error]
        assert busy and served and len(busy) + len(served) == 5
    finally:
        a.stop()


def test_rollback_and_a_load_check_failure_keeps_serving(agent, host, server, agent_bundles):
    installed(host, server, agent_bundles["v1"])
    installed(host, server, agent_bundles["v2"])
    # A correctly signed bundle whose model does not load is rolled back, with the reason.
    r = call(host, "install", install_req(server, agent_bundles["broken_v3"]))
    assert not r.ok and r.error["code"] == "install_failed" and "rolled back" in r.error["message"]
    st_ = call(host, "status", StatusRequest()).result
    assert st_["current"]["version"] == 2
    chunks = stream(host, InferRequest(prompt="The sky is", max_tokens=8, temperature=0.0))
    assert chunks[-1].done and not chunks[-1].error  # still serving v2
    r = call(host, "rollback", RollbackRequest())
    assert r.ok and r.result["current"]["version"] == 1
    chunks = stream(host, InferRequest(prompt="The sky is", max_tokens=8, temperature=0.0))
    assert chunks[-1].done and not chunks[-1].error


def test_tampered_download_is_refused_and_nothing_changes(agent, host, server, agent_bundles):
    installed(host, server, agent_bundles["v1"])
    req = install_req(server, agent_bundles["v2"])
    bad = InstallRequest(url=req.url, sha256="0" * 64, size=req.size)
    r = call(host, "install", bad)
    assert not r.ok and r.error["code"] == "digest_mismatch"
    assert call(host, "status", StatusRequest()).result["current"]["version"] == 1


def test_command_sent_while_agent_is_down_runs_after_restart(tmp_path, broker, agent_bundles):
    host = Host(broker.url, client_id="host-persistent", persistent=True)
    a = AgentProcess(tmp_path / "state", agent_bundles["keyring"], broker.url, device=DEV)
    try:
        a.start()
        host.wait_for(DEV, "state", lambda m: m["state"] == "online", timeout=30)
        a.stop()
        host.wait_for(DEV, "state", lambda m: m["state"] == "offline", timeout=15)
        # Acknowledged by the broker: it now holds the command in the device's persistent session.
        pending = host.requests.request(DEV, "status", StatusRequest(), timeout=60, ack_timeout=10)
        a.start()
        with pending:
            reply = Reply.from_bytes(pending.get().payload)
        assert reply.ok and reply.result["device"] == DEV
    finally:
        a.stop()
        host.close()


def test_broker_restart_during_inference_loses_nothing_silently(agent, host, server, agent_bundles,
                                                                broker):
    installed(host, server, agent_bundles["v1"])
    host2 = Host(broker.url, client_id="host-stream", persistent=True)
    try:
        req = InferRequest(prompt="Describe a long walk through the mountains.", max_tokens=300,
                           temperature=0.0)
        with host2.requests.request(DEV, "infer", req, timeout=90) as pending:
            got = [InferChunk.from_bytes(pending.get().payload)]
            broker.wait_saved()
            broker.restart(crash=True)
            while not got[-1].done:
                got.append(InferChunk.from_bytes(pending.get().payload))
        seqs = sorted({c.seq for c in got})
        # Every chunk arrives (QoS 1 queued across the outage) or the stream ends with an error.
        assert got[-1].error or seqs == list(range(seqs[-1] + 1))
        assert got[-1].done
    finally:
        host2.close()
    # The agent reconnected by itself and still answers.
    host.transport.wait_connected(30)
    assert call(host, "status", StatusRequest(), timeout=60).ok


def test_broker_restart_during_install_installs_once(agent, host, server, agent_bundles, broker):
    host2 = Host(broker.url, client_id="host-install", persistent=True)
    try:
        with host2.requests.request(DEV, "install", install_req(server, agent_bundles["v1"]),
                                    timeout=180) as pending:
            job = install_job_id(pending.correlation)
            host.wait_for(DEV, "events", lambda m: m.get("job") == job, timeout=60)  # it started
            broker.wait_saved()
            broker.restart(crash=True)
            reply = Reply.from_bytes(pending.get().payload)
        assert reply.ok, reply.error
    finally:
        host2.close()
    host.transport.wait_connected(30)
    st_ = call(host, "status", StatusRequest(), timeout=60).result
    assert st_["current"]["version"] == 1
    # Executed once: one install job ran (a redelivered duplicate would be dropped or a no-op).
    assert st_["counters"]["install_errors"] == 0


# --- fuzz --------------------------------------------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# Every payload is malformed on purpose: raw bytes (not JSON objects), JSON that is not an object,
# or an object carrying a field no command has. Valid commands would run for real.
malformed = st.one_of(
    st.binary(max_size=200).filter(lambda b: not b.strip().startswith(b"{")),
    _json_values.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(["prompt", "url", "size", "sha256", "max_tokens", "request_id",
                                     "runtimes", "temperature"]), _json_values, max_size=5)
    .map(lambda d: json.dumps({**d, "zz_unknown": 1}).encode()),
)


def test_fuzz_10000_malformed_commands_all_answered_no_crash(agent, host):
    # Published by hand (not through RequestClient) so unknown command names reach the agent too.
    replies: queue.Queue = queue.Queue()
    reply_to = topics(DEV).reply("fuzzer")
    host.transport.subscribe(reply_to, handler=replies.put)
    answered = {"n": 0}
    base = topics(DEV).base

    @settings(max_examples=10_000, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(command=st.sampled_from([*COMMANDS, "reboot", "Install", "cmd"]), payload=malformed)
    def one(command: str, payload: bytes) -> None:
        corr = secrets.token_bytes(8)
        host.transport.publish(f"{base}/cmd/{command}", payload, qos=1, response_topic=reply_to,
                               correlation_data=corr)
        msg = replies.get(timeout=10)
        assert msg.correlation_data == corr
        if command == "infer":
            c = InferChunk.from_bytes(msg.payload)
            assert c.done and c.error and c.error["code"], c
        else:
            r = Reply.from_bytes(msg.payload)
            assert not r.ok and r.error["code"], r
        answered["n"] += 1

    one()
    assert answered["n"] >= 10_000
    assert agent.alive()
    status = call(host, "status", StatusRequest()).result
    assert status["counters"]["rejected"] >= 10_000


# --- systemd and a locked-down broker ----------------------------------------------------------------


def test_systemd_ready_status_watchdog_and_stopping(tmp_path, broker, agent_bundles, host):
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(1.0)
    a = AgentProcess(tmp_path / "state", agent_bundles["keyring"], broker.url, device=DEV,
                     env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000"})
    got: list[str] = []

    def until(pred, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not pred():
            with contextlib.suppress(TimeoutError):
                got.extend(sock.recv(4096).decode().splitlines())

    try:
        a.start()
        until(lambda: "READY=1" in got and got.count("WATCHDOG=1") >= 2, 30)
        assert "READY=1" in got, (got, a.tail())
        assert any(x.startswith("STATUS=serving edgepack/v1/test/dev-a") for x in got), got
        # READY only once the device is really online (the retained state is there).
        assert host.wait_for(DEV, "state", lambda m: m["state"] == "online", timeout=5)
        assert got.count("WATCHDOG=1") >= 2  # pinged from the main loop every 0.5 s
        assert a.stop() == 0
        until(lambda: "STOPPING=1" in got, 10)
        assert "STOPPING=1" in got
    finally:
        a.stop()
        sock.close()


def test_device_over_tls_with_credentials_is_confined_to_its_subtree(tmp_path, secure_broker,
                                                                     agent_bundles):
    users, ca = secure_broker.users, str(secure_broker.ca_file)
    host = Host(secure_broker.tls_url, username="controller", password=users["controller"],
                ca_file=ca)
    good = AgentProcess(tmp_path / "a", agent_bundles["keyring"], secure_broker.tls_url, device=DEV,
                        env={"EDGEPACK_MQTT_USERNAME": DEV, "EDGEPACK_MQTT_PASSWORD": users[DEV],
                             "EDGEPACK_MQTT_CA": ca})
    # dev-b's credentials claiming to be dev-a: the ACL must keep it out of dev-a's subtree.
    impostor = AgentProcess(tmp_path / "b", agent_bundles["keyring"], secure_broker.tls_url,
                            device="dev-c", env={"EDGEPACK_MQTT_USERNAME": "dev-b",
                                                 "EDGEPACK_MQTT_PASSWORD": users["dev-b"],
                                                 "EDGEPACK_MQTT_CA": ca})
    try:
        good.start()
        host.wait_for(DEV, "state", lambda m: m["state"] == "online", timeout=30)
        reply = host.requests.call(DEV, "status", StatusRequest(), timeout=30)
        assert reply.ok and reply.result["device"] == DEV
        impostor.start()
        # The impostor connected and announced itself: the broker refused its birth and state
        # (QoS 1, so each refusal comes back as a PUBACK "Not authorized" the agent logs).
        impostor.wait_log("broker refused message", count=2)
        # Anything the broker had passed on would reach the host before this later reply.
        assert host.requests.call(DEV, "status", StatusRequest(), timeout=30).ok
        assert host.latest("dev-c", "state") is None
        assert host.latest("dev-c", "birth") is None
    finally:
        good.stop()
        impostor.stop()
        host.close()


def test_install_while_serving_finishes_the_running_request_first(agent, host, server, agent_bundles):
    installed(host, server, agent_bundles["v1"])
    long = InferRequest(prompt="Write about the history of bridges.", max_tokens=150, temperature=0.0)
    with host.requests.request(DEV, "infer", long, timeout=120) as gen:
        first = InferChunk.from_bytes(gen.get().payload)
        assert not first.done
        with host.requests.request(DEV, "install", install_req(server, agent_bundles["v2"]),
                                   timeout=180) as inst:
            chunks = [first]
            while not chunks[-1].done:
                chunks.append(InferChunk.from_bytes(gen.get().payload))
            reply = Reply.from_bytes(inst.get().payload)
    # The running generation was not cut off by the swap, and the install then went through.
    assert not chunks[-1].error and chunks[-1].usage["completion_tokens"] == 150
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert reply.ok and reply.result["installed"]["version"] == 2
