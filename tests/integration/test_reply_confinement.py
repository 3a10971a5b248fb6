"""No device can forge another device's replies: real mosquitto with the device ACL, real agents.

Attack: a compromised device A learns the correlation data of a host's request to device B (the
worst case; it is 16 random bytes it cannot read off B's command topic) and answers it first.
Defences under test: (1) replies live in the replying device's subtree, where the broker ACL lets
only that device publish; (2) the host accepts a reply only on the asked device's reply topic;
(3) the agent answers only inside its own reply subtree, even on a broker without our ACL.
"""

# The broker fixtures are imported by name, so each test's fixture parameter "redefines" them.
# ruff: noqa: F811

from __future__ import annotations

import queue
import time
from pathlib import Path

import pytest
from agentkit import AgentProcess, Host
from brokerfixtures import broker, secure_broker  # noqa: F401
from brokerkit import Broker

from agent.bundle import Keyring
from agent.errors import TransportError
from agent.protocol import Reply, StatusRequest, Topics
from agent.transport.mqtt import Message, MqttTransport

pytestmark = pytest.mark.integration

FLEET = "test"
HOST_ID = "host-confined"
WAIT = 30.0


@pytest.fixture
def keyring_file(tmp_path: Path, keyring: Keyring) -> Path:
    p = tmp_path / "keyring.json"
    p.write_bytes(keyring.to_bytes())
    return p


def _creds(b: Broker, user: str) -> dict[str, str]:
    return {"EDGEPACK_MQTT_USERNAME": user, "EDGEPACK_MQTT_PASSWORD": b.users[user]}


def test_device_a_cannot_forge_a_reply_that_a_host_waiting_on_device_b_accepts(
        tmp_path: Path, secure_broker: Broker, keyring_file: Path) -> None:
    b = secure_broker
    host = Host(b.url, FLEET, client_id=HOST_ID, username="controller",
                password=b.users["controller"])
    dev_b = AgentProcess(tmp_path / "b" / "state", keyring_file, b.url, device="dev-b",
                         fleet=FLEET, env=_creds(b, "dev-b"))
    attacker = MqttTransport(b.url, "dev-a", username="dev-a", password=b.users["dev-a"],
                             session_expiry=0)
    try:
        # dev-b makes its persistent session, then goes offline: the request to it waits in the
        # broker, and the attacker has all the time it wants to answer first.
        dev_b.start()
        host.wait_for("dev-b", "state", lambda m: m["state"] == "online", timeout=WAIT)
        dev_b.stop()
        host.wait_for("dev-b", "state", lambda m: m["state"] == "offline", timeout=WAIT)
        pending = host.requests.request("dev-b", "status", StatusRequest(), timeout=WAIT,
                                        ack_timeout=10)
        assert pending.reply_topic == Topics(FLEET, "dev-b").reply(HOST_ID)

        attacker.start()
        attacker.wait_connected(10)
        forged = Reply.success({"device": "dev-b", "forged": True}).to_bytes()
        # (1) On dev-b's reply topic (the one the host waits on) and on the old shared reply
        # namespace: the broker refuses both (MQTT 5 PUBACK "Not authorized").
        for topic in (pending.reply_topic, f"edgepack/v1/{FLEET}/_clients/{HOST_ID}/reply"):
            with pytest.raises(TransportError, match=r"(?i)not authorized"):
                attacker.publish(topic, forged, qos=1, correlation_data=pending.correlation,
                                 timeout=10)
        # (2) On its own reply topic, which it may publish on: the broker delivers it to the
        # host, whose client drops it because dev-a is not the device it asked.
        attacker.publish(Topics(FLEET, "dev-a").reply(HOST_ID), forged, qos=1,
                         correlation_data=pending.correlation, timeout=10)
        deadline = time.monotonic() + WAIT
        while host.requests.misrouted < 1:
            assert time.monotonic() < deadline, "the forged reply never reached the host"
            time.sleep(0.02)
        with pytest.raises(TransportError, match="no reply"):
            pending.get(timeout=1.0)

        # (3) The real dev-b comes back and answers: that reply, and only it, is accepted.
        dev_b.start()
        with pending:
            got = pending.get(timeout=WAIT)
        reply = Reply.from_bytes(got.payload)
        assert got.topic == Topics(FLEET, "dev-b").reply(HOST_ID)
        assert reply.ok and reply.result is not None
        assert reply.result["device"] == "dev-b" and "forged" not in reply.result
        assert host.requests.misrouted == 1
    finally:
        attacker.stop()
        dev_b.stop()
        host.close()


def test_the_agent_refuses_a_response_topic_outside_its_own_subtree(
        tmp_path: Path, broker: Broker, keyring_file: Path) -> None:
    # An open broker (no ACL): the agent's own check is the only defence left.
    dev = "dev-r"
    host = Host(broker.url, FLEET)
    agent = AgentProcess(tmp_path / "state", keyring_file, broker.url, device=dev, fleet=FLEET)
    seen: queue.Queue[Message] = queue.Queue()
    host.transport.subscribe(f"edgepack/v1/{FLEET}/#", handler=seen.put)
    bad = [Topics(FLEET, "dev-other").reply("h"),  # another device's reply topic
           f"edgepack/v1/{FLEET}/_clients/h/reply",  # the old shared reply namespace
           Topics(FLEET, "dev-other").state,  # another device's retained state
           Topics(FLEET, dev).state,  # its own subtree, but not a reply topic
           "elsewhere/reply"]
    try:
        agent.start()
        host.wait_for(dev, "state", lambda m: m["state"] == "online", timeout=WAIT)
        for i, topic in enumerate(bad):
            host.transport.publish(Topics(FLEET, dev).cmd("status"), b"{}", qos=1,
                                   response_topic=topic, correlation_data=b"bad-%d" % i, timeout=10)
        # The positive control, sent last: the agent handles commands in order.
        reply = host.requests.call(dev, "status", StatusRequest(), timeout=WAIT)
        assert reply.ok and reply.result is not None
        assert reply.result["counters"]["bad_response_topic"] == len(bad)
        assert reply.result["counters"]["commands"] == len(bad) + 1
        answered = []
        while not seen.empty():
            m = seen.get_nowait()
            if m.topic in bad and (m.correlation_data or b"").startswith(b"bad-"):
                answered.append(m.topic)
        assert answered == []
        health = host.wait_for(dev, "health",
                               lambda m: m["errors"].get("bad_response_topic") == len(bad),
                               timeout=WAIT)
        assert health["errors"]["bad_response_topic"] == len(bad)
        assert agent.alive()
    finally:
        agent.stop()
        host.close()
