"""The on-device fidelity check: does this device compute the tokens the build host computed?

A runtime, driver or accelerator that computes wrong produces fluent garbage and raises no error
(a wrong conversion raises none either), and a speed benchmark passes it. So: (1) at packaging time
the packager scores :data:`PROBE_TEXT` through the runtime that will serve the bundle
(:func:`probe_top1`: ``Runtime.evaluate_nll(PROBE_TEXT, window=PROBE_WINDOW)``) and writes the
variant's own top-1 next-token id at each of the first :data:`PROBE_POSITIONS` positions into the
manifest's ``fidelity`` table (:class:`~agent.bundle.Fidelity`) with the profile's threshold
(``[slo] min_agreement``); (2) after install the gate scores the same text with the loaded model
(:func:`check`); (3) :func:`judge` compares: the fraction of positions whose top-1 id matches is
the ``agreement``, and under the threshold the gate fails with
:class:`~agent.errors.FidelityError` (error code ``fidelity_failed``) and the install rolls back.

Invariants:
- :func:`agreement` and :func:`judge` are pure.
- The ids compared come from the same bundle (same weights, same tokenizer files) through the same
  runtime: only the device's computation differs. Teacher-forced scoring, not generation, so one
  early difference does not derail every later position.
- Not checked, and reported so (``checked: false`` with the reason), rather than failed: a bundle
  without a table (built before it existed), a table for another probe text (another agent
  version), or a threshold of 0.
- On OpenVINO the scoring model is compiled with f32 inference precision (see
  agent/runtimes/openvino.py): the check covers the device plugin and the weights, not the bf16
  kernels serving may use (on this project's AVX512-BF16 host both give the same 64 ids:
  bench/results/fidelity.md). The check frees that second model afterwards
  (``Runtime.release_scoring``).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from agent.errors import InferenceError

if TYPE_CHECKING:
    from agent.bundle import Fidelity
    from agent.runtimes import Runtime

# Fixed: every bundle's ids belong to this exact text (its sha256 is in the table). Plain English
# that no other fixed text here uses (the gate prompt, the evaluation text), 65 Gemma tokens: one
# window, one 64-position batch in each runtime, so the check costs one short forward pass.
PROBE_TEXT: Final = (
    "Every morning the baker on Mill Street opens her shop at six. She lights the ovens, mixes "
    "flour, water, salt and yeast, and shapes the dough into long loaves and small round rolls. "
    "By seven the first customers are waiting at the door: a nurse going home after the night "
    "shift and two students with heavy bags."
)
PROBE_SHA256: Final = hashlib.sha256(PROBE_TEXT.encode("utf-8")).hexdigest()
PROBE_POSITIONS: Final = 64  # ids recorded and compared: one mismatch moves the agreement by 1/64
PROBE_WINDOW: Final = 96  # tokens per scoring window: the whole probe for Gemma's tokenizer


def probe_top1(runtime: Runtime, window: int = PROBE_WINDOW) -> tuple[int, ...]:
    """The loaded model's top-1 next-token ids on the probe, first :data:`PROBE_POSITIONS`.

    Args:
        runtime: a runtime with the model loaded (held exclusively by the caller).
        window: the scoring window (a manifest's ``fidelity.window``).

    Returns:
        Up to :data:`PROBE_POSITIONS` token ids (fewer only if the tokenizer gives fewer tokens).

    Raises:
        InferenceError: scoring failed, or the runtime gives no top-1 ids.
    """
    result = runtime.evaluate_nll(PROBE_TEXT, window=window)
    if result.top1 is None:
        raise InferenceError(f"{runtime.name} gives no top-1 ids: the fidelity check needs them")
    return tuple(result.top1[:PROBE_POSITIONS])


def agreement(expected: Sequence[int], observed: Sequence[int]) -> float:
    """The fraction of ``expected`` positions whose id ``observed`` matches. Pure.

    A position ``observed`` lacks (a tokenizer that gives fewer tokens) counts as a mismatch.

    Raises:
        InferenceError: ``expected`` is empty.
    """
    if not expected:
        raise InferenceError("no expected ids to compare with")
    hits = sum(1 for i, t in enumerate(expected) if i < len(observed) and observed[i] == t)
    return hits / len(expected)


@dataclass(frozen=True)
class FidelityReport:
    """The check's outcome, as the gate reports it under ``fidelity``.

    Attributes:
        checked: whether ids were compared (False: see ``reason``).
        ok: True when the agreement reaches the threshold; None when not checked.
        agreement: fraction of matching positions, or None.
        positions: positions compared (0 when not checked).
        threshold: the agreement needed, or None when not checked.
        ms: milliseconds the scoring took (0 when not checked).
        reason: why it was not checked ("" when it was).
    """

    checked: bool
    ok: bool | None
    agreement: float | None = None
    positions: int = 0
    threshold: float | None = None
    ms: float = 0.0
    reason: str = ""

    @property
    def failed(self) -> bool:
        return self.ok is False

    def message(self) -> str:
        """The failure in words, with the numbers (empty unless it failed)."""
        if not self.failed:
            return ""
        return (f"fidelity: top-1 agreement {self.agreement:.3f} over {self.positions} positions "
                f"< {self.threshold:.2f} on the probe text (this device computes other tokens "
                "than the build host did for the same bundle)")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "checked": self.checked, "ok": self.ok,
            "agreement": round(self.agreement, 4) if self.agreement is not None else None,
            "positions": self.positions, "threshold": self.threshold, "ms": round(self.ms, 1)}
        if self.reason:
            d["reason"] = self.reason
        return d


def not_checked(table: Fidelity | None, override: float | None = None) -> str:
    """Why ``table`` cannot or need not be checked ("" when it must be). Pure."""
    if table is None:
        return "the bundle has no fidelity table (built before edgepack recorded one)"
    if table.probe_sha256 != PROBE_SHA256:
        return (f"the bundle's ids are for another probe text (sha256 {table.probe_sha256[:12]}; "
                f"this agent's is {PROBE_SHA256[:12]})")
    limit = table.threshold if override is None else override
    if limit == 0:
        return "turned off (threshold 0)"
    return ""


def judge(table: Fidelity, observed: Sequence[int], *, override: float | None = None,
          ms: float = 0.0) -> FidelityReport:
    """Compare the ids measured here with the bundle's. Pure.

    Args:
        table: the manifest's fidelity table.
        observed: this device's top-1 ids on the probe (:func:`probe_top1`).
        override: replaces the table's threshold (``--slo min_agreement=VALUE``).
        ms: how long the scoring took, for the report.

    Returns:
        The report; ``ok`` is False when the agreement is under the threshold.
    """
    limit = table.threshold if override is None else float(override)
    agree = agreement(table.top1, observed)
    return FidelityReport(checked=True, ok=agree >= limit, agreement=agree,
                          positions=table.positions, threshold=limit, ms=ms)


def check(runtime: Runtime, table: Fidelity | None, *,
          override: float | None = None) -> FidelityReport:
    """Score the probe with the loaded model and judge it against the bundle's ids.

    Args:
        runtime: a runtime with the new model loaded (held exclusively by the caller).
        table: the new bundle's manifest ``fidelity`` (None: an older bundle).
        override: replaces the table's threshold; 0 turns the check off.

    Returns:
        The report (not checked, with the reason, when :func:`not_checked` says so).

    Raises:
        InferenceError: scoring failed.
    """
    reason = not_checked(table, override)
    if reason or table is None:
        return FidelityReport(checked=False, ok=None, reason=reason)
    t0 = time.perf_counter()
    try:
        observed = probe_top1(runtime, table.window)
    finally:
        runtime.release_scoring()  # serving never scores: do not keep a second model resident
    return judge(table, observed, override=override, ms=(time.perf_counter() - t0) * 1000.0)


__all__ = ["PROBE_POSITIONS", "PROBE_SHA256", "PROBE_TEXT", "PROBE_WINDOW", "FidelityReport",
           "agreement", "check", "judge", "not_checked", "probe_top1"]
