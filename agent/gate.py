"""The post-install benchmark gate: measure the freshly loaded model and judge it against its SLO.

Runs inside the store's load check, after the switch and before the commit: (1) the new bundle is
loaded as the one resident model, (2) :func:`measure` runs a short fixed benchmark on it (greedy,
a fixed English prompt, one warm-up token, then ``runs`` measured generations of exactly
``max_tokens`` tokens: end of sequence is ignored, so a model that would stop after a token or
two cannot report a rate measured over nothing), (3) :func:`judge` compares the figures with the
manifest's ``slo`` (the profile's :class:`~agent.profiles.schema.Slo`) and the configured
overrides, and refuses a rate measured over fewer than ``GateConfig.min_decode_tokens`` tokens,
(4) the fidelity check (agent/fidelity.py) scores a fixed probe and compares its top-1 ids with
the build host's, after the benchmark so its scoring memory is not counted in the peak RSS,
(5) a miss raises :class:`~agent.errors.GateFailedError` (a fidelity miss its subclass
:class:`~agent.errors.FidelityError`) so the store rolls back; a pass returns the report, which
goes into the install result, the ``committed`` event and health.

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

from agent.errors import EdgepackError, FidelityError, GateFailedError, InferenceError, ManifestError

if TYPE_CHECKING:
    from agent.bundle import Fidelity
    from agent.runtimes import Runtime, Usage

# Fixed so figures compare across bundles, devices and agent versions. Plain narrative English: a
# base model continues it for many tokens instead of stopping at once.
DEFAULT_PROMPT: Final = (
    "The old lighthouse keeper climbed the narrow stairs every evening to light the lamp. "
    "One stormy night in November, he noticed a small boat far out at sea, and"
)
SLO_KEYS: Final = ("min_decode_tok_s", "max_ttft_ms", "max_rss_mb")
# Replaces the fidelity table's threshold (a fraction in [0, 1]); the other override keys are SLOs.
AGREEMENT_KEY: Final = "min_agreement"
OVERRIDE_KEYS: Final = (*SLO_KEYS, AGREEMENT_KEY)
# Fewest decoded tokens a rate may be reported over (or max_tokens - 1 when fewer are asked):
# the rate over one token is one inter-token gap, e.g. "105485 tok/s" from a model that stopped.
MIN_DECODE_TOKENS: Final = 16
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
    # Replace the manifest's thresholds per key (OVERRIDE_KEYS): higher or lower; 0 turns a check
    # off. min_agreement replaces the fidelity table's threshold.
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
            if key not in OVERRIDE_KEYS:
                raise EdgepackError(f"unknown SLO {key!r} (known: {', '.join(OVERRIDE_KEYS)})")
            if _threshold(value) is None or (key == AGREEMENT_KEY and float(value) > 1):
                raise EdgepackError(f"SLO {key} must be a number >= 0"
                                    f"{' and <= 1' if key == AGREEMENT_KEY else ''}, got {value!r}")
        # A private copy: the caller's dict must not change a frozen config afterwards.
        object.__setattr__(self, "slo_overrides", {k: float(v) for k, v in overrides.items()})

    @property
    def min_decode_tokens(self) -> int:
        """Decoded tokens a rate must be measured over: :data:`MIN_DECODE_TOKENS`, or all of them
        (``max_tokens - 1``) when fewer are asked."""
        return min(MIN_DECODE_TOKENS, self.max_tokens - 1)


def parse_slo_overrides(items: Iterable[str]) -> dict[str, float]:
    """Parse ``KEY=VALUE`` SLO overrides (``--slo`` flags, or EDGEPACK_SLO split on commas).

    Args:
        items: strings such as ``"min_decode_tok_s=50"``; empty ones are skipped. A later item
            wins over an earlier one for the same key.

    Returns:
        ``{key: threshold}``, keys from :data:`OVERRIDE_KEYS`.

    Raises:
        EdgepackError: an item is not ``KEY=VALUE``, names an unknown SLO or is not a number >= 0
            (``min_agreement``: in [0, 1]).
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
        if not sep or key not in OVERRIDE_KEYS or not math.isfinite(value) or value < 0 or (
                key == AGREEMENT_KEY and value > 1):
            raise EdgepackError(
                f"bad SLO override {item!r}",
                hint=f"Use KEY=VALUE with KEY one of {', '.join(OVERRIDE_KEYS)} and VALUE >= 0 "
                     f"({AGREEMENT_KEY}: a fraction <= 1; 0 turns a check off).",
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
        decode_tokens: Tokens the decode rate was measured over (every token after the first),
            the fewest of the runs; None when not recorded (figures made by hand).
    """

    ttft_ms: float
    decode_tok_s: float
    peak_rss_mb: float
    tokens: int
    decode_tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The figures as JSON-ready numbers, rounded for reports."""
        d: dict[str, Any] = {"ttft_ms": round(self.ttft_ms, 1),
                             "decode_tok_s": round(self.decode_tok_s, 2),
                             "peak_rss_mb": round(self.peak_rss_mb, 1), "tokens": self.tokens}
        if self.decode_tokens is not None:
            d["decode_tokens"] = self.decode_tokens
        return d


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
    _generate(runtime, config.prompt, 1, ignore_eos=True)
    # Exactly max_tokens whatever the model would do: a model that ends its text after a token
    # would otherwise be timed over one inter-token gap.
    params = GenerationParams(max_tokens=config.max_tokens, temperature=0.0, seed=0, ignore_eos=True)
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
        decode_tokens=min(max(u.completion_tokens - 1, 0) for u in usages),
    )


