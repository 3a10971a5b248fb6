"""The agent as one self-contained binary per runtime (PyInstaller): ``edgepack agent-binary``.

A device then needs no Python: the binary carries CPython, the agent, its dependencies, exactly one
runtime (llama.cpp, ONNX Runtime GenAI or OpenVINO GenAI: its *flavour*) and the device profiles.
It is built from a runtime-only environment, never from edgepack's own (torch, transformers and the
converters must not leak into it), on the checkout's current agent code.

Workflow and cache (everything under the packager cache is complete or absent):
(1) the llama.cpp wheel (flavour ``llamacpp``, ``llama_cpu = "all-variants"``): llama-cpp-python
    built once with ``GGML_BACKEND_DL`` + ``GGML_CPU_ALL_VARIANTS`` (every x86-64 / Arm CPU variant
    as its own ``libggml-cpu-<variant>.so``; ggml scores them against the CPU at run time), kept in
    ``<cache>/wheels/``. Built with pip's cache off: pip keys its wheel cache by sdist only, so a
    cached wheel would be the baseline build, and ours must not replace that one either.
    ``llama_cpu = "baseline"`` reuses the portable wheel (pip's cache, ``-DGGML_NATIVE=OFF``);
(2) the runtime-only environment ``<cache>/envs/agent-<runtime>-<hash of the pins>/``: a venv and
    one pip command with the agent's dependencies (pyproject's ``[project.dependencies]``, what
    ``pip install .`` installs without extras), the one runtime pin (pyproject's extra, or the
    wheel of (1)) and PyInstaller (the ``binary`` extra); an import check (for all-variants also a
    load test of the CPU variants); the stamp written last, under a lock;
(3) the build: PyInstaller in that environment with the checkout first on its path (the
    environment never holds a stale copy of the agent), our hooks (``packager/_pyinstaller/``),
    the runtime hook and the profiles; into ``<cache>/agent-binary/<name>-<key>/``, where the key
    hashes every input (environment, agent sources, profiles, hooks, options): one build per input;
(4) the manifest beside it (``<name>.manifest.json``: flavour, versions, platform, size, and the
    size and sha256 of every file), checked by :func:`verify_binary`; artifact and manifest are
    hard-linked (or copied) into the output directory.

Known traps handled here (measured; see DESIGN.md "Tool facts, 2026-12"): onnxruntime-genai finds
onnxruntime with ``find_spec`` and ctypes-loads ``capi/libonnxruntime.so.<ver>`` (the hooks add the
package and the versioned library, not its 36 MB Python binding); llama-cpp-python ctypes-loads
its libraries from its package folder (collected by their load names, once each); openvino has no
hook (plugins, ``plugins.xml``, the tokenizers' extension are collected; the frontends for other
formats are not); a one-file binary unpacks to ``$TMPDIR`` (or /tmp) on every start, which fails on
a noexec /tmp: point ``TMPDIR`` at an exec-able folder or use the one-folder layout (the default,
which starts without unpacking).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent._fs import file_digest
from agent.errors import ConvertError, DigestMismatchError, ManifestError, PackagingError
from agent.runtimes.registry import RUNTIMES
from packager import _pyinstaller as pyi
from packager._tools import run_streaming
from packager.cache import atomic_dir, atomic_file, copy_atomic, file_lock, sha256_files

__all__ = [
    "BINARY_FORMAT_VERSION", "FLAVOURS", "LLAMA_CPU_MODES", "BinaryFile", "BinaryManifest",
    "add_command", "all_variants_wheel", "artifact_name", "build_agent_binary", "ensure_agent_env",
    "ensure_llama_wheel", "pyinstaller_command", "spec_config", "verify_binary",
]

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]  # the checkout: pyproject.toml, agent/, profiles/
BINARY_FORMAT_VERSION = 1
ENV_STAMP = ".edgepack-env.json"  # written last: its presence means the environment is complete
EXE = "edgepack-agent"  # the executable's name (inside the folder, or the one file's stem)

# llama.cpp builds. BASELINE is run.sh's: one CPU backend for x86-64-v3 (AVX2/FMA/F16C) or armv8.
# ALL_VARIANTS adds every CPU variant as a loadable module, chosen at run time (see the module doc).
LLAMA_CPU_MODES = ("all-variants", "baseline")
BASELINE_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF"
ALL_VARIANTS_CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON "
                           "-DGGML_BLAS=OFF -DLLAMA_CURL=OFF")

# Never part of an agent binary (PyInstaller would follow optional imports into them): the host
# side of edgepack, the converters' stacks, GUI and test tooling.
EXCLUDES = ("packager", "fleet", "edgepack", "torch", "transformers", "matplotlib", "IPython",
            "tkinter", "_tkinter", "pytest", "setuptools", "pkg_resources", "pip", "distutils",
            "lib2to3", "pydoc_data", "test")


@dataclass(frozen=True)
class Flavour:
    """What one runtime's binary needs beyond the agent."""

    runtime: str  # registry name: "llamacpp"
    check_modules: tuple[str, ...]  # imported by the environment's check
    # modules PyInstaller cannot see imported (our hooks in packager/_pyinstaller/hooks do the rest)
    hidden_imports: tuple[str, ...] = ()

    @property
    def distribution(self) -> str:
        return RUNTIMES[self.runtime].distributions[0]


