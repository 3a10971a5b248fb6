"""The job journal across restarts (agent/jobs.py): a job a dead process was running reads
``interrupted``, and the host is told of it once — by the first process that reaches the broker,
even when the one right after the death died too before it could."""

from __future__ import annotations

from pathlib import Path

from agent.jobs import JobJournal


def test_an_interrupted_job_is_listed_until_the_host_is_told(tmp_path: Path) -> None:
    path = tmp_path / "jobs.json"
    j = JobJournal(path)
    j.start("ro-1.dev.1", "install", 1.0)
    j.start("rb-1", "rollback", 2.0)
    j.finish("rb-1", {"ok": True}, 3.0)
    # killed here; the next process dies too before it reaches the broker
    assert JobJournal(path).interrupted == [("ro-1.dev.1", "install")]
    again = JobJournal(path)
    assert again.interrupted == [("ro-1.dev.1", "install")]
    assert again.get("ro-1.dev.1")["state"] == "interrupted"  # type: ignore[index]
    again.told(["ro-1.dev.1"])
    assert again.interrupted == []
    assert JobJournal(path).interrupted == []  # told once, not on every start
    assert JobJournal(path).finished("ro-1.dev.1") is None  # sent again, it still runs again
