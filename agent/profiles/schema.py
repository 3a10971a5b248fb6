"""Device profiles: a device class as data (profiles/*.toml), loaded through DeviceProfile.from_dict.

A profile says how to recognise the device (``[match]``), what to ship to it (``[target]``), how much
quality the quantization may cost (``[budget]``) and what the installed model must achieve on it
(``[slo]``). Unknown keys are refused so a typo in a profile is an error, not a silent default.
"""

from __future__ import annotations

import os
import sys
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import ProfileError
from agent.runtimes.registry import RUNTIMES

PRECISIONS = ("int4", "int8", "fp16", "fp32")
# llama.cpp quant types we build, and the precision class each belongs to.
GGUF_QUANTS = {"Q4_0": "int4", "Q4_K_M": "int4", "Q5_K_M": "int4", "Q8_0": "int8", "F16": "fp16",
               "F32": "fp32"}
ACCELERATORS = ("nvidia-gpu", "intel-gpu", "intel-npu", "qualcomm-npu", "apple-gpu", "amd-gpu")
EXEC_DEVICES = ("cpu", "cuda", "gpu", "npu", "qnn", "dml", "metal")
ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}


def normalize_arch(arch: str | None) -> str | None:
    """Map the spellings of one architecture to ours (x86_64, aarch64, ...)."""
    if arch is None:
        return None
    a = arch.strip().lower()
    return ARCH_ALIASES.get(a, a)


def _take(data: dict[str, Any], section: str, allowed: set[str]) -> dict[str, Any]:
    raw = data.get(section, {})
    if not isinstance(raw, dict):
        raise ProfileError(f"[{section}] must be a table")
    unknown = set(raw) - allowed
    if unknown:
        raise ProfileError(f"[{section}] has unknown keys: {', '.join(sorted(unknown))}")
    return raw


def _str_list(v: Any, what: str) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ProfileError(f"{what} must be a list of strings")
    return tuple(v)


@dataclass(frozen=True)
class MatchRules:
    """How a device is recognised. Every non-empty rule must hold for the profile to be eligible."""

    os: tuple[str, ...] = ()  # e.g. ("linux", "android"); empty = any
    arch: tuple[str, ...] = ()  # normalized: x86_64, aarch64
    cpu_flags_all: tuple[str, ...] = ()  # ISA flags that must all be present (e.g. avx2)
    cpu_model_any: tuple[str, ...] = ()  # case-insensitive substrings; one must occur
    accelerators_all: tuple[str, ...] = ()  # accelerator kinds that must all be present
    accelerators_none: tuple[str, ...] = ()  # kinds that must be absent (they'd deserve another profile)
    min_ram_gb: float = 0.0  # GiB of total RAM
    max_ram_gb: float = 0.0  # GiB; 0 = no upper bound

    @property
    def specificity(self) -> int:
        """How narrowly the rules describe a device: more specific profiles win ties."""
        return (
            100 * len(self.accelerators_all)
            + 20 * bool(self.cpu_model_any)
            + 5 * len(self.cpu_flags_all)
            + 3 * bool(self.arch)
            + 2 * bool(self.os)
            + 1 * bool(self.max_ram_gb)
        )


@dataclass(frozen=True)
class BuildTarget:
    """What to ship: runtime, format, precision and how to run it."""

    runtime: str
    format: str
    precision: str
    quant: str = ""  # the tool's name for the precision (GGUF: Q4_K_M); "" = the tool's default
    device: str = "cpu"  # execution device the runtime uses (cpu, cuda, npu, qnn, metal, ...)
    context: int = 2048  # tokens
    threads: int = 0  # 0 = one per physical core
    # GiB the model may use (weights + KV cache + runtime); 0 = 80% of match.min_ram_gb.
    ram_budget_gb: float = 0.0
    fallbacks: tuple[str, ...] = ()  # quants to try, smallest last, when the first does not fit RAM
    options: dict[str, Any] = field(default_factory=dict)  # runtime-specific build options

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ProfileError(f"target.runtime {self.runtime!r} is not one of {tuple(RUNTIMES)}")
        expected = RUNTIMES[self.runtime].format
        if self.format != expected:
            raise ProfileError(
                f"target.format {self.format!r} does not fit runtime {self.runtime!r} "
                f"(expected {expected!r})"
            )
        if self.precision not in PRECISIONS:
            raise ProfileError(f"target.precision {self.precision!r} is not one of {PRECISIONS}")
        if self.device not in EXEC_DEVICES:
            raise ProfileError(f"target.device {self.device!r} is not one of {EXEC_DEVICES}")
        if self.format == "gguf":
            for q in (self.quant, *self.fallbacks):
                if q not in GGUF_QUANTS:
                    raise ProfileError(f"GGUF quant {q!r} is not one of {sorted(GGUF_QUANTS)}")
            if GGUF_QUANTS[self.quant] != self.precision:
                raise ProfileError(
                    f"quant {self.quant} is {GGUF_QUANTS[self.quant]}, not {self.precision}"
                )
        if self.context < 128 or self.threads < 0:
            raise ProfileError("target.context must be >= 128 and target.threads >= 0")


@dataclass(frozen=True)
class QualityBudget:
    """How much quality quantization may cost, against the full-precision reference."""

    max_ppl_increase_pct: float = 10.0  # perplexity increase over the reference, in percent