FLAVOURS: Mapping[str, Flavour] = {
    "llamacpp": Flavour("llamacpp", ("llama_cpp",)),
    # onnxruntime is found with find_spec and never imported (see hooks/hook-onnxruntime*.py)
    "ortgenai": Flavour("ortgenai", ("onnxruntime_genai",), ("onnxruntime",)),
    "openvino": Flavour("openvino", ("openvino", "openvino_genai", "openvino_tokenizers")),
}


# --- (a) pins and names, pure ------------------------------------------------------------------------


def _pyproject(root: Path) -> dict[str, Any]:
    path = root / "pyproject.toml"
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise PackagingError(
            f"cannot read {path}: {e}",
            hint="agent-binary builds from an edgepack source checkout (pyproject.toml, agent/).",
        ) from e


def agent_requirements(project: Mapping[str, Any], runtime: str) -> tuple[list[str], list[str], list[str]]:
    """The agent's dependencies, the runtime's pins and PyInstaller's, from pyproject data. Pure.

    Returns:
        (``[project.dependencies]``, the ``runtime`` extra, the ``binary`` extra).

    Raises:
        PackagingError: an unknown runtime, or an extra missing from pyproject.toml.
    """
    if runtime not in FLAVOURS:
        raise PackagingError(f"unknown runtime {runtime!r}",
                             hint=f"--runtime takes {', '.join(FLAVOURS)}.")
    proj = project.get("project", {})
    extras = proj.get("optional-dependencies", {})
    for name in (runtime, "binary"):
        if not extras.get(name):
            raise PackagingError(f"pyproject.toml has no [project.optional-dependencies] {name}")
    return list(proj.get("dependencies", [])), list(extras[runtime]), list(extras["binary"])


def artifact_name(runtime: str, onefile: bool) -> str:
    """``edgepack-agent-<runtime>`` (a folder) or ``edgepack-agent-<runtime>-onefile`` (a file)."""
    return f"{EXE}-{runtime}" + ("-onefile" if onefile else "")


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def _pinned_version(reqs: Sequence[str], dist: str) -> str:
    norm = re.sub(r"[-_.]+", "-", dist).lower()
    for r in reqs:
        name, sep, version = r.partition("==")
        if sep and re.sub(r"[-_.]+", "-", name.strip()).lower() == norm:
            return version.strip()
    raise PackagingError(f"pyproject.toml does not pin {dist} with == (needed to build its wheel)")


def spec_config(flavour: Flavour, *, work: Path, onefile: bool, flavour_file: Path,
                strip: bool = True, root: Path = ROOT) -> dict[str, Any]:
    """The parameters ``packager/_pyinstaller/agent.spec`` builds one flavour with. Pure.

    Every runtime plugin is a hidden import (the registry imports them by name), so a binary of
    one flavour refuses a bundle of another with the runtime's own error, not a missing module.
    ``strip`` strips the collected libraries except those auditwheel patched (see the spec).
    Bytecode is not optimised: ``-OO`` saved 0.3 MiB of idle RSS here, not worth dropping asserts.
    """
    return {
        "name": EXE, "onefile": onefile, "strip": strip, "optimize": 0, "work": str(work),
        "entry": str(pyi.ENTRY), "paths": [str(root)], "hooks": str(pyi.HOOKS_DIR),
        "runtime_hook": str(pyi.RUNTIME_HOOK),
        "hiddenimports": [*(RUNTIMES[r].plugin.partition(":")[0] for r in sorted(RUNTIMES)),
                          *flavour.hidden_imports],
        "excludes": list(EXCLUDES),
        "datas": [[str(root / "profiles" / "*.toml"), "profiles"], [str(flavour_file), "."]],
    }


