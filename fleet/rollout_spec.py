"""What a rollout was asked for: waves, selection, thresholds — parsed from the command line,
validated, and stored with the rollout (:meth:`RolloutSpec.to_dict` / :meth:`RolloutSpec.from_dict`).

The spellings follow the OTA systems users know: cumulative waves as counts or percentages
(``1,10%,50%,100%``, hawkBit rollout groups), an abort threshold as a count or a percentage of a
wave's finished devices with a minimum executed before a percentage applies (AWS IoT Jobs
``abortConfig``), a per-device timeout and retries (AWS ``timeoutConfig`` / retry config).
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from agent.errors import EdgepackError

_ID = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


class RolloutError(EdgepackError):
    """A rollout cannot be started or changed as asked (bad spec, unknown id, wrong state)."""


# --- the spec: parsed from the command line, stored with the rollout ---------------------------


@dataclass(frozen=True)
class FailureThreshold:
    """``3`` (failures per wave) or ``5%`` (of the wave's finished targets)."""

    count: int | None = None
    percent: float | None = None

    @classmethod
    def parse(cls, text: str) -> FailureThreshold:
        """Raises: RolloutError: not ``N`` or ``N%``."""
        t = text.strip()
        try:
            if t.endswith("%"):
                pct = float(t[:-1])
                if not 0 <= pct <= 100 or not math.isfinite(pct):
                    raise ValueError
                return cls(percent=pct)
            n = int(t)
            if n < 0:
                raise ValueError
            return cls(count=n)
        except ValueError:
            raise RolloutError(f"bad failure threshold {text!r}",
                               hint="Use a count (3) or a percentage of each wave (5%).") from None

    def exceeded(self, failures: int, finished: int) -> bool:
        if self.count is not None:
            return failures > self.count
        if self.percent is not None and finished:
            return 100.0 * failures / finished > self.percent
        return False

    def __str__(self) -> str:
        return f"{self.count}" if self.count is not None else f"{self.percent:g}%"


@dataclass(frozen=True)
class RegressionLimits:
    """Largest allowed median regression per measure, as fractions (0.10 = 10 % worse)."""

    decode: float | None = 0.10  # decode tok/s lower by this much
    ttft: float | None = 0.25  # time to first token higher by this much
    rss: float | None = 0.20  # peak RSS higher by this much

    @classmethod
    def parse(cls, text: str) -> RegressionLimits:
        """``decode=10%,ttft=25%,rss=20%``; a measure left out keeps its default, ``off`` disables.

        Raises:
            RolloutError: an unknown measure or a malformed value.
        """
        values: dict[str, float | None] = {}
        for item in filter(None, (i.strip() for i in text.split(","))):
            key, sep, raw = item.partition("=")
            key, raw = key.strip(), raw.strip()
            if not sep or key not in ("decode", "ttft", "rss"):
                raise RolloutError(f"bad regression limit {item!r}",
                                   hint="Use decode=10%,ttft=25%,rss=20% (off disables one).")
            if raw == "off":
                values[key] = None
                continue
            try:
                v = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
            except ValueError:
                raise RolloutError(f"bad regression limit {item!r}") from None
            if not math.isfinite(v) or v < 0:
                raise RolloutError(f"bad regression limit {item!r}: must be >= 0")
            values[key] = v
        return replace(cls(), **values)

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)


@dataclass(frozen=True)
class Selection:
    """Which devices of the fleet: profiles and device-id globs (empty = all)."""

    profiles: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Selection:
        """``profile=raspberry-pi-5|jetson-orin,device=pi-*`` (``|`` separates alternatives).

        Raises:
            RolloutError: an unknown key.
        """
        profiles: list[str] = []
        devices: list[str] = []
        for item in filter(None, (i.strip() for i in text.split(","))):
            key, sep, raw = item.partition("=")
            alts = [a.strip() for a in raw.split("|") if a.strip()]
            if not sep or not alts or key.strip() not in ("profile", "device"):
                raise RolloutError(f"bad selection {item!r}",
                                   hint="Use profile=NAME[|NAME...],device=GLOB[|GLOB...].")
            (profiles if key.strip() == "profile" else devices).extend(alts)
        return cls(tuple(profiles), tuple(devices))

    def matches(self, device: str, profile: str | None) -> bool:
        if self.profiles and profile not in self.profiles:
            return False
        return not self.devices or any(fnmatch.fnmatchcase(device, g) for g in self.devices)

    def __str__(self) -> str:
        parts = ([f"profile={'|'.join(self.profiles)}"] if self.profiles else []) + \
                ([f"device={'|'.join(self.devices)}"] if self.devices else [])
        return ",".join(parts) or "all"


