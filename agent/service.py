"""The agent's systemd unit and env file, rendered and installed by ``edgepack-agent install-service``.

:data:`UNIT_TEMPLATE` is byte-for-byte ``systemd/edgepack-agent.service`` (a test keeps them equal);
only its ``ExecStart=`` line changes, to the path the agent is installed at. Settings go to
``/etc/edgepack/agent.env`` (mode 0600: it may hold broker credentials), read by systemd through
``EnvironmentFile=``. Both files are written atomically, so a crash never leaves half a unit.
Accelerator device nodes need group membership; groups that exist on this machine are granted in
a drop-in (naming a missing group in the unit itself would make the service fail to start).
"""

from __future__ import annotations

import contextlib
import grp
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from agent._fs import atomic_write
from agent.errors import InstallError

__all__ = [
    "DEFAULT_ENV_PATH", "DEFAULT_UNIT_DIR", "UNIT_NAME", "UNIT_TEMPLATE",
    "install_service", "render_env", "render_unit",
]

UNIT_NAME = "edgepack-agent.service"
DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
DEFAULT_ENV_PATH = Path("/etc/edgepack/agent.env")
DEFAULT_EXEC = "/usr/local/bin/edgepack-agent"
ACCEL_GROUPS = ("render", "video")  # owners of /dev/dri/*, /dev/accel/* on Debian, Ubuntu, Fedora
_DROPIN_NAME = "10-accelerators.conf"
_ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_GROUP_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_SAFE_EXEC_RE = re.compile(r"/[A-Za-z0-9_./+-]*")

UNIT_TEMPLATE = """# edgepack device agent: verified model installs over MQTT, then local inference.
# Installed by `edgepack-agent install-service` (see systemd/README.md); settings come from
# /etc/edgepack/agent.env (EDGEPACK_* variables, mode 0600: it may hold broker credentials).
# Keep agent/service.py's UNIT_TEMPLATE identical to this file (a test enforces it).

[Unit]
Description=edgepack agent (signed model installs and on-device inference)
Wants=network-online.target
After=network-online.target

[Service]
# The agent sends READY=1 once connected and WATCHDOG=1 from its main loop (agent/_systemd.py).
Type=notify
NotifyAccess=main
ExecStart=/usr/local/bin/edgepack-agent run
EnvironmentFile=-/etc/edgepack/agent.env
WatchdogSec=30
Restart=on-failure
RestartSec=5
# An install (hash + fsync of a few hundred MB) must not be cut short by a stop.
TimeoutStopSec=60

# A transient system user: nothing to create on the device, and the agent owns only its state.
# systemd chowns the state directory to it; models live in /var/lib/edgepack-agent.
DynamicUser=yes
StateDirectory=edgepack-agent
StateDirectoryMode=0750
UMask=0027
LimitNOFILE=4096

# Filesystem: read-only OS, no home directories, private /tmp.
ProtectSystem=strict
ProtectHome=yes
PrivateMounts=yes
PrivateTmp=yes

# Devices: NOT PrivateDevices=yes. It gives the service a /dev with only pseudo devices, which
# hides the accelerators the runtimes need (Intel NPU /dev/accel/*, GPUs /dev/dri/*, NVIDIA
# /dev/nvidia*). Instead the device cgroup allows pseudo devices plus these character-device
# groups (names from /proc/devices; a group absent on this machine is simply skipped).
# Access also needs group membership (render/video): `install-service` writes a drop-in with
# SupplementaryGroups= for the groups that exist, because naming a missing group fails the start.
DevicePolicy=closed
DeviceAllow=char-drm rw
DeviceAllow=char-accel rw
DeviceAllow=char-nvidia-frontend rw
DeviceAllow=char-nvidia-uvm rw
DeviceAllow=char-nvidia-caps rw

# Privileges and kernel surfaces.
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictSUIDSGID=yes
RestrictRealtime=yes
RestrictNamespaces=yes
LockPersonality=yes
RemoveIPC=yes
# MQTT and bundle downloads need IP; AF_UNIX for sd_notify and the journal.
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
# W+X memory stays allowed: OpenVINO's CPU plugin (oneDNN/Xbyak), onnxruntime's MLAS kernels on
# some builds, the NVIDIA driver and libffi closures (ctypes callbacks) generate code at run time;
# MemoryDenyWriteExecute=yes would make model loads fail on exactly the devices we target.
MemoryDenyWriteExecute=no
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
# A filtered call fails with EPERM instead of killing the agent mid-install.
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
"""

_DEFAULT_EXEC_LINE = f"ExecStart={DEFAULT_EXEC} run\n"


