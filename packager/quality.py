"""Quality of a quantized variant: perplexity on a fixed text, against a full-precision reference.

Both models are scored by the same runtime the device will use (through the ``Runtime`` contract's
``evaluate_nll``) on ``packager/data/eval.txt``, an English text shipped with the package whose
sha256 goes into the manifest, so a delta is reproducible and tied to the exact text. A score is
computed once per (model bytes, runtime version, window, text) and kept in the build cache, so the
reference is scored once for every variant and every later build of the same model.

:func:`check_budget` is pure: it compares a report with a profile's budget and raises.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import QualityBudgetError
from agent.profiles.schema import DeviceProfile
from packager.cache import atomic_file, default_cache_dir, sha256_file, sha256_files

if TYPE_CHECKING:
    from agent.runtimes import NllResult

log = logging.getLogger(__name__)

EVAL_RESOURCE = "data/eval.txt"
# (reference sha256, runtime, window, eval sha256) -> result; the reference is scored once per run.
_reference_results: dict[tuple[str, str, int, str], NllResult] = {}


@dataclass(frozen=True)
class QualityReport:
    """How much a variant loses against its reference on the evaluation text."""

    metric: str  # "perplexity"
    variant: str  # the variant's quant name (e.g. "Q4_K_M")
    reference: str  # the reference's quant name (e.g. "F16"); NO_REFERENCE when there is none
    reference_ppl: float | None  # None: not measured against a reference (a ready folder)
    ppl: float
    mean_nll: float  # nats per token
    reference_mean_nll: float | None
    delta_pct: float | None  # perplexity increase over the reference, percent; None: no reference
    top1_agreement: float | None  # fraction of positions whose argmax matches the reference
    tokens: int  # scored tokens
    eval_sha256: str
    runtime: str = "llamacpp"
    window: int = 512
    measured_as: str = ""  # another variant's key when this one cannot load here (its CPU build)

    def to_manifest(self) -> dict[str, Any]:
        """The report as the manifest's ``quality`` table (floats rounded for stable output)."""
        d = asdict(self)
        for k in ("reference_ppl", "ppl", "mean_nll", "reference_mean_nll"):
            if d[k] is not None:
                d[k] = round(d[k], 6)
        if self.delta_pct is not None:
            d["delta_pct"] = round(self.delta_pct, 3)
        if self.top1_agreement is not None:
            d["top1_agreement"] = round(self.top1_agreement, 6)
        if not self.measured_as:
            del d["measured_as"]
        return d


NO_REFERENCE = "none"


def describe_loss(quality: Mapping[str, Any]) -> str:
    """A manifest quality table in words: ``"+0.57% vs F16"`` or that nothing was compared."""
    delta = quality.get("delta_pct")
    if not isinstance(delta, int | float) or isinstance(delta, bool):
        return "not measured against a reference"
    return f"{delta:+.2f}% vs {quality.get('reference', '?')}"


def eval_text() -> tuple[str, str]:
    """The evaluation text and the sha256 of its bytes.

    Returns:
        (text, hex sha256).
    """
    data = resources.files("packager").joinpath(EVAL_RESOURCE).read_bytes()
    return data.decode("utf-8"), hashlib.sha256(data).hexdigest()


