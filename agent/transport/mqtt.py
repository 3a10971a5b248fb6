"""MQTT 5 transport over paho-mqtt 2.x: the only module of edgepack that imports paho.

Everything above this module sees :class:`Message` and :class:`TransportError`; no paho type or
exception leaks out. Works with any MQTT 5 broker (no broker-specific feature is used).

Connection policy, and why:
- ``clean_start=False`` plus a Session Expiry Interval (default one day): the broker keeps the
  session and queues QoS 1 commands sent while a device is offline, and hands them over when it
  returns.
- A last will (qos 1, retained) announces an unclean loss; a clean :meth:`MqttTransport.stop`
  sends DISCONNECT with reason 0, so the will is not published.
- Reconnects: paho's exponential backoff (``reconnect_delay_set``) plus a random jitter of up to
  half the current delay, so a fleet that lost its broker does not come back in lockstep.
- ``TCP_NODELAY`` on every socket (``on_socket_open``): without it a QoS 1 round trip costs
  44–88 ms of Nagle/delayed-ACK stalls; with it ~0.5 ms.
- Subscriptions are remembered and sent again on every connect (idempotent; retained messages
  are not replayed), so a lost or older session never leaves one missing. A subscription is in
  effect once the broker's SUBACK granted it: :meth:`MqttTransport.subscribe` waits for that when
  connected, and :meth:`MqttTransport.wait_connected` returns only after the SUBACKs of the
  subscriptions sent on connect; a refusal (e.g. the ACL) is a TransportError, not a silence.
- User callbacks run on paho's network thread; an exception in one is logged, never allowed to
  kill that thread (paho would stop the loop).
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.errors import TransportError

log = logging.getLogger(__name__)

DEFAULT_SESSION_EXPIRY = 86_400  # seconds: queued commands survive a day offline
DEFAULT_KEEPALIVE = 30  # seconds; the broker declares us lost after 1.5x this
DEFAULT_SUBSCRIBE_TIMEOUT = 10.0  # seconds subscribe() waits for the broker's SUBACK
# CONNACK reasons that retrying with the same settings cannot fix; wait_connected fails at once.
_REFUSALS = {0x84, 0x85, 0x86, 0x87, 0x8A, 0x8C}


@dataclass(frozen=True)
class Message:
    """One received MQTT message, in our own terms."""

    topic: str
    payload: bytes
    response_topic: str | None = None
    correlation_data: bytes | None = None
    retain: bool = False
    qos: int = 0
    # MQTT 5 Message Expiry Interval as delivered: the seconds left of the sender's interval (the
    # broker subtracts the time it held the message); None if the sender set none.
    expiry: int | None = None


@dataclass(frozen=True)
class Will:
    """The last will: published by the broker if we vanish without a clean DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


MessageHandler = Callable[[Message], None]


class _Ack:
    __slots__ = ("done", "reason")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.reason = ""


def _parse_url(url: str) -> tuple[str, int, bool]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise TransportError(f"bad broker URL {url!r}: {e}") from e
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise TransportError(f"bad broker URL {url!r}: want mqtt://host:port or mqtts://host:port")
    tls = parts.scheme == "mqtts"
    return parts.hostname, port or (8883 if tls else 1883), tls


def _filter_matches(topic_filter: str, topic: str) -> bool:
    if topic_filter.startswith("$share/"):
        # Shared subscription "$share/<group>/<filter>": messages arrive on the plain topic.
        topic_filter = topic_filter.split("/", 2)[2] if topic_filter.count("/") >= 2 else ""
    return bool(paho.topic_matches_sub(topic_filter, topic))


