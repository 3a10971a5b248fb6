"""MqttTransport and RequestClient against a real mosquitto on loopback (no mocks).

Faults are injected for real: the client process is SIGKILLed, the broker is SIGKILLed and
restarted. Every wait is bounded, and none stands in for an acknowledgement: ``subscribe()`` on a
connected transport returns once the broker's SUBACK granted the filter, and ``wait_connected()``
once the SUBACKs of the filters subscribed before the connect are in, so a publish that follows is
delivered.

"Nothing arrives" checks lean on mosquitto delivering one publisher's messages in the order they
were published: the forbidden message is sent first and an allowed control after it, so once the
control has arrived, a forbidden message that got through would already be in the inbox.
"""

# The broker fixtures are imported by name (until conftest.py imports them), so each test's fixture
# parameter "redefines" them for ruff.
# ruff: noqa: F811

from __future__ import annotations

import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from brokerfixtures import (  # noqa: F401
    ALLOWED_FILTER,
    CONTROLLER,
    broker,
    secure_broker,
    subscribe_acl_broker,
)
from brokerkit import Broker

from agent.errors import TransportError
from agent.protocol import (
    InferChunk,
    InferRequest,
    ProtocolError,
    Reply,
    StatusRequest,
    Topics,
    parse_command,
    parse_state,
    state_payload,
)
from agent.transport import Message, MqttTransport, RequestClient, Will

pytestmark = pytest.mark.integration

WAIT = 10.0  # seconds: generous bound for anything that should take milliseconds
REPO = Path(__file__).resolve().parents[2]


class Inbox:
    """A thread-safe message sink with bounded waits."""

    def __init__(self) -> None:
        self.q: queue.Queue[Message] = queue.Queue()

    def __call__(self, m: Message) -> None:
        self.q.put(m)

    def expect(self, pred: Callable[[Message], bool] = lambda m: True, timeout: float = WAIT) -> Message:
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            try:
                m = self.q.get(timeout=left)
            except queue.Empty:
                break
            if pred(m):
                return m
        raise AssertionError(f"no matching message within {timeout}s")

    def none(self, pred: Callable[[Message], bool], timeout: float) -> None:
        with pytest.raises(AssertionError):
            self.expect(pred, timeout)

    def until(self, pred: Callable[[Message], bool], timeout: float = WAIT) -> list[Message]:
        """Every message up to and including the first matching ``pred`` (bounded wait)."""
        got: list[Message] = []
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            try:
                got.append(self.q.get(timeout=left))
            except queue.Empty:
                break
            if pred(got[-1]):
                return got
        raise AssertionError(f"no matching message within {timeout}s; got {got}")


@pytest.fixture
def clients() -> Iterator[Callable[..., MqttTransport]]:
    """Factory of started, connected transports; all stopped at the end."""
    made: list[MqttTransport] = []

    def make(url: str, client_id: str, *, start: bool = True, **kw: object) -> MqttTransport:
        t = MqttTransport(url, client_id, reconnect_max_delay=2, **kw)  # type: ignore[arg-type]
        made.append(t)
        if start:
            t.start()
            t.wait_connected(WAIT)
        return t

    yield make
    for t in made:
        t.stop()


def test_publish_subscribe_round_trip(broker: Broker, clients: Callable[..., MqttTransport]) -> None:
    inbox = Inbox()
    sub = clients(broker.url, "sub")
    sub.subscribe("edgepack/v1/lab/+/health", handler=inbox)
    pub = clients(broker.url, "pub")
    pub.publish("edgepack/v1/lab/pi/health", b'{"x":1}', qos=1, timeout=WAIT)
    m = inbox.expect()
    assert (m.topic, m.payload, m.retain, m.qos) == ("edgepack/v1/lab/pi/health", b'{"x":1}', False, 1)
    assert sub.connected and pub.connected


def test_bad_url_is_a_transport_error() -> None:
    with pytest.raises(TransportError):
        MqttTransport("http://127.0.0.1:1", "x")


def test_not_connected_times_out_with_transport_error() -> None:
    from brokerkit import free_port

    t = MqttTransport(f"mqtt://127.0.0.1:{free_port()}", "lonely")
    t.start()
    try:
        with pytest.raises(TransportError, match="not connected"):
            t.wait_connected(1.5)
        assert "Refused" in t.last_error or "refused" in t.last_error
    finally:
        t.stop()


