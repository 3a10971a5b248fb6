"""``edgepack fleet enroll`` / ``fleet revoke``: a device's own broker credentials, and their end.

Uses mosquitto's own mechanisms (Debian's 2.0.11): the ``password_file`` (PBKDF2-SHA512 ``$7$``
lines, written here) and the ``acl_file`` whose ``pattern`` lines, keyed by the authenticated user
name (``%u``), confine every device to its own subtree (fleet/broker.py :func:`acl_text`); a
SIGHUP makes mosquitto re-read both and drop connected clients whose credentials are gone
(measured with 2.0.11: it drops them without publishing their last will, so a revoked device's
retained ``state`` still reads ``online``; the inventory's health age shows it went quiet).
Host (controller) users are separate accounts with their own lines; a device's user name is its
device id, so it can never act as another device or as a host.

Enroll: (1) refuse a device id that is already enrolled (unless ``--force``), (2) make a random
password, (3) replace the password file atomically with the new line added, (4) make sure the
ACL file holds the device patterns, (5) reload the broker, (6) write the device config (0600).
Revoke: (1) remove the line atomically, (2) reload: the device is disconnected and refused from
then on. Other MQTT 5 brokers have the same two pieces under other names (EMQX's built-in
database + ACL, HiveMQ's file RBAC, VerneMQ's vmq_passwd + vmq_acl): create a user per device and
grant it ``edgepack/v1/<fleet>/<device>/#`` as the patterns below do.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
from pathlib import Path

from agent._cli import dump, err
from agent._fs import atomic_write
from agent.device_config import DeviceConfig
from agent.errors import EdgepackError
from agent.protocol import DeviceId
from fleet.broker import acl_text, password_line

__all__ = ["add_arguments", "enroll", "reload_broker", "revoke"]


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise EdgepackError(f"cannot read {path}: {e}") from e


def enroll(passwd: Path, device: str, *, fleet: str, broker_url: str, acl: Path | None = None,
           ca_file: str | None = None, keyring: str | None = None,
           force: bool = False) -> DeviceConfig:
    """Give ``device`` its own broker account and return its config (not written here).

    Args:
        passwd: mosquitto's ``password_file``.
        device: the device id (its broker user name).
        fleet, broker_url: what the device joins.
        acl: mosquitto's ``acl_file``; the device patterns are appended if missing.
        ca_file, keyring: paths on the device, written into its config.
        force: replace an existing account (a new password; the old one stops working).

    Raises:
        ProtocolError: a malformed device or fleet id.
        EdgepackError: already enrolled, or a file cannot be written.
    """
    DeviceId(fleet, device)
    lines = _lines(passwd)
    mine = [ln for ln in lines if ln.split(":", 1)[0] == device]
    if mine and not force:
        raise EdgepackError(f"{device} is already enrolled in {passwd}",
                            hint="Use --force for new credentials, or 'edgepack fleet revoke'.")
    password = secrets.token_urlsafe(24)
    kept = [ln for ln in lines if ln.split(":", 1)[0] != device]
    atomic_write(passwd, ("\n".join([*kept, password_line(device, password)]) + "\n").encode(), mode=0o600)
    if acl is not None:
        text = "\n".join(_lines(acl))
        patterns = [ln for ln in acl_text(()).splitlines() if ln.startswith("pattern ")]
        missing = [p for p in patterns if p not in text.splitlines()]
        if missing:
            # Patterns first: in mosquitto's acl_file a "user" block runs to the end of the file.
            atomic_write(acl, ("\n".join([*missing, text]) + "\n").encode(), mode=0o600)
    return DeviceConfig(broker_url, fleet, device, device, password, ca_file, keyring)


def revoke(passwd: Path, device: str) -> bool:
    """Remove ``device``'s broker account; True if it had one.

    Raises:
        EdgepackError: the file cannot be written.
    """
    lines = _lines(passwd)
    kept = [ln for ln in lines if ln.split(":", 1)[0] != device]
    if len(kept) == len(lines):
        return False
    atomic_write(passwd, ("\n".join(kept) + "\n").encode() if kept else b"", mode=0o600)
    return True


def reload_broker(pid_file: Path) -> None:
    """SIGHUP the mosquitto whose pid is in ``pid_file`` (it re-reads passwords and ACLs).

    Raises:
        EdgepackError: no such pid file or process.
    """
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as e:
        raise EdgepackError(f"cannot reload the broker from {pid_file}: {e}",
                            hint="Reload it yourself: systemctl reload mosquitto "
                                 "(or kill -HUP its pid).") from e


def cmd_enroll(args: argparse.Namespace) -> int:
    cfg = enroll(Path(args.passwd), args.device, fleet=args.fleet, broker_url=args.broker,
                 acl=Path(args.acl) if args.acl else None, ca_file=args.device_ca,
                 keyring=args.device_keyring, force=args.force)
    if args.reload_pid:
        reload_broker(Path(args.reload_pid))
    out = Path(args.output or f"{args.device}.json")
    atomic_write(out, cfg.to_bytes(), mode=0o600)  # it holds the device's password
    if args.json:
        dump({"device": cfg.device, "fleet": cfg.fleet, "config": str(out)})
    else:
        err(f"enrolled {cfg.device} in fleet {cfg.fleet}; its config: {out} (secret: copy it to the "
            f"device, then 'edgepack-agent run --config {out.name}')")
    return 0


def mark_revoked(args: argparse.Namespace) -> str | None:
    """Set the device's retained ``state`` to ``revoked`` on the broker, as the host. Mosquitto
    drops a client whose account a reload removed without sending its last will, so its retained
    state would say ``online`` for good. Returns why it could not, or None."""
    import time

    from agent.protocol import Topics, state_payload
    from fleet.client import client_for

    try:
        with client_for(args) as client:
            client.transport.publish(Topics(args.fleet, args.device).state,
                                     state_payload("revoked", ts=time.time()), qos=1, retain=True,
                                     timeout=10.0)
    except EdgepackError as e:
        return str(e)
    return None


def cmd_revoke(args: argparse.Namespace) -> int:
    had = revoke(Path(args.passwd), args.device)
    if args.reload_pid:
        reload_broker(Path(args.reload_pid))
    unmarked = mark_revoked(args) if had else None
    if args.json:
        dump({"device": args.device, "revoked": had, "state_marked": had and unmarked is None})
    else:
        err(f"revoked {args.device}" if had else f"{args.device} was not enrolled")
    if unmarked:
        err(f"warning: {args.device}'s retained state was not set to revoked ({unmarked}); the "
            f"inventory may show it online until then: run again with the host's --broker "
            f"--username --password")
    return 0 if had else 1


def add_arguments(enroll_parser: argparse.ArgumentParser, revoke_parser: argparse.ArgumentParser) -> None:
    """The options of ``fleet enroll`` and ``fleet revoke`` (their common ones come from fleet/cli.py)."""
    for s, func in ((enroll_parser, cmd_enroll), (revoke_parser, cmd_revoke)):
        s.add_argument("device")
        s.add_argument("--passwd", required=True, help="mosquitto's password_file")
        s.add_argument("--reload-pid", metavar="PID_FILE",
                       help="SIGHUP the mosquitto whose pid_file this is, so the change applies now")
        s.set_defaults(func=func)
    e = enroll_parser
    e.add_argument("--acl", help="mosquitto's acl_file (the device patterns are added if missing)")
    e.add_argument("--device-ca", help="path of the broker's CA on the device, for mqtts://")
    e.add_argument("--device-keyring", help="path of the keyring on the device")
    e.add_argument("-o", "--output", help="where to write the device config (default DEVICE.json)")
    e.add_argument("--force", action="store_true", help="new credentials for an enrolled device")
