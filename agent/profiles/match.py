"""The matcher: probe facts -> the best device profile, with the reasons for every verdict.

Pure: it reads only its arguments (a probe dict and the loaded profiles) and never the machine, so
the same facts give the same answer on the host (fleet inventory, ``edgepack profiles match``) and
on the device. Facts come from :func:`agent.probe.probe` or from a device's birth message, so any
fact may be missing or ``None``: a rule that needs an unknown fact makes its profile ineligible
with a "... unknown" reason instead of raising.

Ranking: every rule of a profile must hold for it to be eligible; eligible profiles are scored
``match.specificity + priority`` and the highest wins; equal scores are broken by name so the
result never depends on dict order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.profiles.schema import DeviceProfile, MatchRules, normalize_arch

_GIB = 1024**3


@dataclass(frozen=True)
class Candidate:
    """One profile's verdict.

    ``reasons`` lists the rules that held when ``eligible``, and the rules that failed otherwise
    (an eligible profile that did not win also says what outranked it).
    """

    name: str
    eligible: bool
    score: int  # match.specificity + priority; only compared among eligible candidates
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """The candidate as plain JSON-able data."""
        return {
            "name": self.name,
            "eligible": self.eligible,
            "score": self.score,
            "reasons": list(self.reasons),
        }


@dataclass(frozen=True)
class MatchResult:
    """The outcome of :func:`match_profile`: the winner (or None) and every candidate, best first."""

    best: str | None
    candidates: tuple[Candidate, ...]

    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON-able data (for ``--json`` output and birth messages)."""
        return {"best": self.best, "candidates": [c.to_dict() for c in self.candidates]}

    def explain(self) -> list[str]:
        """Human-readable lines: the verdict, then one line per candidate with its reasons."""
        if self.best is None:
            lines = ["no profile matches this device"]
        else:
            win = self.candidates[0]
            lines = [f"best profile: {win.name} (score {win.score})"]
        for c in self.candidates:
            mark = "+" if c.eligible else "-"
            head = f"  {mark} {c.name}"
            if c.eligible:
                head += f" (score {c.score})"
            lines.append(f"{head}: {'; '.join(c.reasons) or 'no rules'}")
        return lines


