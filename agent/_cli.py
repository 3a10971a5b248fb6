"""Plumbing shared by the two command lines (``edgepack-agent`` and ``edgepack``).

Human status goes to stderr (:func:`err`), machine output to stdout (:func:`dump`); only
:class:`~agent.errors.EdgepackError` is caught by :func:`dispatch`, printed with its hint, exit 1.
Logging is configured on our package loggers, never on the root logger.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from agent.errors import EdgepackError

PACKAGE_LOGGERS = ("agent", "packager", "fleet", "edgepack")


def err(msg: str) -> None:
    """One line of human status on stderr."""
    print(msg, file=sys.stderr, flush=True)


def dump(obj: Any) -> None:
    """One JSON document on stdout (stable key order, so scripts can diff it)."""
    print(json.dumps(obj, indent=2, sort_keys=True, default=str), flush=True)


def env(name: str, default: str | None = None) -> str | None:
    """``$EDGEPACK_<name>``, the default of a flag for systemd env files and scripts."""
    return os.environ.get(f"EDGEPACK_{name}", default)


def setup_logging(verbosity: int) -> None:
    """WARNING by default, INFO with ``-v``, DEBUG with ``-vv``, on our package loggers only."""
    level = logging.WARNING - 10 * min(verbosity, 2)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in PACKAGE_LOGGERS:
        lg = logging.getLogger(name)
        lg.setLevel(level)
        if not lg.handlers:
            lg.addHandler(handler)
    # Connects and disconnects are noise at the default level (they would interleave with
    # streamed tokens); -vv shows them.
    logging.getLogger("agent.transport").setLevel(level if verbosity >= 2 else logging.WARNING)


def dispatch(args: argparse.Namespace) -> int:
    """Run the parsed command; an EdgepackError is printed with its hint and gives exit code 1."""
    try:
        return int(args.func(args))
    except EdgepackError as e:
        err(f"error: {e}")
        if e.diagnostics():
            err(f"hint: {e.diagnostics()}")
        return 1
    except KeyboardInterrupt:
        err("interrupted")
        return 130
