"""The test suite's broker is the product's own local mosquitto runner (fleet/broker.py)."""

from fleet.broker import (
    HOST,
    Broker,
    acl_text,
    free_port,
    make_tls_files,
    mosquitto_binary,
    password_line,
)

__all__ = ["HOST", "Broker", "acl_text", "free_port", "make_tls_files", "mosquitto_binary",
           "password_line"]
