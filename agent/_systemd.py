"""sd_notify without libsystemd: readiness, status and watchdog pings for a Type=notify unit.

systemd names a datagram socket in ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract
namespace); each notification is one datagram of ``KEY=VALUE`` lines. Outside systemd there is no
socket and every call returns False, so the daemon calls these unconditionally. A failed send
never raises: a missed status line must not take the agent down (a missed watchdog ping is what
the watchdog is for).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("agent.systemd")

__all__ = ["notify", "ready", "status", "stopping", "watchdog", "watchdog_interval"]


def _socket_address(raw: str) -> str | bytes | None:
    if raw.startswith("@"):
        # Abstract namespace: the name begins with a NUL byte instead of "@" (sd_notify(3)).
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    return None  # vsock ("vsock:...") and other forms are not used on our devices


def notify(state: str, *, env: Mapping[str, str] = os.environ) -> bool:
    """Send one notification (e.g. ``"READY=1\\nSTATUS=serving"``) to systemd.

    Args:
        state: newline-separated ``KEY=VALUE`` assignments, as in sd_notify(3).
        env: the environment to read ``NOTIFY_SOCKET`` from (tests pass their own).

    Returns:
        True if the datagram was sent; False when not under systemd or the send failed.
        Never raises: notifications are best effort.
    """
    raw = env.get("NOTIFY_SOCKET", "")
    address = _socket_address(raw) if raw else None
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(1.0)  # systemd reads at once; never let a full queue stall the agent
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as e:  # tolerated: the service keeps working without systemd's bookkeeping
        log.debug("sd_notify to %s failed: %s", raw, e)
        return False
    return True


def ready(status_text: str = "", *, env: Mapping[str, str] = os.environ) -> bool:
    """Tell systemd start-up is complete (``READY=1``), optionally with a status line.

    Returns:
        True if sent (see :func:`notify`).
    """
    msg = "READY=1" + (f"\nSTATUS={_one_line(status_text)}" if status_text else "")
    return notify(msg, env=env)


def status(text: str, *, env: Mapping[str, str] = os.environ) -> bool:
    """Set the free-form status shown by ``systemctl status``.

    Returns:
        True if sent (see :func:`notify`).
    """
    return notify(f"STATUS={_one_line(text)}", env=env)


def watchdog(*, env: Mapping[str, str] = os.environ) -> bool:
    """Ping the watchdog (``WATCHDOG=1``); call it at least every :func:`watchdog_interval`.

    Returns:
        True if sent (see :func:`notify`).
    """
    return notify("WATCHDOG=1", env=env)


def stopping(status_text: str = "", *, env: Mapping[str, str] = os.environ) -> bool:
    """Tell systemd the agent is shutting down (``STOPPING=1``).

    Returns:
        True if sent (see :func:`notify`).
    """
    msg = "STOPPING=1" + (f"\nSTATUS={_one_line(status_text)}" if status_text else "")
    return notify(msg, env=env)


def watchdog_interval(env: Mapping[str, str] = os.environ) -> float | None:
    """How often to ping, in seconds: half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises.

    Args:
        env: the environment holding ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

    Returns:
        The ping interval in seconds, or None when the watchdog is off, the value is malformed,
        or ``WATCHDOG_PID`` names another process (the variables were inherited, not meant for us).
    """
    raw_usec = env.get("WATCHDOG_USEC", "")
    try:
        usec = int(raw_usec)
    except ValueError:
        return None
    if usec <= 0:
        return None
    raw_pid = env.get("WATCHDOG_PID", "")
    if raw_pid:
        try:
            if int(raw_pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 2_000_000


def _one_line(text: str) -> str:
    # A newline would start a new assignment that systemd would try to interpret.
    return " ".join(text.splitlines())
