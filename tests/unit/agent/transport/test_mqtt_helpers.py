"""MqttTransport's own logic without a broker (agent/transport/mqtt.py): URL parsing, filter
matching, TCP_NODELAY, routing of received messages to handlers, and the SUBACK bookkeeping in the
one case a real broker cannot produce on demand (an acknowledgement that beats its waiter).

Received messages and broker answers are small stand-ins with the attributes the callbacks read;
everything over a real connection is in tests/integration/test_mqtt_transport.py.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from typing import Any

import pytest

from agent.errors import TransportError
from agent.transport import Message, MqttTransport
from agent.transport.mqtt import _filter_matches, _parse_url

URL = "mqtt://127.0.0.1:1"  # never connected to


@pytest.mark.parametrize("url, expected", [
    ("mqtt://broker.local", ("broker.local", 1883, False)),
    ("mqtts://broker.local", ("broker.local", 8883, True)),
    ("mqtt://10.0.0.5:1884", ("10.0.0.5", 1884, False)),
    ("mqtts://broker.local:443", ("broker.local", 443, True)),
    ("mqtt://[::1]:1885", ("::1", 1885, False)),
    ("MQTT://Broker.Local", ("broker.local", 1883, False)),
])
def test_parse_url(url: str, expected: tuple[str, int, bool]):
    assert _parse_url(url) == expected


@pytest.mark.parametrize("url", ["http://h:1883", "tcp://h", "mqtt://", "mqtt://:1883", "h:1883",
                                 "mqtt://h:99999", "mqtt://h:port"])
def test_parse_url_refuses(url: str):
    with pytest.raises(TransportError, match="bad broker URL"):
        _parse_url(url)


@pytest.mark.parametrize("topic_filter, topic, matches", [
    ("edgepack/v1/lab/pi/cmd/+", "edgepack/v1/lab/pi/cmd/status", True),
    ("edgepack/v1/lab/pi/cmd/+", "edgepack/v1/lab/pi/cmd/status/x", False),
    ("edgepack/v1/lab/pi/cmd/+", "edgepack/v1/lab/pj/cmd/status", False),
    ("edgepack/v1/+/+/state", "edgepack/v1/lab/pi/state", True),
    ("edgepack/v1/#", "edgepack/v1", True),
    ("edgepack/v1/#", "edgepack/v2/x", False),
    ("#", "$SYS/broker/uptime", False),  # MQTT: wildcards at the root do not match $ topics
    ("$share/hosts/edgepack/v1/+/state", "edgepack/v1/lab/state", True),
    ("$share/hosts/edgepack/v1/+/state", "$share/hosts/edgepack/v1/lab/state", False),
    ("$share/hosts", "hosts", False),  # a malformed shared filter matches nothing
])
def test_filter_matches(topic_filter: str, topic: str, matches: bool):
    assert _filter_matches(topic_filter, topic) is matches


def test_socket_open_sets_tcp_nodelay_and_tolerates_other_sockets():
    t = MqttTransport(URL, "nodelay")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        assert not tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        t._on_socket_open(None, None, tcp)  # type: ignore[arg-type]
        assert tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
        t._on_socket_open(None, None, unix)  # type: ignore[arg-type]  # no error: just slower


@pytest.mark.parametrize("topic_filter, qos", [("", 1), ("a/b", 3), ("a/b", -1)])
def test_subscribe_refuses_a_bad_filter_or_qos(topic_filter: str, qos: int):
    with pytest.raises(TransportError, match="bad subscription"):
        MqttTransport(URL, "bad-sub").subscribe(topic_filter, qos=qos)


def test_before_start_subscribe_only_records_and_wait_connected_times_out():
    t = MqttTransport(URL, "unstarted")
    t.subscribe("a/#", timeout=None)
    t.subscribe("b/#")  # not connected: returns at once, nothing to wait for yet
    with pytest.raises(TransportError, match=r"not connected to 127\.0\.0\.1:1 within"):
        t.wait_connected(0.01)


# --- routing received messages ----------------------------------------------------------------------


@dataclass
class Props:
    ResponseTopic: str | None = None
    CorrelationData: bytes | None = None


@dataclass
class Received:
    """What the message callback reads of paho's MQTTMessage."""

    topic: str
    payload: bytes = b"{}"
    retain: bool = False
    qos: int = 1
    properties: Props | None = None