def pyinstaller_command(python: Path, work: Path) -> list[str]:
    """PyInstaller on our spec, in the runtime-only environment (config: ``work/spec.json``). Pure."""
    return [str(python), "-I", "-m", "PyInstaller", "--noconfirm", "--log-level", "WARN",
            "--distpath", str(work / "dist"), "--workpath", str(work / "build"), str(pyi.SPEC)]


# --- (b) tools -----------------------------------------------------------------------------------------


def _tool_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "CMAKE_ARGS")}
    env.update(PYTHONUNBUFFERED="1", PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def _run(cmd: list[str], *, what: str, prefix: str, env: dict[str, str] | None = None,
         hint: str = "", level: int = logging.DEBUG) -> str:
    out: list[str] = []

    def keep(line: str) -> bool:
        out.append(line)
        return False

    rc, tail = run_streaming(cmd, env=env or _tool_env(), prefix=prefix, log=log, on_line=keep,
                             level=level)
    if rc != 0:
        err = ConvertError(f"agent-binary: {what} failed (exit {rc})" + (f": {hint}" if hint else ""),
                           returncode=rc, stderr_tail=tail)
        err.hint = hint
        raise err
    return "\n".join(out)


def _venv(env: Path) -> Path:
    _run([sys.executable, "-m", "venv", str(env)], what="python -m venv", prefix="venv: ",
         hint="install Python's venv module (Debian: apt-get install python3-venv)")
    return env / "bin" / "python"


# --- (1) the llama.cpp wheel ------------------------------------------------------------------------


def llama_wheel_dir(cache_dir: Path, version: str, cmake_args: str) -> Path:
    """Where the llama-cpp-python ``version`` wheel built with ``cmake_args`` is kept."""
    return cache_dir / "wheels" / f"llama-cpp-python-{version}-{_key([cmake_args, platform.machine()])}"


def cached_llama_wheel(cache_dir: Path, version: str, cmake_args: str) -> Path | None:
    """The cached wheel, or None when it has not been built yet."""
    d = llama_wheel_dir(cache_dir, version, cmake_args)
    wheels = sorted(d.glob("llama_cpp_python-*.whl")) if (d / "build.json").is_file() else []
    return wheels[0] if wheels else None


def all_variants_wheel(cache_dir: Path, root: Path = ROOT) -> Path | None:
    """The all-variants wheel of pyproject's llama-cpp-python pin, if it was built here already."""
    _, reqs, _ = agent_requirements(_pyproject(root), "llamacpp")
    version = _pinned_version(reqs, FLAVOURS["llamacpp"].distribution)
    return cached_llama_wheel(cache_dir, version, ALL_VARIANTS_CMAKE_ARGS)


def ensure_llama_wheel(python: Path, cache_dir: Path, version: str, cmake_args: str) -> Path:
    """Find or build llama-cpp-python ``version`` with ``cmake_args``; return the wheel.

    Built once (all CPU variants: ~35 minutes on 2 cores) with ``python``'s pip from the sdist,
    pip's cache off in both directions (see the module docstring).

    Raises:
        ConvertError: the download or the compile failed (with the output's tail).
    """
    found = cached_llama_wheel(cache_dir, version, cmake_args)
    if found:
        return found
    dst = llama_wheel_dir(cache_dir, version, cmake_args)
    with file_lock(dst.with_name(dst.name + ".lock")):
        found = cached_llama_wheel(cache_dir, version, cmake_args)
        if found:
            return found
        log.warning("building llama-cpp-python %s with %s (once; about 35 minutes on 2 cores)",
                    version, cmake_args)
        t0 = time.monotonic()
        with atomic_dir(dst) as tmp:
            _run([str(python), "-m", "pip", "wheel", "--no-deps", "--no-cache-dir",
                  "--no-binary", "llama-cpp-python", "-w", str(tmp), f"llama-cpp-python=={version}"],
                 what="building the llama-cpp-python wheel", prefix="llama.cpp: ",
                 env=_tool_env(CMAKE_ARGS=cmake_args,
                               CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2)),
                 hint="the C/C++ toolchain and cmake are needed (Debian: build-essential cmake)")
            wheel = next(tmp.glob("llama_cpp_python-*.whl"))
            (tmp / "build.json").write_text(json.dumps({
                "version": version, "cmake_args": cmake_args, "arch": platform.machine(),
                "sha256": file_digest(wheel).sha256, "seconds": round(time.monotonic() - t0)},
                indent=2))
        log.info("llama-cpp-python wheel built in %.0f s", time.monotonic() - t0)
    found = cached_llama_wheel(cache_dir, version, cmake_args)
    assert found is not None
    return found


