"""Build signed bundles for device profiles: plan -> convert/quantize -> measure -> gate -> sign.

Workflow: (1) plan every profile purely (:func:`packager.plan.plan`), (2) build each distinct
variant once — profiles that want the same (runtime, format, precision, quant, device) share it,
(3) measure each variant's quality once against the full-precision reference through the runtime
that will serve it, (4) per profile, refuse variants over the profile's quality budget (never
signed), (5) write and sign one bundle per remaining profile, (6) write a build report.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.bundle import FileEntry, Manifest, Requirements, SigningKey, Target
from agent.errors import PackagingError, QualityBudgetError
from agent.profiles import DeviceProfile
from packager.bundler import hash_file, write_bundle
from packager.model import ModelInfo
from packager.plan import BuildPlan, ProfilePlan, Variant, plan
from packager.quality import QualityReport, check_budget

log = logging.getLogger("packager.build")

PAYLOAD_NAME = {"gguf": "model.gguf"}


@dataclass
class BuiltBundle:
    profile: str
    variant: str
    path: Path
    manifest: Manifest
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        m = self.manifest
        return {"profile": self.profile, "variant": self.variant, "bundle": str(self.path),
                "version": m.version, "runtime": m.target.runtime, "format": m.target.format,
                "precision": m.target.precision, "quant": m.target.quant, "device": m.target.device,
                "size_bytes": self.size_bytes, "quality": m.quality}


@dataclass
class BuildReport:
    model: dict[str, Any]
    bundles: list[BuiltBundle] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # profile -> reason (plan / runtime)
    over_budget: dict[str, str] = field(default_factory=dict)  # profile -> quality refusal
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> size + quality

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "bundles": [b.to_dict() for b in self.bundles],
                "refused": self.refused, "over_budget": self.over_budget, "variants": self.variants}

    def to_markdown(self) -> str:
        lines = [f"# Build report: {self.model['name']}", "",
                 f"Source: `{self.model['source_kind']}` {self.model['source_digest']}, "
                 f"{self.model['n_params'] / 1e6:.0f} M parameters.", "",
                 "| variant | size (MiB) | perplexity | reference | Δ ppl % | top-1 agree |",
                 "|---|---:|---:|---:|---:|---:|"]
        for key, v in self.variants.items():
            q = v.get("quality", {})
            nan = float("nan")
            lines.append(
                f"| {key} | {v['size_bytes'] / 2**20:.1f} | {q.get('ppl', nan):.3f} | "
                f"{q.get('reference_ppl', nan):.3f} | {q.get('delta_pct', nan):+.2f} | "
                f"{q.get('top1_agreement') or nan:.3f} |"
            )
        lines += ["", "| profile | bundle | version |", "|---|---|---:|"]
        lines += [f"| {b.profile} | {b.path.name} | {b.manifest.version} |" for b in self.bundles]
        sections = (("Refused (plan)", self.refused), ("Refused (quality budget)", self.over_budget))
        for title, refusals in sections:
            if refusals:
                lines += ["", f"## {title}", ""]
                lines += [f"- **{p}**: {why}" for p, why in refusals.items()]
        return "\n".join(lines) + "\n"


def model_slug(name: str) -> str:
    """A manifest-safe model name: "Gemma 3 270m" -> "gemma-3-270m"."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._")
    return slug[:128] or "model"


def chat_template_of(model: ModelInfo) -> str | None:
    """The model's chat template, from the HF folder or the GGUF metadata (None if it has none)."""
    if model.source_kind == "hf":
        jinja = model.path / "chat_template.jinja"
        if jinja.exists():
            return jinja.read_text(encoding="utf-8")
        cfg = model.path / "tokenizer_config.json"
        if cfg.exists():
            t = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
            return t if isinstance(t, str) else None
        return None
    import gguf  # host-only dependency, read lazily

    reader = gguf.GGUFReader(str(model.path))
    f = reader.fields.get("tokenizer.chat_template")
    if f is None:
        return None
    return bytes(f.parts[f.data[0]]).decode("utf-8")


def build_variant(model: ModelInfo, variant: Variant, *, cache_dir: Path, threads: int) -> Path:
    """Build one variant's artifact (cached by source digest, quant and tool version).

    Raises:
        PackagingError: the variant's format is not buildable, or a tool failed.
    """
    if variant.format == "gguf":
        from packager.gguf import build_gguf_variant

        return build_gguf_variant(model, variant.quant, cache_dir / "variants", cache_dir=cache_dir,
                                  threads=threads)
    raise PackagingError(f"format {variant.format!r} is not buildable yet")


