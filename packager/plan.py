"""The build planner: which variant each device profile gets, and whether it fits. Pure, no I/O.

For every profile the planner takes ``target.quant`` or, when that does not fit the profile's RAM
budget, the first of ``target.fallbacks`` that does, and estimates the memory it needs (weights +
KV cache + runtime overhead). Profiles that share a (runtime, format, precision, quant, device)
share one :class:`Variant`, which is built once.

What can be built is one set, :data:`BUILDABLE_FORMATS`: GGUF (llama.cpp), ONNX (the
onnxruntime-genai builder) and OpenVINO IR (optimum-intel + NNCF). A profile's ``target.options``
(int4 block size, group size, symmetric weights, ...) change the artifact, so they are part of the
variant: two profiles share a build only when those agree too.

A precision override (:class:`Override`: ``edgepack plan|build --precision``, ``--quant`` or
``--override PROFILE=VALUE``) replaces a profile's ``target.quant`` and its fallbacks for one
build and answers to the same rules: over the RAM budget it is refused with the numbers unless
forced; the converter refuses what it cannot build or run, with its own reasons (for every
profile: the plan says now what the build would stop on); the quality budget still applies
at build time, or ``max_loss_pct`` for that build. Each :class:`ProfilePlan` carries a
:class:`Choice`: who chose, and what the profile itself would have chosen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.errors import PackagingError, PlanError
from agent.profiles.schema import GGUF_QUANTS, PRECISIONS, DeviceProfile
from packager.model import READY_FORMATS, ModelInfo

GIB = 1024**3
# Formats the packager can build now. The single extension point for new converters.
BUILDABLE_FORMATS: frozenset[str] = frozenset({"gguf", "onnx", "openvino-ir"})

# Devices each converter can target (GGUF files run on any llama.cpp backend). The onnxruntime-genai
# 0.18 builder has no QNN target: Hexagon NPU models come from Qualcomm's own toolchain.
BUILDABLE_DEVICES: dict[str, frozenset[str]] = {
    "onnx": frozenset({"cpu", "cuda", "dml"}),
    "openvino-ir": frozenset({"cpu", "gpu", "npu"}),
}
# format -> the converter module whose ``check_variant(model, variant)`` raises what its build
# would (imported lazily; both are light). GGUF quants are checked here, against GGUF_QUANTS.
CONVERTER_CHECKS: dict[str, str] = {"onnx": "packager.onnx", "openvino-ir": "packager.openvino"}
# Formats whose device builds only load on that device: their quality is scored on the CPU build
# (same precision and options), which must therefore be buildable and runnable too.
CPU_PROXY_FORMATS = frozenset({"onnx"})
# The GGUF quant a precision override means, unless the profile's own quant has that precision.
GGUF_QUANT_OF: dict[str, str] = {"int4": "Q4_K_M", "int8": "Q8_0", "fp16": "F16", "fp32": "F32"}

# Average stored bits per weight, scales and all. K-quants mix block types per tensor, hence the
# fractional values (llama.cpp's own reported sizes for 7B-class models).
GGUF_BITS_PER_WEIGHT = {
    "Q4_0": 4.5, "Q4_K_M": 4.85, "Q5_K_M": 5.7, "Q8_0": 8.5, "F16": 16.0, "F32": 32.0,
}
# ONNX (ORT GenAI) and OpenVINO IR by precision: int4 is blockwise with fp16 scales per 32/128.
PRECISION_BITS_PER_WEIGHT = {"int4": 4.5, "int8": 8.0, "fp16": 16.0, "fp32": 32.0}
KV_BYTES_PER_VALUE = 2  # the runtimes keep the KV cache in f16 by default
RUNTIME_OVERHEAD_BYTES = 150 * 1024**2  # runtime code, compute buffers, tokenizer, Python
DEFAULT_BUDGET_FRACTION = 0.8  # of match.min_ram_gb when the profile gives no ram_budget_gb


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a variant needs resident on the device at a given context length."""

    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int
    total_bytes: int

    def __str__(self) -> str:
        return (
            f"{self.total_bytes / GIB:.2f} GiB (weights {self.weights_bytes / GIB:.2f} + "
            f"KV {self.kv_cache_bytes / GIB:.2f} + runtime {self.overhead_bytes / GIB:.2f})"
        )


