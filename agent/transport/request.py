"""Host-side request/response over MQTT 5: send a command, collect the replies meant for it.

Workflow: (1) the client subscribes once to its replies from every device of the fleet,
``edgepack/v1/<fleet>/+/reply/<client-id>``; (2) each request gets fresh random Correlation Data,
a queue, and the reply topic inside the asked device's own subtree
(``edgepack/v1/<fleet>/<device>/reply/<client-id>``) as its Response Topic; (3) the request is
published to the device's ``cmd/<name>`` with that Response Topic, Correlation Data and a Message
Expiry Interval (:data:`agent.protocol.COMMAND_EXPIRY` unless told otherwise), so a command to an
offline device is not run long after anyone waits for it; (4) a reply is routed to the queue of
its correlation only if it arrived on that request's reply topic — the broker ACL lets only the
asked device publish there, so another device that learned the correlation cannot answer for it
(counted in :attr:`RequestClient.misrouted`); replies of abandoned requests are dropped;
(5) closing the request forgets the queue.
"""

from __future__ import annotations

import logging
import queue
import secrets
from collections.abc import Iterator
from types import TracebackType

from agent.errors import TransportError
from agent.protocol import COMMAND_EXPIRY, Command, InferChunk, Reply, Topics, reply_filter
from agent.transport.mqtt import Message, MqttTransport

log = logging.getLogger(__name__)

MAX_QUEUED_REPLIES = 65_536  # per request: a host that stops reading must not exhaust memory


class PendingRequest:
    """The replies of one request, in arrival order; iterate, or :meth:`get` one at a time.

    Use as a context manager (or call :meth:`close`) so late replies stop being queued.
    """

    def __init__(self, owner: RequestClient, correlation: bytes, timeout: float, *,
                 device: str = "", reply_topic: str = "") -> None:
        self.correlation = correlation
        self.timeout = timeout
        self.device = device
        self.reply_topic = reply_topic  # the only topic a reply to this request is accepted on
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
            be a valid id (``[A-Za-z0-9_-]{1,64}``) as it names the reply topics.
        fleet: the fleet id.

    Attributes:
        misrouted: replies dropped because they carried a pending request's correlation but
            arrived on another device's reply topic (a forgery, or a confused device).

    Raises:
        ProtocolError: a malformed fleet or client id.
        TransportError: the reply subscription cannot be made (on a connected transport: the
            broker refused it or did not acknowledge it; see :meth:`MqttTransport.subscribe`).
    """

    def __init__(self, transport: MqttTransport, fleet: str) -> None:
        self.transport = transport
        self.fleet = fleet
        self.reply_filter = reply_filter(fleet, transport.client_id)
        self.misrouted = 0
        self._pending: dict[bytes, PendingRequest] = {}
        transport.subscribe(self.reply_filter, qos=1, handler=self._on_reply)

    def reply_topic(self, device: str) -> str:
        """The Response Topic of our requests to ``device`` (inside that device's subtree).

        Raises:
            ProtocolError: a malformed device id.
        """
        return Topics(self.fleet, device).reply(self.transport.client_id)

    def request(self, device: str, command: str, payload: bytes | Command, *,
                timeout: float = 10.0, ack_timeout: float | None = None,
                expiry: int | None = None) -> PendingRequest:
        """Publish a command and return the handle its replies arrive on.

        Args:
            device: the device id.
            command: one of :data:`agent.protocol.COMMANDS`.
            payload: raw JSON bytes, or a request dataclass (serialized for you).
            timeout: default wait per reply, seconds.
            ack_timeout: if given, first wait up to this many seconds for the broker to
                acknowledge the command (it then holds it, e.g. for a device that is offline with
                a persistent session).
            expiry: the command's Message Expiry Interval, seconds; default
                :data:`agent.protocol.COMMAND_EXPIRY` for ``command``. Past it the broker
                discards the command and the agent drops it unrun.

        Returns:
            A :class:`PendingRequest`; close it when done.

        Raises:
            ProtocolError: a malformed device id or unknown command.
            TransportError: the publish failed, or the broker refused or did not acknowledge it
                within ``ack_timeout``.
        """
        topics = Topics(self.fleet, device)
        topic = topics.cmd(command)
        reply_to = topics.reply(self.transport.client_id)
        data = payload if isinstance(payload, bytes) else payload.to_bytes()
        correlation = secrets.token_bytes(16)
        pending = PendingRequest(self, correlation, timeout, device=device, reply_topic=reply_to)
        self._pending[correlation] = pending
        try:
            self.transport.publish(topic, data, qos=1, response_topic=reply_to,
                                   correlation_data=correlation, timeout=ack_timeout,
                                   expiry=COMMAND_EXPIRY[command] if expiry is None else expiry)
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
        if msg.topic != p.reply_topic:
            # The correlation is right but the device is not: only the asked device can publish
            # on its reply topic (ACL), so this one answers for another. Never accept it.
            self.misrouted += 1
            log.warning("dropped a reply for %s that arrived on %s", p.device, msg.topic)
            return
        try:
            p._queue.put_nowait(msg)
        except queue.Full:  # the caller stopped reading; never block the network thread
            log.warning("reply queue full; dropped a reply")
