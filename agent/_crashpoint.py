"""Test hook: numbered crash points in the install and rollback paths. A no-op in production.

Every step that changes the disk during an install or a rollback (each file created, each MiB
staged, each fsync and rename, each pointer write) calls :func:`crash_point` with a name. Nothing
happens unless one of two environment variables is set when the process starts:

``EDGEPACK_TEST_CRASH_AT=N``
    the process sends itself SIGKILL at the N-th crash point (1-based): no ``finally`` clause,
    no ``except``, no flush runs, exactly as when the power fails or the OOM killer strikes.
``EDGEPACK_TEST_CRASH_TRACE=FILE``
    append ``<n> <name>`` per crash point to FILE, so a test can count a run's points and then
    kill a fresh run at each of them (tests/integration/test_crash_points.py).

The count is per process, which is the unit a crash kills; the variables are read once.
"""

from __future__ import annotations

import os
import signal

_ENV_AT = "EDGEPACK_TEST_CRASH_AT"
_ENV_TRACE = "EDGEPACK_TEST_CRASH_TRACE"


class _Hook:
    def __init__(self) -> None:
        at = os.environ.get(_ENV_AT, "")
        self.at = int(at) if at.strip().isdigit() else 0  # 0: never kill
        self.trace = os.environ.get(_ENV_TRACE) or None
        self.active = bool(self.at or self.trace)
        self.count = 0

    def step(self, name: str) -> None:
        self.count += 1
        if self.trace:
            # One short O_APPEND write per point: it survives the SIGKILL that may follow.
            fd = os.open(self.trace, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{self.count} {name}\n".encode())
            finally:
                os.close(fd)
        if self.count == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


_hook: _Hook | None = None


def crash_point(name: str) -> None:
    """Mark one step; under ``EDGEPACK_TEST_CRASH_AT`` the N-th call kills this process."""
    global _hook
    if _hook is None:
        _hook = _Hook()
    if _hook.active:
        _hook.step(name)