@dataclass(frozen=True)
class Variant:
    """One artifact to build; profiles with equal keys share it."""

    runtime: str
    format: str
    precision: str
    quant: str  # the tool's name ("Q4_K_M"); for ONNX/OpenVINO the precision itself
    device: str
    # The profile's build options as sorted (key, value) pairs: hashable, so equal options share
    # a build. ``dict(variant.options)`` gives them back.
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def key(self) -> str:
        """A stable, file-name-safe identifier, e.g. ``llamacpp-gguf-Q4_K_M-cpu``; options add a
        short digest (``ortgenai-onnx-int4-cpu-3fa2b1``) so builds that differ only there differ."""
        base = f"{self.runtime}-{self.format}-{self.quant}-{self.device}"
        if not self.options:
            return base
        blob = json.dumps(self.options, sort_keys=True, separators=(",", ":")).encode()
        return f"{base}-{hashlib.sha256(blob).hexdigest()[:6]}"


@dataclass(frozen=True)
class Override:
    """A precision the user chose for one build: a precision class or a GGUF quant name.

    Raises:
        PlanError: ``value`` is neither (the message lists both).
    """

    value: str  # int4 | int8 | fp16 | fp32, or a GGUF quant (Q4_0, Q4_K_M, Q5_K_M, Q8_0, F16, F32)

    def __post_init__(self) -> None:
        if self.value not in PRECISIONS and self.value not in GGUF_QUANTS:
            raise PlanError(
                f"precision override {self.value!r} is neither a precision ({', '.join(PRECISIONS)}) "
                f"nor a GGUF quant ({', '.join(sorted(GGUF_QUANTS))})")

    @property
    def is_quant(self) -> bool:
        """A GGUF quant name (only GGUF profiles take it), not a precision class."""
        return self.value in GGUF_QUANTS

    @classmethod
    def parse_pair(cls, text: str) -> tuple[str, Override]:
        """``"raspberry-pi-5=Q5_K_M"`` -> ``("raspberry-pi-5", Override("Q5_K_M"))``.

        Raises:
            PlanError: no ``=``, an empty profile name, or a value :class:`Override` refuses.
        """
        name, sep, value = text.partition("=")
        if not sep or not name.strip():
            raise PlanError(f"override {text!r} is not PROFILE=PRECISION_OR_QUANT",
                            hint="For example --override raspberry-pi-5=Q5_K_M.")
        return name.strip(), cls(value.strip())


@dataclass(frozen=True)
class Choice:
    """Who chose a profile's precision for this build, and what the profile would have chosen."""

    by: str = "profile"  # "profile": its target.quant and fallbacks; "user": an Override
    requested: str = ""  # the override as given ("Q5_K_M", "int8"); "" when the profile chose
    profile_variant: Variant | None = None  # what the profile itself would build (None: refused)
    profile_estimate: MemoryEstimate | None = None
    profile_refused: str = ""  # why the profile's own choice would be refused
    forced: bool = False  # over the RAM budget, built anyway (--force)
    ram_budget_bytes: int = 0  # the profile's RAM budget (0: none stated)
    max_loss_pct: float | None = None  # replaces the profile's quality budget (--max-loss)
    profile_max_loss_pct: float = 0.0  # the profile's own budget.max_ppl_increase_pct

    def __post_init__(self) -> None:
        if self.by not in ("profile", "user"):
            raise PlanError(f"a precision is chosen by the profile or the user, not {self.by!r}")

    @property
    def recorded(self) -> bool:
        """Whether anything differs from the profile's own choice (then the manifest says so)."""
        return self.by != "profile" or self.max_loss_pct is not None

    def to_dict(self) -> dict[str, Any]:
        """The choice as plain data: ``plan --json``, the manifest's ``choice``, the report."""
        d: dict[str, Any] = {"by": self.by}
        if self.by == "user":
            v, est = self.profile_variant, self.profile_estimate
            d["requested"] = self.requested
            d["profile_choice"] = None if v is None or est is None else {
                "variant": v.key, "precision": v.precision, "quant": v.quant,
                "estimate_bytes": est.total_bytes}
            if self.profile_refused:
                d["profile_refused"] = self.profile_refused
            d["forced"] = self.forced
            if self.forced:
                d["ram_budget_bytes"] = self.ram_budget_bytes
        if self.max_loss_pct is not None:
            d["max_loss_pct"] = self.max_loss_pct
            d["profile_max_loss_pct"] = self.profile_max_loss_pct
        return d


@dataclass(frozen=True)
class ProfilePlan:
    """What one profile gets and why."""

    profile: DeviceProfile
    variant: Variant
    estimate: MemoryEstimate
    reasons: tuple[str, ...]
    context: int  # the profile's context, clipped to the model's
    choice: Choice = Choice()

    @property
    def max_loss_pct(self) -> float:
        """The quality budget this build applies: ``--max-loss`` when given, else the profile's."""
        if self.choice.max_loss_pct is not None:
            return self.choice.max_loss_pct
        return self.profile.budget.max_ppl_increase_pct


