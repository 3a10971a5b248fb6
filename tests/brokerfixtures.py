"""Pytest fixtures for a real mosquitto on loopback: ``broker`` (open) and ``secure_broker``.

``secure_broker`` has a password file, the device ACL and a TLS listener; its users are in
``secure_broker.users``: ``controller`` (whole tree) and devices ``dev-a``, ``dev-b``.

``subscribe_acl_broker`` refuses SUBSCRIBEs outside ``allowed/#`` with SUBACK 0x87. mosquitto's
``acl_file`` never refuses one (it grants the SUBACK and filters what it delivers), so this broker
uses mosquitto's dynamic-security plugin, which checks subscriptions when they are made.
Without mosquitto the tests skip with the reason (and fail in CI: tests/need.py).
"""

from __future__ import annotations

import glob
import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokerkit import Broker, mosquitto_binary
from need import need

DEVICES = ("dev-a", "dev-b")
CONTROLLER = "controller"
ALLOWED_FILTER = "allowed/#"  # the only filter subscribe_acl_broker lets anyone subscribe to
_DYNSEC_GLOBS = ("/usr/lib/*/mosquitto_dynamic_security.so", "/usr/lib/mosquitto_dynamic_security.so",
                 "/usr/local/lib/mosquitto_dynamic_security.so")


def _need_mosquitto() -> None:
    need(mosquitto_binary() is not None, "mosquitto is not installed (apt-get install mosquitto)")


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


def _dynsec_plugin() -> str | None:
    found = [p for g in _DYNSEC_GLOBS for p in sorted(glob.glob(g))]
    return found[0] if found else None


@pytest.fixture
def subscribe_acl_broker(tmp_path: Path) -> Iterator[Broker]:
    """An anonymous mosquitto that grants subscriptions under ``ALLOWED_FILTER`` only."""
    _need_mosquitto()
    plugin = _dynsec_plugin()
    need(plugin, "mosquitto's dynamic-security plugin is missing (it ships with Debian's mosquitto)")
    b = Broker(tmp_path / "subscribe-acl-broker")
    rules = b.workdir / "dynamic-security.json"
    rules.write_text(json.dumps({
        # Publishing and receiving stay open: only the SUBSCRIBE check is under test.
        "defaultACLAccess": {"publishClientSend": True, "publishClientReceive": True,
                             "subscribe": False, "unsubscribe": True},
        "clients": [], "anonymousGroup": "anonymous",
        "groups": [{"groupname": "anonymous", "roles": [{"rolename": "allowed"}]}],
        "roles": [{"rolename": "allowed", "acls": [
            {"acltype": "subscribePattern", "topic": ALLOWED_FILTER, "priority": 0, "allow": True}]}],
    }))
    conf = b.conf_file.read_text()
    assert "allow_anonymous true\n" in conf, conf
    b.conf_file.write_text(conf.replace("allow_anonymous true\n", "allow_anonymous true\n"
                                        f"plugin {plugin}\nplugin_opt_config_file {rules}\n"))
    b.start()
    try:
        yield b
    finally:
        b.stop()