def render_unit(exec_path: str) -> str:
    """The unit text with ``ExecStart=<exec_path> run``; otherwise identical to :data:`UNIT_TEMPLATE`.

    Args:
        exec_path: absolute path of the ``edgepack-agent`` executable.

    Returns:
        The unit file's text.

    Raises:
        InstallError: ``exec_path`` is not absolute or holds characters systemd would interpret
            (spaces, quotes, ``%`` specifiers, ``$``).
    """
    if not _SAFE_EXEC_RE.fullmatch(exec_path):
        raise InstallError(
            f"cannot use {exec_path!r} in ExecStart=: it must be an absolute path of letters, "
            "digits and ._+-/", step="service",
        )
    assert UNIT_TEMPLATE.count(_DEFAULT_EXEC_LINE) == 1  # the template is ours; a test pins it
    return UNIT_TEMPLATE.replace(_DEFAULT_EXEC_LINE, f"ExecStart={exec_path} run\n")


def render_env(settings: Mapping[str, str]) -> str:
    """An ``EnvironmentFile=`` for ``settings``: one ``KEY="value"`` line each, sorted by key.

    Values are double-quoted with backslash, double quote, dollar and backquote escaped by a
    backslash, which systemd and POSIX shells both read back verbatim.

    Args:
        settings: variable names (``[A-Za-z_][A-Za-z0-9_]*``) to values.

    Returns:
        The file's text.

    Raises:
        InstallError: a name is not a valid variable name, or a value holds a control character
            such as a newline (an env file cannot carry it safely).
    """
    lines = ["# edgepack agent settings, read by systemd (EnvironmentFile=). Written by install-service."]
    for key in sorted(settings):
        value = settings[key]
        if not _ENV_KEY_RE.fullmatch(key):
            raise InstallError(f"not a valid environment variable name: {key!r}", step="service")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise InstallError(f"value of {key} holds a control character", step="service")
        quoted = "".join("\\" + c if c in '\\"$`' else c for c in value)
        lines.append(f'{key}="{quoted}"')
    return "\n".join(lines) + "\n"


def install_service(
    exec_path: str,
    env: Mapping[str, str],
    unit_dir: Path = DEFAULT_UNIT_DIR,
    env_path: Path = DEFAULT_ENV_PATH,
    *,
    accel_groups: Sequence[str] | None = None,
) -> tuple[Path, Path]:
    """Write the unit and its env file atomically (the caller runs ``systemctl daemon-reload``).

    Args:
        exec_path: absolute path of the ``edgepack-agent`` executable.
        env: the EDGEPACK_* settings for the env file.
        unit_dir: where units live (``/etc/systemd/system``).
        env_path: the env file; written with mode 0600 because it may hold broker credentials.
        accel_groups: supplementary groups for accelerator devices, granted in the drop-in
            ``<unit_dir>/edgepack-agent.service.d/10-accelerators.conf``; None picks those of
            ``render`` and ``video`` that exist here; empty removes the drop-in.

    Returns:
        ``(unit_path, env_path)``.

    Raises:
        InstallError: a bad ``exec_path`` or setting (see :func:`render_unit`, :func:`render_env`)
            or a file that cannot be written (e.g. not run as root).
    """
    unit_text = render_unit(exec_path)
    env_text = render_env(env)
    groups = list(accel_groups) if accel_groups is not None else _existing_groups(ACCEL_GROUPS)
    for g in groups:
        if not _GROUP_RE.fullmatch(g):
            raise InstallError(f"not a valid group name: {g!r}", step="service")
    unit_path = Path(unit_dir) / UNIT_NAME
    env_path = Path(env_path)
    dropin = Path(unit_dir) / f"{UNIT_NAME}.d" / _DROPIN_NAME
    try:
        env_path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        atomic_write(env_path, env_text.encode(), mode=0o600)
        if groups:
            dropin.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            atomic_write(dropin, _render_dropin(groups).encode(), mode=0o644)
        else:
            with contextlib.suppress(FileNotFoundError):
                dropin.unlink()
        # The unit last: once it exists, everything it refers to is in place.
        Path(unit_dir).mkdir(mode=0o755, parents=True, exist_ok=True)
        atomic_write(unit_path, unit_text.encode(), mode=0o644)
    except OSError as e:
        raise InstallError(f"cannot install the service: {e}", step="service",
                           hint="Run install-service as root.") from e
    return unit_path, env_path


def _render_dropin(groups: Sequence[str]) -> str:
    return (
        "# Written by edgepack-agent install-service: device groups that exist on this machine,\n"
        "# so the agent may open the accelerators its unit's DeviceAllow= lines permit.\n"
        "[Service]\n"
        f"SupplementaryGroups={' '.join(groups)}\n"
    )


def _existing_groups(names: Sequence[str]) -> list[str]:
    found = []
    for name in names:
        with contextlib.suppress(KeyError):
            grp.getgrnam(name)
            found.append(name)
    return found