@dataclass(frozen=True)
class BuildPlan:
    """The plan for a set of profiles: per-profile choices, refusals, and the variants to build."""

    profiles: dict[str, ProfilePlan]
    refused: dict[str, str]  # profile name -> why it gets nothing
    variants: tuple[Variant, ...] = field(default=())  # unique, in first-use order


def bits_per_weight(fmt: str, quant: str) -> float:
    """Average bits per weight of a quant (GGUF name) or precision (int4/int8/fp16/fp32).

    Raises:
        PlanError: the quant is unknown.
    """
    if fmt == "gguf" and quant in GGUF_BITS_PER_WEIGHT:
        return GGUF_BITS_PER_WEIGHT[quant]
    if quant in PRECISION_BITS_PER_WEIGHT:
        return PRECISION_BITS_PER_WEIGHT[quant]
    if quant in GGUF_BITS_PER_WEIGHT:
        return GGUF_BITS_PER_WEIGHT[quant]
    raise PlanError(f"unknown quantization {quant!r} for format {fmt!r}")


def estimate_bytes(model: ModelInfo, quant: str, context: int, *, fmt: str = "gguf") -> MemoryEstimate:
    """Estimate the resident memory of ``model`` at ``quant`` with a KV cache of ``context`` tokens.

    Args:
        model: the source model's shape.
        quant: a GGUF quant name (Q4_K_M, ...) or a precision (int4, int8, fp16, fp32).
        context: tokens of KV cache to hold.
        fmt: the artifact format (gguf, onnx, openvino-ir); selects the bits-per-weight table.

    Returns:
        Weights, KV cache (K and V, every layer, f16) and a fixed runtime overhead, in bytes.

    Raises:
        PlanError: the quant is unknown.
    """
    weights = int(model.n_params * bits_per_weight(fmt, quant) / 8)
    kv = 2 * model.n_layers * context * model.n_kv_heads * model.head_dim * KV_BYTES_PER_VALUE
    return MemoryEstimate(weights, kv, RUNTIME_OVERHEAD_BYTES, weights + kv + RUNTIME_OVERHEAD_BYTES)


def ram_budget_bytes(profile: DeviceProfile) -> int:
    """The profile's RAM budget in bytes (``target.ram_budget_gb``, else 80% of the minimum RAM).

    Returns 0 when the profile states neither: no limit is known.
    """
    gb = profile.target.ram_budget_gb or DEFAULT_BUDGET_FRACTION * profile.match.min_ram_gb
    return int(gb * GIB)


def _override_quant(profile: DeviceProfile, override: Override) -> str:
    """The quant an override means for this profile's format (GGUF: a quant; else a precision)."""
    t = profile.target
    if t.format != "gguf":
        if override.is_quant:
            raise PlanError(
                f"{override.value} is a llama.cpp (GGUF) quant; profile {profile.name} builds "
                f"{t.format} for {t.runtime}",
                hint=f"Give it a precision instead: {', '.join(PRECISIONS)}.")
        return override.value
    if override.is_quant:
        return override.value
    own = t.quant or "Q4_K_M"
    return own if GGUF_QUANTS.get(own) == override.value else GGUF_QUANT_OF[override.value]


def _check_converter(model: ModelInfo, variant: Variant) -> None:
    """Refuse, with the converter's own reasons, what its build would stop on (and, where quality
    is scored on the CPU build, that build too)."""
    module = CONVERTER_CHECKS.get(variant.format)
    if module is None or model.source_kind == variant.format:  # a ready folder ships as it is
        return
    check = importlib.import_module(module).check_variant
    targets = [variant]
    if variant.format in CPU_PROXY_FORMATS and variant.device != "cpu":
        targets.append(dataclasses.replace(variant, device="cpu"))
    for v in targets:
        try:
            check(model, v)
        except PlanError:
            raise
        except PackagingError as e:
            scored = "" if v is variant else f" (the {v.device} build its quality is scored on)"
            raise PlanError(f"{e}{scored}", hint=e.diagnostics()) from e


