"""What the fleet simulator pretends to be: hardware per profile, bundles, and the gate's figures.

Pure data and pure functions (no networking, no clock). The profiles' targets and SLOs come from
the real ``profiles/*.toml`` (:func:`agent.profiles.load_profiles`); this module adds only what a
profile does not say: plausible probe facts of such a device (after the captured facts in
``tests/data/facts``) and the sample model's (Gemma 3 270M) baseline speed on it, so births,
gate reports and regressions look like a real fleet's. ``tests/unit/fleet`` checks that each
profile's facts match that profile with the real matcher.

Bundles: with a release (:mod:`agent.bundle.release`), an install of one of its sha256 gets that
bundle's real manifest digest, model, version and quant. Any other sha256 gets a fake but
deterministic bundle: the manifest digest is derived from the sha256 alone, so every device
installing the same file reports the same digest, as real devices would.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from agent.errors import EdgepackError
from agent.profiles import DeviceProfile

INITIAL_MODEL: Final = "gemma-3-270m-it"  # what every simulated device serves at start
FAKE_SIGNER: Final = "sim-release-key"
FIDELITY_POSITIONS: Final = 64  # greedy next-token positions the gate compares with the reference
FIDELITY_THRESHOLD: Final = 0.9  # agreement below it fails the gate (fidelity_failed)
_MIB = 2**20
_GIB = 2**30


@dataclass(frozen=True)
class Hardware:
    """A device class as the probe would see it, and the sample model's speed on it.

    ``decode_tok_s``, ``ttft_ms`` and ``peak_rss_mb`` are the baseline gate figures of the initial
    bundle (each device varies them by a few percent).
    """

    os: str
    arch: str
    cpu_model: str
    cores_logical: int
    cores_physical: int
    ram_choices: tuple[int, ...]  # bytes; a device gets one of them
    accelerators: tuple[tuple[str, str], ...]  # (kind, name)
    runtimes: tuple[str, ...]  # runtimes installed on such a device
    cpu_flags: tuple[str, ...]
    decode_tok_s: float  # tokens/s
    ttft_ms: float  # milliseconds
    peak_rss_mb: float  # MiB


_ARM = ("aes", "asimd", "asimddp", "asimdhp", "atomics", "crc32", "fp", "fphp", "pmull", "sha1", "sha2")
_X86 = ("avx", "avx2", "bmi2", "f16c", "fma", "sse4_1", "sse4_2", "ssse3")
_X86_512 = (*_X86, "avx512bw", "avx512f", "avx512vl", "avx512_vnni", "amx_bf16", "amx_int8")

HARDWARE: Final[Mapping[str, Hardware]] = {
    "raspberry-pi-5": Hardware("linux", "aarch64", "Raspberry Pi 5 Model B Rev 1.0", 4, 4,
                               (4236275712, 8454660096), (), ("llamacpp",), _ARM, 24.0, 380.0, 410.0),
    "android-arm64": Hardware("android", "aarch64", "Qualcomm Snapdragon 8 Gen 2", 8, 8,
                              (7925321728, 11811160064), (), ("ortgenai",), (*_ARM, "i8mm"), 31.0, 290.0,
                              470.0),
    "jetson-orin": Hardware("linux", "aarch64", "NVIDIA Jetson Orin Nano Developer Kit", 6, 6,
                            (7990435840,), (("nvidia-gpu", "NVIDIA Jetson Orin Nano (integrated GPU)"),),
                            ("llamacpp",), _ARM, 78.0, 60.0, 620.0),
    "intel-core-ultra": Hardware("linux", "x86_64", "Intel(R) Core(TM) Ultra 7 155H", 22, 16,
                                 (16 * _GIB - 700 * _MIB, 33331679232),
                                 (("intel-gpu", "Intel Arc Graphics"), ("intel-npu", "Intel AI Boost NPU")),
                                 ("openvino",), (*_X86, "avx_vnni"), 42.0, 230.0, 700.0),
    "snapdragon-x": Hardware("windows", "aarch64", "Snapdragon(R) X Elite - X1E78100", 12, 12,
                             (16 * _GIB - 400 * _MIB, 32 * _GIB - 600 * _MIB),
                             (("qualcomm-npu", "Qualcomm Hexagon NPU"),), ("ortgenai",), (*_ARM, "i8mm"),
                             58.0, 130.0, 520.0),
    "nvidia-rtx": Hardware("linux", "x86_64", "AMD Ryzen 9 7950X 16-Core Processor", 32, 16,
                           (68447657984,), (("nvidia-gpu", "NVIDIA GeForce RTX 4090"),), ("llamacpp",),
                           _X86_512[:-2], 260.0, 14.0, 930.0),
    "apple-silicon": Hardware("darwin", "aarch64", "Apple M3 Pro", 12, 12, (18 * _GIB, 36 * _GIB),
                              (("apple-gpu", "Apple M3 Pro GPU"),), ("llamacpp",), _ARM, 150.0, 25.0, 610.0),
    "x86-64-cpu": Hardware("linux", "x86_64", "Intel(R) Xeon(R) Gold 6430", 64, 32, (270095880192,), (),
                           ("llamacpp",), _X86_512, 60.0, 40.0, 520.0),
}


class SimulatorError(EdgepackError):
    """The simulator was asked for something it cannot simulate (bad mix, unknown profile, ...)."""


def parse_mix(spec: str | Mapping[str, float], known: Mapping[str, object]) -> dict[str, float]:
    """Parse a profile mix: ``"raspberry-pi-5:60%,intel-core-ultra:30%,x86-64-cpu:10%"``.

    Weights may be percentages or plain numbers (``a:3,b:1``); a bare name weighs 1. They are
    normalized to fractions summing to 1.

    Args:
        spec: the mix text, or a mapping of profile name to weight.
        known: profile names the simulator can play.

    Returns:
        ``{profile: fraction}`` in the given order.

    Raises:
        SimulatorError: an unknown profile, a weight that is not a number > 0, or an empty mix.
    """
    items: list[tuple[str, str | float]] = []
    if isinstance(spec, str):
        for part in (p.strip() for p in spec.split(",")):
            if part:
                label, _, weight_text = part.partition(":")
                items.append((label.strip(), weight_text.strip().rstrip("%") or "1"))
    else:
        items = list(spec.items())
    out: dict[str, float] = {}
    for name, w in items:
        if name not in known:
            raise SimulatorError(f"cannot simulate profile {name!r}",
                                 hint=f"Known profiles: {', '.join(sorted(known))}.")
        try:
            weight = float(w)
        except ValueError:
            weight = -1.0
        if not weight > 0 or weight == float("inf"):
            raise SimulatorError(f"bad weight {w!r} for profile {name!r}: want a number > 0")
        out[name] = out.get(name, 0.0) + weight
    total = sum(out.values())
    if not out:
        raise SimulatorError("the profile mix is empty",
                             hint="e.g. --profiles raspberry-pi-5:60%,x86-64-cpu:40%")
    return {k: v / total for k, v in out.items()}


def apportion(mix: Mapping[str, float], n: int) -> list[str]:
    """Exactly ``n`` profile names in the mix's proportions (largest remainder), in mix order."""
    raw = {k: f * n for k, f in mix.items()}
    counts = {k: int(v) for k, v in raw.items()}
    by_remainder = sorted(raw, key=lambda k: (-(raw[k] - counts[k]), list(mix).index(k)))
    for k in by_remainder[: n - sum(counts.values())]:
        counts[k] += 1
    return [k for k in mix for _ in range(counts[k])]


