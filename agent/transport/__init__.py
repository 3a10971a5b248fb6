"""Moving protocol messages between the fleet and devices.

:mod:`agent.transport.mqtt` is the only module that imports paho-mqtt; callers see
:class:`Message`, :class:`Will` and :class:`agent.errors.TransportError`.
"""

from agent.transport.mqtt import Message, MqttTransport, Will
from agent.transport.request import PendingRequest, RequestClient

__all__ = ["Message", "MqttTransport", "PendingRequest", "RequestClient", "Will"]
