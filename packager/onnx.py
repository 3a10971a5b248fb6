"""ONNX Runtime GenAI variants: the onnxruntime-genai model builder run on an HF checkpoint.

The builder (``python -m onnxruntime_genai.models.builder``) runs as a subprocess of this
interpreter: it imports torch and transformers and prints a lot, and a crash in it must not take
the packager down. Its ``--help`` crashes in 0.18, so the options used here were read from its
source (``builder.py``: ``-p int4|int8|bf16|fp16|fp32``, ``-e cpu|cuda|dml|webgpu|NvTensorRtRtx``,
``--extra_options block_size=.. accuracy_level=..``).

Workflow and cache (``<cache>/onnx/<source digest>-ortgenai<version>/<precision>-<device>[-opts]/``):
(1) check the request: the precision/EP pairs the builder can make, the options, fp16 on CPU;
(2) stage the checkpoint in a temporary folder: symlinks to its files, except ``config.json``,
    which :func:`adapt_config` rewrites (Gemma 3 configs saved by transformers 5 nest their RoPE
    parameters per layer type; the builder reads flat keys);
(3) run the builder into a temporary folder (its output streamed to our log as progress);
(4) finish ``genai_config.json`` (a bounded ``search.max_length`` that covers the sliding window),
    make sure the chat template is in the folder, write ``edgepack-build.json``, rename into place;
(5) hard-link the folder into the caller's output directory.
Nothing partial is ever cached: a failed or interrupted build leaves no folder behind.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import ConvertError, PackagingError
from packager._tools import run_streaming
from packager.cache import atomic_dir, atomic_file, copy_atomic
from packager.model import ModelInfo

if TYPE_CHECKING:
    from packager.plan import Variant

log = logging.getLogger(__name__)

BUILDER_DIST = "onnxruntime-genai"
BUILDER_MODULE = "onnxruntime_genai.models.builder"
PRECISIONS = ("int4", "int8", "fp16", "fp32")
DEVICES = ("cpu", "cuda", "dml", "qnn")
# Precisions the 0.18 builder makes per execution provider (its own list, printed on every run:
# "FP32 CPU, FP32 CUDA, FP16 CUDA, FP16 DML, ..., INT8 CPU, INT8 CUDA, INT4 CPU, INT4 CUDA, INT4
# DML"). QNN is not a builder target at all: QNN wants QDQ models made with Olive / QAIRT.
BUILDER_TARGETS: Mapping[str, tuple[str, ...]] = {
    "cpu": ("int4", "int8", "fp32"),
    "cuda": ("int4", "int8", "fp16", "fp32"),
    "dml": ("int4", "fp16"),
}
# Profile options -> allowed values; passed to the builder as --extra_options KEY=VALUE. They
# shape the MatMulNBits weight-only quantization, so they matter only for int4/int8.
OPTION_VALUES: Mapping[str, tuple[int | str, ...]] = {
    "block_size": (16, 32, 64, 128, 256),  # weights per quantization block (builder default 32)
    "accuracy_level": (0, 1, 2, 3, 4),  # MatMulNBits activation type: 4 = int8 (CPU default)
    # Quantization method: RTN by default; k_quant_* keep output-sensitive MatMuls (lm_head,
    # "mixed" also llama.cpp's sensitive layers) at int8. Measured on the sample (Gemma 3 270M),
    # perplexity vs fp32: RTN block 32 +59 %, k_quant_mixed block 32 +22 %, block 16 +11 %.
    # (The builder's plain matmul_mixed_precision=last_matmul:int8 writes an invalid model for
    # tied embeddings in 0.18, so it is not offered.)
    "algo_config": ("default", "rtn", "k_quant", "rtn_last", "k_quant_last", "k_quant_mixed"),
}
# Weight-only quantization applies to MatMuls. int4 also shares the quantized LM head with the
# embedding lookup (GatherBlockQuantized); int8 keeps the embedding in fp32, so for a large
# vocabulary (Gemma: 262,144 x 640) the int8 folder is nearly as big as fp32 (1,074 vs 1,173 MB).
QUANTIZED = ("int4", "int8")
# search.max_length written into genai_config.json: the builder writes the model's full context
# (32,768 for Gemma 3), for which ORT GenAI preallocates the whole KV cache. The runtime sets its
# own from LoadOptions.context; this default only serves other consumers of the folder.
DEFAULT_MAX_LENGTH = 2048
BUILD_MARKER = "edgepack-build.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# Builder output that is one line per tensor or node: debug level, so -v shows it.
_CHATTY = re.compile(r"matmul_nbits_quantizer|^Saving \S+ \(|^Loading weights|it/s\]$")


def builder_version() -> str:
    """The installed onnxruntime-genai version (from metadata; nothing is imported).

    Raises:
        PackagingError: onnxruntime-genai is not installed.
    """
    try:
        return metadata.version(BUILDER_DIST)
    except metadata.PackageNotFoundError as e:
        raise PackagingError(
            "onnxruntime-genai is not installed: ONNX variants cannot be built",
            hint="pip install 'edgepack[packager]' (it pins onnxruntime-genai and the builder's "
            "onnx / onnx-ir dependencies).",
        ) from e


# --- (a) the config adaptation (pure) -------------------------------------------------------


def adapt_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Rewrite an HF ``config.json`` so the 0.18 builder can read it.

    transformers 5 saves Gemma 3 RoPE per layer type (``rope_parameters = {"full_attention":
    {...}, "sliding_attention": {...}}``), and always loads it back that way, whatever the file
    says. The builder copies ``rope_parameters``' top-level keys onto the config and then reads
    ``rope_parameters["rope_type"]`` (KeyError) and, for Gemma 3, ``config.rope_local_base_freq``.
    So the global layers' parameters (type, theta, scaling factor) are added at the top level of
    ``rope_parameters`` and the sliding layers' theta as ``rope_local_base_freq``; the nested
    entries stay, so transformers still loads the model the same way.

    Args:
        config: the parsed ``config.json``.

    Returns:
        (the adapted config — a new dict, ``config`` is not modified —, one line per change;
        no lines when nothing had to change).

    Raises:
        PackagingError: the sliding layers use a scaled RoPE, which the builder cannot express.
    """
    out = copy.deepcopy(dict(config))
    rope = out.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_type" in rope:
        return out, []
    full = rope.get("full_attention")
    sliding = rope.get("sliding_attention")
    if not isinstance(full, dict):
        return out, []  # not per-layer-type RoPE: nothing the builder trips on
    changes: list[str] = []
    for key, value in full.items():
        if key not in rope:
            rope[key] = value
            changes.append(f"rope_parameters.{key} = {value!r} (from full_attention)")
    rope.setdefault("rope_type", "default")
    if "rope_theta" not in full and "rope_theta" in out:
        rope["rope_theta"] = out["rope_theta"]
    if isinstance(sliding, dict):
        if sliding.get("rope_type", "default") != "default":
            raise PackagingError(
                f"the sliding-window layers use {sliding['rope_type']!r} RoPE scaling, which the "
                "onnxruntime-genai builder cannot express (it takes one local theta)",
                hint="Build a GGUF or OpenVINO variant of this model instead.",
            )
        if "rope_theta" in sliding and "rope_local_base_freq" not in rope:
            rope["rope_local_base_freq"] = sliding["rope_theta"]
            changes.append(
                f"rope_parameters.rope_local_base_freq = {sliding['rope_theta']!r} "
                "(from sliding_attention.rope_theta)"
            )
    return out, changes


