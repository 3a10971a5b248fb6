"""Build signed bundles for device profiles: plan -> convert/quantize -> measure -> gate -> sign.

Workflow: (1) plan every profile purely (:func:`packager.plan.plan`), (2) build each distinct
variant once — profiles that want the same (runtime, format, precision, quant, device) share it,
(3) measure each variant's quality once against the full-precision reference through the runtime
that will serve it, and its own top-1 ids on the agent's fidelity probe (agent/fidelity.py) the
same way, (4) per profile, refuse variants over the profile's quality budget (never signed),
(5) write and sign one bundle per remaining profile, its manifest carrying the probe ids and the
profile's ``min_agreement``, and, when the user chose the precision (``overrides``) or the quality
budget (``max_loss_pct``), the plan's :class:`~packager.plan.Choice` (``choice``), (6) write and
sign the release (``release.json`` + ``release.json.sig``: every bundle of this build by profile,
agent/bundle/release.py) and the build report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent._fs import file_digest
from agent.bundle import Fidelity, Manifest, Release, ReleaseBundle, Requirements, SigningKey, Target
from agent.errors import PackagingError, QualityBudgetError
from agent.profiles import DeviceProfile
from packager.bundler import file_entries, write_bundle
from packager.model import READY_FORMATS, ModelInfo, chat_template_in
from packager.plan import CPU_PROXY_FORMATS, BuildPlan, Override, ProfilePlan, Variant, plan
from packager.quality import QualityReport, check_budget

log = logging.getLogger("packager.build")

PAYLOAD_NAME = {"gguf": "model.gguf"}  # single-file formats; folders ship under FOLDER_NAME
FOLDER_NAME = "model"
# CPU_PROXY_FORMATS (from packager.plan, which checks those builds too): formats whose device
# builds only load on that device; their quality is scored on the CPU build.
# format -> (module, build function, reference function); imported only when that format is built.
# A build function is f(model, variant, out_dir, *, cache_dir, threads) -> file or folder, a
# reference function f(model, cache_dir, *, threads) -> the full-precision artifact to score against.
BACKENDS: dict[str, tuple[str, str, str]] = {
    "gguf": ("packager.gguf", "build_variant", "reference_gguf"),
    "onnx": ("packager.onnx", "build_onnx_variant", "reference_onnx"),
    "openvino-ir": ("packager.openvino", "build_openvino_variant", "reference_openvino"),
}


@dataclass
class BuiltBundle:
    profile: str
    variant: str
    path: Path
    manifest: Manifest
    size_bytes: int
    sha256: str = ""  # of the bundle file
    manifest_digest: str = ""  # sha256 of the signed manifest bytes: the digest a device reports

    def to_dict(self) -> dict[str, Any]:
        m = self.manifest
        return {"profile": self.profile, "variant": self.variant, "bundle": str(self.path),
                "version": m.version, "runtime": m.target.runtime, "format": m.target.format,
                "precision": m.target.precision, "quant": m.target.quant, "device": m.target.device,
                "size_bytes": self.size_bytes, "sha256": self.sha256,
                "manifest_digest": self.manifest_digest, "quality": m.quality,
                "choice": m.choice or {"by": "profile"}}


@dataclass
class BuildReport:
    model: dict[str, Any]
    bundles: list[BuiltBundle] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # profile -> reason (plan / runtime)
    over_budget: dict[str, str] = field(default_factory=dict)  # profile -> quality refusal
    # key -> runtime, format, precision, size, quality and speed on this host
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    machine: str = ""  # the host the speed figures were measured on
    chart: str = ""  # the PNG's file name, when one was drawn
    release: str = ""  # the signed release.json listing this build's bundles ("" when none)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "bundles": [b.to_dict() for b in self.bundles],
                "refused": self.refused, "over_budget": self.over_budget, "variants": self.variants,
                "machine": self.machine, "chart": self.chart, "release": self.release}

    def to_markdown(self) -> str:
        from packager.report import cross_runtime_rows

        nan = float("nan")
        lines = [f"# Build report: {self.model['name']}", "",
                 f"Source: `{self.model['source_kind']}` {self.model['source_digest']}, "
                 f"{self.model['n_params'] / 1e6:.0f} M parameters.", "",
                 "Quality: perplexity on the packaged evaluation text, through the runtime that "
                 "serves the variant, against the full-precision build of the same format. Speed: "
                 f"greedy decode of the agent gate's fixed prompt on this host ({self.machine or 'n/a'}).",
                 "",
                 "| variant | size (MiB) | perplexity | reference | Δ ppl % | top-1 agree "
                 "| TTFT ms | decode tok/s |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for key, v in self.variants.items():
            q, sp = v.get("quality", {}), v.get("speed", {})
            speed = (f"{sp['ttft_ms']:.0f} | {sp['decode_tok_s']:.1f}" if "decode_tok_s" in sp
                     else "n/a | n/a")
            ref = (f"{q['reference_ppl']:.3f} | {q['delta_pct']:+.2f}" if q.get("delta_pct") is not None
                   else "not measured against a reference | n/a")
            lines.append(
                f"| {key} | {v['size_bytes'] / 2**20:.1f} | {q.get('ppl', nan):.3f} | {ref} | "
                f"{q.get('top1_agreement') or nan:.3f} | {speed} |"
            )
        if self.chart:
            lines += ["", f"![size vs quality loss vs decode speed]({self.chart})"]
        cross = cross_runtime_rows(self.variants)
        if cross:
            lines += ["", "## The same precision across runtimes", "",
                      "| precision | runtime | variant | size (MiB) | Δ ppl % | top-1 agree | tok/s |",
                      "|---|---|---|---:|---:|---:|---:|", *cross]
        not_run = {k: v["speed"]["error"] for k, v in self.variants.items()
                   if "error" in v.get("speed", {})}
        if not_run:
            lines += ["", "## Not runnable on this host (quality measured on its CPU build path)", ""]
            lines += [f"- **{k}**: {why}" for k, why in not_run.items()]
        lines += ["", "| profile | bundle | version |", "|---|---|---:|"]
        lines += [f"| {b.profile} | {b.path.name} | {b.manifest.version} |" for b in self.bundles]
        if self.release:
            lines += ["", f"Release (signed, every bundle above by profile): `{Path(self.release).name}`"]
        chosen = [f"- **{b.profile}**: {describe_choice(b.manifest.choice)}"
                  for b in self.bundles if b.manifest.choice]
        if chosen:
            lines += ["", "## Chosen on the command line (recorded in the signed manifest)", "",
                      *chosen]
        sections = (("Refused (plan)", self.refused), ("Refused (quality budget)", self.over_budget))
        for title, refusals in sections:
            if refusals:
                lines += ["", f"## {title}", ""]
                lines += [f"- **{p}**: {why}" for p, why in refusals.items()]
        return "\n".join(lines) + "\n"


def describe_choice(choice: dict[str, Any]) -> str:
    """A manifest's ``choice`` in words (see :meth:`packager.plan.Choice.to_dict`)."""
    parts = []
    if choice.get("by") == "user":
        own = choice.get("profile_choice")
        parts.append(f"{choice.get('requested')} chosen by the user; the profile would have chosen "
                     + (f"{own['quant']} ({own['precision']})" if own else
                        f"nothing ({choice.get('profile_refused', 'refused')})"))
        if choice.get("forced"):
            parts.append(f"over the RAM budget of {choice.get('ram_budget_bytes', 0) / 2**30:.2f} "
                         "GiB, built with --force")
    if choice.get("max_loss_pct") is not None:
        parts.append(f"quality budget {choice['max_loss_pct']:g}% (--max-loss; the profile's "
                     f"{choice.get('profile_max_loss_pct', 0):g}%)")
    return "; ".join(parts) or "chosen by the profile"