# --- (2) the runtime-only environment -------------------------------------------------------------


@dataclass(frozen=True)
class AgentEnv:
    """A ready runtime-only environment."""

    path: Path
    python: Path
    versions: dict[str, str]  # distribution -> version, as installed
    llama_cpu: str | None  # llamacpp only: "all-variants" | "baseline"


# What the check script reports: the version of each of these distributions.
_VERSIONED = ("pyinstaller", "pyinstaller-hooks-contrib", "paho-mqtt", "psutil", "cryptography",
              "py-cpuinfo", "numpy")
# For all-variants: load the CPU variants from the wheel's bin/ and name the one ggml picked.
_VARIANT_CHECK = r"""
import ctypes, pathlib, re, sys, llama_cpp.llama_cpp as l
site = pathlib.Path(l.__file__).parents[1]
variants = sorted(p.name for p in (site / "bin").glob("libggml-cpu-*.so"))
l._lib.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
l._lib.ggml_backend_load_all_from_path(str(site / "bin").encode())
l._lib.ggml_backend_reg_count.restype = ctypes.c_size_t
maps = open("/proc/self/maps").read()
chosen = sorted(set(re.findall(r"libggml-cpu-([\w.]+)\.so", maps)))
out["llama_cpu_variants"] = variants
out["llama_cpu_variant_here"] = chosen[0] if chosen else None
out["ggml_backends"] = l._lib.ggml_backend_reg_count()
"""


def agent_env_dir(cache_dir: Path, runtime: str, pins: Mapping[str, Any]) -> Path:
    """``<cache>/envs/agent-<runtime>-<hash of the pins and this Python>``."""
    return cache_dir / "envs" / f"agent-{runtime}-{_key({**pins, 'python': sys.version_info[:2]})}"


def ensure_agent_env(runtime: str, cache_dir: Path, *, llama_cpu: str = "all-variants",
                     root: Path = ROOT) -> AgentEnv:
    """Find or make the runtime-only build environment for ``runtime``.

    Args:
        runtime: llamacpp, ortgenai or openvino.
        cache_dir: the packager cache.
        llama_cpu: llamacpp only: ``all-variants`` (the wheel of step (1), built once) or
            ``baseline`` (the portable wheel pip has cached, else compiled with run.sh's flags).
        root: the edgepack checkout (its pyproject.toml gives every pin).

    Returns:
        The environment, with the installed versions.

    Raises:
        PackagingError: an unknown runtime or llama_cpu mode, or pins missing from pyproject.toml.
        ConvertError: venv, the wheel build, pip or the import check failed.
    """
    deps, runtime_reqs, binary_reqs = agent_requirements(_pyproject(root), runtime)
    if runtime != "llamacpp":
        llama_cpu_mode: str | None = None
    elif llama_cpu in LLAMA_CPU_MODES:
        llama_cpu_mode = llama_cpu
    else:
        raise PackagingError(f"unknown llama_cpu {llama_cpu!r}",
                             hint=f"--llama-cpu takes {', '.join(LLAMA_CPU_MODES)}.")
    pins = {"deps": deps, "runtime": runtime_reqs, "binary": binary_reqs, "llama_cpu": llama_cpu_mode,
            "cmake_args": ALL_VARIANTS_CMAKE_ARGS if llama_cpu_mode == "all-variants" else None}
    env = agent_env_dir(cache_dir, runtime, pins)
    stamp = env / ENV_STAMP
    with file_lock(env.with_name(env.name + ".lock")):
        if not stamp.is_file():
            _make_env(env, runtime, deps, runtime_reqs, binary_reqs, llama_cpu_mode, cache_dir)
    data = json.loads(stamp.read_text())
    return AgentEnv(env, env / "bin" / "python", data["versions"], llama_cpu_mode)


