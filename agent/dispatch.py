"""Commands from MQTT: validate, drop duplicates, route, and answer every one of them.

Runs on paho's network thread and never blocks it: (0) a command whose Response Topic is outside
this device's own reply subtree (:func:`agent.protocol.check_response_topic`) is refused unanswered
and unrun (counted ``bad_response_topic``): answering it would put words in another device's
mouth; (1) the payload is parsed strictly
(:func:`agent.protocol.parse_command`); a malformed one is answered with its error code at once,
(2) a duplicate delivery (same correlation data, e.g. a QoS 1 resend around a broker restart) is
dropped — except a named job (``job`` on install/rollback), which the journal answers instead,
(3) ``infer`` goes to the :class:`~agent.serving.InferenceServer` (a full queue answers ``busy``),
``cancel`` is answered at once, (4) everything else (install, rollback, status, probe) goes to the
control worker, one at a time, and gets exactly one :class:`~agent.protocol.Reply`. A named job
that the :class:`~agent.jobs.JobJournal` has finished is answered with the recorded reply and not
run again; otherwise it is recorded ``running`` before it starts and with its reply after.

Expiry: a command's MQTT 5 Message Expiry Interval, as delivered, is what is left of the host's
interval after the broker held it; the dispatcher turns it into a local monotonic deadline on
arrival (no wall clock: a device without an RTC may boot in 1970). A command already expired on
arrival, or whose deadline passes while it waits behind others (the control queue, the inference
queue), is dropped unrun and unanswered — nobody waits for it any more — and counted ``expired``.

Nothing raised while handling or answering a command reaches paho or stops the control worker.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from agent._counters import Counters
from agent.errors import EdgepackError
from agent.jobs import JobJournal
from agent.protocol import (
    CancelRequest,
    Command,
    InferChunk,
    InferRequest,
    ProtocolError,
    Reply,
    Topics,
    check_response_topic,
    error_code,
    parse_command,
)
from agent.serving import InferenceServer, InferJob
from agent.transport.mqtt import Message

log = logging.getLogger("agent.dispatch")

CONTROL_QUEUE = 8  # install/rollback/status/probe waiting behind the running one
SEEN_CORRELATIONS = 4096  # duplicate suppression memory

Publish = Callable[..., None]  # MqttTransport.publish
ControlHandler = Callable[[Command, Message], dict[str, Any]]
ReplayHandler = Callable[[str, Command, dict[str, Any]], None]  # (job, request, recorded reply)


def command_deadline(received: float, expiry: int | None) -> float | None:
    """The monotonic time after which a command is stale, or None if it never expires.

    Args:
        received: the monotonic clock when the command arrived.
        expiry: its Message Expiry Interval as delivered (seconds left), or None.
    """
    return None if expiry is None else received + expiry


def is_expired(deadline: float | None, now: float) -> bool:
    """True if a command with ``deadline`` (see :func:`command_deadline`) is stale at ``now``."""
    return deadline is not None and now >= deadline


class _Seen:
    """A bounded memory of correlation ids: the oldest is forgotten first."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._ids: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def first_time(self, key: bytes) -> bool:
        with self._lock:
            if key in self._ids:
                return False
            self._ids[key] = None
            while len(self._ids) > self._size:
                self._ids.popitem(last=False)
            return True


