"""sd_notify against a real AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import _systemd


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)  # bounded: a missing datagram fails the test instead of hanging it
    try:
        yield sock, {"NOTIFY_SOCKET": str(path)}
    finally:
        sock.close()


def _recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_ready_status_watchdog_stopping_arrive(notify_socket: tuple[socket.socket, dict[str, str]]) -> None:
    sock, env = notify_socket
    assert _systemd.ready("connected to broker", env=env)
    assert _recv(sock) == "READY=1\nSTATUS=connected to broker"
    assert _systemd.status("installing tiny v2", env=env)
    assert _recv(sock) == "STATUS=installing tiny v2"
    assert _systemd.watchdog(env=env)
    assert _recv(sock) == "WATCHDOG=1"
    assert _systemd.stopping(env=env)
    assert _recv(sock) == "STOPPING=1"


def test_status_newlines_cannot_inject_assignments(
        notify_socket: tuple[socket.socket, dict[str, str]]) -> None:
    sock, env = notify_socket
    assert _systemd.status("bad\nREADY=1", env=env)
    assert _recv(sock) == "STATUS=bad READY=1"


def test_abstract_socket() -> None:
    name = f"edgepack-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2.0)
    try:
        assert _systemd.notify("READY=1", env={"NOTIFY_SOCKET": "@" + name})
        assert _recv(sock) == "READY=1"
    finally:
        sock.close()


@pytest.mark.parametrize("env", [
    {},
    {"NOTIFY_SOCKET": ""},
    {"NOTIFY_SOCKET": "relative/path"},
    {"NOTIFY_SOCKET": "vsock:2:1234"},
])
def test_not_under_systemd_returns_false(env: dict[str, str]) -> None:
    assert _systemd.notify("READY=1", env=env) is False
    assert _systemd.ready(env=env) is False


def test_dead_socket_returns_false_without_raising(tmp_path: Path) -> None:
    assert _systemd.watchdog(env={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}) is False


@pytest.mark.parametrize(("env", "expected"), [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": "abc"}, None),
    ({}, None),
])
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert _systemd.watchdog_interval(env) == expected
