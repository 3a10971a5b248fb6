"""The build planner: which variant each device profile gets, and whether it fits. Pure, no I/O.

For every profile the planner takes ``target.quant`` or, when that does not fit the profile's RAM
budget, the first of ``target.fallbacks`` that does, and estimates the memory it needs (weights +
KV cache + runtime overhead). Profiles that share a (runtime, format, precision, quant, device)
share one :class:`Variant`, which is built once.

What can be built is one set, :data:`BUILDABLE_FORMATS`: GGUF (llama.cpp), ONNX (the
onnxruntime-genai builder) and OpenVINO IR (optimum-intel + NNCF). A profile's ``target.options``
(int4 block size, group size, symmetric weights, ...) change the artifact, so they are part of the
variant: two profiles share a build only when those agree too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from agent.errors import PlanError
from agent.profiles.schema import GGUF_QUANTS, DeviceProfile
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
class ProfilePlan:
    """What one profile gets and why."""

    profile: DeviceProfile
    variant: Variant
    estimate: MemoryEstimate
    reasons: tuple[str, ...]
    context: int  # the profile's context, clipped to the model's


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


def plan_profile(profile: DeviceProfile, model: ModelInfo) -> ProfilePlan:
    """Choose the variant for one profile: its quant, else the first fallback that fits its RAM.

    Args:
        profile: the device class.
        model: the source model.

    Returns:
        The chosen variant, its memory estimate, the effective context and the reasons.

    Raises:
        PlanError: the profile's format cannot be built yet, or no allowed quant fits the RAM
            budget (the message names each estimate and the budget).
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
    context = min(t.context, model.max_context)
    reasons: list[str] = []
    if context < t.context:
        reasons.append(f"context {t.context} clipped to the model's maximum {model.max_context}")
    budget = ram_budget_bytes(profile)
    budget_src = (f"ram_budget_gb {t.ram_budget_gb:g}" if t.ram_budget_gb else
                  f"{DEFAULT_BUDGET_FRACTION:.0%} of min_ram_gb {profile.match.min_ram_gb:g}")
    # GGUF names a llama.cpp quant type; ONNX and OpenVINO build a precision directly.
    first = t.quant or ("Q4_K_M" if t.format == "gguf" else t.precision)
    candidates = [first, *(q for q in t.fallbacks if q != first)]
    tried: list[str] = []
    for quant in candidates:
        est = estimate_bytes(model, quant, context, fmt=t.format)
        if budget and est.total_bytes > budget:
            tried.append(f"{quant} needs {est}")
            continue
        if tried:
            reasons.append(f"{'; '.join(tried)}: over the budget of {budget / GIB:.2f} GiB "
                           f"({budget_src}); fell back to {quant}")
        if budget:
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
        return ProfilePlan(profile, variant, est, tuple(reasons), context)
    raise PlanError(
        f"{model.name} ({model.n_params / 1e9:.2f} B params) does not fit profile {profile.name} "
        f"at context {context}: {'; '.join(tried)}; the budget is {budget / GIB:.2f} GiB "
        f"({budget_src})",
        hint="Add a smaller quant to target.fallbacks, lower target.context, or pick a smaller "
        "model for this device class.",
    )


def plan(profiles: Iterable[DeviceProfile], model: ModelInfo) -> BuildPlan:
    """Plan every profile; collect refusals instead of stopping at the first.

    Args:
        profiles: the device classes to build for.
        model: the source model.

    Returns:
        A :class:`BuildPlan` whose ``variants`` lists each distinct variant once, in the order the
        profiles first need it.
    """
    plans: dict[str, ProfilePlan] = {}
    refused: dict[str, str] = {}
    variants: dict[Variant, None] = {}  # an ordered set
    for p in profiles:
        try:
            pp = plan_profile(p, model)
        except PlanError as e:
            refused[p.name] = str(e)
            continue
        plans[p.name] = pp
        variants.setdefault(pp.variant, None)
    return BuildPlan(plans, refused, tuple(variants))
