"""Commands expire: real mosquitto, the real agent as a process, persistent sessions.

(1) A command sent while the device is offline, whose Message Expiry Interval passes before the
device returns, never runs (the broker discards it; the agent never sees it), while a command
with a longer expiry sent at the same time does run. (2) A command that expires while it waits on
the device behind a slow one is dropped unrun and unanswered, and counted ``expired`` in status
and health.
"""

# ruff: noqa: F811

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentkit import AgentProcess, Host
from brokerfixtures import broker  # noqa: F401
from brokerkit import Broker

from agent.bundle import Keyring
from agent.errors import TransportError
from agent.protocol import COMMAND_EXPIRY, InstallRequest, Reply, StatusRequest

pytestmark = pytest.mark.integration

FLEET = "test"
DEV = "dev-x"
WAIT = 30.0
STALL = 4.0  # seconds the bundle server sits on a request before answering 404


@pytest.fixture
def keyring_file(tmp_path: Path, keyring: Keyring) -> Path:
    p = tmp_path / "keyring.json"
    p.write_bytes(keyring.to_bytes())
    return p


class _StallingServer(http.server.ThreadingHTTPServer):
    """Answers every GET with 404 after STALL seconds: an install that takes a while, then fails."""

    daemon_threads = True

    def __init__(self) -> None:
        self.hit = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hit.set()
                time.sleep(STALL)
                self.send_error(404)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/slow.bundle"


@pytest.fixture
def stalling() -> Iterator[_StallingServer]:
    s = _StallingServer()
    t = threading.Thread(target=s.serve_forever, daemon=True)
    t.start()
    yield s
    s.shutdown()
    s.server_close()


def test_a_command_that_expired_while_the_device_was_offline_never_runs(
        tmp_path: Path, broker: Broker, keyring_file: Path) -> None:
    host = Host(broker.url, FLEET)
    agent = AgentProcess(tmp_path / "state", keyring_file, broker.url, device=DEV, fleet=FLEET)
    try:
        agent.start()
        host.wait_for(DEV, "state", lambda m: m["state"] == "online", timeout=WAIT)
        agent.stop()
        host.wait_for(DEV, "state", lambda m: m["state"] == "offline", timeout=WAIT)
        # Both held by the broker in the device's persistent session (acknowledged).
        short = host.requests.request(DEV, "status", StatusRequest(), timeout=WAIT, ack_timeout=10,
                                      expiry=2)
        kept = host.requests.request(DEV, "status", StatusRequest(), timeout=WAIT, ack_timeout=10)
        time.sleep(3.5)  # the device stays away past the short expiry
        agent.start()
        with kept:
            reply = Reply.from_bytes(kept.get().payload)
        assert reply.ok and reply.result is not None
        # Only the unexpired command reached the restarted agent.
        assert reply.result["counters"]["commands"] == 1
        with short, pytest.raises(TransportError, match="no reply"):
            short.get(timeout=1.0)  # sent first: its reply would have come before kept's
    finally:
        agent.stop()
        host.close()


def test_a_command_that_expires_while_queued_behind_a_slow_one_is_dropped_and_counted(
        tmp_path: Path, broker: Broker, keyring_file: Path, stalling: _StallingServer) -> None:
    host = Host(broker.url, FLEET)
    agent = AgentProcess(tmp_path / "state", keyring_file, broker.url, device=DEV, fleet=FLEET)
    try:
        agent.start()
        host.wait_for(DEV, "state", lambda m: m["state"] == "online", timeout=WAIT)
        slow = host.requests.request(DEV, "install", InstallRequest(stalling.url, "0" * 64, 1024),
                                     timeout=WAIT)
        assert stalling.hit.wait(WAIT), agent.tail()  # the install is running on the worker
        # Delivered at once (the device is online), then waits behind the install past its expiry.
        stale = host.requests.request(DEV, "status", StatusRequest(), timeout=WAIT, expiry=2)
        fresh = host.requests.request(DEV, "status", StatusRequest(), timeout=WAIT)
        assert COMMAND_EXPIRY["status"] > STALL + 2
        with slow:
            assert not Reply.from_bytes(slow.get().payload).ok  # the install failed (404)
        with fresh:
            reply = Reply.from_bytes(fresh.get().payload)
        assert reply.ok and reply.result is not None
        assert reply.result["counters"]["expired"] == 1
        assert reply.result["counters"]["commands"] == 3
        with stale, pytest.raises(TransportError, match="no reply"):
            stale.get(timeout=1.0)  # queued before fresh: its reply would have come first
        health = host.wait_for(DEV, "health", lambda m: m["errors"].get("expired") == 1,
                               timeout=WAIT)
        assert health["errors"]["expired"] == 1
        agent.wait_log("dropped an expired status command")
    finally:
        agent.stop()
        host.close()