def measure(variant_path: Path, reference_path: Path | None, *, runtime: str = "llamacpp",
            threads: int = 0, window: int = 512, variant_name: str = "",
            reference_name: str = "") -> QualityReport:
    """Measure a variant's perplexity increase over its reference on the evaluation text.

    Args:
        variant_path: the model to judge (a file or folder the runtime loads).
        reference_path: the full-precision (or best available) model of the same source; None
            when there is none (a ready folder): the variant is scored and the report says it was
            not measured against a reference.
        runtime: the runtime name (see :func:`agent.runtimes.get_runtime`).
        threads: CPU threads; 0 = the runtime's default.
        window: tokens per scoring window.
        variant_name, reference_name: quant names for the report; read from GGUF metadata when
            empty and the file is a GGUF.

    Returns:
        The :class:`QualityReport`.

    Raises:
        RuntimeUnavailableError: the runtime is unknown or cannot run here.
        InferenceError: loading or scoring a model failed.
    """
    text, eval_sha = eval_text()
    if reference_path is None:
        res = _score(variant_path, text, runtime=runtime, threads=threads, window=window)
        log.info("%s: perplexity %.3f, not measured against a reference", variant_path.name,
                 res.perplexity)
        return QualityReport(
            metric="perplexity", variant=variant_name or _quant_name(variant_path),
            reference=NO_REFERENCE, reference_ppl=None, ppl=res.perplexity, mean_nll=res.mean_nll,
            reference_mean_nll=None, delta_pct=None, top1_agreement=None, tokens=res.tokens,
            eval_sha256=eval_sha, runtime=runtime, window=window)
    ref_digest = _digest(reference_path)
    key = (ref_digest, runtime, window, eval_sha)
    ref = _reference_results.get(key)
    if ref is None:
        ref = _score(reference_path, text, runtime=runtime, threads=threads, window=window)
        _reference_results[key] = ref
    else:
        log.info("reference %s already scored in this run", reference_path.name)
    res = _score(variant_path, text, runtime=runtime, threads=threads, window=window)
    agreement: float | None = None
    if ref.top1 is not None and res.top1 is not None and len(ref.top1) == len(res.top1):
        agreement = sum(a == b for a, b in zip(ref.top1, res.top1, strict=True)) / len(ref.top1)
    report = QualityReport(
        metric="perplexity",
        variant=variant_name or _quant_name(variant_path),
        reference=reference_name or _quant_name(reference_path),
        reference_ppl=ref.perplexity,
        ppl=res.perplexity,
        mean_nll=res.mean_nll,
        reference_mean_nll=ref.mean_nll,
        delta_pct=(res.perplexity / ref.perplexity - 1.0) * 100.0,
        top1_agreement=agreement,
        tokens=res.tokens,
        eval_sha256=eval_sha,
        runtime=runtime,
        window=window,
    )
    log.info("%s: perplexity %.3f vs %s %.3f (%+.2f%%), top-1 agreement %s", report.variant,
             report.ppl, report.reference, report.reference_ppl, report.delta_pct,
             "n/a" if agreement is None else f"{agreement:.1%}")
    return report


def probe_ids(path: Path, *, runtime: str, threads: int = 0) -> tuple[int, ...]:
    """A variant's own top-1 ids on the agent's fidelity probe, through the runtime that serves it.

    Exactly what the device's gate computes (agent/fidelity.py :func:`~agent.fidelity.probe_top1`:
    ``evaluate_nll(PROBE_TEXT, window=PROBE_WINDOW)``, the first ``PROBE_POSITIONS`` ids), scored
    once per (model bytes, runtime version) and cached like every score.

    Raises:
        RuntimeUnavailableError: the runtime cannot run here.
        InferenceError: loading or scoring failed, or the runtime gives no top-1 ids.
    """
    from agent.errors import InferenceError
    from agent.fidelity import PROBE_POSITIONS, PROBE_TEXT, PROBE_WINDOW

    res = _score(path, PROBE_TEXT, runtime=runtime, threads=threads, window=PROBE_WINDOW)
    if res.top1 is None:
        raise InferenceError(f"{runtime} gives no top-1 ids: no fidelity table can be recorded")
    return tuple(res.top1[:PROBE_POSITIONS])