def facts(profile: str, hw: Hardware, device: str, rng: random.Random, *, runtimes: bool = False
          ) -> dict[str, Any]:
    """Probe facts of one simulated device (``agent.probe.probe``'s shape)."""
    out: dict[str, Any] = {
        "schema": 1, "os": hw.os, "arch": hw.arch, "cpu_model": hw.cpu_model,
        "cpu_flags": list(hw.cpu_flags), "cores_logical": hw.cores_logical,
        "cores_physical": hw.cores_physical, "ram_bytes": rng.choice(hw.ram_choices),
        "disk_free_bytes": rng.randrange(8 * _GIB, 200 * _GIB, _MIB), "disk_path": "/var/lib/edgepack",
        "accelerators": [{"kind": k, "name": n, "source": "simulated"} for k, n in hw.accelerators],
        "hostname": device, "python": "3.11.9", "simulated": True,
    }
    if runtimes:
        out["runtimes"] = {r: {"installed": r in hw.runtimes, "version": None, "devices": None,
                               "error": None} for r in ("llamacpp", "ortgenai", "openvino")}
    return out


@dataclass(frozen=True)
class Bundle:
    """An installed (simulated) bundle: what ``InstalledBundle.summary()`` reports of it."""

    digest: str  # manifest digest (sha256 of the manifest bytes)
    model: str
    version: int
    profile: str
    runtime: str
    format: str
    precision: str
    quant: str
    size_bytes: int
    quality: dict[str, Any] | None = None
    signer: str = FAKE_SIGNER
    arch: str = ""  # the profile's arch ("" = any): the store refuses another
    fidelity_threshold: float | None = None  # the manifest's fidelity table's (None: the default)

    @property
    def slot(self) -> str:
        return self.digest[:16]

    def summary(self, gate: dict[str, Any] | None) -> dict[str, Any]:
        """The agent's ``InstalledBundle.summary()`` of this bundle with its gate report here."""
        return {"slot": self.slot, "digest": self.digest, "model": self.model, "version": self.version,
                "profile": self.profile, "runtime": self.runtime, "format": self.format,
                "precision": self.precision, "quant": self.quant, "size_bytes": self.size_bytes,
                "quality": self.quality, "gate": gate}