def stage_checkpoint(hf_dir: Path, dst: Path) -> list[str]:
    """Fill ``dst`` with symlinks to ``hf_dir``'s files and an adapted ``config.json``.

    Returns:
        The config changes (see :func:`adapt_config`).

    Raises:
        PackagingError: ``config.json`` is missing or unreadable, or cannot be adapted.
    """
    cfg_path = hf_dir / "config.json"
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PackagingError(f"cannot read {cfg_path}: {e}") from e
    adapted, changes = adapt_config(config)
    for src in hf_dir.iterdir():
        if src.name != "config.json" and src.is_file():
            (dst / src.name).symlink_to(src.resolve())
    (dst / "config.json").write_text(json.dumps(adapted, indent=2), encoding="utf-8")
    return changes


# --- (b) what can be built --------------------------------------------------------------------


def check_request(model: ModelInfo, precision: str, device: str,
                  options: Mapping[str, Any]) -> dict[str, int | str]:
    """Refuse what the builder cannot make or what would not run; return the builder options.

    Args:
        model: the source model.
        precision: int4, int8, fp16 or fp32.
        device: the execution provider: cpu, cuda, dml or qnn.
        options: the profile's build options (``block_size``, ``accuracy_level``,
            ``algo_config``; see :data:`OPTION_VALUES`).

    Returns:
        The options to pass to the builder (empty for fp16/fp32, which do not use them).

    Raises:
        PackagingError: an unknown precision, device or option; a pair the builder cannot build
            (QNN, fp16 on CPU, ...); a source that is not an HF checkpoint.
    """
    if precision not in PRECISIONS:
        raise PackagingError(f"unknown ONNX precision {precision!r}; one of {', '.join(PRECISIONS)}")
    if device not in DEVICES:
        raise PackagingError(f"unknown ONNX device {device!r}; one of {', '.join(DEVICES)}")
    if device == "qnn":
        raise PackagingError(
            "the onnxruntime-genai 0.18 builder cannot build for the QNN execution provider "
            "(its targets are cpu, cuda, dml, webgpu and NvTensorRtRtx)",
            hint="QNN needs a QDQ model made with Qualcomm's tools (Olive / QAIRT); give that "
            "folder as the model source, or build int4 for device 'cpu' (ORT GenAI runs it on "
            "the Snapdragon CPU).",
        )
    if precision == "fp16" and device == "cpu":
        gqa = model.n_kv_heads < model.n_heads
        why = (f"this model uses grouped-query attention ({model.n_kv_heads} KV heads < "
               f"{model.n_heads} heads) and ORT's CPU GroupQueryAttention fails at decode in fp16"
               if gqa else "the builder makes fp16 only for cuda and dml")
        raise PackagingError(
            f"fp16 ONNX on CPU is refused: {why}",
            hint="Use int8 or fp32 for CPU profiles, or target device 'cuda' or 'dml' for fp16.",
        )
    if precision not in BUILDER_TARGETS[device]:
        pairs = ", ".join(f"{p} {d}" for d, ps in BUILDER_TARGETS.items() for p in ps)
        raise PackagingError(
            f"the onnxruntime-genai builder does not make {precision} models for {device}",
            hint=f"Supported precision/device pairs: {pairs}.",
        )
    if model.source_kind != "hf":
        raise PackagingError(
            f"ONNX variants are built from an HF checkpoint, not from a {model.source_kind} source "
            f"({model.path})",
            hint="Pass the Hugging Face folder (config.json + *.safetensors) as the model source.",
        )
    unknown = sorted(set(options) - set(OPTION_VALUES))
    if unknown:
        raise PackagingError(
            f"unknown ONNX build option(s) {', '.join(unknown)}; known: {', '.join(OPTION_VALUES)}",
            hint="Fix target.options in the profile.",
        )
    checked: dict[str, int | str] = {}
    for key, value in sorted(options.items()):
        allowed = OPTION_VALUES[key]
        # bool is an int subclass (True == 1): refuse it rather than pass "True" to the builder
        if isinstance(value, bool) or not any(type(value) is type(a) and value == a for a in allowed):
            raise PackagingError(f"ONNX build option {key}={value!r} is not one of {allowed}",
                                 hint="Fix target.options in the profile.")
        checked[key] = value
    if checked and precision not in QUANTIZED:
        log.info("options %s apply to int4/int8 only: not used for %s", checked, precision)
        return {}
    return checked


