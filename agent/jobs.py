"""The journal of named jobs (installs and rollbacks a host sent with a ``job`` id).

A rollout names every install it sends after itself and the device. When the controller restarts
it sends again what it had in flight; the journal lets the agent answer a job it already finished
with the recorded outcome instead of executing it twice.

States: ``running`` (written before the job starts), then ``done`` or ``failed`` with the reply
that was sent. A journal found with a ``running`` job on start-up belongs to a process that died
mid-job: the store's recovery has already undone or finished the step, and the job reads
``interrupted`` — sent again, it runs again, because it never completed (an install then resumes
what it had staged: agent/partial.py). The jobs interrupted by this start are listed in
:attr:`JobJournal.interrupted`, so the daemon can tell the host once instead of leaving it to wait
for its timeout.

The file is small JSON written atomically (:func:`agent._fs.atomic_write`); the oldest entries are
dropped beyond :data:`MAX_JOBS`.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from agent._fs import atomic_write

log = logging.getLogger("agent.jobs")

MAX_JOBS = 1024  # a rollout of a few hundred attempts per device would still be remembered


class JobJournal:
    """Outcomes of named jobs, persisted under the agent's state folder.

    Args:
        path: the journal file (created on first write).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._jobs: dict[str, dict[str, Any]] = self._read()
        interrupted = [j for j, e in self._jobs.items() if e.get("state") == "running"]
        for j in interrupted:
            self._jobs[j]["state"] = "interrupted"
        if interrupted:
            log.warning("jobs interrupted by a restart: %s", ", ".join(interrupted))
            self._write()
        # (job, command) of interrupted jobs the host was not told of yet (a process may die
        # again before it reaches the broker: those are told by the next one).
        self.interrupted: list[tuple[str, str]] = [
            (j, str(e.get("command", "?"))) for j, e in self._jobs.items()
            if e.get("state") == "interrupted" and not e.get("told")]

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            doc = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            # Written atomically, so this is damage from outside; losing it only means a resent
            # job runs again (the store still refuses a downgrade or a second install of the same).
            log.warning("job journal %s unreadable (%s): starting a new one", self.path, e)
            return {}
        jobs = doc.get("jobs") if isinstance(doc, dict) else None
        return {str(k): v for k, v in jobs.items() if isinstance(v, dict)} if isinstance(jobs, dict) else {}

    def _write(self) -> None:
        while len(self._jobs) > MAX_JOBS:
            self._jobs.pop(next(iter(self._jobs)))
        atomic_write(self.path, json.dumps({"jobs": self._jobs}, separators=(",", ":")).encode())

    def get(self, job: str) -> dict[str, Any] | None:
        """The journal entry ``{"command", "state", "reply"?, "ts"}`` of ``job``, or None."""
        with self._lock:
            entry = self._jobs.get(job)
            return dict(entry) if entry is not None else None

    def finished(self, job: str) -> dict[str, Any] | None:
        """The recorded reply of a job that completed (``done`` or ``failed``), else None."""
        entry = self.get(job)
        if entry is None or entry.get("state") not in ("done", "failed"):
            return None
        reply = entry.get("reply")
        return reply if isinstance(reply, dict) else None

    def told(self, jobs: list[str]) -> None:
        """The host was told these interrupted jobs ended: not again on the next start."""
        with self._lock:
            for j in jobs:
                if j in self._jobs:
                    self._jobs[j]["told"] = True
            self.interrupted = [(j, c) for j, c in self.interrupted if j not in jobs]
            if jobs:
                self._write()

    def start(self, job: str, command: str, ts: float) -> None:
        with self._lock:
            self._jobs.pop(job, None)  # re-inserted last: it is the newest
            self._jobs[job] = {"command": command, "state": "running", "ts": ts}
            self._write()

    def finish(self, job: str, reply: dict[str, Any], ts: float) -> None:
        """Record the reply sent for ``job`` (``reply["ok"]`` says done or failed)."""
        with self._lock:
            entry = self._jobs.setdefault(job, {"command": "?"})
            entry.update(state="done" if reply.get("ok") else "failed", reply=reply, ts=ts)
            self._write()


__all__ = ["MAX_JOBS", "JobJournal"]