def plan_profile(profile: DeviceProfile, model: ModelInfo, *, override: Override | None = None,
                 force: bool = False, max_loss_pct: float | None = None) -> ProfilePlan:
    """Choose the variant for one profile: its quant, else the first fallback that fits its RAM;
    or, with ``override``, exactly the user's choice.

    Args:
        profile: the device class.
        model: the source model.
        override: the precision the user chose; it replaces ``target.quant`` and the fallbacks.
        force: build an override that does not fit the RAM budget anyway (recorded in the
            choice); without an override nothing is forced (the fallbacks are the profile's
            answer to RAM).
        max_loss_pct: the quality budget (perplexity increase, %) that replaces the profile's
            for this build; None keeps the profile's.

    Returns:
        The chosen variant, its memory estimate, the effective context, the reasons and the
        :class:`Choice` (who chose, what the profile would have chosen).

    Raises:
        PlanError: the profile's format cannot be built yet; no allowed quant fits the RAM budget,
            or the override does not and ``force`` is off (the message names each estimate and
            the budget); the override does not apply to the format; the converter cannot build
            or run the variant (its own reason, e.g. fp16 ONNX on CPU for a GQA model);
            ``max_loss_pct`` is negative or not finite.
    """
    t = profile.target
    if t.format not in BUILDABLE_FORMATS:
        raise PlanError(
            f"format {t.format} is not buildable (known: {', '.join(sorted(BUILDABLE_FORMATS))})",
            hint=f"Profile {profile.name} targets {t.format}; change its target.format.",
        )
    devices = BUILDABLE_DEVICES.get(t.format)
    if devices is not None and t.device not in devices:
        raise PlanError(
            f"{t.format} cannot be built for device {t.device} (buildable: {', '.join(sorted(devices))})",
            hint=f"Change profile {profile.name}'s target.device, or its format.",
        )
    if model.source_kind in READY_FORMATS and t.format != model.source_kind:
        raise PlanError(
            f"the source is a ready {model.source_kind} folder: it ships as it is, to "
            f"{model.source_kind} profiles only (this one wants {t.format})",
            hint="Give an HF checkpoint to build every format from one model.",
        )
    if model.source_kind == "gguf" and t.format != "gguf":
        raise PlanError(
            f"{t.format} is built from an HF checkpoint, and the source is a GGUF file",
            hint="Pass the model's HF folder (transformers can dequantize a GGUF into one: "
            "see `edgepack model sample`).",
        )
    _check_max_loss(max_loss_pct)
    choice = Choice(max_loss_pct=max_loss_pct,
                    profile_max_loss_pct=profile.budget.max_ppl_increase_pct)
    if override is not None:
        try:
            own = plan_profile(profile, model)
            choice = dataclasses.replace(choice, profile_variant=own.variant,
                                         profile_estimate=own.estimate)
        except PlanError as e:
            choice = dataclasses.replace(choice, profile_refused=str(e))
        choice = dataclasses.replace(choice, by="user", requested=override.value,
                                     ram_budget_bytes=ram_budget_bytes(profile))
    context = min(t.context, model.max_context)
    reasons: list[str] = []
    if context < t.context:
        reasons.append(f"context {t.context} clipped to the model's maximum {model.max_context}")
    budget = ram_budget_bytes(profile)
    budget_src = (f"ram_budget_gb {t.ram_budget_gb:g}" if t.ram_budget_gb else
                  f"{DEFAULT_BUDGET_FRACTION:.0%} of min_ram_gb {profile.match.min_ram_gb:g}")
    if override is not None:
        candidates = [_override_quant(profile, override)]
        own_v, own_est = choice.profile_variant, choice.profile_estimate
        reasons.append(f"{override.value} chosen by the user; the profile would choose "
                       + (f"{own_v.quant} ({own_est})" if own_v and own_est else
                          f"nothing: {choice.profile_refused}"))
    else:
        # GGUF names a llama.cpp quant type; ONNX and OpenVINO build a precision directly.
        first = t.quant or ("Q4_K_M" if t.format == "gguf" else t.precision)
        candidates = [first, *(q for q in t.fallbacks if q != first)]
    if max_loss_pct is not None:
        reasons.append(f"quality budget {max_loss_pct:g}% for this build (the profile's: "
                       f"{choice.profile_max_loss_pct:g}%)")
    tried: list[str] = []
    for quant in candidates:
        est = estimate_bytes(model, quant, context, fmt=t.format)
        over = bool(budget) and est.total_bytes > budget
        if over and not (override is not None and force):
            tried.append(f"{quant} needs {est}")
            continue
        if tried:
            reasons.append(f"{'; '.join(tried)}: over the budget of {budget / GIB:.2f} GiB "
                           f"({budget_src}); fell back to {quant}")
        if over:
            reasons.append(f"{quant} needs {est}, over the budget of {budget / GIB:.2f} GiB "
                           f"({budget_src}): built anyway (forced)")
            choice = dataclasses.replace(choice, forced=True)
        elif budget:
            reasons.append(f"{quant} needs {est}, within {budget / GIB:.2f} GiB ({budget_src})")
        else:
            reasons.append(f"{quant} needs {est}; the profile states no RAM budget")
        if model.source_kind in READY_FORMATS:
            reasons.append(f"ready {model.source_kind} folder shipped as it is (declared {quant})")
        native = model.native_quant
        if native and native not in ("F32", "F16", "BF16") and quant != native:
            reasons.append(f"source is a {native} GGUF: {quant} quality is bounded by it")
        precision = GGUF_QUANTS.get(quant, t.precision) if t.format == "gguf" else quant
        options = tuple(sorted((str(k), v) for k, v in t.options.items()))
        variant = Variant(t.runtime, t.format, precision, quant, t.device, options)
        _check_converter(model, variant)
        return ProfilePlan(profile, variant, est, tuple(reasons), context, choice)
    if override is not None:
        own_v, own_est = choice.profile_variant, choice.profile_estimate
        raise PlanError(
            f"{tried[0]} (chosen by the user), over the RAM budget of {budget / GIB:.2f} GiB "
            f"({budget_src}) of profile {profile.name} at context {context}",
            hint="Pass --force to build it anyway (the manifest records it), or choose a smaller "
            "precision; the profile itself would choose "
            + (f"{own_v.quant} ({own_est})." if own_v and own_est else "nothing that fits."),
        )
    raise PlanError(
        f"{model.name} ({model.n_params / 1e9:.2f} B params) does not fit profile {profile.name} "
        f"at context {context}: {'; '.join(tried)}; the budget is {budget / GIB:.2f} GiB "
        f"({budget_src})",
        hint="Add a smaller quant to target.fallbacks, lower target.context, or pick a smaller "
        "model for this device class.",
    )