def check_variant(model: ModelInfo, variant: Variant) -> None:
    """:func:`check_request` of a planned variant: the planner's converter check (packager.plan).

    Raises:
        PackagingError: what :func:`build_onnx_variant` would refuse the variant with.
    """
    check_request(model, variant.precision, variant.device, dict(variant.options))


# --- (c) the build ----------------------------------------------------------------------------


def _builds_dir(model: ModelInfo, cache_dir: Path) -> Path:
    digest = model.source_digest.removeprefix("sha256:")[:16]
    return cache_dir / "onnx" / f"{digest}-ortgenai{builder_version()}"


def _variant_name(precision: str, device: str, options: Mapping[str, int | str]) -> str:
    return "-".join([precision, device, *(f"{k}{v}" for k, v in sorted(options.items()))])


def _check_builder_deps() -> None:
    builder_version()
    for module, dist in (("onnx_ir", "onnx-ir"), ("onnx", "onnx"), ("torch", "torch"),
                         ("transformers", "transformers"), ("onnxruntime", "onnxruntime")):
        if importlib.util.find_spec(module) is None:
            raise PackagingError(
                f"the onnxruntime-genai builder needs {dist}, which is not installed",
                hint="pip install 'edgepack[packager]'",
            )


def _ensure_build(model: ModelInfo, precision: str, device: str, options: Mapping[str, int | str], *,
                  cache_dir: Path, threads: int) -> Path:
    cached = _builds_dir(model, cache_dir) / _variant_name(precision, device, options)
    if (cached / "genai_config.json").is_file():
        log.info("ONNX %s %s cached: %s", precision, device, cached)
        return cached
    _check_builder_deps()
    t0 = time.monotonic()
    log.info("building ONNX %s for %s from %s with onnxruntime-genai %s%s", precision, device,
             model.path, builder_version(), f" ({options})" if options else "")
    # The builder's scratch (external data while saving) and the staged input live beside the
    # output, on the same filesystem, and go away whatever happens.
    with (tempfile.TemporaryDirectory(prefix=".stage-", dir=_mkdir(cached.parent)) as tmp,
          atomic_dir(cached) as out):
        staged, scratch = Path(tmp, "hf"), Path(tmp, "scratch")
        staged.mkdir()
        changes = stage_checkpoint(model.path, staged)
        for change in changes:
            log.info("config adapted for the builder: %s", change)
        cmd = [sys.executable, "-m", BUILDER_MODULE, "-i", str(staged), "-o", str(out),
               "-p", precision, "-e", device, "-c", str(scratch)]
        if options:
            cmd += ["--extra_options", *(f"{k}={v}" for k, v in sorted(options.items()))]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if threads > 0:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        rc, tail = run_streaming(cmd, env=env, prefix="ort-builder: ", log=log, quiet=_CHATTY)
        if rc != 0:
            raise ConvertError(f"the onnxruntime-genai builder failed on {model.path} "
                               f"({precision}, {device}; exit {rc})", returncode=rc,
                               stderr_tail=tail)
        finish_folder(out, model.path)
        seconds = time.monotonic() - t0
        (out / BUILD_MARKER).write_text(json.dumps({
            "source_digest": model.source_digest, "precision": precision, "device": device,
            "options": dict(options), "builder": f"{BUILDER_DIST} {builder_version()}",
            "transformers": _dist_version("transformers"), "config_changes": changes,
            "build_seconds": round(seconds, 1),
        }, indent=2))
    size = sum(p.stat().st_size for p in cached.iterdir())
    log.info("built ONNX %s %s in %.1f s (%.0f MB): %s", precision, device, seconds, size / 1e6,
             cached)
    return cached


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _dist_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""