WILL_CLIENT = """
import sys, time
from agent.protocol import Topics, state_payload
from agent.transport import MqttTransport, Will
t = Topics("lab", "pi-kill")
tr = MqttTransport(sys.argv[1], "pi-kill", keepalive=5, will=Will(t.state, state_payload("lost")))
tr.start(); tr.wait_connected(10)
tr.publish(t.state, state_payload("online"), retain=True, timeout=10)
print("ready", flush=True)
time.sleep(60)
"""


def test_last_will_marks_a_killed_client_lost(broker: Broker, clients: Callable[..., MqttTransport]) -> None:
    topics = Topics("lab", "pi-kill")
    proc = subprocess.Popen([sys.executable, "-c", WILL_CLIENT, broker.url], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready and proc.stdout.readline().strip() == b"ready"
        watcher = Inbox()
        ctl = clients(broker.url, "ctl-will")
        ctl.subscribe(topics.state, handler=watcher)
        assert parse_state(watcher.expect(lambda m: m.retain).payload) == "online"
        proc.send_signal(signal.SIGKILL)
        proc.wait(WAIT)
        lost = watcher.expect()
        assert parse_state(lost.payload) == "lost"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
        if proc.stdout is not None:
            proc.stdout.close()
    # The will was retained: a newcomer learns the device is lost.
    late = Inbox()
    clients(broker.url, "ctl-late").subscribe(topics.state, handler=late)
    m = late.expect()
    assert m.retain and parse_state(m.payload) == "lost"


def test_clean_stop_does_not_fire_the_will(broker: Broker, clients: Callable[..., MqttTransport]) -> None:
    topics = Topics("lab", "pi-clean")
    watcher = Inbox()
    ctl = clients(broker.url, "ctl-clean")
    ctl.subscribe(topics.state, handler=watcher)
    dev = clients(broker.url, "pi-clean", will=Will(topics.state, state_payload("lost")))
    dev.publish(topics.state, state_payload("offline"), retain=True, timeout=WAIT)
    dev.stop()
    assert parse_state(watcher.expect().payload) == "offline"
    watcher.none(lambda m: True, 1.0)


def test_qos1_sent_while_offline_arrives_after_reconnect(broker: Broker,
                                                         clients: Callable[..., MqttTransport]) -> None:
    topics = Topics("lab", "pi-sleep")
    dev = clients(broker.url, "pi-sleep", session_expiry=3600)
    dev.subscribe(topics.cmd_filter)
    dev.stop()
    ctl = clients(broker.url, "ctl-sleep")
    ctl.publish(topics.cmd("status"), b"{}", qos=1, timeout=WAIT)
    # Same client id, no subscribe call: the broker kept the session and its queued command.
    inbox = Inbox()
    sessions: list[bool] = []
    clients(broker.url, "pi-sleep", session_expiry=3600, on_message=inbox, on_connect=sessions.append)
    m = inbox.expect()
    assert m.topic == topics.cmd("status") and parse_command("status", m.payload) == StatusRequest()
    assert sessions == [True]


def test_message_expiry_drops_what_waited_too_long_and_reports_what_is_left(
        broker: Broker, clients: Callable[..., MqttTransport]) -> None:
    topics = Topics("lab", "pi-expiry")
    dev = clients(broker.url, "pi-expiry", session_expiry=3600)
    dev.subscribe(topics.cmd_filter)
    dev.stop()
    ctl = clients(broker.url, "ctl-expiry")
    ctl.publish(topics.cmd("infer"), b"short", qos=1, timeout=WAIT, expiry=1)
    ctl.publish(topics.cmd("status"), b"long", qos=1, timeout=WAIT, expiry=600)
    ctl.publish(topics.cmd("probe"), b"none", qos=1, timeout=WAIT)
    time.sleep(2.5)  # past the short expiry, while the device is away
    inbox = Inbox()
    clients(broker.url, "pi-expiry", session_expiry=3600, on_message=inbox)
    first, second = inbox.expect(), inbox.expect()
    # The broker discarded the expired command and says how long the other one has left.
    assert (first.payload, second.payload) == (b"long", b"none")
    assert first.expiry is not None and 590 <= first.expiry < 600
    assert second.expiry is None
    inbox.none(lambda m: True, 0.5)
    with pytest.raises(TransportError, match="expiry"):
        ctl.publish(topics.cmd("status"), b"{}", expiry=0)


def test_reconnects_by_itself_after_broker_crash(broker: Broker,
                                                 clients: Callable[..., MqttTransport]) -> None:
    inbox = Inbox()
    ups: queue.Queue[bool] = queue.Queue()
    downs: queue.Queue[str] = queue.Queue()
    sub = clients(broker.url, "pi-crash", session_expiry=3600, on_connect=ups.put, on_disconnect=downs.put)
    sub.subscribe("edgepack/v1/lab/pi-crash/cmd/+", handler=inbox)
    pub = clients(broker.url, "ctl-crash")
    assert ups.get(timeout=WAIT) is False
    broker.wait_saved()  # so the crash keeps the session
    broker.restart(crash=True)
    downs.get(timeout=WAIT)
    assert not sub.connected
    # Reconnected with no help from the test, into the persisted session (subscription intact).
    assert ups.get(timeout=30) is True
    pub.wait_connected(30)
    pub.publish("edgepack/v1/lab/pi-crash/cmd/probe", b"{}", timeout=WAIT)
    assert inbox.expect().topic.endswith("/cmd/probe")


def test_qos1_published_during_an_outage_is_sent_after_reconnect(
        broker: Broker, clients: Callable[..., MqttTransport]) -> None:
    inbox = Inbox()
    downs: queue.Queue[str] = queue.Queue()
    sub = clients(broker.url, "ctl-outage", session_expiry=3600)
    sub.subscribe("edgepack/v1/lab/pi-out/events", handler=inbox)
    pub = clients(broker.url, "pi-out", session_expiry=3600, on_disconnect=downs.put)
    broker.wait_saved()  # the subscriber's session must survive the crash to receive it
    broker.kill()
    downs.get(timeout=WAIT)
    assert not pub.connected
    pub.publish("edgepack/v1/lab/pi-out/events", b"queued")  # no broker: paho keeps it
    broker.start()
    assert inbox.expect(timeout=30).payload == b"queued"


# --- request / response --------------------------------------------------------------------------


def serve(t: MqttTransport, topics: Topics) -> None:
    """A toy device: validates commands, answers status with a Reply and infer with chunks."""

    def on_cmd(m: Message) -> None:
        assert m.response_topic is not None
        name = m.topic.rsplit("/", 1)[1]

        def send(data: bytes) -> None:
            t.publish(m.response_topic or "", data, correlation_data=m.correlation_data)

        try:
            req = parse_command(name, m.payload)
        except ProtocolError as e:
            if name == "infer":
                send(InferChunk.failure(0, e.code, str(e)).to_bytes())
            else:
                send(Reply.failure(e.code, str(e)).to_bytes())
            return
        if isinstance(req, InferRequest):
            words = req.prompt.split()
            for i, w in enumerate(words):
                send(InferChunk(i, w + " ").to_bytes())
            send(InferChunk(len(words), "", True, {"completion_tokens": len(words)}).to_bytes())
        else:
            send(Reply.success({"device": topics.device, "command": name}).to_bytes())

    t.subscribe(topics.cmd_filter, handler=on_cmd)


def test_request_response_with_correlation(broker: Broker, clients: Callable[..., MqttTransport]) -> None:
    topics = Topics("lab", "pi-rr")
    serve(clients(broker.url, "pi-rr"), topics)
    host = RequestClient(clients(broker.url, "host-rr", session_expiry=0), "lab")
    r = host.call("pi-rr", "status", StatusRequest(), timeout=WAIT)
    assert r == Reply.success({"device": "pi-rr", "command": "status"})
    chunks = list(host.stream("pi-rr", InferRequest("a b c"), timeout=WAIT))
    assert "".join(c.text for c in chunks) == "a b c "
    assert [c.seq for c in chunks] == [0, 1, 2, 3] and chunks[-1].done
    assert chunks[-1].usage == {"completion_tokens": 3}
    err = list(host.stream("pi-rr", b'{"prompt": ""}', timeout=WAIT))
    assert len(err) == 1 and err[0].error is not None and err[0].error["code"] == "bad_field"


def test_concurrent_requests_get_their_own_replies(broker: Broker,
                                                   clients: Callable[..., MqttTransport]) -> None:
    for d in ("pi-c1", "pi-c2"):
        serve(clients(broker.url, d), Topics("lab", d))
    host = RequestClient(clients(broker.url, "host-cc", session_expiry=0), "lab")
    p1 = host.request("pi-c1", "probe", b"{}", timeout=WAIT)
    p2 = host.request("pi-c2", "rollback", b"{}", timeout=WAIT)
    with p1, p2:
        r2 = Reply.from_bytes(p2.get().payload)
        r1 = Reply.from_bytes(p1.get().payload)
    assert r1.result == {"device": "pi-c1", "command": "probe"}
    assert r2.result == {"device": "pi-c2", "command": "rollback"}


def test_request_to_absent_device_times_out(broker: Broker, clients: Callable[..., MqttTransport]) -> None:
    serve(clients(broker.url, "pi-here"), Topics("lab", "pi-here"))
    host = RequestClient(clients(broker.url, "host-to", session_expiry=0), "lab")
    # The positive control: the same client gets an answer from a device that is there.
    assert host.call("pi-here", "status", b"{}", timeout=WAIT).ok
    with pytest.raises(TransportError, match="no reply"):
        host.call("nobody", "status", b"{}", timeout=0.5)


def test_every_connection_sets_tcp_nodelay(broker: Broker, clients: Callable[..., MqttTransport]) -> None:
    # Without TCP_NODELAY a QoS 1 round trip costs 44-88 ms of Nagle/delayed-ACK stalls
    # (bench/bench_mqtt.py measures it); here the option itself is checked, on the live socket,
    # after the first connect and after a reconnect.
    ups: queue.Queue[bool] = queue.Queue()
    t = clients(broker.url, "pi-nodelay", on_connect=ups.put)
    ups.get(timeout=WAIT)

    def nodelay() -> int:
        sock = t._client.socket()  # paho's socket: the only way to read the option back
        assert sock is not None
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

    assert nodelay()
    broker.restart()
    ups.get(timeout=30)
    assert nodelay()


# --- security: TLS, passwords, ACL ---------------------------------------------------------------------


def test_tls_with_our_ca_works_and_without_it_fails(secure_broker: Broker,
                                                     clients: Callable[..., MqttTransport]) -> None:
    b = secure_broker
    ok = clients(b.tls_url, "dev-a", username="dev-a", password=b.users["dev-a"], ca_file=str(b.ca_file))
    ok.publish(Topics("lab", "dev-a").state, state_payload("online"), retain=True, timeout=WAIT)
    untrusting = clients(b.tls_url, "dev-b", username="dev-b", password=b.users["dev-b"], start=False)
    untrusting.start()
    with pytest.raises(TransportError, match=r"(?i)certificate"):
        untrusting.wait_connected(3)


def test_wrong_password_is_refused(secure_broker: Broker,
                                   clients: Callable[..., MqttTransport]) -> None:
    t = clients(secure_broker.url, "dev-a", username="dev-a", password="wrong", start=False)
    t.start()
    # "refused the connection" is the at-once path; a timeout would say "not connected within".
    with pytest.raises(TransportError, match="refused the connection"):
        t.wait_connected(WAIT)
    assert "reason code 0x86" in t.last_error or "reason code 0x87" in t.last_error, t.last_error
    # The positive control: the right password on the same broker connects.
    clients(secure_broker.url, "dev-a", username="dev-a", password=secure_broker.users["dev-a"])


def test_device_cannot_publish_outside_its_subtree_or_to_its_commands(
        secure_broker: Broker, clients: Callable[..., MqttTransport]) -> None:
    b = secure_broker
    watcher = Inbox()
    ctl = clients(b.url, "ctl-acl", username=CONTROLLER, password=b.users[CONTROLLER])
    ctl.subscribe("edgepack/v1/#", handler=watcher)
    dev = clients(b.url, "dev-a", username="dev-a", password=b.users["dev-a"])
    own, other = Topics("lab", "dev-a"), Topics("lab", "dev-b")
    denied = [other.state, other.cmd("install"), own.cmd("install"), "edgepack/v1/lab/dev-a-x/state",
              "elsewhere/topic", other.reply("host-1"), "edgepack/v1/lab/_clients/host-1/reply"]
    for topic in denied:
        # MQTT 5 mosquitto answers a denied QoS 1 publish with PUBACK "Not authorized".
        with pytest.raises(TransportError, match=r"(?i)not authorized"):
            dev.publish(topic, b"evil", qos=1, timeout=WAIT)
    dev.publish(own.reply("host-1"), b"reply", qos=1, timeout=WAIT)  # its own reply topic: allowed
    dev.publish(own.health, b"fine", qos=1, timeout=WAIT)  # the positive control, sent last
    seen = watcher.until(lambda m: m.payload == b"fine")
    assert seen[-1].topic == own.health
    assert [m.topic for m in seen if m.payload == b"reply"] == [own.reply("host-1")]
    assert [m.topic for m in seen if m.payload == b"evil"] == []
    # Commands still flow from the controller to the device.
    got = Inbox()
    dev.subscribe(own.cmd_filter, handler=got)
    ctl.publish(own.cmd("status"), b"{}", timeout=WAIT)
    assert got.expect().topic == own.cmd("status")


def test_device_cannot_read_another_devices_commands(
        secure_broker: Broker, clients: Callable[..., MqttTransport]) -> None:
    b = secure_broker
    spy, mine = Inbox(), Inbox()
    dev = clients(b.url, "dev-b", username="dev-b", password=b.users["dev-b"])
    # mosquitto grants the SUBACK (its acl_file filters delivery, not subscriptions): what the ACL
    # must stop is the delivery.
    dev.subscribe(Topics("lab", "dev-a").cmd_filter, handler=spy)
    dev.subscribe(Topics("lab", "dev-b").cmd_filter, handler=mine)
    ctl = clients(b.url, "ctl-spy", username=CONTROLLER, password=b.users[CONTROLLER])
    ctl.publish(Topics("lab", "dev-a").cmd("install"), b"{}", timeout=WAIT)
    # The positive control, published after: dev-b does read its own commands.
    ctl.publish(Topics("lab", "dev-b").cmd("status"), b"{}", timeout=WAIT)
    assert mine.expect().topic == Topics("lab", "dev-b").cmd("status")
    assert spy.q.empty()  # dev-a's command, published first on the same connection, would be here


# --- subscriptions take effect at a known point ------------------------------------------------------


def test_a_refused_subscription_raises_and_an_allowed_one_receives(
        subscribe_acl_broker: Broker, clients: Callable[..., MqttTransport]) -> None:
    b = subscribe_acl_broker
    inbox, never = Inbox(), Inbox()
    t = clients(b.url, "sub-acl")
    with pytest.raises(TransportError, match=r"refused subscription to 'forbidden/x'.*0x87"):
        t.subscribe("forbidden/x", handler=never)
    t.subscribe(ALLOWED_FILTER, handler=inbox)  # the positive control, on the same connection
    pub = clients(b.url, "pub-acl")
    pub.publish("forbidden/x", b"no", timeout=WAIT)
    pub.publish("allowed/x", b"yes", timeout=WAIT)
    assert inbox.expect().payload == b"yes"
    assert never.q.empty()
    # A refused subscription is forgotten: a reconnect does not try it again.
    ups: queue.Queue[bool] = queue.Queue()
    t.on_connect = ups.put
    b.restart()
    ups.get(timeout=30)
    t.wait_connected(WAIT)


def test_subscriptions_made_before_start_are_active_when_wait_connected_returns(
        broker: Broker, clients: Callable[..., MqttTransport]) -> None:
    inbox = Inbox()
    pub = clients(broker.url, "pub-early")
    sub = clients(broker.url, "sub-early", start=False)
    for i in range(20):
        sub.subscribe(f"early/{i}", handler=inbox)
    sub.start()
    sub.wait_connected(WAIT)
    pub.publish("early/19", b"first", timeout=WAIT)  # the last filter sent on connect
    assert inbox.expect().payload == b"first"


def test_wait_connected_reports_a_refused_subscription_made_before_start(
        subscribe_acl_broker: Broker, clients: Callable[..., MqttTransport]) -> None:
    inbox = Inbox()
    t = clients(subscribe_acl_broker.url, "sub-refused-early", start=False)
    t.subscribe("forbidden/y")
    t.subscribe("allowed/y", handler=inbox)
    t.start()
    with pytest.raises(TransportError, match=r"refused subscription 'forbidden/y'.*0x87"):
        t.wait_connected(WAIT)
    assert t.connected  # the connection stays up, and the granted filter works
    clients(subscribe_acl_broker.url, "pub-refused-early").publish("allowed/y", b"ok", timeout=WAIT)
    assert inbox.expect().payload == b"ok"


def test_subscribe_inside_a_handler_does_not_wait(broker: Broker,
                                                  clients: Callable[..., MqttTransport]) -> None:
    # The SUBACK is read by the thread running the handler: waiting there could only time out.
    second = Inbox()
    done = threading.Event()
    errors: list[Exception] = []
    t = clients(broker.url, "sub-in-handler")

    def on_first(m: Message) -> None:
        try:
            t.subscribe("inner/second", handler=second)
        except TransportError as e:
            errors.append(e)
        done.set()

    t.subscribe("inner/first", handler=on_first)
    pub = clients(broker.url, "pub-in-handler")
    pub.publish("inner/first", b"go", timeout=WAIT)
    assert done.wait(WAIT) and errors == []
    # A waited-for SUBACK, sent after the handler's SUBSCRIBE, means that one is in effect too.
    t.subscribe("inner/sync")
    pub.publish("inner/second", b"reached", timeout=WAIT)
    assert second.expect().payload == b"reached"