class CommandDispatcher:
    """Routes command messages to the inference server and the control worker.

    Args:
        publish: sends a message (``MqttTransport.publish``); may raise TransportError.
        serving: the inference server shared by every door.
        control: runs one control command and returns its result (raises EdgepackError to fail).
        journal: outcomes of named jobs (None: jobs are not remembered across restarts).
        on_replay: told when a finished job is answered from the journal (to resend its final
            event).
        topics: this device's topics: replies go only to its reply subtree.
        counters: ``commands``, ``rejected``, ``busy``, ``duplicates``, ``replayed``,
            ``expired`` and ``bad_response_topic`` are counted here.
        clock: epoch seconds, for the journal.
        monotonic: the clock command deadlines are kept on.
    """

    def __init__(self, publish: Publish, serving: InferenceServer, control: ControlHandler, *,
                 topics: Topics,
                 journal: JobJournal | None = None, on_replay: ReplayHandler | None = None,
                 counters: Counters | None = None, control_queue: int = CONTROL_QUEUE,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._publish = publish
        self.serving = serving
        self._control = control
        self.topics = topics
        self.journal = journal
        self._on_replay = on_replay
        self.clock = clock
        self._monotonic = monotonic
        self.counters = counters or Counters()
        self._queue: queue.Queue[tuple[Command, Message, float | None] | None] = \
            queue.Queue(control_queue)
        self._seen = _Seen(SEEN_CORRELATIONS)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._control_worker, name="edgepack-control",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        if self._thread is not None:
            self._thread.join(timeout)

    # --- network thread ----------------------------------------------------------------------------

    def on_command(self, msg: Message) -> None:
        """Validate and route one command. Never raises: every failure becomes a reply."""
        name = msg.topic.rsplit("/", 1)[-1]
        try:
            self.counters.incr("commands")
            deadline = command_deadline(self._monotonic(), msg.expiry)
            if msg.response_topic is not None:
                try:
                    check_response_topic(self.topics, msg.response_topic)
                except ProtocolError as e:
                    self.counters.incr("bad_response_topic")
                    log.warning("refused a %s command: %s (code %s)", name, e, e.code)
                    return
            try:
                req = parse_command(name, msg.payload)
            except ProtocolError as e:
                if not self._first_delivery(msg, None):
                    return
                self.counters.incr("rejected")
                self._answer_error(msg, name, e.code, str(e))
                return
            if not self._first_delivery(msg, _job_of(req)):
                log.info("dropped a duplicate %s command", name)
                return
            if self._expired(name, deadline, "on arrival"):
                return
            if isinstance(req, CancelRequest):
                if self.serving.cancel(req.request_id):
                    self.reply(msg, Reply.success({"cancelled": req.request_id}))
                else:
                    self.reply(msg, Reply.failure("not_found",
                                                  f"no running or queued request {req.request_id!r}"))
            elif isinstance(req, InferRequest):
                if not self.serving.submit(InferJob(req, functools.partial(self.chunk, msg),
                                                    deadline=deadline)):
                    self.chunk(msg, InferChunk.failure(
                        0, "busy", f"{self.serving.queue_size} requests are already waiting; retry later"))
            else:
                try:
                    self._queue.put_nowait((req, msg, deadline))
                except queue.Full:
                    self.counters.incr("busy")
                    self.reply(msg, Reply.failure("busy", "the agent is busy with other commands"))
        except Exception as e:  # the network thread must survive anything; log it loudly
            log.exception("command handling failed")
            self.counters.incr("rejected")
            with contextlib.suppress(Exception):
                self.reply(msg, Reply.failure("internal", f"internal error: {e}"))

    def _expired(self, name: str, deadline: float | None, when: str) -> bool:
        if not is_expired(deadline, self._monotonic()):
            return False
        self.counters.incr("expired")
        log.info("dropped an expired %s command (%s): its Message Expiry Interval has passed",
                 name, when)
        return True

    def _first_delivery(self, msg: Message, job: str | None) -> bool:
        # A named job is never dropped: the journal answers it (a second reply is harmless; a
        # missing one would leave a rollout waiting for its timeout).
        if job is not None or not msg.correlation_data:
            return True
        if self._seen.first_time(msg.correlation_data):
            return True
        self.counters.incr("duplicates")
        return False

    def _answer_error(self, msg: Message, name: str, code: str, text: str) -> None:
        if name == "infer":
            self.chunk(msg, InferChunk.failure(0, code, text))
        else:
            self.reply(msg, Reply.failure(code, text))

    # --- answers -----------------------------------------------------------------------------------

    def reply(self, msg: Message, reply: Reply) -> None:
        """Answer a command on its Response Topic; a failure to send is logged, not raised."""
        if not msg.response_topic:
            return  # fire-and-forget command: nobody to answer
        try:
            self._publish(msg.response_topic, reply.to_bytes(), qos=1,
                          correlation_data=msg.correlation_data)
        except EdgepackError as e:
            log.warning("reply to %s not sent: %s", msg.response_topic, e)

    def chunk(self, msg: Message, chunk: InferChunk) -> None:
        """Send one inference chunk; raises TransportError so the server can stop generating."""
        if msg.response_topic:
            self._publish(msg.response_topic, chunk.to_bytes(), qos=1,
                          correlation_data=msg.correlation_data)

    # --- control worker ----------------------------------------------------------------------------

    def _control_worker(self) -> None:
        while (item := self._queue.get()) is not None:
            req, msg, deadline = item
            job = _job_of(req)
            if self._expired(req.NAME, deadline, "while queued"):
                continue
            try:
                recorded = self.journal.finished(job) if job and self.journal else None
                if job and recorded is not None:
                    self.counters.incr("replayed")
                    log.info("job %s already finished: answering with its recorded reply", job)
                    reply = Reply(bool(recorded.get("ok")), recorded.get("result"), recorded.get("error"))
                    if self._on_replay is not None:
                        self._on_replay(job, req, recorded)
                    self.reply(msg, reply)
                    continue
                if job and self.journal:
                    self.journal.start(job, req.NAME, self.clock())
                reply = self._run(req, msg)
                if job and self.journal:
                    self.journal.finish(job, {"ok": reply.ok, "result": reply.result,
                                              "error": reply.error}, self.clock())
                self.reply(msg, reply)
            except Exception as e:  # keep serving: a bug in one command must not kill the agent
                log.exception("%s crashed", req.NAME)
                self.reply(msg, Reply.failure("internal", f"internal error: {e}"))

    def _run(self, req: Command, msg: Message) -> Reply:
        try:
            return Reply.success(self._control(req, msg))
        except EdgepackError as e:
            log.warning("%s failed: %s", req.NAME, e)
            hint = e.diagnostics()
            return Reply.failure(error_code(e), f"{e}" + (f" ({hint})" if hint else ""))


def _job_of(req: Command) -> str | None:
    return getattr(req, "job", None)


__all__ = ["CONTROL_QUEUE", "CommandDispatcher", "command_deadline", "is_expired"]
