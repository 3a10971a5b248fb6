"""Install and roll back on command (MQTT): download, verify + stage + switch, gate, commit | roll back.

Steps of one install, each reported as an event of the job: (1) the download is streamed
(``downloading``, resuming a dropped connection) straight into (2) the store, which verifies the
signed manifest before any payload, stages each file into its slot while hashing, checks the whole
download's sha256 at its end and switches (``verified``, ``installed``): the bundle is on disk once,
so a device needs its payload size plus a small margin, not twice that; a download interrupted by
a dropped connection resumes with ``Range``, and one interrupted by the agent's own death (or by a
network that gave up) resumes from its last checkpoint when the install is sent again
(``downloading`` with ``from_byte``; agent/partial.py); (3) the resident model is
swapped for the new bundle and benchmarked against the manifest's SLO (``benchmarked``, with the
figures), (4) commit (``committed``) or roll back and drop the failed model so the previous one
serves again (``rolled_back`` with the gate's figures when it was the SLO, then ``failed``).

Every failure says what is serving now, so an operator never has to guess.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

from agent._counters import Counters
from agent.errors import EdgepackError, InstallError
from agent.gate import GateConfig
from agent.protocol import InstallRequest, error_code
from agent.resident import ResidentModel
from agent.store import InstalledBundle, Store

log = logging.getLogger("agent.installer")

EventSink = Callable[..., None]  # (job, stage, **detail)

# Store event -> the job stage a host sees.
_STAGES = {"resumed": "downloading", "verified": "verified", "switched": "installed",
           "committed": "committed", "rolled_back": "rolled_back"}


def serving_now(store: Store) -> str:
    """A human phrase for what serves now: ``"gemma v2 (slot ab12...)"`` or ``"nothing ..."``."""
    return store.serving()


class Installer:
    """Carries out install and rollback commands against the store and the resident model.

    Args:
        store: the device's bundle store.
        model: the resident model an install swaps.
        events: receives ``(job, stage, **detail)`` for each step.
        gate: the post-install gate configuration.
        load_check: load (and gate) a new bundle before committing it.
        download_timeout: seconds without download progress before a retry.
        stop: set when the agent stops; an ongoing download ends.
        counters: ``install_errors`` is counted here.
        clock: epoch seconds, for ``last_install``.
    """

    def __init__(self, store: Store, model: ResidentModel, *, events: EventSink,
                 gate: GateConfig | None = None, load_check: bool = True,
                 download_timeout: float = 30.0, stop: threading.Event | None = None,
                 counters: Counters | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.model = model
        self._events = events
        self.gate = gate or GateConfig()
        self.load_check = load_check
        self.download_timeout = download_timeout
        self._stop = stop or threading.Event()
        self.counters = counters or Counters()
        self.clock = clock
        self.last_install: dict[str, Any] | None = None
        self.last_gate: dict[str, Any] | None = None  # the last post-install benchmark's report

    def install(self, req: InstallRequest, job_id: str) -> dict[str, Any]:
        """Download, verify, install and gate one bundle.

        Returns:
            ``{installed, previous, already_installed, check, seconds}``.

        Raises:
            EdgepackError: any step failed (the ``failed`` event is sent first); an
                :class:`InstallError` with ``rolled_back`` when the new bundle was switched back.
                Its ``serving`` (and ``diagnostics()``) names what serves now, or that nothing does.
        """
        from agent.fetch import open_download

        # Older agents downloaded into state/downloads before staging (two copies on disk): what
        # they left there is only taking the space an install now needs.
        shutil.rmtree(self.store.state_dir / "downloads", ignore_errors=True)
        t0 = time.monotonic()
        last = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if now - last[0] >= 1.0 or done == total:
                last[0] = now
                self._events(job_id, "downloading", bytes=done, total=total)

        self._events(job_id, "downloading", url=req.url, total=req.size)
        gate: dict[str, Any] = {}  # this install's gate report, for the rolled_back event

        def on_gate(report: dict[str, Any]) -> None:
            gate.update(report)
            self._events(job_id, "benchmarked", **report)

        def on_store_event(name: str, data: dict[str, Any]) -> None:
            stage = _STAGES.get(name)
            if stage == "rolled_back" and gate:
                data = {**data, "gate": dict(gate)}  # the measured numbers that failed
            if stage:
                self._events(job_id, stage, **data)

        def check(bundle: InstalledBundle) -> dict[str, Any]:
            return self._gate(bundle, on_gate)

        def open_stream(start: int, prefix: Any) -> Any:
            return open_download(req.url, sha256=req.sha256, size=req.size, progress=progress,
                                 timeout=self.download_timeout, cancel=self._stop, start=start,
                                 prefix=prefix)

        try:
            res = self.store.install_download(req.sha256, req.size, open_stream,
                                              load_check=check if self.load_check else None,
                                              on_event=on_store_event)
        except EdgepackError as e:
            self.counters.incr("install_errors")
            rolled_back = isinstance(e, InstallError) and e.rolled_back
            if rolled_back:
                self.model.drop()  # the failed model was resident: the next request reloads current
            serving = serving_now(self.store)
            e.serving = serving  # a download failure too: the error names what still serves
            self._events(job_id, "failed", code=error_code(e), reason=str(e), rolled_back=rolled_back,
                         serving=serving)
            self.last_install = {"ok": False, "code": error_code(e), "reason": str(e),
                                 "serving": serving, "ts": self.clock()}
            raise
        if not self.load_check:
            self.model.drop()
        if res.check and not res.already_installed:
            # Kept beside the bundle: the device's own figures on it are the baseline a rollout
            # compares the next bundle with (birth carries them), across restarts.
            self.store.record_gate(res.bundle.slot, {**res.check, "ts": self.clock()})
        self.last_install = {"ok": True, "slot": res.bundle.slot, "ts": self.clock()}
        return {"installed": res.bundle.summary(),
                "previous": res.previous.summary() if res.previous else None,
                "already_installed": res.already_installed, "check": res.check,
                "seconds": round(time.monotonic() - t0, 2)}

    def rollback(self, *, from_digest: str | None = None) -> dict[str, Any]:
        """Make the previous bundle current and drop the resident model (it reloads lazily).

        Args:
            from_digest: roll back only if the bundle with this manifest digest is current; if
                another one is, nothing changes (``rolled_back: False`` and the reason).

        Returns:
            ``{"current": summary, "rolled_back": bool}`` (and ``reason`` when nothing changed).

        Raises:
            StoreError: there is no previous bundle (nothing changed; ``serving`` says what serves).
        """
        if from_digest is not None:
            cur = self.store.current()
            if cur is None or cur.digest != from_digest:
                return {"current": cur.summary() if cur else None, "rolled_back": False,
                        "reason": f"the bundle {from_digest[:16]} is not current here; nothing changed"}
        b = self.store.rollback()
        self.model.drop()
        return {"current": b.summary(), "rolled_back": True}

    def _gate(self, bundle: InstalledBundle, on_gate: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        def record(report: dict[str, Any]) -> None:
            self.last_gate = {"slot": bundle.slot, **report, "ts": self.clock()}
            on_gate(report)

        return self.model.load_and_gate(bundle, self.gate, on_gate=record)


__all__ = ["Installer", "serving_now"]