def _make_env(env: Path, runtime: str, deps: list[str], runtime_reqs: list[str],
              binary_reqs: list[str], llama_cpu: str | None, cache_dir: Path) -> None:
    if env.exists():
        log.warning("removing the incomplete build environment %s", env)
        shutil.rmtree(env)
    t0 = time.monotonic()
    log.info("creating the %s agent build environment in %s (once)", runtime, env)
    flavour = FLAVOURS[runtime]
    extra_env: dict[str, str] = {}
    try:
        py = _venv(env)
        reqs = list(runtime_reqs)
        if llama_cpu == "all-variants":
            version = _pinned_version(runtime_reqs, flavour.distribution)
            wheel = ensure_llama_wheel(py, cache_dir, version, ALL_VARIANTS_CMAKE_ARGS)
            reqs = [str(wheel) if r.replace(" ", "") == f"{flavour.distribution}=={version}" else r
                    for r in runtime_reqs]
        elif llama_cpu == "baseline":
            extra_env["CMAKE_ARGS"] = BASELINE_CMAKE_ARGS  # only used if pip has no cached wheel
        log.info("build env: installing %s", " ".join([*deps, *reqs, *binary_reqs]))
        _run([str(py), "-m", "pip", "install", *deps, *reqs, *binary_reqs],
             what="pip install", prefix="build env: ", env=_tool_env(**extra_env),
             hint="pip could not install the agent's pinned packages; check the package index "
                  "(pip's own configuration is used) and disk space")
        names = [flavour.distribution, *_VERSIONED]
        code = ("import importlib, importlib.metadata as m, json\n"
                f"for n in {list(flavour.check_modules)!r} + ['paho.mqtt.client', 'psutil', "
                "'cryptography', 'PyInstaller']: importlib.import_module(n)\n"
                "out = {'versions': {}}\n"
                f"for d in {names!r}:\n"
                "    try: out['versions'][d] = m.version(d)\n"
                "    except m.PackageNotFoundError: pass\n"
                + (_VARIANT_CHECK if llama_cpu == "all-variants" else "")
                + "print(json.dumps(out))\n")
        checked = json.loads(_run([str(py), "-I", "-c", code], what="the import check",
                                  prefix="build env: ").strip().splitlines()[-1])
    except BaseException:
        shutil.rmtree(env, ignore_errors=True)
        raise
    with atomic_file(env / ENV_STAMP) as tmp:
        tmp.write_text(json.dumps({"runtime": runtime, "llama_cpu": llama_cpu,
                                   "python": platform.python_version(),
                                   "seconds": round(time.monotonic() - t0), **checked}, indent=2))
    log.info("build environment ready in %.0f s: %s", time.monotonic() - t0,
             ", ".join(f"{k} {v}" for k, v in checked["versions"].items()))
    if llama_cpu == "all-variants":
        log.info("llama.cpp CPU variants: %d built; ggml picks %s on this machine",
                 len(checked.get("llama_cpu_variants", [])), checked.get("llama_cpu_variant_here"))


# --- (4) the manifest ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BinaryFile:
    """One file of a binary: its path relative to the artifact, and size + sha256 (or a link)."""

    path: str
    size: int = 0
    sha256: str = ""
    link: str | None = None  # a symlink's target (relative), instead of size + sha256

    def __post_init__(self) -> None:
        if self.path.startswith("/") or ".." in Path(self.path).parts:
            raise ManifestError(f"file path {self.path!r} leaves the binary's folder")
        if self.link is None and not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ManifestError(f"file {self.path!r} has no sha256")

    def to_dict(self) -> dict[str, Any]:
        if self.link is not None:
            return {"path": self.path, "link": self.link}
        return {"path": self.path, "size": self.size, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BinaryFile:
        return cls(str(d["path"]), int(d.get("size", 0)), str(d.get("sha256", "")),
                   None if d.get("link") is None else str(d["link"]))


@dataclass
class BinaryManifest:
    """What an agent binary is, so it can be shipped and verified (``<name>.manifest.json``).

    ``files`` lists every file of a one-folder binary (paths relative to the folder) or the one
    file (its name). Unknown fields are kept on a round trip.
    """

    name: str  # edgepack-agent-llamacpp[-onefile]: the folder or file beside the manifest
    flavour: str  # the runtime it serves
    layout: str  # "onedir" | "onefile"
    entry: str  # the executable, relative to the manifest's folder
    versions: dict[str, str]  # python, agent, the runtime's distribution, pyinstaller, ...
    platform: dict[str, str]  # os, arch, glibc (the oldest a device may have: the build host's)
    size_bytes: int
    files: list[BinaryFile]
    options: dict[str, Any] = field(default_factory=dict)  # llama_cpu, onefile
    source: dict[str, Any] = field(default_factory=dict)  # sources digest, git commit
    built: dict[str, Any] = field(default_factory=dict)  # date, seconds, cache key
    format_version: int = BINARY_FORMAT_VERSION
    unrecognized: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.format_version != BINARY_FORMAT_VERSION:
            raise ManifestError(f"binary manifest format {self.format_version} is not "
                                f"{BINARY_FORMAT_VERSION}")
        if self.layout not in ("onedir", "onefile") or self.flavour not in FLAVOURS:
            raise ManifestError(f"binary manifest: bad layout {self.layout!r} or flavour "
                                f"{self.flavour!r}")

    _FIELDS = ("format_version", "name", "flavour", "layout", "entry", "versions", "platform",
               "size_bytes", "files", "options", "source", "built")

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self._FIELDS}
        out["files"] = [f.to_dict() for f in self.files]
        return {**self.unrecognized, **out}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BinaryManifest:
        try:
            known = {k: d[k] for k in cls._FIELDS if k in d}
            known["files"] = [BinaryFile.from_dict(f) for f in d["files"]]
            return cls(**known, unrecognized={k: v for k, v in d.items() if k not in cls._FIELDS})
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"not an agent binary manifest: {e}") from e


