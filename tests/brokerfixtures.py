"""Pytest fixtures for a real mosquitto on loopback: ``broker`` (open) and ``secure_broker``.

``secure_broker`` has a password file, the device ACL and a TLS listener; its users are in
``secure_broker.users``: ``controller`` (whole tree) and devices ``dev-a``, ``dev-b``.
Tests are skipped (with the reason) when mosquitto is not installed.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokerkit import Broker, mosquitto_binary

DEVICES = ("dev-a", "dev-b")
CONTROLLER = "controller"


def _need_mosquitto() -> None:
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """An anonymous mosquitto on a free 127.0.0.1 port, persistence on, stopped afterwards."""
    _need_mosquitto()
    b = Broker(tmp_path / "broker")
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def secure_broker(tmp_path: Path) -> Iterator[Broker]:
    """mosquitto with passwords, the device ACL, a plain and a TLS listener (CA: ``ca_file``)."""
    _need_mosquitto()
    users = {u: secrets.token_urlsafe(12) for u in (CONTROLLER, *DEVICES)}
    b = Broker(tmp_path / "secure-broker", users=users, controllers=(CONTROLLER,), tls=True)
    b.start()
    try:
        yield b
    finally:
        b.stop()
