"""The device config an enrollment writes (``edgepack fleet enroll``) and the agent reads.

One JSON file holds what a device needs to join its fleet: the broker URL, its own broker user
name and password, the fleet and device ids, the broker's CA and the keyring to trust.
``edgepack-agent run --config FILE`` and ``install-service --config FILE`` take their MQTT
settings from it. It holds a secret: it is written 0600 and must be copied to the device as such.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.errors import EdgepackError
from agent.protocol import DeviceId, ProtocolError

CONFIG_FORMAT = "edgepack-device/1"
MAX_CONFIG_BYTES = 64 << 10


class DeviceConfigError(EdgepackError):
    """A device config file is unreadable or malformed."""

    hint = "Make a new one with 'edgepack fleet enroll DEVICE'."


@dataclass(frozen=True)
class DeviceConfig:
    """What one enrolled device needs (validated on construction).

    Raises:
        DeviceConfigError: a malformed id, URL or field.
    """

    broker: str
    fleet: str
    device: str
    username: str
    password: str
    ca_file: str | None = None  # path on the device
    keyring: str | None = None  # path on the device

    def __post_init__(self) -> None:
        try:
            DeviceId(self.fleet, self.device)
        except ProtocolError as e:
            raise DeviceConfigError(f"device config: {e}") from None
        if not isinstance(self.broker, str) or not self.broker.startswith(("mqtt://", "mqtts://")):
            raise DeviceConfigError(f"device config: broker {self.broker!r} is not mqtt(s)://")
        for name in ("username", "password"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v or len(v) > 256:
                raise DeviceConfigError(f"device config: {name} must be a non-empty string")
        for name in ("ca_file", "keyring"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise DeviceConfigError(f"device config: {name} must be a path or null")

    def to_bytes(self) -> bytes:
        return (json.dumps({"format": CONFIG_FORMAT, **asdict(self)}, indent=2) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> DeviceConfig:
        """Parse a config file (unknown fields ignored, for newer hosts).

        Raises:
            DeviceConfigError: not a device config.
        """
        try:
            d: Any = json.loads(data[:MAX_CONFIG_BYTES + 1].decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise DeviceConfigError(f"device config is not JSON: {e}") from None
        if len(data) > MAX_CONFIG_BYTES or not isinstance(d, dict) or d.get("format") != CONFIG_FORMAT:
            raise DeviceConfigError(f"not a device config (format {CONFIG_FORMAT!r})")
        try:
            return cls(d.get("broker", ""), d.get("fleet", ""), d.get("device", ""),
                       d.get("username", ""), d.get("password", ""), d.get("ca_file"),
                       d.get("keyring"))
        except TypeError as e:
            raise DeviceConfigError(f"device config: {e}") from None


def load_device_config(path: Path | str) -> DeviceConfig:
    """Read a device config file.

    Raises:
        DeviceConfigError: unreadable or malformed.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DeviceConfigError(f"cannot read device config {path}: {e}") from e
    return DeviceConfig.from_bytes(data)


__all__ = ["CONFIG_FORMAT", "DeviceConfig", "DeviceConfigError", "load_device_config"]