def measure_variant(model: ModelInfo, variant: Variant, artifact: Path, *, cache_dir: Path,
                    threads: int) -> QualityReport:
    """Quality of one variant against the full-precision reference, through its runtime."""
    from packager.gguf import reference_gguf
    from packager.quality import measure

    ref = reference_gguf(model, cache_dir)
    return measure(artifact, ref, runtime=variant.runtime, threads=threads)


def _manifest(model: ModelInfo, pp: ProfilePlan, artifact: Path, quality: dict[str, Any],
              key: SigningKey, version: int, now: datetime, chat_template: str | None) -> Manifest:
    prof = pp.profile
    name = PAYLOAD_NAME[pp.variant.format]
    size, digest = hash_file(artifact)
    return Manifest(
        model_name=model_slug(model.name),
        version=version,
        profile=prof.name,
        target=Target(pp.variant.runtime, pp.variant.format, pp.variant.precision, pp.variant.quant,
                      pp.variant.device, name),
        files=[FileEntry(name, size, digest)],
        requirements=Requirements(prof.match.arch, pp.estimate.total_bytes, size),
        generation={"context": pp.context, "threads": prof.target.threads,
                    "chat_template": chat_template or "", "repeat_penalty": 1.15},
        quality=quality,
        slo=asdict(prof.slo),
        source={"kind": model.source_kind, "digest": model.source_digest, "name": model.name,
                "n_params": model.n_params, "native_quant": model.native_quant},
        signer_key_id=key.key_id,
        created=now.strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


def build(
    model: ModelInfo,
    profiles: Iterable[DeviceProfile],
    key: SigningKey,
    out_dir: Path,
    *,
    cache_dir: Path,
    bundle_version: int | None = None,
    threads: int = 0,
    now: datetime | None = None,
) -> BuildReport:
    """Build, gate and sign one bundle per profile.

    Args:
        model: the resolved source model.
        profiles: the device profiles to build for.
        key: the signing key.
        out_dir: where bundles and the report are written.
        cache_dir: where converted variants are cached between builds.
        bundle_version: the monotonic version; default: the UTC time as YYYYMMDDHHMMSS.
        threads: threads for quantization and measurement (0 = all cores).
        now: the build time (read once).

    Returns:
        The report: bundles written, profiles refused by the plan or the quality budget.

    Raises:
        PackagingError: a conversion or quantization failed.
    """
    now = now or datetime.now(UTC)
    version = bundle_version if bundle_version is not None else int(now.strftime("%Y%m%d%H%M%S"))
    bp: BuildPlan = plan(profiles, model)
    report = BuildReport(model=model.to_dict(), refused=dict(bp.refused))
    for name, why in bp.refused.items():
        log.warning("profile %s: %s", name, why)
    artifacts: dict[str, Path] = {}
    qualities: dict[str, QualityReport] = {}
    for i, v in enumerate(bp.variants, 1):  # (2) each distinct variant once
        log.info("[%d/%d] building %s", i, len(bp.variants), v.key)
        artifacts[v.key] = build_variant(model, v, cache_dir=cache_dir, threads=threads)
        log.info("[%d/%d] measuring %s", i, len(bp.variants), v.key)
        qualities[v.key] = measure_variant(model, v, artifacts[v.key], cache_dir=cache_dir,
                                           threads=threads)
        report.variants[v.key] = {"size_bytes": artifacts[v.key].stat().st_size,
                                  "quality": qualities[v.key].to_manifest()}
    template = chat_template_of(model)
    for name, pp in bp.profiles.items():
        q = qualities[pp.variant.key]
        try:  # (4) the gate: an over-budget variant is never signed for this profile
            check_budget(q, pp.profile)
        except QualityBudgetError as e:
            log.error("%s", e)
            report.over_budget[name] = str(e)
            continue
        m = _manifest(model, pp, artifacts[pp.variant.key], q.to_manifest(), key, version, now, template)
        out = out_dir / f"{m.model_name}-{name}-{pp.variant.quant}-v{version}.bundle"
        write_bundle(out, m, key, {m.files[0].path: artifacts[pp.variant.key]})
        report.bundles.append(BuiltBundle(name, pp.variant.key, out, m, out.stat().st_size))
        log.info("signed %s", out.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "build-report.json").write_text(json.dumps(report.to_dict(), indent=2, default=str))
    (out_dir / "build-report.md").write_text(report.to_markdown())
    return report