def _file_entries(artifact: Path) -> list[BinaryFile]:
    if artifact.is_file():
        digest = file_digest(artifact)
        return [BinaryFile(artifact.name, digest.size, digest.sha256)]
    out = []
    for p in sorted(artifact.rglob("*")):
        rel = p.relative_to(artifact).as_posix()
        if p.is_symlink():
            out.append(BinaryFile(rel, link=os.readlink(p)))
        elif p.is_file():
            digest = file_digest(p)
            out.append(BinaryFile(rel, digest.size, digest.sha256))
    return out


def verify_binary(manifest_path: Path) -> BinaryManifest:
    """Check an agent binary against its manifest: every file, nothing missing, nothing extra.

    Args:
        manifest_path: ``<name>.manifest.json``, beside the binary's folder or file.

    Returns:
        The manifest.

    Raises:
        ManifestError: the manifest is unreadable, or files are missing or not listed.
        DigestMismatchError: a file's size or sha256 (or a link's target) differs.
    """
    try:
        m = BinaryManifest.from_dict(json.loads(Path(manifest_path).read_text()))
    except (OSError, ValueError) as e:
        raise ManifestError(f"cannot read {manifest_path}: {e}") from e
    artifact = Path(manifest_path).parent / m.name
    actual = {f.path: f for f in _file_entries(artifact)} if artifact.exists() else {}
    listed = {(f.path if m.layout == "onedir" else m.name): f for f in m.files}
    missing, extra = sorted(set(listed) - set(actual)), sorted(set(actual) - set(listed))
    if missing or extra:
        raise ManifestError(f"{artifact}: " + "; ".join(
            ([f"missing {', '.join(missing[:5])}"] if missing else [])
            + ([f"not in the manifest: {', '.join(extra[:5])}"] if extra else [])))
    for path, want in listed.items():
        got = actual[path]
        if (got.link, got.size, got.sha256) != (want.link, want.size, want.sha256):
            raise DigestMismatchError(f"{artifact}: {path} differs from the manifest", path=path,
                                      expected=want.sha256 or str(want.link),
                                      actual=got.sha256 or str(got.link))
    return m


# --- (3) the build ------------------------------------------------------------------------------------


def _sources_digest(root: Path) -> str:
    """One digest over everything that goes into a binary or decides how it is built: the
    checkout's agent and profiles, our PyInstaller inputs and this module."""
    agent = [*sorted((root / "agent").rglob("*.py")), *sorted((root / "profiles").glob("*.toml"))]
    builder = [*sorted(pyi.HERE.rglob("*.py")), pyi.SPEC, Path(__file__).resolve()]
    parts = [sha256_files([p for p in files if "__pycache__" not in p.parts], root=base)
             for files, base in ((agent, root.resolve()), (builder, ROOT))]
    return hashlib.sha256("".join(parts).encode()).hexdigest()


def _git(root: Path) -> dict[str, Any]:
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "agent",
                                "profiles"], capture_output=True, text=True, timeout=10,
                               check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # not a git checkout: the digest still says it
        return {}
    return {"git_commit": head, "git_dirty": bool(dirty)}


def _glibc() -> str:
    name, version = platform.libc_ver()
    return version if name == "glibc" else ""