def finish_folder(out: Path, hf_dir: Path, *, max_length: int = DEFAULT_MAX_LENGTH) -> None:
    """Make a builder output folder complete for our runtime.

    ``search.max_length`` is set to ``max_length`` clipped to the model's context and raised to
    its sliding window (ORT GenAI sizes windowed KV caches from it and fails below the window);
    the chat template is copied from the checkpoint when the builder did not write one.

    Raises:
        ConvertError: the builder wrote no ``genai_config.json`` or no model file.
    """
    cfg_path = out / "genai_config.json"
    try:
        genai = json.loads(cfg_path.read_text(encoding="utf-8"))
        model = genai["model"]
        decoder = model["decoder"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConvertError(f"the builder wrote no usable genai_config.json in {out}: {e}") from e
    if not (out / decoder.get("filename", "model.onnx")).is_file():
        raise ConvertError(f"the builder wrote no {decoder.get('filename', 'model.onnx')} in {out}")
    context = int(model.get("context_length") or max_length)
    window = int((decoder.get("sliding_window") or {}).get("window_size") or 0)
    genai.setdefault("search", {})["max_length"] = max(min(max_length, context), window)
    with atomic_file(cfg_path) as tmp:
        tmp.write_text(json.dumps(genai, indent=4), encoding="utf-8")
    if not (out / CHAT_TEMPLATE_FILE).is_file():
        template = chat_template_of(hf_dir)
        if template:
            (out / CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")


def chat_template_of(folder: Path) -> str | None:
    """The chat template in an HF or ONNX folder (``chat_template.jinja``, ``chat_template.json``
    or ``tokenizer_config.json``), or None."""
    jinja = folder / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        try:
            template = json.loads((folder / name).read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(template, str) and template.strip():
            return template
    return None


def _place(src: Path, dst: Path) -> Path:
    """Hard-link (or copy) every file of ``src`` into a new folder ``dst``, atomically."""
    names = sorted(p.name for p in src.iterdir() if p.is_file())
    if dst.is_dir() and sorted(p.name for p in dst.iterdir()) == names and all(
            (dst / n).samefile(src / n) for n in names):
        return dst
    with atomic_dir(dst) as tmp:
        for name in names:
            try:
                os.link(src / name, tmp / name)  # same filesystem: no copy of hundreds of MB
            except OSError:
                copy_atomic(src / name, tmp / name)
    return dst


# --- (d) the public entry points ---------------------------------------------------------------


def build_onnx_variant(model: ModelInfo, variant: Variant, out_dir: Path, *, cache_dir: Path,
                       threads: int) -> Path:
    """Build (or reuse) an ONNX Runtime GenAI folder of ``model`` and place it in ``out_dir``.

    Cached by (source digest, precision, device, options, builder version).

    Args:
        model: the source model (an HF checkpoint).
        variant: ``precision`` (int4, int8, fp16, fp32), ``device`` (cpu, cuda, dml; qnn is
            refused) and ``options`` (``block_size``, ``accuracy_level``, ``algo_config``).
        out_dir: where the folder is placed (files hard-linked to the cache when possible).
        cache_dir: the packager cache.
        threads: CPU threads for the builder; 0 = its default.

    Returns:
        The folder in ``out_dir``: ``genai_config.json``, ``model.onnx`` (+ ``.data``), tokenizer
        files, the chat template when the checkpoint has one, ``edgepack-build.json``.

    Raises:
        PackagingError: the request cannot be built (see :func:`check_request`) or the builder
            or one of its dependencies is not installed.
        ConvertError: the builder failed (its exit code and output tail are attached); nothing
            is left in the cache.
    """
    options = check_request(model, variant.precision, variant.device,
                            dict(variant.options))
    cached = _ensure_build(model, variant.precision, variant.device, options,
                           cache_dir=cache_dir, threads=threads)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", model.name).strip("-") or "model"
    return _place(cached, out_dir / f"{stem}-onnx-{cached.name}")


def reference_onnx(model: ModelInfo, cache_dir: Path, *, threads: int = 0) -> Path:
    """The fp32 CPU ONNX build of ``model``: the reference ONNX variants are scored against.

    Args:
        model: the source model (an HF checkpoint).
        cache_dir: the packager cache.
        threads: CPU threads for the builder; 0 = its default.

    Returns:
        The cached folder (built once).

    Raises:
        PackagingError: the source is not an HF checkpoint or the builder is not installed.
        ConvertError: the builder failed.
    """
    check_request(model, "fp32", "cpu", {})
    return _ensure_build(model, "fp32", "cpu", {}, cache_dir=cache_dir, threads=threads)