class NotUtf8Topic(Received):
    @property  # type: ignore[override]
    def topic(self) -> str:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    @topic.setter
    def topic(self, _v: str) -> None:
        pass


@dataclass(eq=False)  # handlers are hashed (one handler under two filters runs once)
class Sink:
    got: list[Message] = field(default_factory=list)

    def __call__(self, m: Message) -> None:
        self.got.append(m)


def deliver(t: MqttTransport, m: Received) -> None:
    t._on_message(None, None, m)  # type: ignore[arg-type]


def test_messages_go_to_the_handler_of_the_matching_filter():
    cmd, state, default = Sink(), Sink(), Sink()
    t = MqttTransport(URL, "route", on_message=default)
    t.subscribe("edgepack/v1/lab/pi/cmd/+", handler=cmd)
    t.subscribe("edgepack/v1/+/+/state", handler=state)
    deliver(t, Received("edgepack/v1/lab/pi/cmd/status", b'{"a":1}',
                        properties=Props("reply/here", b"\x01\x02")))
    deliver(t, Received("edgepack/v1/lab/pi/state", b"online", retain=True, qos=0))
    assert cmd.got == [Message("edgepack/v1/lab/pi/cmd/status", b'{"a":1}', "reply/here", b"\x01\x02",
                               False, 1)]
    assert state.got == [Message("edgepack/v1/lab/pi/state", b"online", None, None, True, 0)]
    assert default.got == []


def test_unclaimed_messages_go_to_the_default_handler_or_nowhere():
    default = Sink()
    t = MqttTransport(URL, "default", on_message=default)
    t.subscribe("claimed/#", handler=Sink())
    deliver(t, Received("session/queued"))  # e.g. from a persistent session, no filter recorded
    assert [m.topic for m in default.got] == ["session/queued"]
    deliver(MqttTransport(URL, "no-default"), Received("session/queued"))  # dropped, no error


def test_one_handler_under_two_matching_filters_runs_once():
    sink = Sink()
    t = MqttTransport(URL, "twice")
    t.subscribe("a/+", handler=sink)
    t.subscribe("a/#", handler=sink)
    deliver(t, Received("a/b"))
    assert len(sink.got) == 1


def test_shared_subscriptions_receive_on_the_plain_topic():
    sink = Sink()
    t = MqttTransport(URL, "shared")
    t.subscribe("$share/hosts/edgepack/v1/+/+/events", handler=sink)
    deliver(t, Received("edgepack/v1/lab/pi/events"))
    assert [m.topic for m in sink.got] == ["edgepack/v1/lab/pi/events"]


def test_a_failing_handler_is_logged_and_the_others_still_run(caplog: pytest.LogCaptureFixture):
    sink = Sink()

    def broken(_m: Message) -> None:
        raise RuntimeError("handler bug")

    t = MqttTransport(URL, "broken-handler")
    t.subscribe("a/+", handler=broken)
    t.subscribe("a/#", handler=sink)
    with caplog.at_level(logging.ERROR, logger="agent.transport.mqtt"):
        deliver(t, Received("a/b"))
    assert len(sink.got) == 1
    assert "handler bug" in caplog.text


def test_a_topic_that_is_not_utf8_is_dropped(caplog: pytest.LogCaptureFixture):
    sink = Sink()
    t = MqttTransport(URL, "not-utf8", on_message=sink)
    with caplog.at_level(logging.WARNING, logger="agent.transport.mqtt"):
        deliver(t, NotUtf8Topic("ignored"))
    assert sink.got == [] and "non-UTF-8 topic" in caplog.text
    deliver(t, Received("fine"))  # the positive control: the same path delivers a valid one
    assert [m.topic for m in sink.got] == ["fine"]


# --- SUBACK bookkeeping ----------------------------------------------------------------------------------


class Reason:
    """The parts of paho's ReasonCode the callbacks read."""

    def __init__(self, value: int) -> None:
        self.value = value
        self.is_failure = value >= 0x80

    def __str__(self) -> str:
        return "Not authorized" if self.value == 0x87 else f"Granted QoS {self.value}"


@dataclass
class Flags:
    session_present: bool = False