def _check_max_loss(max_loss_pct: float | None) -> None:
    if max_loss_pct is not None and not (math.isfinite(max_loss_pct) and max_loss_pct >= 0):
        raise PlanError(f"a quality budget must be a percentage >= 0, got {max_loss_pct}")


def plan(profiles: Iterable[DeviceProfile], model: ModelInfo, *,
         overrides: Mapping[str, Override] | None = None, force: bool = False,
         max_loss_pct: float | None = None) -> BuildPlan:
    """Plan every profile; collect refusals instead of stopping at the first.

    Args:
        profiles: the device classes to build for.
        model: the source model.
        overrides: profile name -> the precision the user chose for it in this build.
        force: build overrides that do not fit their profile's RAM budget anyway (recorded).
        max_loss_pct: a quality budget (perplexity increase, %) replacing every profile's for
            this build (recorded); None keeps each profile's.

    Returns:
        A :class:`BuildPlan` whose ``variants`` lists each distinct variant once, in the order the
        profiles first need it.

    Raises:
        PlanError: an override names a profile that is not being planned, ``force`` is given
            without any override (it would change nothing: say so rather than ignore it), or
            ``max_loss_pct`` is negative or not finite.
    """
    _check_max_loss(max_loss_pct)
    profiles = list(profiles)
    overrides = dict(overrides or {})
    names = [p.name for p in profiles]
    stray = sorted(set(overrides) - set(names))
    if stray:
        raise PlanError(f"precision override for {', '.join(stray)}, which is not being built "
                        f"(profiles: {', '.join(names) or 'none'})",
                        hint="Select the profile with --profile, or fix the name.")
    if force and not overrides:
        raise PlanError("--force lifts the RAM refusal of a precision override, and there is none",
                        hint="Give --precision, --quant or --override PROFILE=VALUE; without one a "
                        "profile's target.fallbacks are its answer to RAM.")
    plans: dict[str, ProfilePlan] = {}
    refused: dict[str, str] = {}
    variants: dict[Variant, None] = {}  # an ordered set
    for p in profiles:
        try:
            pp = plan_profile(p, model, override=overrides.get(p.name), force=force,
                              max_loss_pct=max_loss_pct)
        except PlanError as e:
            # An override's refusal carries its way out (--force, what the profile would choose).
            hint = e.diagnostics() if p.name in overrides else ""
            refused[p.name] = f"{e} ({hint})" if hint else str(e)
            continue
        plans[p.name] = pp
        variants.setdefault(pp.variant, None)
    return BuildPlan(plans, refused, tuple(variants))
