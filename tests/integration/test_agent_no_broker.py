"""systemd without a broker: the agent becomes READY once it serves locally, whether or not its
broker is reachable, says so in STATUS, and updates STATUS when the broker appears. The real
agent process, a real mosquitto started late on the port it was told, a fake notify socket."""

from __future__ import annotations

import contextlib
import socket
import time

import pytest
from agentkit import AgentProcess, Host

from fleet.broker import Broker, free_port

pytestmark = pytest.mark.integration

DEV = "dev-nb"


def test_ready_without_a_broker_then_online_when_it_appears(tmp_path, agent_bundles):
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.5)
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    agent = AgentProcess(tmp_path / "state", agent_bundles["keyring"], url, device=DEV,
                         env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "2000000"})
    got: list[str] = []

    def until(pred, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not pred():
            with contextlib.suppress(TimeoutError):
                got.extend(sock.recv(4096).decode().splitlines())
        return pred()

    broker = Broker(tmp_path / "broker", port=port)  # not started: nothing listens there yet
    try:
        agent.start()
        assert until(lambda: "READY=1" in got, 30), (got, agent.tail())
        status = [x for x in got if x.startswith("STATUS=")]
        assert status and "not connected" in status[0], got
        assert until(lambda: got.count("WATCHDOG=1") >= 2, 10), "the main loop pings while offline"
        # The broker appears: the agent connects and says so; the device is online.
        broker.start()
        host = Host(broker.url)
        try:
            assert until(lambda: any(x.startswith(f"STATUS=serving edgepack/v1/test/{DEV}")
                                     for x in got), 60), (got, agent.tail())
            host.wait_for(DEV, "state", lambda m: m["state"] == "online", timeout=10)
        finally:
            host.close()
        assert agent.alive() and got.count("READY=1") == 1
    finally:
        agent.stop()
        broker.stop()
        sock.close()