@dataclass(frozen=True)
class Waves:
    """Cumulative wave sizes: counts (``1``) or percentages of the targets (``10%``)."""

    steps: tuple[str, ...] = ("1", "10%", "50%", "100%")

    @classmethod
    def parse(cls, text: str) -> Waves:
        """Raises: RolloutError: empty, malformed, or not non-decreasing."""
        steps = tuple(s.strip() for s in text.split(",") if s.strip())
        if not steps:
            raise RolloutError("no waves given", hint="Use e.g. --waves 1,10%,50%,100%.")
        w = cls(steps)
        w.sizes(1000)  # validates every step
        return w

    def sizes(self, n: int) -> list[int]:
        """Cumulative target counts per wave for ``n`` targets; the last wave always ends at ``n``."""
        out: list[int] = []
        for s in self.steps:
            try:
                if s.endswith("%"):
                    pct = float(s[:-1])
                    if not 0 < pct <= 100:
                        raise ValueError
                    c = math.ceil(n * pct / 100)
                else:
                    c = int(s)
                    if c < 1:
                        raise ValueError
            except ValueError:
                raise RolloutError(f"bad wave {s!r}", hint="A wave is a count (1) or a percentage "
                                   "of the targets (10%), cumulative.") from None
            if out and c < out[-1]:
                raise RolloutError(f"waves must not shrink: {', '.join(self.steps)}")
            out.append(min(c, n))
        if not out or out[-1] < n:
            out.append(n)  # the last wave takes whoever is left
        return out


@dataclass(frozen=True)
class RolloutSpec:
    """Everything ``edgepack rollout start`` was asked for."""

    rollout_id: str
    release_id: str
    fleet: str
    selection: Selection = field(default_factory=Selection)
    waves: Waves = field(default_factory=Waves)
    max_parallel: int = 0  # devices in flight at once; 0 = a whole wave
    device_timeout: float = 900.0  # seconds for one install, and for an offline device to return
    retries: int = 2  # extra attempts after a timeout or a retryable failure
    max_failures: FailureThreshold = field(default_factory=lambda: FailureThreshold(percent=5.0))
    min_executed: int = 10  # committed devices in a wave before its medians are judged mid-wave
    max_regression: RegressionLimits = field(default_factory=RegressionLimits)
    min_agreement: float | None = None  # median fidelity agreement a wave must keep
    rollback_on_abort: bool = False
    dynamic: bool = False
    soak: float = 0.0  # seconds a done wave's devices must stay healthy before the next starts
    offline_is_failure: bool = False

    def __post_init__(self) -> None:
        if not _ID.match(self.rollout_id):
            raise RolloutError(f"bad rollout id {self.rollout_id!r}")
        if self.max_parallel < 0 or self.retries < 0 or self.min_executed < 1:
            raise RolloutError("--max-parallel and --retries must be >= 0, --min-executed >= 1")
        if not self.device_timeout > 0 or self.soak < 0:
            raise RolloutError("--device-timeout must be > 0 and --soak >= 0")
        if self.min_agreement is not None and not 0 <= self.min_agreement <= 1:
            raise RolloutError("--min-agreement must be in [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["max_failures"] = str(self.max_failures)
        d["waves"] = list(self.waves.steps)
        d["selection"] = {"profiles": list(self.selection.profiles),
                          "devices": list(self.selection.devices)}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RolloutSpec:
        d = dict(d)
        d["selection"] = Selection(tuple(d["selection"].get("profiles", ())),
                                   tuple(d["selection"].get("devices", ())))
        d["waves"] = Waves(tuple(d["waves"]))
        d["max_failures"] = FailureThreshold.parse(str(d["max_failures"]))
        d["max_regression"] = RegressionLimits(**d["max_regression"])
        return cls(**d)


__all__ = ["FailureThreshold", "RegressionLimits", "RolloutError", "RolloutSpec", "Selection", "Waves"]