def judge(figures: Figures, slo: Mapping[str, Any],
          overrides: Mapping[str, float] | None = None, *, min_decode_tokens: int = 0) -> Verdict:
    """Compare measured figures with the SLO thresholds. Pure.

    Args:
        figures: what :func:`measure` returned.
        slo: the manifest's ``slo`` (``min_decode_tok_s``, ``max_ttft_ms``, ``max_rss_mb``);
            0 or missing means unchecked, unknown keys are ignored.
        overrides: thresholds that replace the manifest's, per key (0 turns a check off).
        min_decode_tokens: fewest decoded tokens a rate may stand on (``figures.decode_tokens``;
            unchecked when that is None): fewer fail the gate whatever the SLO, and the decode SLO
            is then not compared (the rate means nothing).

    Returns:
        The verdict, with one message per missed SLO, e.g.
        ``"decode 41.2 tok/s < SLO 50.0 tok/s"``.

    Raises:
        ManifestError: a manifest threshold is not a number >= 0.
    """
    overrides = overrides or {}
    thresholds: dict[str, float] = {}
    failures: list[str] = []
    n = figures.decode_tokens
    too_few = n is not None and n < min_decode_tokens
    if too_few:
        failures.append(f"decode rate measured over {n} token{'' if n == 1 else 's'}; at least "
                        f"{min_decode_tokens} needed (the generation ended early)")
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
        if key == "min_decode_tok_s" and figures.decode_tok_s < limit and not too_few:
            failures.append(f"decode {_num(figures.decode_tok_s)} tok/s < {src} {_num(limit)} tok/s")
        elif key == "max_ttft_ms" and figures.ttft_ms > limit:
            failures.append(f"TTFT {_num(figures.ttft_ms)} ms > {src} {_num(limit)} ms")
        elif key == "max_rss_mb" and figures.peak_rss_mb > limit:
            failures.append(f"peak RSS {_num(figures.peak_rss_mb)} MiB > {src} {_num(limit)} MiB")
    return Verdict(not failures, tuple(failures), thresholds)


def run_gate(runtime: Runtime, slo: Mapping[str, Any], config: GateConfig,
             fidelity: Fidelity | None = None) -> dict[str, Any]:
    """The load check's second half, on the freshly loaded model: benchmark, check and judge it.

    With the gate disabled this only generates a few tokens (the model must work at all).

    Args:
        runtime: a runtime with the new model loaded (held exclusively by the caller).
        slo: the new bundle's manifest ``slo``.
        config: the gate configuration.
        fidelity: the new bundle's manifest ``fidelity`` table (None: not checked, reported so).

    Returns:
        ``{"ttft_ms"}`` when disabled; otherwise the report ``{"ok": True, "ttft_ms",
        "decode_tok_s", "peak_rss_mb", "tokens", "decode_tokens", "failures": [], "thresholds",
        "fidelity": {"checked", "ok", "agreement", "positions", "threshold", "ms"}}``.

    Raises:
        FidelityError: the top-1 agreement on the probe is under the threshold (whatever the
            SLO verdict); carries the figures, the failure messages and the fidelity report.
        GateFailedError: an SLO is missed, or the rate stands on too few tokens.
        InferenceError: generation or scoring failed, or produced no tokens.
        ManifestError: the manifest's ``slo`` holds a threshold that is not a number >= 0.
    """
    from agent.fidelity import check

    if not config.enabled:
        usage = _generate(runtime, "Hello", _SMOKE_TOKENS)
        return {"ttft_ms": round(usage.ttft_ms, 1)}
    figures = measure(runtime, config)
    verdict = judge(figures, slo, config.slo_overrides, min_decode_tokens=config.min_decode_tokens)
    fid = check(runtime, fidelity, override=config.slo_overrides.get(AGREEMENT_KEY))
    failures = (*verdict.failures, *((fid.message(),) if fid.failed else ()))
    if failures:
        cls = FidelityError if fid.failed else GateFailedError
        what = "computes other tokens than the build host" if fid.failed else "misses its SLO"
        raise cls(f"the model {what} on this device: " + "; ".join(failures),
                  figures=figures.to_dict(), failures=failures, thresholds=verdict.thresholds,
                  fidelity=fid.to_dict())
    return {"ok": True, **figures.to_dict(), "failures": [], "thresholds": verdict.thresholds,
            "fidelity": fid.to_dict()}


def _generate(runtime: Runtime, prompt: str, max_tokens: int, *, ignore_eos: bool = False) -> Usage:
    from agent.runtimes import GenerationParams

    usage = None
    params = GenerationParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)
    for chunk in runtime.stream(prompt, params):
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


__all__ = ["AGREEMENT_KEY", "DEFAULT_PROMPT", "MIN_DECODE_TOKENS", "OVERRIDE_KEYS", "SLO_KEYS",
           "Figures", "GateConfig", "Verdict", "judge", "measure", "parse_slo_overrides", "run_gate"]
