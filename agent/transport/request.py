"""Host-side request/response over MQTT 5: send a command, collect the replies meant for it.

Workflow: (1) the client subscribes once to its own reply topic
``edgepack/v1/<fleet>/_clients/<client-id>/reply``; (2) each request gets fresh random Correlation
Data and a queue; (3) the request is published to the device's ``cmd/<name>`` with that Response
Topic and Correlation Data; (4) replies carrying that correlation are routed to that queue, others
(late replies of abandoned requests) are dropped; (5) closing the request forgets the queue.
"""

from __future__ import annotations

import logging
import queue
import secrets
from collections.abc import Iterator
from types import TracebackType

from agent.errors import TransportError
from agent.protocol import Command, InferChunk, Reply, Topics, reply_topic
from agent.transport.mqtt import Message, MqttTransport

log = logging.getLogger(__name__)

MAX_QUEUED_REPLIES = 65_536  # per request: a host that stops reading must not exhaust memory


class PendingRequest:
    """The replies of one request, in arrival order; iterate, or :meth:`get` one at a time.

    Use as a context manager (or call :meth:`close`) so late replies stop being queued.
    """

    def __init__(self, owner: RequestClient, correlation: bytes, timeout: float) -> None:
        self.correlation = correlation
        self.timeout = timeout
        self._owner = owner
        self._queue: queue.Queue[Message] = queue.Queue(MAX_QUEUED_REPLIES)

    def get(self, timeout: float | None = None) -> Message:
        """The next reply.

        Args:
            timeout: seconds to wait; default the request's timeout.

        Raises:
            TransportError: no reply within the timeout.
        """
        t = self.timeout if timeout is None else timeout
        try:
            return self._queue.get(timeout=t)
        except queue.Empty:
            raise TransportError(f"no reply within {t:.1f}s",
                                 hint="Is the device online? Check its retained state topic.") from None

    def __iter__(self) -> Iterator[Message]:
        """Replies until the caller stops; each waits at most ``timeout`` (TransportError)."""
        while True:
            yield self.get()

    def close(self) -> None:
        self._owner._forget(self.correlation)

    def __enter__(self) -> PendingRequest:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class RequestClient:
    """Sends commands to devices of one fleet and routes their replies back by correlation.

    Args:
        transport: a started (or about to be started) :class:`MqttTransport`; its client id must
            be a valid id (``[A-Za-z0-9_-]{1,64}``) as it names the reply topic.
        fleet: the fleet id.

    Raises:
        ProtocolError: a malformed fleet or client id.
        TransportError: the reply subscription cannot be made (on a connected transport: the
            broker refused it or did not acknowledge it; see :meth:`MqttTransport.subscribe`).
    """

    def __init__(self, transport: MqttTransport, fleet: str) -> None:
        self.transport = transport
        self.fleet = fleet
        self.reply_topic = reply_topic(fleet, transport.client_id)
        self._pending: dict[bytes, PendingRequest] = {}
        transport.subscribe(self.reply_topic, qos=1, handler=self._on_reply)

    def request(self, device: str, command: str, payload: bytes | Command, *,
                timeout: float = 10.0, ack_timeout: float | None = None) -> PendingRequest:
        """Publish a command and return the handle its replies arrive on.

        Args:
            device: the device id.
            command: one of :data:`agent.protocol.COMMANDS`.
            payload: raw JSON bytes, or a request dataclass (serialized for you).
            timeout: default wait per reply, seconds.
            ack_timeout: if given, first wait up to this many seconds for the broker to
                acknowledge the command (it then holds it, e.g. for a device that is offline with
                a persistent session).

        Returns:
            A :class:`PendingRequest`; close it when done.

        Raises:
            ProtocolError: a malformed device id or unknown command.
            TransportError: the publish failed, or the broker refused or did not acknowledge it
                within ``ack_timeout``.
        """
        topic = Topics(self.fleet, device).cmd(command)
        data = payload if isinstance(payload, bytes) else payload.to_bytes()
        correlation = secrets.token_bytes(16)
        pending = PendingRequest(self, correlation, timeout)
        self._pending[correlation] = pending
        try:
            self.transport.publish(topic, data, qos=1, response_topic=self.reply_topic,
                                   correlation_data=correlation, timeout=ack_timeout)
        except TransportError:
            self._forget(correlation)
            raise
        return pending

    def call(self, device: str, command: str, payload: bytes | Command, *,
             timeout: float = 10.0) -> Reply:
        """Send a non-streaming command and return its one :class:`Reply`.

        Raises:
            TransportError: no reply within ``timeout``.
            ProtocolError: the reply is malformed.
        """
        with self.request(device, command, payload, timeout=timeout) as p:
            return Reply.from_bytes(p.get().payload)

    def stream(self, device: str, payload: bytes | Command, *, timeout: float = 30.0,
               command: str = "infer") -> Iterator[InferChunk]:
        """Send an inference request and yield its chunks in ``seq`` order, through ``done``.

        QoS 1 may deliver a chunk twice: duplicates are dropped. Chunks arriving early are held
        until the gap before them is filled.

        Args:
            timeout: the longest wait between two chunks, seconds.

        Raises:
            TransportError: no chunk within ``timeout``.
            ProtocolError: a malformed chunk.
        """
        with self.request(device, command, payload, timeout=timeout) as p:
            want = 0
            held: dict[int, InferChunk] = {}
            deadline_chunks = MAX_QUEUED_REPLIES  # bound the loop even if a device floods us
            while deadline_chunks > 0:
                deadline_chunks -= 1
                c = InferChunk.from_bytes(p.get().payload)
                if c.seq < want or c.seq in held:
                    continue  # a QoS 1 duplicate
                held[c.seq] = c
                while want in held:
                    c = held.pop(want)
                    want += 1
                    yield c
                    if c.done:
                        return
            raise TransportError(f"inference stream exceeded {MAX_QUEUED_REPLIES} chunks")

    def wait_ready(self, timeout: float) -> None:
        """Wait until the transport is connected and the reply subscription is in effect
        (replies can flow).

        Raises:
            TransportError: not connected within ``timeout``, or the reply subscription refused.
        """
        self.transport.wait_connected(timeout)

    def _forget(self, correlation: bytes) -> None:
        self._pending.pop(correlation, None)

    def _on_reply(self, msg: Message) -> None:
        p = self._pending.get(msg.correlation_data or b"")
        if p is None:
            log.debug("dropped a reply without a pending request on %s", msg.topic)
            return
        try:
            p._queue.put_nowait(msg)
        except queue.Full:  # the caller stopped reading; never block the network thread
            log.warning("reply queue full; dropped a reply")
