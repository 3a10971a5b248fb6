"""The post-install benchmark gate: measure the freshly loaded model and judge it against its SLO.

Runs inside the store's load check, after the switch and before the commit: (1) the new bundle is
loaded as the one resident model, (2) :func:`measure` runs a short fixed benchmark on it (greedy,
a fixed English prompt, one warm-up token, then ``runs`` measured generations), (3) :func:`judge`
compares the figures with the manifest's ``slo`` (the profile's
:class:`~agent.profiles.schema.Slo`) and the configured overrides, (4) a miss raises
:class:`~agent.errors.GateFailedError` so the store rolls back; a pass returns the figures, which
go into the install result, the ``committed`` event and health.

Invariants:
- :func:`judge` is pure: the same figures and thresholds always give the same verdict.
- A threshold of 0 or a missing one is unchecked; SLO keys this agent does not know (from a newer
  manifest) are ignored, so an older agent still installs a newer bundle.
- Peak RSS is this process's resident set sampled with psutil before the benchmark, after every
  streamed chunk and at the end, and the maximum kept. Not ``getrusage().ru_maxrss``: that is the
  process-lifetime high-water mark, which in the daemon still holds the previous model (and
  whatever the install itself touched), so a smaller new model could fail a ``max_rss_mb`` it
  meets. One sample reads /proc/self/statm (microseconds), nothing beside a token's milliseconds;
  the KV cache and compute buffers allocated by the prefill stay allocated, so the sample after
  the first token sees them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from agent.errors import EdgepackError, GateFailedError, InferenceError, ManifestError

if TYPE_CHECKING:
    from agent.runtimes import Runtime, Usage

# Fixed so figures compare across bundles, devices and agent versions. Plain narrative English: a
# base model continues it for many tokens instead of stopping at once.
DEFAULT_PROMPT: Final = (
    "The old lighthouse keeper climbed the narrow stairs every evening to light the lamp. "
    "One stormy night in November, he noticed a small boat far out at sea, and"
)
SLO_KEYS: Final = ("min_decode_tok_s", "max_ttft_ms", "max_rss_mb")
_SMOKE_TOKENS = 4  # the load check without the gate: the model must produce something
_MIB = 2**20


@dataclass(frozen=True)
class GateConfig:
    """How the post-install gate benchmarks and judges a new bundle.

    Raises:
        EdgepackError: a value is out of range or an override names an unknown SLO.
    """

    prompt: str = DEFAULT_PROMPT  # fixed benchmark text; greedy, so the run is repeatable
    max_tokens: int = 32  # tokens per measured generation; >= 2 (a decode rate needs two)
    runs: int = 1  # measured generations after the warm-up; TTFT and decode are their medians
    # Replace the manifest's thresholds per key (SLO_KEYS): higher or lower; 0 turns a check off.
    slo_overrides: dict[str, float] = field(default_factory=dict)
    enabled: bool = True  # False: load and generate a few tokens, judge nothing

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise EdgepackError("the gate prompt must be non-empty text")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) \
                or self.max_tokens < 2:
            raise EdgepackError(f"gate tokens must be an integer >= 2, got {self.max_tokens!r}",
                                hint="A decode rate needs at least two generated tokens.")
        if isinstance(self.runs, bool) or not isinstance(self.runs, int) or self.runs < 1:
            raise EdgepackError(f"gate runs must be an integer >= 1, got {self.runs!r}")
        overrides = dict(self.slo_overrides)
        for key, value in overrides.items():
            if key not in SLO_KEYS:
                raise EdgepackError(f"unknown SLO {key!r} (known: {', '.join(SLO_KEYS)})")
            if _threshold(value) is None:
                raise EdgepackError(f"SLO {key} must be a number >= 0, got {value!r}")
        # A private copy: the caller's dict must not change a frozen config afterwards.
        object.__setattr__(self, "slo_overrides", {k: float(v) for k, v in overrides.items()})


def parse_slo_overrides(items: Iterable[str]) -> dict[str, float]:
    """Parse ``KEY=VALUE`` SLO overrides (``--slo`` flags, or EDGEPACK_SLO split on commas).

    Args:
        items: strings such as ``"min_decode_tok_s=50"``; empty ones are skipped. A later item
            wins over an earlier one for the same key.

    Returns:
        ``{key: threshold}``, keys from :data:`SLO_KEYS`.

    Raises:
        EdgepackError: an item is not ``KEY=VALUE``, names an unknown SLO or is not a number >= 0.
    """
    out: dict[str, float] = {}
    for item in items:
        item = item.strip()
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key = key.strip()
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not sep or key not in SLO_KEYS or not math.isfinite(value) or value < 0:
            raise EdgepackError(
                f"bad SLO override {item!r}",
                hint=f"Use KEY=VALUE with KEY one of {', '.join(SLO_KEYS)} and VALUE >= 0 "
                     "(0 turns the check off).",
            )
        out[key] = value
    return out


@dataclass(frozen=True)
class Figures:
    """What the benchmark measured.

    Attributes:
        ttft_ms: Median time to first token, milliseconds (prompt processing included).
        decode_tok_s: Median decode rate after the first token, tokens/s; 0.0 when the model
            stopped before a second token (a ``min_decode_tok_s`` check then fails: the rate
            could not be shown).
        peak_rss_mb: Highest resident memory of this process during the benchmark, MiB.
        tokens: Tokens generated over the measured runs.
    """

    ttft_ms: float
    decode_tok_s: float
    peak_rss_mb: float
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        """The figures as JSON-ready numbers, rounded for reports."""
        return {"ttft_ms": round(self.ttft_ms, 1), "decode_tok_s": round(self.decode_tok_s, 2),
                "peak_rss_mb": round(self.peak_rss_mb, 1), "tokens": self.tokens}


@dataclass(frozen=True)
class Verdict:
    """The gate's decision.

    Attributes:
        ok: True when every checked SLO is met.
        failures: One message per missed SLO, naming the measure, the value and the threshold.
        thresholds: The thresholds that were checked (non-zero), after overrides.
    """

    ok: bool
    failures: tuple[str, ...]
    thresholds: dict[str, float]


def measure(runtime: Runtime, config: GateConfig) -> Figures:
    """Benchmark the model already loaded in ``runtime`` (the caller holds it exclusively).

    Args:
        runtime: a runtime with the new model loaded.
        config: prompt, tokens per run and number of runs.

    Returns:
        The measured figures.

    Raises:
        InferenceError: generation failed, or the model generated no tokens.
    """
    import psutil  # lazily: the idle agent does not need it imported for this

    from agent.runtimes import GenerationParams

    proc = psutil.Process()
    peak = proc.memory_info().rss
    # A warm-up token first: the first generation after a load pays for page faults on the
    # mmapped weights and one-off allocations; the SLO is about serving, not the first request.
    _generate(runtime, config.prompt, 1)
    params = GenerationParams(max_tokens=config.max_tokens, temperature=0.0, seed=0)
    usages: list[Usage] = []
    for _ in range(config.runs):
        # Every run evaluates the whole prompt: a kept prefix would make TTFT one token's time.
        runtime.drop_prompt_cache()
        usage = None
        for chunk in runtime.stream(config.prompt, params):
            peak = max(peak, proc.memory_info().rss)
            if chunk.done:
                usage = chunk.usage
        if usage is None or usage.completion_tokens == 0:
            raise InferenceError("the new model loaded but generated no tokens")
        usages.append(usage)
    peak = max(peak, proc.memory_info().rss)
    return Figures(
        ttft_ms=statistics.median(u.ttft_ms for u in usages),
        decode_tok_s=statistics.median(u.decode_tok_s for u in usages),
        peak_rss_mb=peak / _MIB,
        tokens=sum(u.completion_tokens for u in usages),
    )


def judge(figures: Figures, slo: Mapping[str, Any],
          overrides: Mapping[str, float] | None = None) -> Verdict:
    """Compare measured figures with the SLO thresholds. Pure.

    Args:
        figures: what :func:`measure` returned.
        slo: the manifest's ``slo`` (``min_decode_tok_s``, ``max_ttft_ms``, ``max_rss_mb``);
            0 or missing means unchecked, unknown keys are ignored.
        overrides: thresholds that replace the manifest's, per key (0 turns a check off).

    Returns:
        The verdict, with one message per missed SLO, e.g.
        ``"decode 41.2 tok/s < SLO 50.0 tok/s"``.

    Raises:
        ManifestError: a manifest threshold is not a number >= 0.
    """
    overrides = overrides or {}
    thresholds: dict[str, float] = {}
    failures: list[str] = []
    for key in SLO_KEYS:
        raw = overrides[key] if key in overrides else slo.get(key, 0)
        limit = _threshold(raw)
        if limit is None:
            if raw is not None and raw != 0:
                raise ManifestError(f"slo.{key} must be a number >= 0, got {raw!r}")
            continue
        if limit == 0:
            continue
        thresholds[key] = limit
        # Say where a threshold came from: an override is the operator's, not the profile's.
        src = "override" if key in overrides else "SLO"
        if key == "min_decode_tok_s" and figures.decode_tok_s < limit:
            failures.append(f"decode {_num(figures.decode_tok_s)} tok/s < {src} {_num(limit)} tok/s")
        elif key == "max_ttft_ms" and figures.ttft_ms > limit:
            failures.append(f"TTFT {_num(figures.ttft_ms)} ms > {src} {_num(limit)} ms")
        elif key == "max_rss_mb" and figures.peak_rss_mb > limit:
            failures.append(f"peak RSS {_num(figures.peak_rss_mb)} MiB > {src} {_num(limit)} MiB")
    return Verdict(not failures, tuple(failures), thresholds)


def run_gate(runtime: Runtime, slo: Mapping[str, Any], config: GateConfig) -> dict[str, Any]:
    """The load check's second half, on the freshly loaded model: benchmark and judge it.

    With the gate disabled this only generates a few tokens (the model must work at all).

    Args:
        runtime: a runtime with the new model loaded (held exclusively by the caller).
        slo: the new bundle's manifest ``slo``.
        config: the gate configuration.

    Returns:
        ``{"ttft_ms"}`` when disabled; otherwise the report ``{"ok": True, "ttft_ms",
        "decode_tok_s", "peak_rss_mb", "tokens", "failures": [], "thresholds"}``.

    Raises:
        GateFailedError: an SLO is missed; carries the figures and the failure messages.
        InferenceError: generation failed or produced no tokens.
        ManifestError: the manifest's ``slo`` holds a threshold that is not a number >= 0.
    """
    if not config.enabled:
        usage = _generate(runtime, "Hello", _SMOKE_TOKENS)
        return {"ttft_ms": round(usage.ttft_ms, 1)}
    figures = measure(runtime, config)
    verdict = judge(figures, slo, config.slo_overrides)
    if not verdict.ok:
        raise GateFailedError(
            "the model misses its SLO on this device: " + "; ".join(verdict.failures),
            figures=figures.to_dict(), failures=verdict.failures, thresholds=verdict.thresholds,
        )
    return {"ok": True, **figures.to_dict(), "failures": [], "thresholds": verdict.thresholds}


def _generate(runtime: Runtime, prompt: str, max_tokens: int) -> Usage:
    from agent.runtimes import GenerationParams

    usage = None
    for chunk in runtime.stream(prompt, GenerationParams(max_tokens=max_tokens, temperature=0.0)):
        if chunk.done:
            usage = chunk.usage
    if usage is None or usage.completion_tokens == 0:
        raise InferenceError("the new model loaded but generated no tokens")
    return usage


def _threshold(value: object) -> float | None:
    # bool is an int subclass: ``true`` in a manifest is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    v = float(value)
    return v if math.isfinite(v) and v >= 0 else None


def _num(x: float) -> str:
    # One decimal reads well for real figures; a tiny threshold (0.001 ms) must not print as 0.0.
    return f"{x:.1f}" if x == 0 or abs(x) >= 0.1 else f"{x:.3g}"


__all__ = ["DEFAULT_PROMPT", "SLO_KEYS", "Figures", "GateConfig", "Verdict", "judge", "measure",
           "parse_slo_overrides", "run_gate"]
