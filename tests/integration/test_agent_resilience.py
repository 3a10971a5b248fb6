"""The agent keeps serving when parts of it fail: a health reading that raises, and a reply that
cannot be sent in the middle of a generation. Real mosquitto, the real sample model, the daemon
in-process (its threads are what is under test); the one injected fault is a transport that
refuses to publish to one reply topic, as a broken connection or a refused topic would.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any, ClassVar

import pytest
from agentkit import Host

from agent.daemon import Agent, AgentConfig
from agent.errors import TransportError
from agent.protocol import InferRequest, StatusRequest, Topics
from agent.store import Store
from agent.transport.mqtt import MqttTransport

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEV = "dev-r"


class RefusingTransport(MqttTransport):
    """The real transport, except that publishing to a topic in ``refused`` raises TransportError."""

    refused: ClassVar[set[str]] = set()

    def publish(self, topic: str, payload: bytes, *args: Any, **kwargs: Any) -> None:
        if topic in self.refused:
            raise TransportError(f"injected: cannot publish to {topic}")
        super().publish(topic, payload, *args, **kwargs)


@pytest.fixture
def host(broker):
    h = Host(broker.url)
    yield h
    h.close()


def _agent(state: Path, keyring: Path, broker_url: str, **kw: Any) -> Agent:
    cfg = AgentConfig(state_dir=state, keyring=[keyring], broker_url=broker_url, device_id=DEV,
                      fleet="test", health_interval=0.2, **kw)
    return Agent(cfg, transport_factory=RefusingTransport)


def _run(agent: Agent) -> threading.Thread:
    t = threading.Thread(target=agent.run, name="agent-main", daemon=True)
    t.start()
    assert agent.wait_ready(30)
    return t


def test_a_health_reading_that_raises_does_not_stop_the_agent(tmp_path, broker, host, agent_bundles):
    state = tmp_path / "state"
    agent = _agent(state, agent_bundles["keyring"], broker.url)
    main = _run(agent)
    try:
        first = host.wait_for(DEV, "health", lambda m: m.get("disk_free_bytes") is not None)
        assert first["disk_free_bytes"] > 0  # positive control: the reading works at first
        # The state folder vanishes under the agent: psutil.disk_usage raises FileNotFoundError
        # (an OSError, not one of ours) on every health message from now on.
        shutil.rmtree(state)
        later = host.wait_for(DEV, "health", lambda m: m.get("disk_free_bytes") is None
                              and m["errors"].get("health_errors", 0) > 0, timeout=15)
        assert later["rss_bytes"] > 0, "the other readings still go out"
        assert main.is_alive(), "the main loop survived"
        reply = host.requests.call(DEV, "status", StatusRequest(), timeout=15)
        assert reply.ok and reply.result["counters"]["health_errors"] > 0
    finally:
        agent.request_stop()
        main.join(30)


def test_a_reply_that_cannot_be_sent_mid_generation_leaves_the_next_request_served(
        tmp_path, broker, host, agent_bundles):
    state = tmp_path / "state"
    Store(state, _keyring(agent_bundles["keyring"])).install(agent_bundles["v1"])
    agent = _agent(state, agent_bundles["keyring"], broker.url, chunk_interval=0.0)
    main = _run(agent)
    poisoned = Topics("test", DEV).reply("poisoned")
    RefusingTransport.refused = {poisoned}
    try:
        # A request whose every chunk (the failure chunk too) fails to send: the worker must
        # count it and go on, not die and leave every later request queued as "busy".
        agent.transport.publish(f"edgepack/v1/test/{DEV}/cmd/infer",
                                InferRequest("The capital of France is", max_tokens=8).to_bytes(),
                                qos=1, response_topic=poisoned, correlation_data=b"poison-1",
                                timeout=5)
        _wait(lambda: agent.counters["infer_errors"] >= 1, "the failed request was counted")
        chunks = list(host.requests.stream(DEV, InferRequest("Once upon a time", max_tokens=8,
                                                              temperature=0.0), timeout=60))
        assert chunks[-1].done and chunks[-1].error is None, chunks[-1]
        assert chunks[-1].usage and chunks[-1].usage["completion_tokens"] >= 1
        assert "".join(c.text for c in chunks).strip()
    finally:
        RefusingTransport.refused = set()
        agent.request_stop()
        main.join(30)


def _keyring(path: Path):
    from agent.bundle import load_keyring

    return load_keyring([path])


def _wait(cond, what: str, timeout: float = 60.0) -> None:
    ev = threading.Event()
    for _ in range(int(timeout / 0.05)):
        if cond():
            return
        ev.wait(0.05)
    raise AssertionError(f"timed out waiting: {what}")
