"""Thread-safe named counters for health and status (several threads count into one set)."""

from __future__ import annotations

import threading
from collections.abc import Iterable


class Counters:
    """Integer counters by name; :meth:`snapshot` is a consistent copy."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, int] = dict.fromkeys(names, 0)

    def incr(self, name: str, by: int = 1) -> None:
        with self._lock:
            self._values[name] = self._values.get(name, 0) + by

    def __getitem__(self, name: str) -> int:
        with self._lock:
            return self._values.get(name, 0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)
