"""The dispatcher's refusals and deadlines (agent/dispatch.py, agent/serving.py), without a broker.

Pure routing logic, so the collaborators are stand-ins: ``publish`` records, the control handler
is a function, the clock is a list the test moves. The real agent behind a real mosquitto is in
tests/integration/test_reply_confinement.py and tests/integration/test_command_expiry.py.
"""

from __future__ import annotations

import threading
import time
from typing import Any, cast

import pytest

from agent._counters import Counters
from agent.dispatch import CommandDispatcher, command_deadline, is_expired
from agent.protocol import Command, InferChunk, InferRequest, Reply, Topics
from agent.resident import ResidentModel
from agent.serving import InferenceServer, InferJob
from agent.transport.mqtt import Message

ME = Topics("lab", "pi-1")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Rig:
    def __init__(self, control: Any = None) -> None:
        self.clock = Clock()
        self.sent: list[tuple[str, bytes, dict[str, Any]]] = []
        self.ran: list[str] = []
        self.counters = Counters()
        self.d = CommandDispatcher(self.publish, cast(InferenceServer, None),
                                   control or self.control, topics=ME, counters=self.counters,
                                   monotonic=self.clock)

    def publish(self, topic: str, payload: bytes, **kw: Any) -> None:
        self.sent.append((topic, payload, kw))

    def control(self, req: Command, msg: Message) -> dict[str, Any]:
        self.ran.append(req.NAME)
        return {"ran": req.NAME}

    def command(self, name: str = "status", payload: bytes = b"{}", *, reply_to: str | None = None,
                expiry: int | None = None, corr: bytes = b"c1") -> None:
        self.d.on_command(Message(ME.cmd(name), payload, reply_to or ME.reply("host"), corr,
                                  expiry=expiry))


def _wait(pred: Any, what: str) -> None:
    deadline = time.monotonic() + 5
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_deadlines_are_monotonic_and_absent_without_an_expiry() -> None:
    assert command_deadline(10.0, None) is None and not is_expired(None, 1e12)
    assert command_deadline(10.0, 5) == 15.0
    assert not is_expired(15.0, 14.9) and is_expired(15.0, 15.0)


@pytest.mark.parametrize("reply_to", [Topics("lab", "pi-2").reply("host"), "edgepack/v1/lab/_clients/h/reply",
                                      ME.state, "x/y"])
def test_a_command_with_a_foreign_response_topic_is_neither_run_nor_answered(reply_to: str) -> None:
    rig = Rig()
    rig.d.start()
    try:
        rig.command(reply_to=reply_to)
        rig.command(payload=b"not json", reply_to=reply_to, corr=b"c2")  # not even an error reply
        rig.command(corr=b"c3")  # the positive control
        _wait(lambda: rig.sent, "the control command was answered")
    finally:
        rig.d.stop()
    assert rig.counters["bad_response_topic"] == 2 and rig.ran == ["status"]
    assert [t for t, _, _ in rig.sent] == [ME.reply("host")]


def test_a_command_expired_on_arrival_is_dropped_unanswered() -> None:
    rig = Rig()
    rig.d.start()
    try:
        rig.command(expiry=0)
        rig.command(expiry=30, corr=b"c2")
        _wait(lambda: rig.sent, "the live command was answered")
    finally:
        rig.d.stop()
    assert rig.counters["expired"] == 1 and rig.ran == ["status"]
    assert len(rig.sent) == 1 and rig.sent[0][2]["correlation_data"] == b"c2"


def test_a_command_that_expires_in_the_control_queue_is_dropped_unrun() -> None:
    release = threading.Event()
    rig: Rig

    def control(req: Command, msg: Message) -> dict[str, Any]:
        if msg.correlation_data == b"slow":
            release.wait(5)
        rig.ran.append(msg.correlation_data.decode() if msg.correlation_data else "")
        return {}

    rig = Rig(control)
    rig.d.start()
    try:
        rig.command(corr=b"slow")
        rig.command(expiry=2, corr=b"stale")
        rig.command(expiry=60, corr=b"fresh")
        rig.clock.now += 3  # the slow command took three seconds
        release.set()
        _wait(lambda: len(rig.sent) == 2, "slow and fresh answered")
    finally:
        rig.d.stop()
    assert rig.ran == ["slow", "fresh"] and rig.counters["expired"] == 1
    assert [kw["correlation_data"] for _, _, kw in rig.sent] == [b"slow", b"fresh"]
    assert Reply.from_bytes(rig.sent[1][1]).ok


def test_an_inference_past_its_deadline_is_dropped_before_touching_the_model() -> None:
    clock = Clock()
    counters = Counters()
    emitted: list[InferChunk] = []

    def current() -> None:
        raise AssertionError("an expired job must not look for a model")

    server = InferenceServer(ResidentModel(), current, counters=counters, monotonic=clock)
    server.start()
    try:
        assert server.submit(InferJob(InferRequest("hi"), emitted.append, deadline=clock.now - 1))
        assert server.submit(InferJob(InferRequest("hi"), emitted.append, deadline=clock.now + 60,
                                      cancel=_set()))  # the positive control: reaches the worker
        _wait(lambda: emitted, "the live job was handled")
    finally:
        server.stop()
    assert counters["expired"] == 1
    assert len(emitted) == 1 and emitted[0].usage == {"finish_reason": "cancelled", "completion_tokens": 0}


def _set() -> threading.Event:
    e = threading.Event()
    e.set()
    return e