def _fmt_list(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(items) + "]"


def _str_or_none(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


def _number_or_none(v: Any) -> float | None:
    # bool is an int subclass; a True "ram_bytes" is garbage, not 1 byte.
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)


def _accelerator_kinds(facts: Mapping[str, Any]) -> set[str] | None:
    accs = facts.get("accelerators")
    if not isinstance(accs, list):
        return None
    # Entries come from other machines (birth messages): skip malformed ones rather than fail.
    return {a["kind"] for a in accs if isinstance(a, Mapping) and isinstance(a.get("kind"), str)}


def _cpu_flags(facts: Mapping[str, Any]) -> set[str] | None:
    flags = facts.get("cpu_flags")
    if not isinstance(flags, list):
        return None
    return {f.lower() for f in flags if isinstance(f, str)}


def _check(rules: MatchRules, facts: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Evaluate every rule; return (reasons it held, reasons it failed)."""
    ok: list[str] = []
    bad: list[str] = []

    if rules.os:
        os_ = _str_or_none(facts.get("os"))
        if os_ is None:
            bad.append(f"needs os in {_fmt_list(rules.os)}; os unknown")
        elif os_ in rules.os:
            ok.append(f"os {os_} in {_fmt_list(rules.os)}")
        else:
            bad.append(f"os {os_} not in {_fmt_list(rules.os)}")

    if rules.arch:
        arch = normalize_arch(_str_or_none(facts.get("arch")))
        if arch is None:
            bad.append(f"needs arch in {_fmt_list(rules.arch)}; arch unknown")
        elif arch in rules.arch:
            ok.append(f"arch {arch} in {_fmt_list(rules.arch)}")
        else:
            bad.append(f"arch {arch} not in {_fmt_list(rules.arch)}")

    if rules.cpu_flags_all:
        flags = _cpu_flags(facts)
        if flags is None:
            bad.append(f"needs cpu flags {', '.join(rules.cpu_flags_all)}; cpu flags unknown")
        else:
            missing = [f for f in rules.cpu_flags_all if f.lower() not in flags]
            if missing:
                bad.append(f"lacks cpu flag {', '.join(missing)}")
            else:
                ok.append(f"has {', '.join(rules.cpu_flags_all)}")

    if rules.cpu_model_any:
        model = _str_or_none(facts.get("cpu_model"))
        if model is None:
            bad.append(f"needs cpu model like {_fmt_list(rules.cpu_model_any)}; cpu model unknown")
        else:
            hit = next((s for s in rules.cpu_model_any if s.lower() in model.lower()), None)
            if hit is None:
                bad.append(f"cpu model {model!r} matches none of {_fmt_list(rules.cpu_model_any)}")
            else:
                ok.append(f"cpu model {model!r} contains {hit!r}")

    if rules.accelerators_all or rules.accelerators_none:
        kinds = _accelerator_kinds(facts)
        if kinds is None:
            bad.append("needs accelerator facts; accelerators unknown")
        else:
            for kind in rules.accelerators_all:
                if kind in kinds:
                    ok.append(f"has accelerator {kind}")
                else:
                    have = ", ".join(sorted(kinds)) or "none"
                    bad.append(f"needs accelerator {kind}; device has {have}")
            for kind in rules.accelerators_none:
                if kind in kinds:
                    bad.append(f"has accelerator {kind}, which this profile leaves to another")
                else:
                    ok.append(f"no {kind}")

    if rules.min_ram_gb or rules.max_ram_gb:
        ram = _number_or_none(facts.get("ram_bytes"))
        if ram is None:
            bad.append("needs a RAM size; RAM unknown")
        else:
            gib = ram / _GIB
            if rules.min_ram_gb:
                if gib < rules.min_ram_gb:
                    bad.append(f"RAM {gib:.1f} GiB < {rules.min_ram_gb:.1f} GiB")
                else:
                    ok.append(f"RAM {gib:.1f} GiB >= {rules.min_ram_gb:.1f} GiB")
            if rules.max_ram_gb:
                if gib > rules.max_ram_gb:
                    bad.append(f"RAM {gib:.1f} GiB > {rules.max_ram_gb:.1f} GiB")
                else:
                    ok.append(f"RAM {gib:.1f} GiB <= {rules.max_ram_gb:.1f} GiB")

    return ok, bad


def match_profile(facts: Mapping[str, Any], profiles: Mapping[str, DeviceProfile]) -> MatchResult:
    """Pick the profile that fits the probed device best, and say why for every profile.

    Args:
        facts: a probe dict as returned by :func:`agent.probe.probe` (or carried in a birth
            message); missing keys and ``None`` values are treated as unknown.
        profiles: the loaded profiles keyed by name (:func:`agent.profiles.load_profiles`).

    Returns:
        A :class:`MatchResult` whose ``best`` is the winning profile name, or None when no
        profile is eligible; ``candidates`` holds every profile, eligible ones first, then by
        score (highest first), then by name.
    """
    scored: list[Candidate] = []
    for name in sorted(profiles):
        p = profiles[name]
        ok, bad = _check(p.match, facts)
        scored.append(
            Candidate(
                name=name,
                eligible=not bad,
                score=p.match.specificity + p.priority,
                reasons=tuple(bad or ok),
            )
        )
    # Sorting on (not eligible, -score, name) makes the order total, hence deterministic.
    scored.sort(key=lambda c: (not c.eligible, -c.score, c.name))
    if not scored or not scored[0].eligible:
        return MatchResult(best=None, candidates=tuple(scored))

    win = scored[0]
    out = [win]
    for c in scored[1:]:
        if c.eligible:
            why = "tie broken by name" if c.score == win.score else f"{c.score} < {win.score}"
            c = Candidate(c.name, c.eligible, c.score, (*c.reasons, f"outranked by {win.name} ({why})"))
        out.append(c)
    return MatchResult(best=win.name, candidates=tuple(out))
