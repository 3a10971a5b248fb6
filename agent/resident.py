"""The one resident model: load a bundle, gate it, swap it between requests, close it.

This is the only place that holds "load a bundle and run the post-install gate on it": the CLI's
``install`` (a short-lived :class:`ResidentModel` inside the store's load check) and the daemon
(one long-lived instance shared by every inference door) both call :meth:`ResidentModel.load_and_gate`.

Invariants:
- At most one model is loaded: a load closes the previous model first (even if the new load fails).
- :attr:`ResidentModel.lock` is held by a generation for its whole stream and by a load, so a new
  bundle is swapped in between requests, never under one.
- After a rolled-back install, :meth:`drop` closes the failed model; the next request loads the
  current bundle again (lazily, in :meth:`ensure`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from agent.errors import GateFailedError
from agent.gate import GateConfig, run_gate
from agent.runtimes import runtime_for

if TYPE_CHECKING:
    from agent.runtimes import Runtime
    from agent.store import InstalledBundle

GateSink = Callable[[dict[str, Any]], None]


class ResidentModel:
    """Holds the agent's one loaded model.

    Args:
        threads: overrides every bundle's thread count (None: the manifest's).
    """

    def __init__(self, *, threads: int | None = None) -> None:
        self.threads = threads
        self.lock = threading.Lock()
        self._runtime: Runtime | None = None
        self._slot: str | None = None

    @property
    def slot(self) -> str | None:
        """The slot of the loaded bundle, or None when nothing is loaded."""
        return self._slot

    @property
    def runtime(self) -> Runtime | None:
        return self._runtime

    def ensure(self, bundle: InstalledBundle) -> Runtime:
        """The runtime with ``bundle`` loaded, loading it if another (or none) is resident.

        The caller holds :attr:`lock`.

        Raises:
            RuntimeUnavailableError: the bundle's runtime cannot run here.
            InferenceError: the model does not load.
        """
        if self._runtime is None or self._slot != bundle.slot:
            self._load_locked(bundle)
        assert self._runtime is not None
        return self._runtime

    def load_and_gate(self, bundle: InstalledBundle, gate: GateConfig | None = None, *,
                      on_gate: GateSink | None = None) -> dict[str, Any]:
        """Wait for the running generation, load ``bundle`` and run the post-install gate on it.

        Args:
            bundle: the freshly switched (pending) bundle.
            gate: how to benchmark and judge; the defaults (gate on, the manifest's SLO) when None.
            on_gate: receives the gate's report ({ok, ttft_ms, decode_tok_s, peak_rss_mb, tokens,
                decode_tokens, failures, thresholds, fidelity}), pass or fail, before this
                returns or raises.

        Returns:
            ``load_ms`` plus the gate's figures; the store commits with them.

        Raises:
            GateFailedError: an SLO was missed, or (:class:`~agent.errors.FidelityError`) the
                model computes other tokens than the build host (the store rolls back; call
                :meth:`drop` after).
            InferenceError: the model does not load or generates nothing.
            RuntimeUnavailableError: the bundle's runtime cannot run here.
        """
        gate = gate or GateConfig()
        with self.lock:
            load_ms = self._load_locked(bundle)
            assert self._runtime is not None
            try:
                checked = run_gate(self._runtime, bundle.manifest.slo, gate,
                                   bundle.manifest.fidelity)
            except GateFailedError as e:
                if on_gate is not None:
                    on_gate({"ok": False, **e.figures, "failures": list(e.failures),
                             "thresholds": e.thresholds,
                             **({"fidelity": e.fidelity} if e.fidelity is not None else {})})
                raise
            if gate.enabled and on_gate is not None:
                on_gate(checked)
            return {"load_ms": load_ms, **checked}

    def drop(self) -> None:
        """Close the loaded model (waiting for a running generation); the next request reloads."""
        with self.lock:
            self._close_locked()

    def cancel(self) -> None:
        """Ask a running generation to stop (any thread)."""
        rt = self._runtime
        if rt is not None:
            rt.cancel()

    def close(self) -> None:
        self.cancel()
        self.drop()

    def __enter__(self) -> ResidentModel:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _load_locked(self, bundle: InstalledBundle) -> float:
        self._close_locked()  # one model resident: close before loading the next
        rt, opts = runtime_for(bundle.manifest, threads=self.threads)
        t0 = time.perf_counter()
        rt.load(bundle.entrypoint, opts)
        self._runtime, self._slot = rt, bundle.slot
        return round((time.perf_counter() - t0) * 1000, 1)

    def _close_locked(self) -> None:
        rt, self._runtime, self._slot = self._runtime, None, None
        if rt is not None:
            rt.close()


__all__ = ["ResidentModel"]