def build_agent_binary(runtime: str, out_dir: Path, *, onefile: bool = False,
                       cache_dir: Path, llama_cpu: str = "all-variants",
                       root: Path = ROOT) -> tuple[Path, BinaryManifest]:
    """Build (or reuse) the agent binary for ``runtime`` and place it with its manifest in ``out_dir``.

    Args:
        runtime: the flavour: llamacpp, ortgenai or openvino.
        out_dir: where ``<name>/`` (or the one file) and ``<name>.manifest.json`` are placed.
        onefile: one self-extracting file instead of a folder (smaller, starts slower: it unpacks
            to ``$TMPDIR`` on every start).
        cache_dir: the packager cache (environments, the llama.cpp wheel, built binaries).
        llama_cpu: llamacpp only, see :func:`ensure_agent_env`.
        root: the edgepack checkout whose agent is frozen.

    Returns:
        The placed manifest's path and the manifest.

    Raises:
        PackagingError: bad arguments or pins.
        ConvertError: the environment or PyInstaller failed (with the output's tail), or the
            built binary does not start.
    """
    env = ensure_agent_env(runtime, cache_dir, llama_cpu=llama_cpu, root=root)
    name = artifact_name(runtime, onefile)
    options = {"llama_cpu": env.llama_cpu, "onefile": onefile}
    src_digest = _sources_digest(root)
    key = _key({"env": str(env.path), "versions": env.versions, "sources": src_digest,
                "options": options})
    built = cache_dir / "agent-binary" / f"{name}-{key}"
    manifest_file = built / f"{name}.manifest.json"
    with file_lock(built.with_name(built.name + ".lock")):
        if manifest_file.is_file():
            try:  # the output is hard-linked to the cache: an edited copy must not be reused
                verify_binary(manifest_file)
                log.info("agent binary cached: %s", built / name)
            except (ManifestError, DigestMismatchError) as e:
                log.warning("rebuilding the cached %s: %s", name, e)
                shutil.rmtree(built)
        if not manifest_file.is_file():
            _build(env, runtime, name, built, onefile=onefile, options=options,
                   source={"digest": src_digest, **_git(root)}, key=key, root=root)
            _prune(built)
    return _place(built, name, Path(out_dir))


KEEP_BUILDS = 2  # per artifact name: each agent change makes a new one of 100-250 MB


def _prune(current: Path) -> None:
    """Remove all but the newest :data:`KEEP_BUILDS` builds of ``current``'s name that no other
    process holds (placed copies stay valid: they are hard links or copies)."""
    name = current.name.rsplit("-", 1)[0]
    others = [p for p in current.parent.iterdir()
              if p.is_dir() and p != current and re.fullmatch(re.escape(name) + r"-[0-9a-f]{12}", p.name)]
    for old in sorted(others, key=lambda p: p.stat().st_mtime, reverse=True)[KEEP_BUILDS - 1:]:
        lock = old.with_name(old.name + ".lock")
        with lock.open("a") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # being placed or built right now: next time
                continue
            shutil.rmtree(old, ignore_errors=True)
            lock.unlink(missing_ok=True)


