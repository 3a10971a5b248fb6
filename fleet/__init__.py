"""edgepack fleet: host-side fleet operations.

Inventory from the devices' retained births, states and health (:mod:`fleet.inventory`, a pure
fold), the remote command and inference client (:mod:`fleet.client`), the HTTP bundle server
(:mod:`fleet.serve`), a local mosquitto runner for demos and tests (:mod:`fleet.broker`) and the
``edgepack fleet`` / ``edgepack serve`` commands (:mod:`fleet.cli`). The fleet imports
:mod:`agent` (protocol, transport, bundle format); the agent never imports the fleet.
"""

from fleet.client import (
    DeviceBusyError,
    DeviceCommandError,
    DeviceInferenceError,
    DeviceInstallError,
    FleetClient,
)
from fleet.inventory import DeviceRecord, Inventory
from fleet.serve import BundleServer

__all__ = [
    "BundleServer",
    "DeviceBusyError",
    "DeviceCommandError",
    "DeviceInferenceError",
    "DeviceInstallError",
    "DeviceRecord",
    "FleetClient",
    "Inventory",
]