def model_slug(name: str) -> str:
    """A manifest-safe model name: "Gemma 3 270m" -> "gemma-3-270m"."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._")
    return slug[:128] or "model"


def chat_template_of(model: ModelInfo) -> str | None:
    """The model's chat template, from the HF or ready folder or the GGUF metadata (None if none)."""
    if model.source_kind in READY_FORMATS:
        return chat_template_in(model.path)
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


def _backend(fmt: str) -> tuple[Any, Any]:
    entry = BACKENDS.get(fmt)
    if entry is None:
        raise PackagingError(f"format {fmt!r} is not buildable (known: {', '.join(sorted(BACKENDS))})")
    try:
        module = importlib.import_module(entry[0])
    except ImportError as e:  # a tool the backend imports at module level is not installed
        raise PackagingError(f"the {fmt} backend cannot load: {e}",
                             hint="Install the host tools: pip install 'edgepack[packager]'.") from e
    return getattr(module, entry[1]), getattr(module, entry[2])


def build_variant(model: ModelInfo, variant: Variant, *, cache_dir: Path, threads: int) -> Path:
    """Build one variant's artifact: a file (GGUF) or a folder (ONNX GenAI, OpenVINO IR).

    Cached by each backend (source digest, precision, options and tool version); a ready
    ONNX/OpenVINO folder given as the source is the artifact itself.

    Raises:
        PackagingError: the variant's format is not buildable, or a tool failed.
    """
    if model.source_kind == variant.format:  # a ready folder: shipped as it is
        return model.path
    build_fn, _ = _backend(variant.format)
    return Path(build_fn(model, variant, cache_dir / "variants", cache_dir=cache_dir, threads=threads))


