"""RequestClient's routing by correlation data (agent/transport/request.py), without a broker.

The transport is a stand-in with the three things RequestClient uses: ``client_id``, ``subscribe``
(the reply handler is kept) and ``publish`` (recorded; a test may answer from it, as a device
would). The real round trip is in tests/integration/test_mqtt_transport.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

import agent.transport.request as request_mod
from agent.errors import TransportError
from agent.protocol import (
    COMMAND_EXPIRY,
    InferChunk,
    ProtocolError,
    Reply,
    StatusRequest,
    Topics,
    reply_filter,
)
from agent.transport import Message, MqttTransport, RequestClient

FLEET = "lab"


@dataclass
class Published:
    topic: str
    payload: bytes
    kw: dict[str, Any]


@dataclass
class StandInTransport:
    client_id: str = "host-1"
    subscribed: dict[str, Callable[[Message], None]] = field(default_factory=dict)
    published: list[Published] = field(default_factory=list)
    device: Callable[[Published], list[bytes]] | None = None  # answers a command, if set
    fail: TransportError | None = None

    def subscribe(self, topic_filter: str, qos: int = 1, handler: Any = None, **_kw: Any) -> None:
        self.subscribed[topic_filter] = handler

    def publish(self, topic: str, payload: bytes, **kw: Any) -> None:
        if self.fail is not None:
            raise self.fail
        p = Published(topic, payload, kw)
        self.published.append(p)
        for answer in self.device(p) if self.device else []:
            self.reply(answer, p.kw["correlation_data"], topic=p.kw["response_topic"])

    def reply(self, payload: bytes, correlation: bytes | None, *, device: str = "pi-1",
              topic: str | None = None) -> None:
        # What the broker delivers to our reply subscription: a device's reply topic.
        topic = topic or Topics(FLEET, device).reply(self.client_id)
        self.subscribed[reply_filter(FLEET, self.client_id)](Message(topic, payload, None, correlation))


def client(t: StandInTransport) -> RequestClient:
    return RequestClient(cast(MqttTransport, t), FLEET)


def test_the_client_subscribes_to_its_replies_from_every_device():
    t = StandInTransport(client_id="host-7")
    c = client(t)
    assert c.reply_filter == "edgepack/v1/lab/+/reply/host-7"
    assert list(t.subscribed) == [c.reply_filter]
    assert c.reply_topic("pi-1") == "edgepack/v1/lab/pi-1/reply/host-7"


def test_a_request_carries_the_reply_topic_and_fresh_correlation_data():
    t = StandInTransport()
    c = client(t)
    p1 = c.request("pi-1", "status", StatusRequest())
    p2 = c.request("pi-1", "status", b"{}", ack_timeout=2.0)
    first, second = t.published
    assert first.topic == "edgepack/v1/lab/pi-1/cmd/status" and first.payload == StatusRequest().to_bytes()
    assert first.kw["response_topic"] == c.reply_topic("pi-1") and first.kw["qos"] == 1
    assert (first.kw["timeout"], second.kw["timeout"]) == (None, 2.0)
    assert len(p1.correlation) == 16 and p1.correlation != p2.correlation
    assert (first.kw["correlation_data"], second.kw["correlation_data"]) == (p1.correlation, p2.correlation)


def test_each_reply_goes_to_the_request_with_its_correlation():
    t = StandInTransport()
    c = client(t)
    a, b = c.request("pi-1", "status", b"{}"), c.request("pi-2", "status", b"{}")
    t.reply(b"for b", b.correlation, device="pi-2")
    t.reply(b"for a", a.correlation)
    assert a.get(timeout=0).payload == b"for a" and b.get(timeout=0).payload == b"for b"
    with pytest.raises(TransportError, match="no reply"):
        a.get(timeout=0)  # nothing of b's leaked into a


def test_replies_without_a_pending_request_are_dropped():
    t = StandInTransport()
    c = client(t)
    p = c.request("pi-1", "status", b"{}")
    t.reply(b"unknown", b"\0" * 16)
    t.reply(b"none", None)
    t.reply(b"mine", p.correlation)  # the positive control, after the strays
    assert p.get(timeout=0).payload == b"mine"
    with pytest.raises(TransportError):
        p.get(timeout=0)


def test_a_closed_request_queues_no_more_replies():
    t = StandInTransport()
    c = client(t)
    with c.request("pi-1", "infer", b"{}") as p:
        t.reply(b"early", p.correlation)
        assert p.get(timeout=0).payload == b"early"
    t.reply(b"late", p.correlation)
    with pytest.raises(TransportError, match="no reply"):
        p.get(timeout=0)


def test_a_failed_publish_leaves_no_pending_request():
    t = StandInTransport(fail=TransportError("refused"))
    c = client(t)
    with pytest.raises(TransportError, match="refused"):
        c.request("pi-1", "status", b"{}")
    assert c._pending == {}


def test_a_full_queue_drops_replies_without_blocking(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(request_mod, "MAX_QUEUED_REPLIES", 2)
    t = StandInTransport()
    p = client(t).request("pi-1", "infer", b"{}")
    for i in range(3):
        t.reply(str(i).encode(), p.correlation)
    assert [p.get(timeout=0).payload for _ in range(2)] == [b"0", b"1"]
    with pytest.raises(TransportError):
        p.get(timeout=0)


def test_get_without_a_timeout_uses_the_requests_own():
    p = client(StandInTransport()).request("pi-1", "status", b"{}", timeout=0.0)
    with pytest.raises(TransportError, match=r"no reply within 0\.0s") as e:
        p.get()
    assert "online" in e.value.diagnostics()


def test_call_returns_the_one_reply_and_forgets_the_request():
    t = StandInTransport(device=lambda p: [Reply.success({"ok": 1}).to_bytes()])
    c = client(t)
    assert c.call("pi-1", "status", b"{}", timeout=0) == Reply.success({"ok": 1})
    assert c._pending == {}


def test_call_refuses_a_malformed_reply():
    c = client(StandInTransport(device=lambda p: [b"not json"]))
    with pytest.raises(ProtocolError):
        c.call("pi-1", "status", b"{}", timeout=0)


def test_stream_puts_chunks_in_order_and_drops_duplicates():
    chunks = [InferChunk(2, "c"), InferChunk(0, "a"), InferChunk(0, "a"), InferChunk(1, "b"),
              InferChunk(1, "b"), InferChunk(3, "", True, {"completion_tokens": 3}),
              InferChunk(4, "after done")]
    t = StandInTransport(device=lambda p: [c.to_bytes() for c in chunks])
    got = list(client(t).stream("pi-1", b'{"prompt": "x"}', timeout=0))
    assert [c.seq for c in got] == [0, 1, 2, 3] and "".join(c.text for c in got) == "abc"
    assert got[-1].done and got[-1].usage == {"completion_tokens": 3}


def test_stream_without_its_done_chunk_times_out():
    t = StandInTransport(device=lambda p: [InferChunk(0, "a").to_bytes()])
    got: list[InferChunk] = []
    with pytest.raises(TransportError, match="no reply"):
        for c in client(t).stream("pi-1", b'{"prompt": "x"}', timeout=0):
            got.append(c)
    assert [c.text for c in got] == ["a"]


def test_every_command_carries_its_message_expiry():
    t = StandInTransport()
    c = client(t)
    c.request("pi-1", "status", b"{}")
    c.request("pi-1", "install", b"{}")
    c.request("pi-1", "infer", b"{}", expiry=5)
    got = [p.kw["expiry"] for p in t.published]
    assert got == [COMMAND_EXPIRY["status"], COMMAND_EXPIRY["install"], 5]
    assert COMMAND_EXPIRY["status"] < COMMAND_EXPIRY["install"]  # short for interactive commands


def test_a_reply_with_the_right_correlation_from_another_device_is_dropped():
    t = StandInTransport()
    c = client(t)
    p = c.request("pi-2", "status", b"{}")
    # pi-1 learned the correlation of a request to pi-2 and answers on its own reply topic (the
    # only one the ACL lets it publish on): not accepted, counted.
    t.reply(b"forged", p.correlation, device="pi-1")
    assert c.misrouted == 1
    with pytest.raises(TransportError, match="no reply"):
        p.get(timeout=0)
    t.reply(b"genuine", p.correlation, device="pi-2")
    assert p.get(timeout=0).payload == b"genuine"