class FakeBrokerAnswers:
    """Stands in for paho's ``subscribe``: answers each SUBSCRIBE at once, before ``subscribe``
    returns its packet id — the order a fast broker and a slow caller thread can produce."""

    def __init__(self, t: MqttTransport, answer: dict[str, int | None]) -> None:
        self.t, self.answer, self.sent, self.mid = t, answer, [], 0

    def __call__(self, topic_filter: str, **_kw: Any) -> tuple[int, int]:
        self.mid += 1
        self.sent.append(topic_filter)
        code = self.answer.get(topic_filter)
        if code is not None:
            self.t._on_subscribe(None, None, self.mid, [Reason(code)], None)  # type: ignore[arg-type]
        return 0, self.mid  # MQTT_ERR_SUCCESS


def connected(t: MqttTransport, monkeypatch: pytest.MonkeyPatch,
              answer: dict[str, int | None]) -> FakeBrokerAnswers:
    fake = FakeBrokerAnswers(t, answer)
    monkeypatch.setattr(t._client, "subscribe", fake)
    t._on_connect(None, None, Flags(), Reason(0), None)  # type: ignore[arg-type]
    return fake


def test_a_suback_that_beats_its_waiter_is_not_lost(monkeypatch: pytest.MonkeyPatch):
    t = MqttTransport(URL, "early-ack")
    fake = connected(t, monkeypatch, {"a/#": 1})
    t.subscribe("a/#", timeout=0.5)  # returns: the early SUBACK was kept for it
    assert fake.sent == ["a/#"]


def test_an_early_refusal_raises_and_the_filter_is_forgotten(monkeypatch: pytest.MonkeyPatch):
    t = MqttTransport(URL, "early-refusal")
    fake = connected(t, monkeypatch, {"no/#": 0x87, "yes/#": 1})
    with pytest.raises(TransportError, match=r"refused subscription to 'no/#': Not authorized .*0x87"):
        t.subscribe("no/#", timeout=0.5)
    t.subscribe("yes/#", timeout=0.5)
    t._on_disconnect(None, None, Flags(), Reason(0), None)  # type: ignore[arg-type]
    fake.sent.clear()
    fake.answer.clear()  # on a reconnect the SUBACKs come after the connect callback
    t._on_connect(None, None, Flags(), Reason(0), None)  # type: ignore[arg-type]
    assert fake.sent == ["yes/#"]  # the reconnect re-sends only what the broker granted
    t._on_subscribe(None, None, fake.mid, [Reason(1)], None)  # type: ignore[arg-type]
    t.wait_connected(0)


def test_no_suback_is_a_transport_error_naming_the_filter(monkeypatch: pytest.MonkeyPatch):
    t = MqttTransport(URL, "no-ack")
    connected(t, monkeypatch, {"silent/#": None})
    with pytest.raises(TransportError, match=r"no SUBACK for 'silent/#' within 0\.1s"):
        t.subscribe("silent/#", timeout=0.1)


def test_inside_a_handler_subscribe_sends_without_waiting(monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture):
    t = MqttTransport(URL, "in-handler")
    fake = connected(t, monkeypatch, {"inner/#": None})  # the SUBACK would come after the handler
    t.subscribe("outer/#", handler=lambda _m: t.subscribe("inner/#"), timeout=None)
    with caplog.at_level(logging.ERROR, logger="agent.transport.mqtt"):
        deliver(t, Received("outer/x"))
    assert "inner/#" in fake.sent and caplog.text == ""  # sent, and no "no SUBACK" failure logged


def test_wait_connected_waits_for_the_subacks_of_the_connect(monkeypatch: pytest.MonkeyPatch):
    t = MqttTransport(URL, "connect-acks")
    t.subscribe("a/#")
    t.subscribe("b/#")
    fake = FakeBrokerAnswers(t, {})  # no answers yet: they come below
    monkeypatch.setattr(t._client, "subscribe", fake)
    t._on_connect(None, None, Flags(), Reason(0), None)  # type: ignore[arg-type]
    assert t.connected and fake.sent == ["a/#", "b/#"]
    with pytest.raises(TransportError, match="no SUBACK for a/#, b/#"):
        t.wait_connected(0)
    t._on_subscribe(None, None, 1, [Reason(1)], None)  # type: ignore[arg-type]
    with pytest.raises(TransportError, match="no SUBACK for b/#"):
        t.wait_connected(0)
    t._on_subscribe(None, None, 2, [Reason(0x87)], None)  # type: ignore[arg-type]
    with pytest.raises(TransportError, match=r"refused subscription 'b/#': Not authorized"):
        t.wait_connected(0)
