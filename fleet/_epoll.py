"""Many paho MQTT 5 clients driven by ONE epoll loop on one thread: the fleet simulator's engine.

Why not paho's own loops: ``loop_start()`` gives every client a thread and runs ``select()``,
which fails silently once a socket's fd passes 1024 (~340 clients per process, measured). Here
paho's external-loop hooks (``on_socket_open/close/register_write/unregister_write``) tell
:class:`EpollLoop` which sockets exist and which have bytes waiting, and the loop calls
``loop_read`` / ``loop_write`` on the ready ones and ``loop_misc`` (keepalive pings) on all of
them once a second. 15,000 clients in one process were measured with this scheme.

This is the only fleet module that imports paho besides :mod:`agent.transport.mqtt` (which owns
one client per process on paho's own thread and cannot serve thousands); what leaves it is our
own :class:`~agent.transport.mqtt.Message` and plain callbacks.

Invariants:
- Every paho call and every callback runs on the loop thread. Other threads use only
  :meth:`EpollLoop.call_soon` (thread-safe, wakes the loop) and :meth:`EpollLoop.stop`.
- Nothing a callback raises stops the loop: it is logged and the loop goes on.
- Timers (:meth:`EpollLoop.call_later`) replace every sleep: a delay of one device never holds
  up the others.
- The links' sockets live at fds >= :data:`FD_FLOOR` when the fd limit allows (see there).
- :class:`MqttLink` never reconnects by itself: its owner decides when (the simulator paces
  connects so 10,000 devices do not flood the broker's accept queue).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import heapq
import itertools
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.transport.mqtt import Message

log = logging.getLogger("fleet.simulator")

MISC_INTERVAL = 1.0  # seconds between loop_misc() sweeps (keepalive pings and their timeouts)
# Our sockets are moved to fds at or above this, so fds below 1024 stay free for the rest of the
# process: a controller or FleetClient on paho's select() loop in the same process (a test) still
# works when it (re)connects while thousands of simulated devices are up.
FD_FLOOR = 1024
_IN = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP
_OUT = select.EPOLLOUT


class Timer:
    """A pending :meth:`EpollLoop.call_later`; :meth:`cancel` makes it a no-op."""

    __slots__ = ("args", "cancelled", "fn", "when")

    def __init__(self, when: float, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.when, self.fn, self.args, self.cancelled = when, fn, args, False

    def cancel(self) -> None:
        self.cancelled = True


class EpollLoop:
    """One thread, one epoll object, timers and a thread-safe call queue.

    Args:
        clock: monotonic seconds (timers run on it).
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._ep = select.epoll()
        self._clients: dict[int, paho.Client] = {}  # fd -> client with that socket
        self._out: set[int] = set()  # fds registered for EPOLLOUT
        self._dirty: set[paho.Client] = set()  # clients that queued bytes since the last flush
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._calls: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._ep.register(self._wake_r.fileno(), select.EPOLLIN)
        self._stopping = False
        self._next_misc = 0.0
        self.thread: threading.Thread | None = None
        self.idle: Callable[[], None] | None = None  # called once per iteration (connect pacing)

    # --- scheduling --------------------------------------------------------------------------------

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop thread soon. Thread-safe."""
        self._calls.append((fn, args))
        with contextlib.suppress(BlockingIOError):  # a full wake pipe already wakes the loop
            self._wake_w.send(b"x")

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> Timer:
        """Run ``fn(*args)`` on the loop thread after ``delay`` seconds (loop thread only)."""
        t = Timer(self.clock() + max(0.0, delay), fn, args)
        heapq.heappush(self._timers, (t.when, next(self._seq), t))
        return t

    def stop(self) -> None:
        """End :meth:`run` after the current iteration. Thread-safe."""
        self._stopping = True
        self.call_soon(lambda: None)

    def on_loop_thread(self) -> bool:
        return threading.current_thread() is self.thread

    # --- paho's external-loop hooks ---------------------------------------------------------------

    def attach(self, client: paho.Client) -> None:
        """Let this loop drive ``client`` (before its first connect)."""
        client.on_socket_open = self._socket_open
        client.on_socket_close = self._socket_close
        client.on_socket_register_write = self._register_write
        client.on_socket_unregister_write = self._unregister_write

    def _socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # Without TCP_NODELAY a QoS 1 round trip stalls 44-88 ms on Nagle / delayed ACK.
        with contextlib.suppress(OSError, AttributeError):  # not TCP (a test's socketpair)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        fd = sock.fileno()
        self._clients[fd] = client
        self._ep.register(fd, _IN)

    def _socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        fd = sock.fileno()
        if self._clients.get(fd) is client:
            del self._clients[fd]
            self._out.discard(fd)
            with contextlib.suppress(OSError, ValueError):  # already gone from epoll
                self._ep.unregister(fd)
        self._dirty.discard(client)

    def _register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # Written at the end of this iteration (many publishes, one write); EPOLLOUT only if the
        # socket buffer is full then.
        self._dirty.add(client)

    def _unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        fd = sock.fileno()
        if fd in self._out:
            self._out.discard(fd)
            with contextlib.suppress(OSError, ValueError):
                self._ep.modify(fd, _IN)

    # --- the loop ------------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until :meth:`stop` (call on the thread that owns the loop)."""
        self.thread = threading.current_thread()
        while not self._stopping:
            self._flush()
            timeout = self._timeout()
            try:
                events = self._ep.poll(timeout)
            except InterruptedError:
                continue
            for fd, ev in events:
                if fd == self._wake_r.fileno():
                    with contextlib.suppress(BlockingIOError):
                        while self._wake_r.recv(4096):
                            pass
                    continue
                client = self._clients.get(fd)
                if client is None:
                    continue
                if ev & _IN:
                    self._guard(client.loop_read)
                if ev & _OUT and self._clients.get(fd) is client:
                    self._guard(client.loop_write)
            self._run_calls()
            self._run_timers()
            if self.idle is not None:
                self._guard(self.idle)
            now = self.clock()
            if now >= self._next_misc:
                self._next_misc = now + MISC_INTERVAL
                for client in list(self._clients.values()):
                    self._guard(client.loop_misc)
        self._flush()

    def close(self) -> None:
        self._ep.close()
        self._wake_r.close()
        self._wake_w.close()

    def _timeout(self) -> float:
        if self._calls or self._dirty:
            return 0.0
        until = self._next_misc
        if self._timers:
            until = min(until, self._timers[0][0])
        return max(0.0, min(until - self.clock(), MISC_INTERVAL))

    def _flush(self) -> None:
        while self._dirty:
            client = self._dirty.pop()
            self._guard(client.loop_write)
            sock = client.socket()
            if sock is not None and client.want_write():
                fd = sock.fileno()
                if fd not in self._out and self._clients.get(fd) is client:
                    self._out.add(fd)
                    self._ep.modify(fd, _IN | _OUT)

    def _run_calls(self) -> None:
        for _ in range(len(self._calls)):  # calls queued by these calls wait for the next turn
            fn, args = self._calls.popleft()
            self._guard(fn, *args)

    def _run_timers(self) -> None:
        now = self.clock()
        while self._timers and self._timers[0][0] <= now:
            _, _, t = heapq.heappop(self._timers)
            if not t.cancelled:
                self._guard(t.fn, *t.args)

    @staticmethod
    def _guard(fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # one device's bug must not stop the other 9,999
            log.exception("simulator loop: %s failed", getattr(fn, "__qualname__", fn))


def _above_floor(sock: socket.socket) -> socket.socket:
    if sock.fileno() >= FD_FLOOR:
        return sock
    try:
        fd = fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, FD_FLOOR)
    except OSError:  # the fd limit is below the floor (or exhausted above it): keep the low fd
        return sock
    moved = socket.socket(sock.family, sock.type, sock.proto, fileno=fd)
    moved.settimeout(sock.gettimeout())
    sock.close()
    return moved