def measure_variant(model: ModelInfo, variant: Variant, artifact: Path, *, cache_dir: Path,
                    threads: int) -> QualityReport:
    """Quality of one variant against the full-precision build of the same format, scored by the
    runtime that will serve it (a ready folder has no reference: it is scored, not compared)."""
    from packager.quality import measure

    if model.source_kind == variant.format:
        return measure(artifact, None, runtime=variant.runtime, threads=threads,
                       variant_name=variant.quant)
    if variant.format in CPU_PROXY_FORMATS and variant.device != "cpu":
        # An ONNX build for CUDA or DirectML only loads where that EP exists; its weights are the
        # CPU build's (same precision and options), which is what gets scored, and the manifest
        # says so (``measured_as``).
        proxy = dataclasses.replace(variant, device="cpu")
        log.info("%s cannot load on this host's CPU: scoring %s instead", variant.key, proxy.key)
        q = measure_variant(model, proxy, build_variant(model, proxy, cache_dir=cache_dir, threads=threads),
                            cache_dir=cache_dir, threads=threads)
        return dataclasses.replace(q, measured_as=proxy.key)
    _, reference_fn = _backend(variant.format)
    ref = Path(reference_fn(model, cache_dir, threads=threads))
    if variant.format == "gguf":  # GGUF files name their own quant type
        return measure(artifact, ref, runtime=variant.runtime, threads=threads)
    return measure(artifact, ref, runtime=variant.runtime, threads=threads,
                   variant_name=variant.quant, reference_name="fp32")


def probe_variant(model: ModelInfo, variant: Variant, artifact: Path, *, cache_dir: Path,
                  threads: int) -> tuple[tuple[int, ...], str]:
    """The variant's own top-1 ids on the fidelity probe through its runtime, on this host's CPU.

    Returns:
        (the ids, ``measured_as``): an ONNX build for CUDA or DirectML cannot load here, so its CPU
        build (same precision and options) is probed and its key returned, as for quality.

    Raises:
        PackagingError: the proxy could not be built; InferenceError / RuntimeUnavailableError:
            scoring failed.
    """
    from packager.quality import probe_ids

    if model.source_kind != variant.format and variant.format in CPU_PROXY_FORMATS \
            and variant.device != "cpu":
        proxy = dataclasses.replace(variant, device="cpu")
        path = build_variant(model, proxy, cache_dir=cache_dir, threads=threads)
        return probe_ids(path, runtime=proxy.runtime, threads=threads), proxy.key
    return probe_ids(artifact, runtime=variant.runtime, threads=threads), ""


def payload_files(artifact: Path, fmt: str) -> tuple[dict[str, Path], str]:
    """The bundle's payload for an artifact: ``{path in bundle: file on disk}`` and the entrypoint.

    A file ships as ``model.gguf``; a folder's files ship under ``model/`` in sorted order (the
    bundle bytes are reproducible), and the entrypoint is the folder.
    """
    if artifact.is_file():
        name = PAYLOAD_NAME.get(fmt, artifact.name)
        return {name: artifact}, name
    files = {f"{FOLDER_NAME}/{p.relative_to(artifact).as_posix()}": p
             for p in sorted(artifact.rglob("*")) if p.is_file()}
    if not files:
        raise PackagingError(f"{artifact} is an empty folder: nothing to bundle")
    return files, FOLDER_NAME