def _bundle_for(profile: DeviceProfile, digest: str, model: str, version: int, size: int) -> Bundle:
    t = profile.target
    hw = HARDWARE.get(profile.name)
    return Bundle(digest, model, version, profile.name, t.runtime, t.format, t.precision, t.quant, size,
                  arch=hw.arch if hw else "")


def _get(obj: Any, name: str, default: Any = None) -> Any:
    return obj.get(name, default) if isinstance(obj, Mapping) else getattr(obj, name, default)


@dataclass
class Catalog:
    """Maps an install's sha256 to the bundle a device gets; holds the initial bundles.

    Args:
        profiles: the simulated profiles, by name.
        release: a :class:`agent.bundle.release.Release` (or anything with ``bundles``: profile ->
            an object or mapping with ``sha256``, ``size``, ``manifest_digest``, ``model``,
            ``version``, ``quant``), or None.
    """

    profiles: Mapping[str, DeviceProfile]
    release: Any = None
    _by_sha: dict[str, Bundle] = field(default_factory=dict)
    _initial: dict[str, Bundle] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bundles = _get(self.release, "bundles") if self.release is not None else None
        if self.release is not None and not isinstance(bundles, Mapping):
            raise SimulatorError("the release has no 'bundles' mapping (profile -> bundle)")
        for pname, b in (bundles or {}).items():
            prof = self.profiles.get(pname)
            sha, digest = _get(b, "sha256"), _get(b, "manifest_digest")
            if not isinstance(sha, str) or not isinstance(digest, str):
                raise SimulatorError(f"release bundle for {pname!r} lacks sha256 / manifest_digest")
            model, version = str(_get(b, "model", INITIAL_MODEL)), int(_get(b, "version", 2))
            quality, threshold = _get(b, "quality"), _get(b, "fidelity_threshold")
            t = prof.target if prof is not None else None
            hw = HARDWARE.get(pname)
            self._by_sha[sha] = Bundle(
                digest, model, version, pname, str(_get(b, "runtime", t.runtime if t else "")),
                str(_get(b, "format", t.format if t else "")),
                str(_get(b, "precision", t.precision if t else "")),
                str(_get(b, "quant", t.quant if t else "") or ""), int(_get(b, "size", 1)),
                dict(quality) if quality else None, arch=hw.arch if hw else "",
                fidelity_threshold=float(threshold) if isinstance(threshold, int | float) else None)
            # Devices start one version behind the release (a rollout is an upgrade).
            if prof is not None:
                self._initial[pname] = _bundle_for(
                    prof, _fake_digest(f"initial/{pname}/{model}/{version - 1}"), model, max(version - 1, 0),
                    int(_get(b, "size", 1)))

    def initial(self, profile: str) -> Bundle:
        """The bundle a device of ``profile`` serves at start."""
        if profile not in self._initial:
            prof = self.profiles[profile]
            self._initial[profile] = _bundle_for(prof, _fake_digest(f"initial/{profile}/{INITIAL_MODEL}/1"),
                                                 INITIAL_MODEL, 1, 260 * _MIB)
        return self._initial[profile]

    def lookup(self, sha256: str, size: int, profile: str) -> tuple[Bundle, bool]:
        """The bundle behind ``sha256`` for a device of ``profile``.

        Returns:
            ``(bundle, known)``: ``known`` is False for a fake bundle derived from the sha256
            (version 2 of the initial model for this profile; not checked for downgrades).
        """
        found = self._by_sha.get(sha256)
        if found is not None:
            return found, True
        return _bundle_for(self.profiles[profile], _fake_digest(f"bundle/{sha256}"), INITIAL_MODEL, 2,
                           size), False


