"""OpenVINO IR variants: optimum-intel's exporter (with NNCF weight compression) on an HF checkpoint.

optimum-intel cannot share edgepack's environment: 2.2.0 pins transformers < 5.6 while the
packager needs a newer one (older ones dequantize the sample GGUF into garbage without an error),
and it pulls a PyPI torchvision that breaks imports (``torchvision::nms does not exist``). So the
exporter runs in a converter environment of its own, made once from :data:`CONVERTER_PINS`, as a
subprocess of that environment's Python running ``_ov_export.py`` (shipped beside this module).
That wrapper also relaxes optimum-intel's Gemma guard (it refuses transformers > 5.0 for the
Gemma family although it allows up to 5.5; exports made that way were checked to be correct).

Workflow and cache:
(1) converter environment ``<cache>/envs/openvino-<hash of the pins>/``: a virtualenv, one pip
    command with every pin (torch always in the same command as what depends on it, so pip keeps
    the CPU build), torchvision removed, an import check; the stamp file is written last, under a
    file lock, so a half-built environment is never used (it is rebuilt);
(2) export arguments from the variant: precision and ``target.options`` (:func:`export_spec`,
    pure); on device ``npu`` the ``npu_*`` options apply (NPUs compile only symmetric int4);
(3) the export, its output streamed to our log as progress, into a temporary folder; the
    wrapper then checks the IR against the source in the same process (tokenizer ids,
    teacher-forced top-1 agreement and NLL against PyTorch, a few greedy tokens) because a wrong
    conversion raises no error, and :func:`judge_check` decides; only a checked IR is renamed to
    ``<cache>/openvino/<source digest>-<tag>-<key>/`` (cached by source digest, precision,
    options and converter pins);
(4) the IR folder is hard-linked into the caller's output directory (atomically), without the
    files the runtime does not read (:data:`NOT_SHIPPED`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import ConvertError, PackagingError
from packager._tools import run_streaming
from packager.cache import atomic_dir, atomic_file, copy_atomic, file_lock
from packager.model import ModelInfo

if TYPE_CHECKING:
    from packager.plan import Variant

log = logging.getLogger(__name__)

# The converter environment. torch is the CPU build (pip picks it from the configured wheel
# source when it is in the same command as everything that depends on it).
CONVERTER_PINS: tuple[str, ...] = (
    "torch==2.13.0",
    "transformers==5.5.4",  # the newest optimum-intel 2.2.0 accepts (< 5.6)
    "optimum-intel==2.2.0",
    "optimum==2.3.0",
    "nncf==3.4.0",
    "openvino==2026.4.1",
    "openvino-tokenizers==2026.4.1.0",
)
# Pulled by optimum-intel; its PyPI build does not match the CPU torch and breaks imports.
CONVERTER_REMOVE = ("torchvision",)
CONVERTER_MODULES = ("torch", "transformers", "optimum.intel", "nncf", "openvino",
                     "openvino_tokenizers")
WRAPPER = Path(__file__).with_name("_ov_export.py")
ENV_STAMP = ".edgepack-env.json"  # written last: its presence means the environment is complete
EXPORT_MARKER = ".edgepack-export.json"  # in the cached IR: arguments, versions, check figures
TASK = "text-generation-with-past"
# Exported but not placed in the variant folder (so not bundled): the HF fast tokenizer, which
# openvino-genai never reads (openvino_tokenizer.xml carries the vocabulary and the chat
# template). 33 MB of the sample's 327 MB int8 folder.
NOT_SHIPPED = ("tokenizer.json",)

WEIGHT_FORMATS = ("int4", "int8", "fp16", "fp32")
DEVICES = ("cpu", "gpu", "npu")
GROUP_SIZE_FALLBACKS = ("error", "ignore", "adjust")
# target.options keys this backend reads; npu_* replace the plain ones when device = "npu".
OPTION_KEYS = ("group_size", "sym", "ratio", "group_size_fallback")
NPU_OPTION_KEYS = ("npu_weight_format", "npu_sym", "npu_group_size", "npu_ratio",
                   "npu_group_size_fallback")
INT4_DEFAULTS: Mapping[str, Any] = {"group_size": 128, "ratio": 1.0, "group_size_fallback": "adjust"}
# NPUs compile only symmetric int4 weights, 128-wide groups (or per channel), all in int4.
NPU_DEFAULTS: Mapping[str, Any] = {"weight_format": "int4", "sym": True, "group_size": 128,
                                   "ratio": 1.0}

# The export check (see _ov_export.py): an English paragraph scored teacher-forced, and a prompt
# to continue greedily. Sanity bounds, far looser than a profile's quality budget (which
# packager.quality measures afterwards): a broken conversion scores near-zero agreement and an
# NLL several times the source's.
CHECK_TEXT = (
    "The river rises in the hills north of the town and flows south through farmland before it "
    "reaches the sea. In spring the water is high and fast; in late summer it is low enough to "
    "cross on foot. The old mill by the bridge has been turned into a small museum."
)
CHECK_PROMPT = "The capital of France is"
CHECK_TOKENS = 12
# weight format -> (minimum top-1 agreement with the source, maximum NLL ratio to the source)
CHECK_BOUNDS: Mapping[str, tuple[float, float]] = {
    "fp32": (0.9, 1.05), "fp16": (0.85, 1.1), "int8": (0.7, 1.3), "int4": (0.4, 1.8),
}
_CHECK_MARK = "EDGEPACK_CHECK "
# Exporter lines logged at debug: torch's tracer warnings and their indented context.
_TOOL_NOISE = re.compile(r"TracerWarning|^  ")


# --- (a) export arguments, pure --------------------------------------------------------------------


@dataclass(frozen=True)
class ExportSpec:
    """What optimum-intel is asked to make: weight format and NNCF compression settings."""

    weight_format: str
    sym: bool = False
    group_size: int | None = None  # int4 only; -1 = per channel
    ratio: float | None = None  # int4 only: share of layers in int4 (the rest int8)
    group_size_fallback: str | None = None  # int4 only

    def args(self) -> list[str]:
        """The ``optimum-cli export openvino`` options (without model and output)."""
        out = ["--task", TASK, "--weight-format", self.weight_format]
        if self.sym:
            out.append("--sym")
        if self.group_size is not None:
            out += ["--group-size", str(self.group_size)]
        if self.ratio is not None:
            out += ["--ratio", f"{self.ratio:g}"]
        if self.group_size_fallback is not None:
            out += ["--group-size-fallback", self.group_size_fallback]
        return out

    @property
    def tag(self) -> str:
        """A readable, file-name-safe name, e.g. ``int4-sym-g128-r1`` or ``int8``."""
        parts = [self.weight_format]
        if self.sym:
            parts.append("sym")
        if self.group_size is not None:
            parts.append(f"g{self.group_size}")
        if self.ratio is not None:
            parts.append(f"r{self.ratio:g}")
        if self.group_size_fallback not in (None, "adjust"):
            parts.append(f"fb-{self.group_size_fallback}")
        return "-".join(parts)

    def cache_key(self) -> str:
        """Hex digest of everything that changes the IR: arguments, pins, wrapper, check."""
        blob = json.dumps({"args": self.args(), "pins": CONVERTER_PINS, "check": CHECK_TEXT},
                          sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def export_spec(precision: str, device: str, options: Mapping[str, Any]) -> ExportSpec:
    """Turn a variant's precision, device and ``target.options`` into export settings. Pure.

    Plain options: ``group_size`` (int4: > 0, or -1 per channel), ``sym`` (int4/int8),
    ``ratio`` (int4: share of layers in int4, (0, 1]), ``group_size_fallback`` (int4: what NNCF
    does with layers whose channels the group size does not divide: error | ignore | adjust;
    default adjust). On device ``npu`` the ``npu_*`` keys replace them (defaults: int4,
    symmetric, group size 128, ratio 1), because NPUs compile only symmetric int4 weights.
    int4 without options: asymmetric, group size 128, ratio 1, fallback adjust.

    Args:
        precision: int4, int8, fp16 or fp32 (the variant's precision).
        device: cpu, gpu or npu.
        options: the profile's ``target.options``.

    Returns:
        The export settings.

    Raises:
        PackagingError: an unknown precision, device or option key, a value out of range, or
            an option that does not apply to the precision (with what to change).
    """
    if device not in DEVICES:
        raise PackagingError(f"OpenVINO device {device!r} is not one of {', '.join(DEVICES)}")
    unknown = sorted(set(options) - set(OPTION_KEYS) - set(NPU_OPTION_KEYS))
    if unknown:
        raise PackagingError(
            f"unknown OpenVINO build option(s) {', '.join(unknown)}",
            hint=f"target.options for OpenVINO takes {', '.join(OPTION_KEYS + NPU_OPTION_KEYS)}.",
        )
    if device == "npu":
        chosen: dict[str, Any] = dict(NPU_DEFAULTS)
        chosen.update({k.removeprefix("npu_"): v for k, v in options.items() if k.startswith("npu_")})
        weight_format = chosen.pop("weight_format")
    else:
        chosen = {k: v for k, v in options.items() if not k.startswith("npu_")}
        weight_format = precision
    if weight_format not in WEIGHT_FORMATS:
        raise PackagingError(f"OpenVINO weight format {weight_format!r} is not one of "
                             f"{', '.join(WEIGHT_FORMATS)}")
    sym = chosen.pop("sym", False)
    if not isinstance(sym, bool):
        raise PackagingError(f"option sym must be true or false, got {sym!r}")
    if weight_format in ("fp16", "fp32"):
        if sym or chosen:
            given = ", ".join(sorted(chosen) + (["sym"] if sym else []))
            raise PackagingError(f"option(s) {given} do not apply to {weight_format} weights",
                                 hint="Remove them, or choose precision int4 / int8.")
        return ExportSpec(weight_format)
    if weight_format == "int8":
        if chosen:
            raise PackagingError(
                f"option(s) {', '.join(sorted(chosen))} apply to int4 only (int8 is per channel)",
                hint="Remove them, or choose precision int4.")
        return ExportSpec("int8", sym=sym)
    values = {**INT4_DEFAULTS, **chosen}
    group_size, ratio, fallback = values["group_size"], values["ratio"], values["group_size_fallback"]
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not (
            group_size > 0 or group_size == -1):
        raise PackagingError(f"option group_size must be a positive integer or -1, got {group_size!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1:
        raise PackagingError(f"option ratio must be in (0, 1], got {ratio!r}")
    if fallback not in GROUP_SIZE_FALLBACKS:
        raise PackagingError(f"option group_size_fallback must be one of "
                             f"{', '.join(GROUP_SIZE_FALLBACKS)}, got {fallback!r}")
    if device == "npu" and not sym:
        raise PackagingError("NPUs compile only symmetric int4 weights: npu_sym must be true",
                             hint="Set npu_sym = true in target.options (or leave it out).")
    return ExportSpec("int4", sym=sym, group_size=group_size, ratio=float(ratio),
                      group_size_fallback=fallback)


def variant_spec(variant: Variant) -> ExportSpec:
    """:func:`export_spec` of a planned variant (precision, device and options)."""
    return export_spec(variant.precision, variant.device, dict(getattr(variant, "options", ())))


def check_variant(model: ModelInfo, variant: Variant) -> None:
    """The planner's converter check (packager.plan): :func:`variant_spec`, without exporting.

    Raises:
        PackagingError: what :func:`build_openvino_variant` would refuse the variant's options with.
    """
    variant_spec(variant)


def export_command(python: Path, hf_dir: Path, out: Path, spec: ExportSpec, *,
                   threads: int = 0) -> list[str]:
    """The converter command: the wrapper, its check options, then optimum-cli's arguments. Pure."""
    # -I: isolated from PYTHON* variables and, above all, without the wrapper's own folder on
    # sys.path (packager/openvino.py would shadow the openvino package); -u: unbuffered output.
    return [str(python), "-I", "-u", str(WRAPPER), "--threads", str(threads),
            "--check-hf", str(hf_dir), "--check-out", str(out),
            "--check-text", CHECK_TEXT, "--check-prompt", CHECK_PROMPT,
            "--check-tokens", str(CHECK_TOKENS),
            "--", "--model", str(hf_dir), *spec.args(), str(out)]


def judge_check(weight_format: str, figures: Mapping[str, Any]) -> list[str]:
    """What is wrong with an exported IR, from the wrapper's check figures. Pure.

    Args:
        weight_format: the IR's weight format (selects :data:`CHECK_BOUNDS`).
        figures: the wrapper's ``EDGEPACK_CHECK`` JSON.

    Returns:
        One message per failed check; empty when the IR passes.
    """
    problems: list[str] = []
    if not figures.get("tokenizer_match"):
        problems.append("the OpenVINO tokenizer splits the check text differently from the source "
                        "tokenizer")
    ov_nll, ref_nll = figures.get("ov_nll"), figures.get("ref_nll")
    if not (isinstance(ov_nll, int | float) and isinstance(ref_nll, int | float)
            and math.isfinite(ov_nll) and math.isfinite(ref_nll) and ref_nll > 0):
        problems.append(f"non-finite scores (OpenVINO NLL {ov_nll}, source NLL {ref_nll})")
        return problems
    min_agree, max_ratio = CHECK_BOUNDS[weight_format]
    agree = float(figures.get("top1_agreement", 0.0))
    if agree < min_agree:
        problems.append(f"top-1 agreement with the source is {agree:.0%} (at least {min_agree:.0%} "
                        f"expected for {weight_format})")
    if ov_nll > ref_nll * max_ratio:
        problems.append(f"NLL {ov_nll:.3f} vs the source's {ref_nll:.3f} (at most x{max_ratio:g} "
                        f"expected for {weight_format})")
    if not str(figures.get("generated", "")).strip():
        problems.append("greedy generation produced no text")
    return problems


# --- (b) the converter environment -----------------------------------------------------------------


def converter_env_dir(cache_dir: Path) -> Path:
    """Where the converter environment for :data:`CONVERTER_PINS` and this Python lives."""
    blob = json.dumps({"pins": CONVERTER_PINS, "remove": CONVERTER_REMOVE,
                       "python": list(sys.version_info[:2])}).encode()
    return cache_dir / "envs" / f"openvino-{hashlib.sha256(blob).hexdigest()[:12]}"


def _env_python(env: Path) -> Path:
    return env / "bin" / "python"


def ensure_converter_env(cache_dir: Path) -> Path:
    """Find or make the converter virtualenv; return its Python.

    Made once per set of pins (about a minute with a warm pip cache): ``python -m venv``, one
    ``pip install`` of every pin, ``pip uninstall`` of :data:`CONVERTER_REMOVE`, an import check,
    then the stamp file. A folder without the stamp (an interrupted build) is removed and made
    again. Concurrent packagers wait for each other on a lock file.

    Args:
        cache_dir: the packager cache.

    Returns:
        The environment's ``bin/python``.

    Raises:
        ConvertError: venv, pip or the import check failed (with the tool's output tail).
    """
    env = converter_env_dir(cache_dir)
    stamp = env / ENV_STAMP
    if stamp.is_file():
        return _env_python(env)
    with file_lock(env.with_name(env.name + ".lock")):
        if stamp.is_file():  # another packager finished it while we waited
            return _env_python(env)
        if env.exists():
            log.warning("removing the incomplete converter environment %s", env)
            shutil.rmtree(env)
        t0 = time.monotonic()
        log.info("creating the OpenVINO converter environment in %s (once; about a minute with "
                 "cached wheels, longer on first download)", env)
        try:
            _run_checked([sys.executable, "-m", "venv", str(env)], what="python -m venv",
                         prefix="venv: ", hint="install Python's venv module (Debian: "
                         "apt-get install python3-venv)")
            py = str(_env_python(env))
            log.info("converter env: installing %s", " ".join(CONVERTER_PINS))
            _run_checked([py, "-m", "pip", "install", "--disable-pip-version-check",
                          *CONVERTER_PINS], what="pip install", prefix="converter env: ",
                         hint="pip could not install the converter's pinned packages; check "
                         "the package index (pip's own configuration is used) and disk space")
            log.info("converter env: removing %s (breaks imports with the CPU torch)",
                     ", ".join(CONVERTER_REMOVE))
            _run_checked([py, "-m", "pip", "uninstall", "-y", *CONVERTER_REMOVE],
                         what="pip uninstall", prefix="converter env: ")
            code = ("import importlib, importlib.metadata as m, json\n"
                    f"for n in {list(CONVERTER_MODULES)!r}: importlib.import_module(n)\n"
                    "print(json.dumps({d: m.version(d) for d in "
                    f"{[p.split('==')[0] for p in CONVERTER_PINS]!r}}}))")
            out = _run_checked([py, "-I", "-c", code], what="the import check",
                               prefix="converter env: ")
            versions = json.loads(out.strip().splitlines()[-1])
        except BaseException:
            shutil.rmtree(env, ignore_errors=True)
            raise
        with atomic_file(stamp) as tmp:
            tmp.write_text(json.dumps({"pins": CONVERTER_PINS, "versions": versions,
                                       "python": sys.version.split()[0]}, indent=2))
        log.info("converter environment ready in %.0f s: %s", time.monotonic() - t0,
                 ", ".join(f"{k} {v}" for k, v in versions.items()))
    return _env_python(env)


def converter_versions(cache_dir: Path) -> dict[str, str]:
    """The package versions recorded in the converter environment's stamp ({} if not made yet)."""
    try:
        data = json.loads((converter_env_dir(cache_dir) / ENV_STAMP).read_text())
        return {str(k): str(v) for k, v in data.get("versions", {}).items()}
    except (OSError, ValueError, AttributeError):
        return {}


# --- (c) running tools -------------------------------------------------------------------------------


def _tool_env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_DISABLE_TELEMETRY="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _run_checked(cmd: list[str], *, what: str, prefix: str, hint: str = "") -> str:
    out: list[str] = []

    def keep(line: str) -> bool:
        out.append(line)
        return False

    # pip and venv are chatty (one line per package and index location): debug level; our own
    # messages around each step say what is happening.
    rc, tail = run_streaming(cmd, env=_tool_env(0), prefix=prefix, log=log, on_line=keep,
                             level=logging.DEBUG)
    if rc != 0:
        err = ConvertError(f"converter environment: {what} failed (exit {rc})"
                           + (f": {hint}" if hint else ""), returncode=rc, stderr_tail=tail)
        err.hint = hint
        raise err
    return "\n".join(out)


def _export_hint(tail: str) -> str:
    """What to do about a failed export, from its output ("" when nothing specific is known)."""
    if "Maximum required is" in tail or "does not allow for the export" in tail:
        return ("optimum-intel refuses this architecture with the converter's transformers; "
                "edgepack relaxes that guard for the Gemma family only.")
    if "group-wise quantization" in tail or "InvalidGroupSizeError" in tail:
        return ("A layer's channels are not divisible by the group size: set "
                "group_size_fallback = \"adjust\" in target.options, or another group_size.")
    if "torchvision" in tail:
        return "The converter environment is broken: delete it (it is rebuilt on the next run)."
    if "Killed" in tail or "MemoryError" in tail:
        return "The export ran out of memory: close other work, or export a smaller model."
    return ""


# --- (d) export, variants, reference --------------------------------------------------------------


def _source_tag(model: ModelInfo) -> str:
    return model.source_digest.removeprefix("sha256:")[:16]


def _stem(model: ModelInfo) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", model.name).strip("-") or "model"


def _require_hf(model: ModelInfo) -> None:
    if model.source_kind != "hf":
        raise PackagingError(
            f"an OpenVINO export needs an HF checkpoint; {model.name} is a {model.source_kind} "
            "source",
            hint="Pass the model's Hugging Face folder (config.json + *.safetensors) or hub id.",
        )


def cached_ir_dir(model: ModelInfo, spec: ExportSpec, cache_dir: Path) -> Path:
    """Where the checked IR of ``model`` with ``spec`` is cached."""
    return cache_dir / "openvino" / f"{_source_tag(model)}-{spec.tag}-{spec.cache_key()}"


def _is_complete(ir: Path) -> bool:
    return (ir / EXPORT_MARKER).is_file() and (ir / "openvino_model.xml").is_file()


def export_ir(model: ModelInfo, spec: ExportSpec, *, cache_dir: Path, threads: int = 0) -> Path:
    """Export (or reuse) the IR of ``model`` with ``spec`` in the cache, checked against the source.

    Args:
        model: an HF checkpoint source.
        spec: the export settings (see :func:`export_spec`).
        cache_dir: the packager cache.
        threads: threads for the export and the check (0 = the tools' default).

    Returns:
        The cached IR folder (``openvino_model.xml/.bin``, ``openvino_tokenizer.xml``,
        ``openvino_detokenizer.xml``, configs, chat template).

    Raises:
        PackagingError: the source is not an HF checkpoint.
        ConvertError: the converter environment or the export failed, or the exported model
            failed the check (nothing is cached then).
    """
    _require_hf(model)
    dst = cached_ir_dir(model, spec, cache_dir)
    if _is_complete(dst):
        log.info("OpenVINO %s IR cached: %s", spec.tag, dst)
        return dst
    py = ensure_converter_env(cache_dir)
    t0 = time.monotonic()
    log.info("exporting %s to OpenVINO IR (%s) with optimum-intel", model.name, spec.tag)
    figures: dict[str, Any] = {}

    def grab(line: str) -> bool:
        if line.startswith(_CHECK_MARK):
            figures.update(json.loads(line[len(_CHECK_MARK):]))
            return True
        return False

    with atomic_dir(dst) as tmp:
        cmd = export_command(py, model.path, tmp, spec, threads=threads)
        rc, tail = run_streaming(cmd, env=_tool_env(threads), prefix="openvino: ", log=log,
                                 quiet=_TOOL_NOISE, on_line=grab)
        if rc != 0:
            # ConvertError.diagnostics() shows the tool's output tail, so the advice goes into
            # the message as well as the hint.
            hint = _export_hint(tail)
            err = ConvertError(f"optimum-intel's OpenVINO export of {model.name} ({spec.tag}) "
                               f"failed (exit {rc})" + (f": {hint}" if hint else ""),
                               returncode=rc, stderr_tail=tail)
            err.hint = hint or "See the exporter's output above."
            raise err
        for name in ("openvino_model.xml", "openvino_tokenizer.xml", "openvino_detokenizer.xml"):
            if not (tmp / name).is_file():
                raise ConvertError(f"the OpenVINO export of {model.name} has no {name}",
                                   stderr_tail=tail)
        if not figures:
            raise ConvertError("the exported model was not checked (no check figures in the "
                               "wrapper's output)", stderr_tail=tail)
        problems = judge_check(spec.weight_format, figures)
        if problems:
            err = ConvertError(
                f"the OpenVINO {spec.tag} export of {model.name} does not match its source: "
                + "; ".join(problems),
                stderr_tail=json.dumps(figures, indent=2))
            err.hint = ("The conversion is wrong without raising: check the converter pins "
                        "(transformers version) against this architecture, or use a milder "
                        "precision (int8).")
            raise err
        log.info("check passed: top-1 agreement %.0f%%, NLL %.3f vs source %.3f; %r -> %r",
                 100 * figures["top1_agreement"], figures["ov_nll"], figures["ref_nll"],
                 CHECK_PROMPT, figures.get("generated", ""))
        (tmp / EXPORT_MARKER).write_text(json.dumps({
            "source": str(model.path), "source_digest": model.source_digest,
            "args": spec.args(), "pins": CONVERTER_PINS,
            "versions": converter_versions(cache_dir), "check": figures,
            "seconds": round(time.monotonic() - t0, 1),
        }, indent=2))
        for f in tmp.rglob("*"):
            if f.is_file():
                f.chmod(0o644)
    size = sum(f.stat().st_size for f in dst.iterdir() if f.is_file())
    log.info("OpenVINO %s IR exported in %.0f s (%.0f MB): %s", spec.tag, time.monotonic() - t0,
             size / 1e6, dst)
    return dst


def _place_dir(src: Path, dst: Path) -> Path:
    """Hard-link (or copy) ``src``'s files into ``dst`` atomically, leaving out our dot files
    and :data:`NOT_SHIPPED`."""
    with atomic_dir(dst) as tmp:
        for f in sorted(src.iterdir()):
            if not f.is_file() or f.name.startswith(".") or f.name in NOT_SHIPPED:
                continue
            try:
                os.link(f, tmp / f.name)  # same filesystem: no copy of hundreds of MB
            except OSError:
                copy_atomic(f, tmp / f.name)
    return dst


def build_openvino_variant(model: ModelInfo, variant: Variant, out_dir: Path, *, cache_dir: Path,
                           threads: int) -> Path:
    """Build (or reuse) an OpenVINO IR variant of ``model`` and place it in ``out_dir``.

    Cached by (source digest, weight format, compression options, converter pins); the export
    runs in the converter environment (made on first use) and is checked against the source.

    Args:
        model: the source model (an HF checkpoint).
        variant: the planned variant: ``precision`` int4/int8/fp16/fp32, ``device`` cpu/gpu/npu,
            ``options`` from the profile (see :func:`export_spec`).
        out_dir: where the IR folder is placed (files hard-linked to the cache when possible).
        cache_dir: the packager cache.
        threads: threads for the export and its check (0 = the tools' default).

    Returns:
        The IR folder in ``out_dir``, e.g. ``<out_dir>/<model>-openvino-int8/``.

    Raises:
        PackagingError: the source is not an HF checkpoint, or an option is invalid.
        ConvertError: the converter environment or the export failed, or the export does not
            match its source; no partial folder is left in the cache or in ``out_dir``.
    """
    spec = variant_spec(variant)
    cached = export_ir(model, spec, cache_dir=cache_dir, threads=threads)
    return _place_dir(cached, out_dir / f"{_stem(model)}-openvino-{spec.tag}")


def reference_openvino(model: ModelInfo, cache_dir: Path, *, threads: int = 0) -> Path:
    """The fp32 IR of ``model`` (the quality reference for OpenVINO variants), built once.

    Args:
        model: the source model (an HF checkpoint).
        cache_dir: the packager cache.
        threads: threads for the export (0 = the tools' default).

    Returns:
        The cached fp32 IR folder.

    Raises:
        PackagingError: the source is not an HF checkpoint.
        ConvertError: the export failed or does not match its source.
    """
    return export_ir(model, export_spec("fp32", "cpu", {}), cache_dir=cache_dir, threads=threads)