def _score(path: Path, text: str, *, runtime: str, threads: int, window: int) -> NllResult:
    """Score a model on the text, reusing an earlier score of the same bytes from the disk cache.

    The key is (model bytes, runtime + its version, window, text bytes): anything that can change
    the numbers. Scoring Gemma's 262k-vocabulary logits costs 15-60 s per model on 2 cores, and the
    same F16 reference is scored by every build of a model.
    """
    from agent.runtimes import LoadOptions, NllResult, get_runtime

    rt_cls = get_runtime(runtime)
    digest = _digest(path)
    version = str(rt_cls.describe().get("version", ""))
    key = hashlib.sha256(
        f"{digest}|{runtime}|{version}|{window}|{hashlib.sha256(text.encode()).hexdigest()}".encode()
    ).hexdigest()[:32]
    cache_file = default_cache_dir() / "quality" / f"{key}.json"
    try:
        d = json.loads(cache_file.read_text())
        log.info("score of %s reused from %s", path.name, cache_file)
        return NllResult(float(d["mean_nll"]), float(d["perplexity"]), int(d["tokens"]),
                         tuple(d["top1"]) if d.get("top1") is not None else None)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not cached yet (or unreadable): measure it
    t0 = time.monotonic()
    rt = rt_cls()
    # a fresh context per window: BOS + window tokens must fit; the margin keeps runtimes that
    # round the context up from refusing the last position
    rt.load(path, LoadOptions(context=window + 64, threads=threads))
    try:
        result = rt.evaluate_nll(text, window=window)
    finally:
        rt.close()
    log.info("scored %s: %d tokens, perplexity %.3f in %.1f s", path.name, result.tokens,
             result.perplexity, time.monotonic() - t0)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(cache_file) as tmp:
        tmp.write_text(json.dumps({"mean_nll": result.mean_nll, "perplexity": result.perplexity,
                                   "tokens": result.tokens,
                                   "top1": list(result.top1) if result.top1 is not None else None}))
    return result


# (path, size, mtime_ns) of a file, or the same for every file of a folder -> sha256. A build scores
# the same 1 GB fp32 reference folder once per variant; its bytes are hashed once per process.
_digests: dict[tuple[Any, ...], str] = {}


def _digest(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stamp = (str(path), *((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if stamp not in _digests:
        _digests[stamp] = sha256_file(path) if path.is_file() else sha256_files(files, root=path)
    return _digests[stamp]


def _quant_name(path: Path) -> str:
    if path.suffix == ".gguf":
        from packager.gguf import gguf_file_type

        return gguf_file_type(path) or path.stem
    return path.name


def check_budget(report: QualityReport, profile: DeviceProfile, *,
                 max_loss_pct: float | None = None) -> None:
    """Refuse a variant that loses more perplexity than the profile allows. Pure.

    Args:
        report: the measured quality.
        profile: the device class whose ``budget.max_ppl_increase_pct`` applies.
        max_loss_pct: a budget replacing the profile's for this build (``--max-loss``).

    Raises:
        QualityBudgetError: ``delta_pct`` exceeds the budget or is not a finite number.
    """
    own = profile.budget.max_ppl_increase_pct
    budget = own if max_loss_pct is None else max_loss_pct
    measured = report.delta_pct
    if measured is None:
        # A ready folder ships as it is: there is nothing to compare it with, and the manifest
        # says "not measured against a reference" instead of claiming a loss of 0.
        log.info("%s for %s: no reference, the quality budget does not apply", report.variant,
                 profile.name)
        return
    if math.isfinite(measured) and measured <= budget:
        return
    loss = f"{measured:.1f}%" if math.isfinite(measured) else f"a non-finite ({measured})"
    allows = (f"the profile allows {budget:.1f}%" if max_loss_pct is None else
              f"--max-loss allows {budget:.1f}% (the profile {own:.1f}%)")
    err = QualityBudgetError(
        f"variant {report.variant} for profile {profile.name} loses {loss} perplexity "
        f"({report.reference_ppl or math.nan:.1f} -> {report.ppl:.1f}); {allows}",
        profile=profile.name, measured_pct=measured, budget_pct=budget,
    )
    err.hint = ("--max-loss PCT replaces the quality budget for one build (the manifest records "
                "it); or choose a higher precision (--precision, --quant, --override).")
    raise err
