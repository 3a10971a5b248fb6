"""Helpers for tests that run the real agent daemon as a process against a real broker."""

from __future__ import annotations

import contextlib
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.protocol import Topics, fleet_filter, parse_state, parse_status
from agent.transport.mqtt import Message, MqttTransport
from agent.transport.request import RequestClient

# The device profile of the daemon tests' bundles (tests/conftest.py agent_bundles) and of the
# agents the rollout tests start: this host, GGUF Q4_K_M. A module, not the conftest, so tests in
# any folder import the same object (pytest may have loaded another folder's conftest by then).
AGENT_PROFILE: dict = {
    "name": "x86-64-int4-test", "description": "test: this host, IoT precision", "class": "iot",
    "match": {"arch": ["x86_64", "aarch64"]},
    "target": {"runtime": "llamacpp", "format": "gguf", "precision": "int4", "quant": "Q4_K_M",
               "context": 1024, "threads": 2, "ram_budget_gb": 4.0},
    "budget": {"max_ppl_increase_pct": 25.0},
}

AGENT = str(Path(sys.executable).parent / "edgepack-agent")


class AgentProcess:
    """``edgepack-agent run`` as a child process (so it can be SIGKILLed like a real crash)."""

    def __init__(self, state_dir: Path, keyring: Path, broker_url: str, *, device: str = "dev-a",
                 fleet: str = "test", extra: tuple[str, ...] = (), env: dict[str, str] | None = None):
        self.cmd = [AGENT, "-v", "--state-dir", str(state_dir), "--keyring", str(keyring), "run",
                    "--broker", broker_url, "--device", device, "--fleet", fleet,
                    "--health-interval", "1", *extra]
        self.env = {**os.environ, **(env or {})}
        self.log = state_dir.parent / f"{device}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        out.close()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc and self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> int:
        if self.proc and self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode if self.proc else 0

    def wait_log(self, text: str, count: int = 1, timeout: float = 30.0) -> None:
        """Wait (bounded) until the agent's log holds ``text`` at least ``count`` times."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if self.log.read_text(errors="replace").count(text) >= count:
                    return
            if not self.alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"{text!r} x{count} not in the agent log within {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""


class Host:
    """A host-side MQTT client: watches the fleet's status topics and sends commands."""

    def __init__(self, broker_url: str, fleet: str = "test", *, client_id: str | None = None,
                 persistent: bool = False, **auth: Any) -> None:
        self.fleet = fleet
        self.status: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.cond = threading.Condition()
        self.transport = MqttTransport(broker_url, client_id or f"host-{secrets.token_hex(4)}",
                                       session_expiry=3600 if persistent else 0, **auth)
        self.transport.subscribe(fleet_filter(fleet, "state"), handler=self._on_status)
        self.transport.subscribe(fleet_filter(fleet, "birth"), handler=self._on_status)
        self.transport.subscribe(fleet_filter(fleet, "health"), handler=self._on_status)
        self.transport.subscribe(fleet_filter(fleet, "events"), handler=self._on_status)
        self.requests = RequestClient(self.transport, fleet)
        self.transport.start()
        self.transport.wait_connected(10)

    def _on_status(self, msg: Message) -> None:
        parts = msg.topic.split("/")
        device, kind = parts[3], parts[4]
        if not msg.payload:
            return
        body = ({"state": parse_state(msg.payload)} if kind == "state"
                else parse_status(msg.payload))
        with self.cond:
            self.status.setdefault((device, kind), []).append(body)
            self.cond.notify_all()

    def wait_for(self, device: str, kind: str, pred, timeout: float = 30.0) -> dict[str, Any]:
        """The first status message of ``kind`` from ``device`` satisfying ``pred`` (bounded wait)."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self.cond:
            while True:
                msgs = self.status.get((device, kind), [])
                for m in msgs[seen:]:
                    if pred(m):
                        return m
                seen = len(msgs)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {kind} from {device} matching within {timeout}s; "
                                         f"last: {msgs[-3:]}")
                self.cond.wait(left)

    def latest(self, device: str, kind: str) -> dict[str, Any] | None:
        with self.cond:
            msgs = self.status.get((device, kind), [])
            return msgs[-1] if msgs else None

    def clear(self, device: str, kind: str) -> None:
        with self.cond:
            self.status.pop((device, kind), None)

    def close(self) -> None:
        self.transport.stop()


def collect(pending_iter: Iterator[Any], limit: int = 10_000) -> list[Any]:
    out = []
    for i, item in enumerate(pending_iter):
        out.append(item)
        if i >= limit:
            break
    return out


def drain(q: queue.Queue[Any]) -> list[Any]:
    out = []
    with contextlib.suppress(queue.Empty):
        while True:
            out.append(q.get_nowait())
    return out


def topics(device: str, fleet: str = "test") -> Topics:
    return Topics(fleet, device)