def artifact_size(artifact: Path) -> int:
    """Bytes of a file, or of every file in a folder."""
    if artifact.is_file():
        return artifact.stat().st_size
    return sum(p.stat().st_size for p in artifact.rglob("*") if p.is_file())


def _manifest(model: ModelInfo, pp: ProfilePlan, payload: dict[str, Path], entrypoint: str,
              quality: dict[str, Any], key: SigningKey, version: int, now: datetime,
              chat_template: str | None, probe: tuple[tuple[int, ...], str]) -> Manifest:
    from agent.fidelity import PROBE_SHA256, PROBE_WINDOW

    prof = pp.profile
    entries = file_entries(payload)
    size = sum(e.size for e in entries)
    slo = asdict(prof.slo)
    # The agreement threshold travels with the ids it is about, in the fidelity table.
    threshold = slo.pop("min_agreement")
    ids, measured_as = probe
    fidelity = Fidelity(probe_sha256=PROBE_SHA256, window=PROBE_WINDOW, top1=ids,
                        threshold=threshold, runtime=pp.variant.runtime, device="cpu",
                        measured_as=measured_as)
    return Manifest(
        model_name=model_slug(model.name),
        version=version,
        profile=prof.name,
        target=Target(pp.variant.runtime, pp.variant.format, pp.variant.precision, pp.variant.quant,
                      pp.variant.device, entrypoint),
        files=entries,
        requirements=Requirements(prof.match.arch, pp.estimate.total_bytes, size),
        generation={"context": pp.context, "threads": prof.target.threads,
                    "options": dict(pp.variant.options),
                    "chat_template": chat_template or ""},
        quality=quality,
        slo=slo,
        fidelity=fidelity,
        source={"kind": model.source_kind, "digest": model.source_digest, "name": model.name,
                "n_params": model.n_params, "native_quant": model.native_quant},
        choice=pp.choice.to_dict() if pp.choice.recorded else {},
        signer_key_id=key.key_id,
        created=now.strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


def release_of(report: BuildReport, model: ModelInfo, key: SigningKey, now: datetime) -> Release:
    """The release of a build's signed bundles: per profile the file, its digests, the manifest's
    quality and fidelity threshold, and the speed the report measured for its variant here."""
    bundles: dict[str, ReleaseBundle] = {}
    for b in report.bundles:
        m, q = b.manifest, b.manifest.quality
        speed = report.variants.get(b.variant, {}).get("speed")
        expected = dict(speed) if isinstance(speed, dict) and "error" not in speed else None
        quality = {k: q.get(k) for k in ("metric", "reference", "ppl", "reference_ppl", "delta_pct",
                                         "top1_agreement")}
        if q.get("measured_as"):
            quality["measured_as"] = q["measured_as"]
        bundles[b.profile] = ReleaseBundle(
            profile=b.profile, file=b.path.name, sha256=b.sha256, size=b.size_bytes,
            manifest_digest=b.manifest_digest, model=m.model_name, version=m.version,
            runtime=m.target.runtime, format=m.target.format, precision=m.target.precision,
            quant=m.target.quant, device=m.target.device, quality=quality, expected=expected,
            fidelity_threshold=m.fidelity.threshold if m.fidelity is not None else None)
    first = report.bundles[0].manifest
    return Release(model=first.model_name, version=first.version,
                   created=now.strftime("%Y-%m-%dT%H:%M:%SZ"), bundles=bundles,
                   signer_key_id=key.key_id,
                   source={"kind": model.source_kind, "digest": model.source_digest,
                           "name": model.name})


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
    speed: bool = True,
    overrides: dict[str, Override] | None = None,
    force: bool = False,
    max_loss_pct: float | None = None,
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
        speed: also measure each variant's TTFT and decode rate on this host for the report.
        overrides: profile name -> the precision the user chose (replaces its quant and
            fallbacks; see :func:`packager.plan.plan`).
        force: build overrides over their profile's RAM budget anyway (recorded).
        max_loss_pct: the quality budget (perplexity increase, %) for every profile of this
            build, replacing theirs (recorded).

    Returns:
        The report: bundles written, profiles refused by the plan or the quality budget, and the
        signed release listing the bundles (``release``; none when no bundle was written).

    Raises:
        PackagingError: a conversion or quantization failed.
        PlanError: an override names a profile not being built, or ``force`` without one.
    """
    now = now or datetime.now(UTC)
    version = bundle_version if bundle_version is not None else int(now.strftime("%Y%m%d%H%M%S"))
    bp: BuildPlan = plan(profiles, model, overrides=overrides, force=force,
                         max_loss_pct=max_loss_pct)
    report = BuildReport(model=model.to_dict(), refused=dict(bp.refused))
    if speed:
        from packager.report import machine_note

        report.machine = machine_note()
    for name, why in bp.refused.items():
        log.warning("profile %s: %s", name, why)
    artifacts: dict[str, Path] = {}
    qualities: dict[str, QualityReport] = {}
    probes: dict[str, tuple[tuple[int, ...], str]] = {}
    # One GGUF file serves cpu, cuda and metal profiles alike: time each (artifact, runtime) once.
    speeds: dict[tuple[Path, str], dict[str, Any]] = {}
    for i, v in enumerate(bp.variants, 1):  # (2) each distinct variant once
        log.info("[%d/%d] building %s", i, len(bp.variants), v.key)
        artifacts[v.key] = build_variant(model, v, cache_dir=cache_dir, threads=threads)
        log.info("[%d/%d] measuring %s", i, len(bp.variants), v.key)
        qualities[v.key] = measure_variant(model, v, artifacts[v.key], cache_dir=cache_dir,
                                           threads=threads)
        probes[v.key] = probe_variant(model, v, artifacts[v.key], cache_dir=cache_dir,
                                      threads=threads)
        report.variants[v.key] = {"size_bytes": artifact_size(artifacts[v.key]),
                                  "runtime": v.runtime, "format": v.format,
                                  "precision": v.precision, "quant": v.quant, "device": v.device,
                                  "quality": qualities[v.key].to_manifest()}
        if speed:
            from packager.report import measure_speed

            where = (artifacts[v.key].resolve(), v.runtime)
            if where not in speeds:
                log.info("[%d/%d] timing %s on this host", i, len(bp.variants), v.key)
                speeds[where] = measure_speed(artifacts[v.key], v.runtime, threads=threads)
            report.variants[v.key]["speed"] = speeds[where]
    template = chat_template_of(model)
    for name, pp in bp.profiles.items():
        q = qualities[pp.variant.key]
        try:  # (4) the gate: an over-budget variant is never signed for this profile
            check_budget(q, pp.profile, max_loss_pct=pp.choice.max_loss_pct)
        except QualityBudgetError as e:
            log.error("%s", e)
            report.over_budget[name] = f"{e} ({e.diagnostics()})"
            continue
        payload, entrypoint = payload_files(artifacts[pp.variant.key], pp.variant.format)
        m = _manifest(model, pp, payload, entrypoint, q.to_manifest(), key, version, now, template,
                      probes[pp.variant.key])
        out = out_dir / f"{m.model_name}-{name}-{pp.variant.quant}-v{version}.bundle"
        manifest_bytes = write_bundle(out, m, key, payload)
        d = file_digest(out)
        report.bundles.append(BuiltBundle(name, pp.variant.key, out, m, d.size, d.sha256,
                                          hashlib.sha256(manifest_bytes).hexdigest()))
        log.info("signed %s", out.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    if report.bundles:  # (6) nothing to roll out, no release
        from packager.release import write_release

        rel = release_of(report, model, key, now)
        report.release = str(write_release(out_dir, rel, key))
        log.info("signed %s (%s, %d bundle(s))", Path(report.release).name, rel.release_id,
                 len(rel.bundles))
    if report.variants:
        from packager.report import write_chart

        png = write_chart(report.variants, out_dir / "build-report.png",
                          title=f"{model.name}: size vs quality loss vs decode speed")
        report.chart = png.name if png else ""
    (out_dir / "build-report.json").write_text(json.dumps(report.to_dict(), indent=2, default=str))
    (out_dir / "build-report.md").write_text(report.to_markdown())
    return report