@dataclass(frozen=True)
class Slo:
    """What the installed model must achieve on the device (checked by the post-install gate)."""

    min_decode_tok_s: float = 0.0  # tokens per second; 0 = unchecked
    max_ttft_ms: float = 0.0  # time to first token, milliseconds; 0 = unchecked
    max_rss_mb: float = 0.0  # peak resident memory of the agent with the model, MiB; 0 = unchecked
    # Fidelity check (agent/fidelity.py): the fraction of the fixed probe's 64 positions whose
    # top-1 token the device must compute as the build host did, through the same runtime and
    # bundle; 0 = unchecked. Written into the manifest's fidelity table (not its slo). Default from
    # bench/results/fidelity.md: every honest CPU path measured (llama.cpp, ONNX Runtime GenAI and
    # OpenVINO at 1 vs 2 threads, OpenVINO f32 vs bf16 vs u8 KV cache) agrees 1.000, and even a
    # different build of the model (Q4_K_M vs Q8_0 vs F16, OpenVINO int8 vs GGUF) 0.95-0.98;
    # 0.80 leaves 12 mismatches of margin for accelerator numerics this host cannot run, and sits
    # far above what a wrong model gets (a broken int4 build 0.58, corrupted weights or ids < 0.2).
    min_agreement: float = 0.80

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_agreement <= 1.0:
            raise ProfileError(f"slo.min_agreement must be in [0, 1], got {self.min_agreement}")


@dataclass(frozen=True)
class DeviceProfile:
    """One device class. Construct with :meth:`from_dict` (TOML) so every field is validated."""

    name: str
    description: str
    device_class: str  # iot | phone | ai-pc | edge-gpu | mac | server
    match: MatchRules
    target: BuildTarget
    budget: QualityBudget
    slo: Slo
    priority: int = 0  # breaks ties between equally specific profiles

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceProfile:
        """Validate and build a profile from its TOML table.

        Raises:
            ProfileError: a key is unknown, missing or of the wrong type or value.
        """
        top = {"name", "description", "class", "priority", "match", "target", "budget", "slo"}
        unknown = set(data) - top
        if unknown:
            raise ProfileError(f"unknown top-level keys: {', '.join(sorted(unknown))}")
        try:
            name = str(data["name"])
            m = _take(data, "match", set(MatchRules.__dataclass_fields__))
            t = _take(data, "target", set(BuildTarget.__dataclass_fields__))
            b = _take(data, "budget", set(QualityBudget.__dataclass_fields__))
            s = _take(data, "slo", set(Slo.__dataclass_fields__))
            match_kw: dict[str, Any] = {
                k: (
                    tuple(normalize_arch(a) or "" for a in _str_list(v, f"match.{k}"))
                    if k == "arch"
                    else _str_list(v, f"match.{k}")
                    if isinstance(MatchRules.__dataclass_fields__[k].default, tuple)
                    else float(v)
                )
                for k, v in m.items()
            }
            match = MatchRules(**match_kw)
            for kind in (*match.accelerators_all, *match.accelerators_none):
                if kind not in ACCELERATORS:
                    raise ProfileError(f"accelerator kind {kind!r} is not one of {ACCELERATORS}")
            t = dict(t)
            if "fallbacks" in t:
                t["fallbacks"] = _str_list(t["fallbacks"], "target.fallbacks")
            target = BuildTarget(**t)
            budget = QualityBudget(**{k: float(v) for k, v in b.items()})
            slo = Slo(**{k: float(v) for k, v in s.items()})
            if not name or not all(c.isalnum() or c in "-_." for c in name):
                raise ProfileError(f"profile name {name!r} must be non-empty [A-Za-z0-9._-]")
            return cls(
                name=name,
                description=str(data.get("description", "")),
                device_class=str(data.get("class", "")),
                match=match,
                target=target,
                budget=budget,
                slo=slo,
                priority=int(data.get("priority", 0)),
            )
        except KeyError as e:
            raise ProfileError(f"missing required key {e.args[0]!r}") from e
        except (TypeError, ValueError) as e:
            raise ProfileError(f"bad value in profile: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        """The profile as plain data (for --json output and manifests)."""
        d = asdict(self)
        d["class"] = d.pop("device_class")
        return d


def default_profiles_dir() -> Path:
    """Where profiles are read from: $EDGEPACK_PROFILES_DIR, the source checkout, or the install."""
    env = os.environ.get("EDGEPACK_PROFILES_DIR")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parents[2] / "profiles"
    if checkout.is_dir():
        return checkout
    frozen = Path(getattr(sys, "_MEIPASS", "")) / "profiles"
    if frozen.is_dir():
        return frozen
    return Path(sys.prefix) / "share" / "edgepack" / "profiles"


def load_profile(path: Path) -> DeviceProfile:
    """Load one profile TOML file.

    Raises:
        ProfileError: the file is unreadable or invalid (the message names the file).
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        return DeviceProfile.from_dict(data)
    except OSError as e:
        raise ProfileError(f"cannot read profile {path}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path}: invalid TOML: {e}") from e
    except ProfileError as e:
        raise ProfileError(f"{path.name}: {e}") from e


def load_profiles(directory: Path | None = None) -> dict[str, DeviceProfile]:
    """Load every ``*.toml`` profile in a directory, keyed by name.

    Raises:
        ProfileError: the directory holds no profiles, a file is invalid, or two share a name.
    """
    d = directory or default_profiles_dir()
    files = sorted(d.glob("*.toml"))
    if not files:
        raise ProfileError(
            f"no profiles found in {d}", hint="Set EDGEPACK_PROFILES_DIR to the profiles/ folder."
        )
    out: dict[str, DeviceProfile] = {}
    for f in files:
        p = load_profile(f)
        if p.name in out:
            raise ProfileError(f"two profiles are named {p.name!r} ({f.name})")
        out[p.name] = p
    return out