def _fake_digest(text: str) -> str:
    return hashlib.sha256(b"edgepack-sim-manifest\0" + text.encode()).hexdigest()


def baseline(hw: Hardware, rng: random.Random) -> dict[str, float]:
    """One device's own figures on the initial bundle (the class's, varied by up to 8%)."""
    def vary(x: float) -> float:
        return x * rng.uniform(0.92, 1.08)

    return {"decode_tok_s": vary(hw.decode_tok_s), "ttft_ms": vary(hw.ttft_ms),
            "peak_rss_mb": vary(hw.peak_rss_mb)}


def gate_report(base: Mapping[str, float], profile: DeviceProfile, rng: random.Random, *,
                slow_factor: float = 1.0, garbage: bool = False, runs_tokens: int = 32,
                fidelity_threshold: float | None = None) -> dict[str, Any]:
    """The post-install gate report of one install, in :func:`agent.gate.run_gate`'s shape.

    The SLO verdict comes from the real :func:`agent.gate.judge`; a failed fidelity check adds
    the agent's message to ``failures`` (fidelity is judged whatever the SLO verdict, as the gate
    does).

    Args:
        base: the device's own figures on its first bundle.
        profile: its profile (the SLO).
        rng: this install's random source (figures drift by up to 3%).
        slow_factor: decode tok/s is multiplied by it and TTFT divided by it (1: a normal device).
        garbage: the model computes other tokens than the build host (agreement far below the
            threshold).
        runs_tokens: tokens of the measured generation.
        fidelity_threshold: the bundle's fidelity threshold (None: :data:`FIDELITY_THRESHOLD`).
    """
    from agent.gate import Figures, judge

    drift = rng.uniform(0.97, 1.03)
    figures = Figures(ttft_ms=base["ttft_ms"] / drift / slow_factor,
                      decode_tok_s=base["decode_tok_s"] * drift * slow_factor,
                      peak_rss_mb=base["peak_rss_mb"] * rng.uniform(0.99, 1.02), tokens=runs_tokens,
                      decode_tokens=runs_tokens - 1)
    verdict = judge(figures, {"min_decode_tok_s": profile.slo.min_decode_tok_s,
                              "max_ttft_ms": profile.slo.max_ttft_ms, "max_rss_mb": profile.slo.max_rss_mb})
    threshold = FIDELITY_THRESHOLD if fidelity_threshold is None else fidelity_threshold
    agreement = rng.uniform(0.02, 0.2) if garbage else rng.uniform(max(threshold, 0.95), 1.0)
    fid_ok = agreement >= threshold
    fidelity = {"checked": True, "ok": fid_ok, "agreement": round(agreement, 4),
                "positions": FIDELITY_POSITIONS, "threshold": threshold, "ms": round(rng.uniform(80, 400), 1)}
    failures = list(verdict.failures)
    if not fid_ok:  # agent.fidelity's wording
        failures.append(f"fidelity: top-1 agreement {agreement:.3f} over {FIDELITY_POSITIONS} positions "
                        f"< {threshold:.2f} on the probe text (this device computes other tokens than "
                        "the build host did for the same bundle)")
    return {"ok": not failures, **figures.to_dict(), "failures": failures, "thresholds": verdict.thresholds,
            "fidelity": fidelity}


__all__ = ["FIDELITY_THRESHOLD", "HARDWARE", "INITIAL_MODEL", "Bundle", "Catalog", "Hardware",
           "SimulatorError", "apportion", "baseline", "facts", "gate_report", "parse_mix"]