def _build(env: AgentEnv, runtime: str, name: str, dst: Path, *, onefile: bool,
           options: dict[str, Any], source: dict[str, Any], key: str, root: Path) -> None:
    from agent import __version__

    t0 = time.monotonic()
    log.info("building %s with PyInstaller %s (%s)", name, env.versions.get("pyinstaller"),
             "one file" if onefile else "one folder")
    dst.parent.mkdir(parents=True, exist_ok=True)
    # The work folder beside the result: one filesystem, so the result is moved, not copied.
    with tempfile.TemporaryDirectory(prefix=f".work-{name}-", dir=dst.parent) as tmp, \
            atomic_dir(dst) as out:
        work = Path(tmp)
        flavour_file = work / pyi.FLAVOUR_FILE
        flavour_file.write_text(json.dumps({"flavour": runtime, "llama_cpu": env.llama_cpu,
                                            "layout": "onefile" if onefile else "onedir"}))
        config = work / "spec.json"
        config.write_text(json.dumps(spec_config(FLAVOURS[runtime], work=work, onefile=onefile,
                                                 flavour_file=flavour_file, root=root)))
        _run(pyinstaller_command(env.python, work), what="PyInstaller", prefix="pyinstaller: ",
             level=logging.INFO, env=_tool_env(EDGEPACK_AGENT_SPEC=str(config)),
             hint="see PyInstaller's output above")
        os.replace(work / "dist" / EXE, out / name)
        artifact = out / name
        entry = name if onefile else f"{name}/{EXE}"
        _smoke(out / entry, runtime)
        files = _file_entries(artifact)
        m = BinaryManifest(
            name=name, flavour=runtime, layout="onefile" if onefile else "onedir", entry=entry,
            versions={"python": platform.python_version(), "agent": __version__,
                      **{k: v for k, v in env.versions.items()}},
            platform={"os": sys.platform, "arch": platform.machine(), "glibc": _glibc()},
            size_bytes=sum(f.size for f in files), files=files, options=options, source=source,
            built={"date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                   "seconds": round(time.monotonic() - t0, 1), "key": key})
        (out / f"{name}.manifest.json").write_text(json.dumps(m.to_dict(), indent=2) + "\n")
    log.info("%s built in %.0f s: %.1f MB (%d files)", name, time.monotonic() - t0,
             m.size_bytes / 1e6, len(m.files))


def _smoke(exe: Path, runtime: str) -> None:
    """The binary must run on its own and load its runtime: ``probe --runtimes`` in an empty
    environment (a library broken while collecting it shows up here, not on a device)."""
    with tempfile.TemporaryDirectory(prefix="edgepack-smoke-") as home:
        try:
            r = subprocess.run([str(exe), "--state-dir", f"{home}/state", "probe", "--runtimes",
                                "--json"], capture_output=True, text=True, timeout=300,
                               env={"PATH": "/usr/bin:/bin", "HOME": home}, cwd=home, check=False)
            facts = json.loads(r.stdout) if r.returncode == 0 else {}
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            raise ConvertError(f"the built agent does not start: {e}") from e
    info = facts.get("runtimes", {}).get(runtime, {})
    if not info.get("installed") or info.get("error"):
        raise ConvertError(f"the built agent does not load {runtime}: {info.get('error')}",
                           returncode=r.returncode, stderr_tail=(r.stdout + r.stderr)[-4000:])


def _place(built: Path, name: str, out_dir: Path) -> tuple[Path, BinaryManifest]:
    src = built / name
    dst = out_dir / name
    if src.is_file():
        _link_or_copy(src, dst)
    else:
        with atomic_dir(dst) as tmp:
            for p in sorted(src.rglob("*")):
                target = tmp / p.relative_to(src)
                if p.is_symlink():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(os.readlink(p), target)
                elif p.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    _link_or_copy(p, target)
    manifest = out_dir / f"{name}.manifest.json"
    copy_atomic(built / manifest.name, manifest)
    return manifest, BinaryManifest.from_dict(json.loads(manifest.read_text()))


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(src, tmp)  # same filesystem: no copy of a 100 MB runtime
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


# --- CLI ----------------------------------------------------------------------------------------------


def _cmd_agent_binary(args: argparse.Namespace) -> int:
    from agent._cli import dump, err
    from packager.cache import default_cache_dir

    if args.verify:
        m = verify_binary(Path(args.verify))
        if args.json:
            dump(m.to_dict())
        else:
            err(f"ok: {m.name} ({m.flavour}, {m.layout}, {len(m.files)} files, "
                f"{m.size_bytes / 1e6:.1f} MB) matches its manifest")
        return 0
    if not args.runtime:
        raise PackagingError("name the runtime: --runtime llamacpp|ortgenai|openvino")
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    path, m = build_agent_binary(args.runtime, Path(args.output), onefile=args.onefile,
                                 cache_dir=cache, llama_cpu=args.llama_cpu)
    if args.json:
        dump({"manifest": str(path), **m.to_dict()})
    else:
        err(f"{path.parent / m.entry}: {m.flavour} agent, {m.layout}, {m.size_bytes / 1e6:.1f} MB, "
            f"Python {m.versions['python']}, {FLAVOURS[m.flavour].distribution} "
            f"{m.versions.get(FLAVOURS[m.flavour].distribution)}")
        err(f"manifest: {path} (check a copy with: edgepack agent-binary --verify {path})")
    return 0


def add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``agent-binary`` to the host CLI (it reads the global ``args.cache_dir``)."""
    s = sub.add_parser("agent-binary", help="build the agent as one self-contained binary per runtime")
    s.add_argument("--runtime", choices=sorted(FLAVOURS), help="the flavour: the runtime it serves")
    s.add_argument("-o", "--output", default="dist", help="output folder (default: dist/)")
    s.add_argument("--onefile", action="store_true",
                   help="one self-extracting file (unpacks to $TMPDIR on every start) instead of "
                        "a folder")
    s.add_argument("--llama-cpu", choices=LLAMA_CPU_MODES, default="all-variants",
                   help="llamacpp: every CPU variant, best picked at run time (default; the wheel "
                        "is compiled once), or the portable AVX2/armv8 baseline")
    s.add_argument("--verify", metavar="MANIFEST", help="check a binary against its manifest instead")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_agent_binary)