class MqttTransport:
    """A long-lived MQTT 5 connection with a persistent session, a last will and auto-reconnect.

    Usage::

        t = MqttTransport("mqtt://127.0.0.1:1883", "pi-01", will=Will(topics.state, b"..."))
        t.subscribe(topics.cmd_filter, handler=on_command)
        t.start(); t.wait_connected(10)
        t.publish(topics.state, state_payload("online"), retain=True)
        ...
        t.stop()

    Args:
        broker_url: ``mqtt://host:port`` or ``mqtts://host:port`` (TLS).
        client_id: the MQTT client id (a device uses its device id).
        username: optional user name; password: its password.
        ca_file: CA bundle to verify the broker with (``mqtts`` only; None = system CAs).
        cert_file, key_file: client certificate and key for mutual TLS (optional).
        keepalive: seconds between pings.
        session_expiry: seconds the broker keeps our session (and queued QoS 1 messages) after a
            disconnect; 0 for a throwaway session (e.g. a one-shot CLI with a random client id).
        will: the last will, or None.
        reconnect_min_delay, reconnect_max_delay: backoff bounds in seconds.
        on_message: default handler for messages no per-subscription handler claimed.
        on_connect: called with ``session_present`` after each successful connect.
        replay_retained: ask for the retained messages on every (re)subscribe, even when the
            persistent session still holds the subscription (a host that rebuilds its view of
            the fleet from them after a restart).
        on_disconnect: called with a reason string after each loss of connection.

    Raises:
        TransportError: a malformed broker URL or unreadable TLS files.
    """

    def __init__(
        self,
        broker_url: str,
        client_id: str,
        *,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        keepalive: int = DEFAULT_KEEPALIVE,
        session_expiry: int = DEFAULT_SESSION_EXPIRY,
        will: Will | None = None,
        reconnect_min_delay: float = 0.5,
        reconnect_max_delay: float = 30.0,
        on_message: MessageHandler | None = None,
        on_connect: Callable[[bool], None] | None = None,
        on_disconnect: Callable[[str], None] | None = None,
        replay_retained: bool = False,
    ) -> None:
        self._host, self._port, tls = _parse_url(broker_url)
        self._replay_retained = replay_retained
        self.client_id = client_id
        self._keepalive = keepalive
        self._session_expiry = session_expiry
        self._min_delay = reconnect_min_delay
        self._max_delay = reconnect_max_delay
        self.on_message = on_message
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect

        # Three separate locks, never nested: paho calls on_publish while holding its own message
        # mutex, so nothing of ours may be held across a call into paho that takes that mutex.
        self._subs_lock = threading.Lock()
        self._subs: dict[str, tuple[int, MessageHandler | None]] = {}
        self._ack_lock = threading.Lock()
        self._acks: dict[int, _Ack] = {}  # PUBACK and SUBACK waiters by packet id
        self._early: dict[int, str] = {}  # acks that beat their waiter's registration
        self._awaiting = 0
        self._connected = threading.Event()
        # _state_changed guards the connection state below and wakes wait_connected.
        self._state_changed = threading.Condition()
        self._last_error = ""
        self._refused = False
        self._resubscribing = False  # between CONNACK and the last SUBSCRIBE sent on connect
        self._sub_pending: dict[int, str] = {}  # packet id -> filter, sent on connect, not yet acked
        self._sub_refused: list[str] = []  # filters of this connection the broker refused, with why
        self._stopping = threading.Event()
        self._started = False
        self._backoff = reconnect_min_delay
        self._in_callback = threading.local()

        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                        protocol=MQTTProtocolVersion.MQTTv5)
        # paho's backoff works in whole seconds; _jitter() adds the random part.
        c.reconnect_delay_set(min_delay=max(1, int(reconnect_min_delay)),
                              max_delay=max(1, int(reconnect_max_delay)))
        c.max_queued_messages_set(0)  # unbounded: QoS 1 sent while offline waits for the reconnect
        if username is not None:
            c.username_pw_set(username, password)
        if tls:
            try:
                c.tls_set(ca_certs=ca_file, certfile=cert_file, keyfile=key_file,
                          cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            except (OSError, ValueError) as e:
                raise TransportError(f"cannot load TLS files: {e}") from e
        if will is not None:
            c.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_socket_open = self._on_socket_open
        self._client = c

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start connecting in the background (returns at once; see :meth:`wait_connected`).

        Raises:
            TransportError: already started.
        """
        if self._started:
            raise TransportError("transport already started")
        self._started = True
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._session_expiry
        try:
            self._client.connect_async(self._host, self._port, keepalive=self._keepalive,
                                       clean_start=False, properties=props)
            rc = self._client.loop_start()
        except (OSError, ValueError) as e:
            raise TransportError(f"cannot start MQTT client: {e}") from e
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise TransportError(f"cannot start MQTT client: {paho.error_string(rc)}")

    def stop(self) -> None:
        """Disconnect cleanly (the will is not sent) and stop the network thread.

        Publish the final ``state`` before calling this (with ``timeout=`` to be sure it arrived).
        """
        self._stopping.set()
        try:
            self._client.disconnect()
        except (OSError, ValueError) as e:  # already gone: nothing left to say goodbye on
            log.debug("disconnect: %s", e)
        # The network thread ends promptly: disconnect() flips paho's state, which ends its loop and
        # its reconnect wait, and _stopping ends our jitter wait.
        self._client.loop_stop()
        self._connected.clear()

    @property
    def connected(self) -> bool:
        """True while a CONNACK-accepted connection is up (its subscriptions may still be in
        flight; :meth:`wait_connected` waits for them)."""
        return self._connected.is_set()

    @property
    def last_error(self) -> str:
        """Why the last connection attempt or connection failed ("" if none did)."""
        return self._last_error

    def wait_connected(self, timeout: float) -> None:
        """Block until connected and the broker has acknowledged the subscriptions sent on that
        connect (every filter :meth:`subscribe` recorded before it): once this returns, messages
        matching them are delivered.

        Args:
            timeout: seconds to wait.

        Raises:
            TransportError: the broker refused us (bad credentials, not authorized) — at once —
                or refused one of the subscriptions (the connection stays up; the filter stays
                recorded and is sent again on reconnect), or no connection and SUBACKs within
                ``timeout``, with the last error seen.
        """
        with self._state_changed:
            ok = self._state_changed.wait_for(lambda: self._subscribed() or self._refused, timeout)
            subscribed, connected = self._subscribed(), self._connected.is_set()
            refused_subs = list(self._sub_refused)
            unacked = sorted(self._sub_pending.values())
            why = self._last_error or "no answer from broker"
        where = f"{self._host}:{self._port}"
        if subscribed and not refused_subs:
            return
        if subscribed:
            raise TransportError(f"broker {where} refused subscription {'; '.join(refused_subs)}",
                                 hint="Check the broker ACL for this user name.")
        if ok:
            raise TransportError(f"broker {where} refused the connection: {why}",
                                 hint="Check the device's user name, password and broker ACL.")
        if connected:
            raise TransportError(f"connected to {where}, but no SUBACK for {', '.join(unacked)} "
                                 f"within {timeout:.1f}s")
        raise TransportError(f"not connected to {where} within {timeout:.1f}s: {why}")

    def _subscribed(self) -> bool:
        # Called with _state_changed held.
        return self._connected.is_set() and not self._resubscribing and not self._sub_pending

    # --- publish / subscribe -------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        *,
        timeout: float | None = None,
        expiry: int | None = None,
    ) -> None:
        """Publish a message. QoS 1 messages published while disconnected are queued and sent on
        reconnect; QoS 0 ones are dropped then.

        Args:
            topic, payload, qos, retain: as in MQTT.
            response_topic, correlation_data: MQTT 5 request/response properties.
            expiry: MQTT 5 Message Expiry Interval, seconds (>= 1): the broker discards the
                message once it has held it that long undelivered (e.g. for an offline device).
            timeout: if given, wait up to this many seconds for the broker's acknowledgement and
                fail if it refuses the message (e.g. ACL). Not allowed inside a handler (the
                acknowledgement arrives on the thread running it).

        Raises:
            TransportError: invalid topic/QoS, payload too large, refused by the broker, or no
                acknowledgement within ``timeout``.
        """
        props: Properties | None = None
        if expiry is not None and (type(expiry) is not int or not 1 <= expiry < 1 << 32):
            raise TransportError(f"bad message expiry {expiry!r}: want whole seconds >= 1")
        if response_topic is not None or correlation_data is not None or expiry is not None:
            props = Properties(PacketTypes.PUBLISH)
            if response_topic is not None:
                props.ResponseTopic = response_topic
            if correlation_data is not None:
                props.CorrelationData = correlation_data
            if expiry is not None:
                props.MessageExpiryInterval = expiry
        if timeout is not None and getattr(self._in_callback, "active", False):
            raise TransportError("publish(timeout=...) would deadlock inside a message handler")
        ack = _Ack() if timeout is not None else None
        if ack is not None:
            with self._ack_lock:
                self._awaiting += 1
        try:
            try:
                info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
            except (ValueError, TypeError) as e:
                raise TransportError(f"cannot publish to {topic!r}: {e}") from e
            if ack is not None:
                with self._ack_lock:
                    # The PUBACK may already have been handled on the network thread.
                    if info.mid in self._early:
                        ack.reason = self._early.pop(info.mid)
                        ack.done.set()
                    else:
                        self._acks[info.mid] = ack
        finally:
            if ack is not None:
                with self._ack_lock:
                    self._awaiting -= 1
                    if not self._awaiting:
                        self._early.clear()
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self._drop_ack(info.mid)
            raise TransportError(f"cannot publish to {topic!r}: {paho.error_string(info.rc)}")
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos == 0:
            self._drop_ack(info.mid)
            log.debug("dropped QoS 0 message to %s while disconnected", topic)
            if ack is not None:
                raise TransportError(f"not connected: QoS 0 message to {topic!r} dropped")
            return
        if ack is None:
            return
        assert timeout is not None
        if not ack.done.wait(timeout):
            self._drop_ack(info.mid)
            raise TransportError(f"no acknowledgement for message to {topic!r} within {timeout:.1f}s")
        if ack.reason:
            raise TransportError(f"broker refused message to {topic!r}: {ack.reason}")

    def subscribe(self, topic_filter: str, qos: int = 1, handler: MessageHandler | None = None, *,
                  timeout: float | None = DEFAULT_SUBSCRIBE_TIMEOUT) -> None:
        """Subscribe now if connected, and again on every reconnect.

        When connected, waits for the broker's SUBACK: on return the subscription is in effect.
        When not connected, the filter is only recorded; it is sent on connect and
        :meth:`wait_connected` waits for its SUBACK. Inside a message handler (or ``on_connect``)
        it does not wait, as the SUBACK arrives on the thread running the handler; a refusal is
        then logged.

        Args:
            topic_filter: an MQTT filter (``+``/``#``; ``$share/<group>/...`` for shared ones).
            qos: maximum QoS.
            handler: gets the messages matching this filter; None = the default ``on_message``.
            timeout: seconds to wait for the SUBACK; None = send without waiting.

        Raises:
            TransportError: an invalid filter or QoS; the broker refused the subscription (e.g.
                ACL; it is then forgotten); or no SUBACK within ``timeout`` (it stays recorded and
                is sent again on reconnect).
        """
        if qos not in (0, 1, 2) or not topic_filter:
            raise TransportError(f"bad subscription {topic_filter!r} qos={qos}")
        entry = (qos, handler)
        with self._subs_lock:
            self._subs[topic_filter] = entry
        if not self._connected.is_set():
            return
        if timeout is None or getattr(self._in_callback, "active", False):
            self._send_subscribe(topic_filter, qos)
            return
        ack = _Ack()
        with self._ack_lock:
            self._awaiting += 1
        try:
            mid = self._send_subscribe(topic_filter, qos)
            if mid is not None:
                with self._ack_lock:
                    # The SUBACK may already have been handled on the network thread.
                    if mid in self._early:
                        ack.reason = self._early.pop(mid)
                        ack.done.set()
                    else:
                        self._acks[mid] = ack
        finally:
            with self._ack_lock:
                self._awaiting -= 1
                if not self._awaiting:
                    self._early.clear()
        if mid is None:
            return  # the connection dropped just now: sent again on connect (see wait_connected)
        if not ack.done.wait(timeout):
            self._drop_ack(mid)
            raise TransportError(f"no SUBACK for {topic_filter!r} within {timeout:.1f}s")
        if ack.reason:
            # The caller learns it failed, so it must not come into effect on a later reconnect.
            with self._subs_lock:
                if self._subs.get(topic_filter) == entry:
                    del self._subs[topic_filter]
            raise TransportError(f"broker refused subscription to {topic_filter!r}: {ack.reason}",
                                 hint="Check the broker ACL for this user name.")

    def unsubscribe(self, topic_filter: str) -> None:
        """Forget a subscription and tell the broker if connected."""
        with self._subs_lock:
            self._subs.pop(topic_filter, None)
        if self._connected.is_set():
            try:
                self._client.unsubscribe(topic_filter)
            except ValueError as e:
                raise TransportError(f"cannot unsubscribe {topic_filter!r}: {e}") from e

    def _send_subscribe(self, topic_filter: str, qos: int) -> int | None:
        # The SUBSCRIBE's packet id, or None when the connection is gone (sent again on connect).
        # retainHandling=1: retained messages only for a new subscription, so a resubscribe after
        # reconnect does not replay every retained state/birth. A host whose persistent session
        # outlives its memory (the rollout controller after a restart) asks for them every time.
        handling = SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE if self._replay_retained \
            else SubscribeOptions.RETAIN_SEND_IF_NEW_SUB
        opts = SubscribeOptions(qos=qos, retainHandling=handling)
        try:
            rc, mid = self._client.subscribe(topic_filter, options=opts)
        except ValueError as e:
            raise TransportError(f"cannot subscribe to {topic_filter!r}: {e}") from e
        if rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            return None
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise TransportError(f"cannot subscribe to {topic_filter!r}: {paho.error_string(rc)}")
        return mid

    def _drop_ack(self, mid: int) -> None:
        with self._ack_lock:
            self._acks.pop(mid, None)

    # --- paho callbacks (network thread) ---------------------------------------------------------

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError) as e:  # a non-TCP socket (e.g. a proxy wrapper): just slower
            log.debug("TCP_NODELAY not set: %s", e)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Any) -> None:
        if reason.is_failure:
            with self._state_changed:
                self._last_error = f"{reason} (reason code {reason.value:#04x})"
                self._refused = reason.value in _REFUSALS
                self._state_changed.notify_all()
            log.warning("broker refused connection: %s", self._last_error)
            return
        session_present = bool(getattr(flags, "session_present", False))
        # (1) Mark connected before reading the subscriptions: a subscribe() racing with this
        # connect then either is in the list below or sends its own SUBSCRIBE (twice is harmless).
        # wait_connected keeps waiting while _resubscribing and until every SUBACK is in.
        with self._state_changed:
            self._backoff = self._min_delay
            self._last_error = ""
            self._refused = False
            self._resubscribing = True
            self._sub_pending = {}
            self._sub_refused = []
            self._connected.set()
        with self._subs_lock:
            subs = list(self._subs.items())
        # (2) Subscribe again even when the session survived: a filter added since that session
        # was made (e.g. by a newer agent) would otherwise be missing. Re-subscribing is
        # idempotent, and retainHandling=1 keeps retained messages from being replayed.
        sent: dict[int, str] = {}
        for f, (qos, _) in subs:
            try:
                mid = self._send_subscribe(f, qos)
            except TransportError as e:
                log.error("%s", e)
                continue
            if mid is not None:
                sent[mid] = f
        # (3) Their SUBACKs are read by this (the network) thread after this callback returns,
        # so registering them now cannot miss one; _on_subscribe settles them.
        with self._state_changed:
            self._sub_pending.update(sent)
            self._resubscribing = False
            self._state_changed.notify_all()
        log.info("connected to %s:%d (session present: %s)", self._host, self._port, session_present)
        self._call(self.on_connect, session_present)

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        # paho calls this inside its `except OSError:` block, so the exception is still current.
        err = sys.exc_info()[1]
        with self._state_changed:
            self._last_error = f"{type(err).__name__}: {err}" if err else "connection failed"
            self._state_changed.notify_all()
        log.info("connect to %s:%d failed: %s", self._host, self._port, self._last_error)
        self._jitter()

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Any) -> None:
        was_connected = self._connected.is_set()
        with self._state_changed:
            self._connected.clear()
            self._sub_pending.clear()  # those SUBACKs will not come; the next connect resends
            if reason.is_failure and not self._refused:
                self._last_error = f"disconnected: {reason}"
            self._state_changed.notify_all()
        if was_connected:
            log.info("disconnected from %s:%d: %s", self._host, self._port, reason)
            self._call(self.on_disconnect, str(reason))
        self._jitter()

    def _jitter(self) -> None:
        # paho's own backoff doubles from min to max delay; add up to half of our mirror of it at
        # random so devices do not reconnect in lockstep. Runs on the network thread, which has
        # nothing else to do while disconnected; stop() cuts the wait short.
        if self._stopping.is_set():
            return
        delay = random.uniform(0, self._backoff / 2)
        self._backoff = min(self._backoff * 2, self._max_delay)
        self._stopping.wait(delay)

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Any) -> None:
        why = f"{reason} (reason code {reason.value:#04x})" if reason.is_failure else ""
        with self._ack_lock:
            ack = self._acks.pop(mid, None)
            if ack is None and self._awaiting:
                self._early[mid] = why
        if ack is not None:
            ack.reason = why
            ack.done.set()
        elif reason.is_failure:
            log.warning("broker refused message %d: %s", mid, reason)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int,
                      reason_codes: list[ReasonCode], properties: Any) -> None:
        failed = [r for r in reason_codes if r.is_failure]
        why = f"{failed[0]} (reason code {failed[0].value:#04x})" if failed else ""
        stashed = False
        with self._ack_lock:
            ack = self._acks.pop(mid, None)
            if ack is None and self._awaiting:
                self._early[mid] = why  # maybe a subscribe() about to register; else dropped
                stashed = True
        if ack is not None:
            ack.reason = why
            ack.done.set()
            return
        # A subscription sent on connect (wait_connected waits for these), or one nobody waits for.
        with self._state_changed:
            topic_filter = self._sub_pending.pop(mid, None)
            if topic_filter is not None and why:
                self._sub_refused.append(f"{topic_filter!r}: {why}")
            self._state_changed.notify_all()
        if why and (topic_filter is not None or not stashed):
            log.error("broker refused subscription %s: %s", topic_filter or f"(packet {mid})", why)

    def _on_message(self, client: paho.Client, userdata: Any, m: paho.MQTTMessage) -> None:
        props = getattr(m, "properties", None)
        rt = getattr(props, "ResponseTopic", None) if props is not None else None
        cd = getattr(props, "CorrelationData", None) if props is not None else None
        ex = getattr(props, "MessageExpiryInterval", None) if props is not None else None
        try:
            topic = m.topic
        except UnicodeDecodeError:  # a topic that is not UTF-8 violates MQTT; nothing can use it
            log.warning("dropped a message with a non-UTF-8 topic")
            return
        msg = Message(topic, bytes(m.payload), rt, bytes(cd) if cd is not None else None,
                      bool(m.retain), int(m.qos), int(ex) if isinstance(ex, int) else None)
        with self._subs_lock:
            handlers = [h for f, (_, h) in self._subs.items() if h is not None and _filter_matches(f, topic)]
        if not handlers:
            handlers = [self.on_message] if self.on_message else []
        for h in dict.fromkeys(handlers):  # one handler subscribed under two filters runs once
            self._call(h, msg)

    def _call(self, fn: Callable[[Any], None] | None, arg: Any) -> None:
        if fn is None:
            return
        self._in_callback.active = True
        try:
            fn(arg)
        except Exception:
            # A bug in one handler must not kill paho's network thread (and with it the device's
            # connection); log it with the traceback and go on.
            log.exception("MQTT handler %r failed", fn)
        finally:
            self._in_callback.active = False