class _Client(paho.Client):
    """paho's client with its TCP socket moved above :data:`FD_FLOOR` (before any TLS wrap)."""

    def _create_socket_connection(self) -> socket.socket:
        return _above_floor(super()._create_socket_connection())


def _props(**fields: Any) -> Properties:
    p = Properties(PacketTypes.PUBLISH)
    for k, v in fields.items():
        setattr(p, k, v)
    return p


class MqttLink:
    """One MQTT 5 client driven by an :class:`EpollLoop`: persistent session, last will, TCP_NODELAY.

    Args:
        loop: the loop that drives it; every method is called on its thread.
        client_id: the MQTT client id.
        host, port: the broker.
        keepalive: seconds between pings.
        session_expiry: seconds the broker keeps the session (and queued QoS 1) after a disconnect.
        will: ``(topic, payload)`` published qos 1 retained if the link dies without DISCONNECT.
        username, password: broker credentials.
        tls: an SSL context shared by all links (None: plain TCP).
        on_connect: ``(session_present)`` after a successful CONNACK.
        on_connect_failed: ``(reason)`` after a refused or failed connect attempt.
        on_disconnect: ``(reason)`` after the connection ended, cleanly or not.
        on_message: gets each :class:`~agent.transport.mqtt.Message`.
    """

    def __init__(self, loop: EpollLoop, client_id: str, host: str, port: int, *, keepalive: int,
                 session_expiry: int, will: tuple[str, bytes] | None, username: str | None = None,
                 password: str | None = None, tls: ssl.SSLContext | None = None,
                 on_connect: Callable[[bool], None], on_connect_failed: Callable[[str], None],
                 on_disconnect: Callable[[str], None], on_message: Callable[[Message], None]) -> None:
        self.loop = loop
        self.client_id = client_id
        self._host, self._port, self._keepalive = host, port, keepalive
        self._on_connect, self._on_connect_failed = on_connect, on_connect_failed
        self._on_disconnect, self._on_message = on_disconnect, on_message
        self._acks: dict[int, Callable[[], None]] = {}
        self.connected = False
        c = _Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                        protocol=MQTTProtocolVersion.MQTTv5)
        c.max_queued_messages_set(0)  # unbounded: QoS 1 published while offline waits for reconnect
        if username is not None:
            c.username_pw_set(username, password)
        if tls is not None:
            c.tls_set_context(tls)
        if will is not None:
            c.will_set(will[0], will[1], qos=1, retain=True)
        c.on_connect = self._connected
        c.on_disconnect = self._disconnected
        c.on_message = self._message
        c.on_publish = self._acked
        c.on_subscribe = self._subacked
        loop.attach(c)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = session_expiry
        c.connect_async(host, port, keepalive=keepalive, clean_start=False, properties=props)
        self._client = c

    def connect(self) -> bool:
        """Open the TCP connection and send CONNECT (the CONNACK arrives through the loop).

        Returns:
            False if the socket could not be opened (``on_connect_failed`` was told why).
        """
        try:
            rc = self._client.reconnect()
        except (OSError, ValueError) as e:
            self._on_connect_failed(f"{type(e).__name__}: {e}")
            return False
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._on_connect_failed(paho.error_string(rc))
            return False
        return True

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                correlation_data: bytes | None = None, response_topic: str | None = None,
                on_ack: Callable[[], None] | None = None) -> None:
        """Queue a message (QoS 1 waits in paho's queue while disconnected; QoS 0 is dropped)."""
        props = None
        if correlation_data is not None or response_topic is not None:
            fields: dict[str, Any] = {}
            if correlation_data is not None:
                fields["CorrelationData"] = correlation_data
            if response_topic is not None:
                fields["ResponseTopic"] = response_topic
            props = _props(**fields)
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if on_ack is not None and qos > 0:
            self._acks[info.mid] = on_ack

    def subscribe(self, topic_filter: str, *, on_ack: Callable[[], None] | None = None) -> None:
        """Subscribe at QoS 1; ``on_ack`` runs when the broker granted it."""
        rc, mid = self._client.subscribe(topic_filter, qos=1)
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None and on_ack is not None:
            self._acks[mid] = on_ack

    def disconnect(self) -> None:
        """Send DISCONNECT (reason 0: the broker does not publish the will)."""
        self._client.disconnect()

    def drop(self) -> None:
        """Cut the TCP connection without DISCONNECT: the broker publishes the last will."""
        sock = self._client.socket()
        if isinstance(sock, socket.socket):  # an ssl.SSLSocket is one too
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    # --- paho callbacks (loop thread) ------------------------------------------------------------

    def _connected(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                   properties: Any) -> None:
        if reason.is_failure:
            self._on_connect_failed(f"CONNACK {reason}")
            return
        self.connected = True
        self._on_connect(bool(flags.session_present))

    def _disconnected(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                      properties: Any) -> None:
        was = self.connected
        self.connected = False
        self._acks.clear()  # a resent QoS 1 message gets a new ack callback from its owner only
        if was:
            self._on_disconnect(str(reason))
        else:
            self._on_connect_failed(f"disconnected before CONNACK: {reason}")

    def _message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        p = msg.properties
        self._on_message(Message(msg.topic, bytes(msg.payload),
                                 getattr(p, "ResponseTopic", None) if p else None,
                                 getattr(p, "CorrelationData", None) if p else None,
                                 bool(msg.retain), int(msg.qos)))

    def _acked(self, client: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        cb = self._acks.pop(mid, None)
        if cb is not None:
            cb()

    def _subacked(self, client: paho.Client, userdata: Any, mid: int, reasons: Any,
                  properties: Any) -> None:
        cb = self._acks.pop(mid, None)
        if any(r.is_failure for r in reasons):
            log.warning("%s: subscription refused: %s", self.client_id, [str(r) for r in reasons])
            return
        if cb is not None:
            cb()


__all__ = ["FD_FLOOR", "EpollLoop", "MqttLink", "Timer"]
