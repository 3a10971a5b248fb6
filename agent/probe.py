"""Hardware probe: the facts the profile matcher and the install checks need, as JSON-able data.

Invariants:

* Never raises. Each fact is gathered by its own step; a step that fails (missing file, odd
  format, no permission, library error) leaves its fact ``None`` (or ``[]``) and the rest stands,
  so an unknown machine still gets a probe and the matcher says which fact was missing.
* Fast on the agent's start-up path: on Linux/Android, CPU model and flags come straight from
  ``/proc/cpuinfo`` (py-cpuinfo takes ~1.1 s because it runs subprocesses; it is only the fallback
  on macOS/Windows). Runtimes are located with ``importlib.util.find_spec`` and not imported unless
  ``runtimes=True``.
* Every file path is taken relative to ``root`` so tests can point the probe at a fake tree.

Shape (``schema`` 1)::

    {"schema": 1, "os", "arch", "cpu_model", "cpu_flags", "cores_logical", "cores_physical",
     "ram_bytes", "disk_free_bytes", "disk_path", "accelerators": [{"kind", "name", "source"}],
     "runtimes": {name: {"installed", "version", "devices", "error"}}, "hostname", "python"}

With ``runtimes=True`` the llamacpp entry also has ``cpu_variant``: which CPU build of llama.cpp
was loaded (the variant picked at run time by a binary built with every variant, or ``built-in``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from agent.profiles.schema import ACCELERATORS, normalize_arch
from agent.runtimes.registry import RUNTIMES

__all__ = ["PROBE_SCHEMA", "probe"]

log = logging.getLogger(__name__)

PROBE_SCHEMA = 1
_T = TypeVar("_T")

# PCI vendor id -> (accelerator kind, name) for the devices of each kernel subsystem we read.
_ACCEL_VENDORS = {"0x8086": ("intel-npu", "Intel NPU"), "0x17cb": ("qualcomm-npu", "Qualcomm NPU")}
_DRM_VENDORS = {"0x8086": ("intel-gpu", "Intel GPU"), "0x1002": ("amd-gpu", "AMD GPU")}
_NVIDIA_SMI_TIMEOUT_S = 5.0
_MAX_SMALL_FILE = 1 << 20  # cap on any /proc or /sys file we read (cpuinfo on 256 cores ~ 300 KB)


_Cpu = tuple[str | None, list[str] | None]
_Accs = list[dict[str, str]]
_NO_CPU: _Cpu = (None, None)


def _safe(step: str, fn: Callable[[], _T], default: _T) -> _T:
    """Run one probe step; any failure becomes ``default`` so the probe as a whole never fails."""
    try:
        return fn()
    except Exception as e:  # a probe step may meet anything on an unknown machine; we report None
        log.debug("probe step %s failed: %s", step, e)
        return default


def _read(path: Path) -> str | None:
    try:
        with path.open("r", encoding="utf-8", errors="replace") as f:
            return f.read(_MAX_SMALL_FILE)
    except OSError:
        return None


# --- os / arch ---------------------------------------------------------------------------------


def _detect_os(root: Path) -> str | None:
    p = sys.platform
    if p == "android":  # CPython >= 3.13 on Android
        return "android"
    if p.startswith("linux"):
        # Android's CPython (Termux, embedded) says "linux"; its system partition gives it away.
        if (root / "system" / "build.prop").is_file() or "ANDROID_ROOT" in os.environ:
            return "android"
        return "linux"
    if p == "darwin":
        return "darwin"
    if p in ("win32", "cygwin"):
        return "windows"
    return None


def _detect_arch() -> str | None:
    return normalize_arch(platform.machine() or None)


# --- cpu -----------------------------------------------------------------------------------------


def _parse_cpuinfo(text: str) -> tuple[str | None, list[str] | None]:
    """Model and ISA flags from /proc/cpuinfo text (x86 "flags", ARM "Features")."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        # Only the first processor's block matters: all cores share the ISA on our targets.
        fields.setdefault(key.strip().lower(), value.strip())
    # x86 has "model name"; Raspberry Pi kernels put the board in "Model"; older ARM kernels
    # name the SoC in "Hardware".
    model = fields.get("model name") or fields.get("model") or fields.get("hardware") or None
    raw = fields.get("flags") or fields.get("features")
    flags = sorted({f.lower() for f in raw.split()}) if raw else None
    return model, flags


def _device_tree_model(root: Path) -> str | None:
    for rel in ("proc/device-tree/model", "sys/firmware/devicetree/base/model"):
        text = _read(root / rel)
        if text:
            return text.replace("\x00", "").strip() or None
    return None


def _cpu_from_lib() -> tuple[str | None, list[str] | None]:
    """py-cpuinfo (slow, ~1 s): only where /proc/cpuinfo does not exist (macOS, Windows)."""
    import cpuinfo  # lazy: keeps its import and subprocesses off the Linux path

    info = cpuinfo.get_cpu_info()
    model = info.get("brand_raw") or None
    flags = info.get("flags")
    return model, (sorted({str(f).lower() for f in flags}) if flags else None)


def _windows_cpu_model() -> str | None:
    # The registry has the marketing name ("Snapdragon(R) X Elite - X1E78100 - ...") that
    # platform.processor() lacks on Windows on ARM; reading it costs microseconds.
    import winreg  # type: ignore[import-not-found,unused-ignore]

    key = winreg.OpenKey(  # type: ignore[attr-defined,unused-ignore]
        winreg.HKEY_LOCAL_MACHINE,  # type: ignore[attr-defined,unused-ignore]
        r"HARDWARE\DESCRIPTION\System\CentralProcessor\0",
    )
    with key:
        value, _ = winreg.QueryValueEx(key, "ProcessorNameString")  # type: ignore[attr-defined,unused-ignore]
    return str(value).strip() or None


def _detect_cpu(root: Path, os_name: str | None) -> tuple[str | None, list[str] | None]:
    text = _read(root / "proc" / "cpuinfo")
    if text is not None:
        model, flags = _parse_cpuinfo(text)
        if model is None:
            model = _safe("device-tree model", lambda: _device_tree_model(root), None)
        return model, flags
    if os_name in ("linux", "android"):
        # No /proc/cpuinfo on Linux means a locked-down sandbox; py-cpuinfo would find nothing
        # more and costs a second, so report unknown.
        return None, None
    model, flags = _safe("py-cpuinfo", _cpu_from_lib, _NO_CPU)
    if os_name == "windows":
        model = _safe("windows registry", _windows_cpu_model, None) or model
    return model, flags


# --- memory, disk, cores --------------------------------------------------------------------------


def _ram_bytes() -> int | None:
    import psutil

    return int(psutil.virtual_memory().total)


def _disk_free(path: Path) -> int | None:
    import psutil

    return int(psutil.disk_usage(str(path)).free)


def _cores(logical: bool) -> int | None:
    import psutil

    n = psutil.cpu_count(logical=logical)
    return int(n) if n else None


# --- accelerators --------------------------------------------------------------------------------


def _no_accs() -> _Accs:
    return []


def _acc(kind: str, name: str, source: str) -> dict[str, str]:
    assert kind in ACCELERATORS, kind  # a typo here would silently never match a profile
    return {"kind": kind, "name": name, "source": source}


def _nvidia_proc(root: Path) -> list[dict[str, str]]:
    gpus = root / "proc" / "driver" / "nvidia" / "gpus"
    out = []
    for d in sorted(gpus.iterdir()) if gpus.is_dir() else []:
        text = _read(d / "information") or ""
        m = re.search(r"^Model:\s*(.+)$", text, re.MULTILINE)
        out.append(_acc("nvidia-gpu", m.group(1).strip() if m else "NVIDIA GPU", str(d)))
    if not out and (root / "dev" / "nvidia0").exists():
        out.append(_acc("nvidia-gpu", "NVIDIA GPU", "/dev/nvidia0"))
    return out


def _nvidia_tegra(root: Path) -> list[dict[str, str]]:
    # Jetson's integrated GPU has no /proc/driver/nvidia; L4T leaves these markers instead.
    for rel in ("etc/nv_tegra_release", "dev/nvhost-gpu", "dev/nvgpu"):
        if (root / rel).exists():
            name = _device_tree_model(root) or "NVIDIA Tegra GPU"
            return [_acc("nvidia-gpu", f"{name} (integrated GPU)", "/" + rel)]
    return []


def _nvidia_smi() -> list[dict[str, str]]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    r = subprocess.run(
        [exe, "-L"], capture_output=True, text=True, timeout=_NVIDIA_SMI_TIMEOUT_S, check=False
    )
    if r.returncode != 0:
        return []
    # Lines look like "GPU 0: NVIDIA GeForce RTX 4090 (UUID: GPU-...)".
    names = re.findall(r"^GPU \d+:\s*(.+?)(?:\s*\(UUID:.*)?$", r.stdout, re.MULTILINE)
    return [_acc("nvidia-gpu", n, "nvidia-smi") for n in names]


def _pci_acc(dev_dir: Path, vendors: dict[str, tuple[str, str]], source: str) -> list[dict[str, str]]:
    """The accelerator a PCI device folder describes, if its vendor is one we know in ``vendors``."""
    vendor = (_read(dev_dir / "vendor") or "").strip().lower()
    if vendor not in vendors:
        return []
    kind, name = vendors[vendor]
    device = (_read(dev_dir / "device") or "").strip().lower() or "?"
    return [_acc(kind, f"{name} (device {device})", source)]


def _accel_nodes(root: Path) -> list[dict[str, str]]:
    """NPUs behind the kernel's compute-accelerator subsystem (/dev/accel/accelN)."""
    out = []
    sys_accel = root / "sys" / "class" / "accel"
    for node in sorted(sys_accel.iterdir()) if sys_accel.is_dir() else []:
        # Without its /dev node the device is invisible to the runtimes (e.g. in a container).
        if not (root / "dev" / "accel" / node.name).exists():
            continue
        out += _pci_acc(node / "device", _ACCEL_VENDORS, f"/sys/class/accel/{node.name}")
    return out


def _fastrpc(root: Path) -> list[dict[str, str]]:
    # Qualcomm SoCs (phones, Snapdragon laptops on Linux) expose the Hexagon DSP/NPU via FastRPC.
    nodes = sorted((root / "dev").glob("fastrpc-*")) if (root / "dev").is_dir() else []
    if not nodes:
        return []
    return [_acc("qualcomm-npu", "Qualcomm Hexagon (FastRPC)", "/dev/" + nodes[0].name)]


def _drm_gpus(root: Path) -> list[dict[str, str]]:
    """Intel and AMD GPUs from /sys/class/drm, when a render node exists to use them."""
    dri = root / "dev" / "dri"
    if not (dri.is_dir() and any(dri.glob("renderD*"))):
        return []
    drm = root / "sys" / "class" / "drm"
    out = []
    # "card0" is a device; "card0-HDMI-A-1" is one of its connectors.
    cards = [c for c in drm.iterdir() if re.fullmatch(r"card\d+", c.name)] if drm.is_dir() else []
    for card in sorted(cards):
        out += _pci_acc(card / "device", _DRM_VENDORS, f"/sys/class/drm/{card.name}")
    return out


def _inferred_from_cpu(cpu_model: str | None, arch: str | None) -> list[dict[str, str]]:
    """Windows has no sysfs to look at: infer the on-die accelerators from the CPU model."""
    model = (cpu_model or "").lower()
    if arch == "aarch64" and "snapdragon" in model:
        return [_acc("qualcomm-npu", "Qualcomm Hexagon NPU", "cpu_model")]
    if "core(tm) ultra" in model or "core ultra" in model:
        return [
            _acc("intel-gpu", "Intel Arc GPU (integrated)", "cpu_model"),
            _acc("intel-npu", "Intel AI Boost NPU", "cpu_model"),
        ]
    return []


def _detect_accelerators(
    root: Path, os_name: str | None, arch: str | None, cpu_model: str | None
) -> list[dict[str, str]]:
    found: list[dict[str, str]] = []
    if os_name == "darwin":
        if arch == "aarch64":
            found.append(_acc("apple-gpu", "Apple GPU (Metal)", "platform"))
        return found
    if os_name in ("linux", "android"):
        found += _safe("nvidia /proc", lambda: _nvidia_proc(root), [])
        found += _safe("nvidia tegra", lambda: _nvidia_tegra(root), [])
        found += _safe("accel", lambda: _accel_nodes(root), [])
        if not any(a["kind"] == "qualcomm-npu" for a in found):
            found += _safe("fastrpc", lambda: _fastrpc(root), [])
        found += _safe("drm", lambda: _drm_gpus(root), [])
    if os_name == "windows":
        found += _safe("cpu model", lambda: _inferred_from_cpu(cpu_model, arch), [])
    # nvidia-smi is a real command on the real machine: skip it when probing a fake tree (tests),
    # and when the driver files already answered (it costs ~100 ms).
    if root == Path("/") and not any(a["kind"] == "nvidia-gpu" for a in found):
        found += _safe("nvidia-smi", _nvidia_smi, [])
    return found


# --- runtimes --------------------------------------------------------------------------------------


def _dist_version(dists: tuple[str, ...], origin: str | None = None) -> str | None:
    # The version is in the name of the *.dist-info folder beside the package; reading it costs
    # nothing, while importlib.metadata adds ~0.8 MB to the agent's idle footprint for good.
    if origin:
        site = Path(origin).parent.parent
        for d in dists:
            norm = re.sub(r"[-_.]+", "_", d).lower()
            for info in site.glob("*.dist-info"):
                name, _, version = info.name[: -len(".dist-info")].partition("-")
                if re.sub(r"[-_.]+", "_", name).lower() == norm and version:
                    return version
    import importlib.metadata  # unusual layouts (eggs, zip imports)

    for d in dists:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(d)
    return None


def _llama_cpu_variant() -> str | None:
    """The llama.cpp CPU backend this process has loaded: the variant ggml picked for this CPU in
    a ``GGML_BACKEND_DL`` build (``libggml-cpu-<variant>.so``, e.g. ``haswell``), ``built-in`` for
    a build with one CPU backend, None when none is loaded (or no /proc)."""
    maps = _read(Path("/proc/self/maps")) or ""
    variants = sorted(set(re.findall(r"/libggml-cpu-([\w.]+)\.so", maps)))
    if variants:
        return variants[0]
    return "built-in" if "/libggml-cpu.so" in maps else None


def _runtime(name: str, deep: bool) -> dict[str, Any]:
    entry = RUNTIMES[name]
    info: dict[str, Any] = {"installed": False, "version": None, "devices": None, "error": None}
    try:
        # find_spec on a top-level name locates the package without importing it.
        spec = importlib.util.find_spec(entry.module)
        info["installed"] = spec is not None
        if spec is None:
            return info
        info["version"] = _dist_version(entry.distributions, spec.origin)
        if deep:
            # Imports the runtime (loads its native libraries): only when asked.
            from agent.runtimes import get_runtime

            info["devices"] = get_runtime(name).describe()["devices"]
            if name == "llamacpp":
                info["cpu_variant"] = _llama_cpu_variant()
    except Exception as e:  # a broken install (bad wheel, missing .so) is a fact to report
        info["error"] = f"{type(e).__name__}: {e}"
    return info


# --- entry point -----------------------------------------------------------------------------------


def probe(*, runtimes: bool = False, disk_path: Path | None = None, root: Path = Path("/")) -> dict[str, Any]:
    """Gather this machine's facts for profile matching and install checks.

    Args:
        runtimes: also import each installed runtime and ask it for its devices (slow: loads
            native libraries). Without it, runtimes are only located, never imported.
        disk_path: where bundles will be stored; ``disk_free_bytes`` is measured there
            (default: ``root``).
        root: the filesystem root that ``/proc``, ``/sys``, ``/dev`` and ``/etc`` are read
            under; tests point it at a fake tree.

    Returns:
        A JSON-able dict with the shape in this module's docstring. Facts that could not be
        determined are ``None`` (lists: ``[]`` for accelerators).

    Raises:
        Nothing: every step is guarded, so an unknown machine yields unknown facts.
    """
    disk = disk_path if disk_path is not None else root
    os_name = _safe("os", lambda: _detect_os(root), None)
    arch = _safe("arch", _detect_arch, None)
    cpu_model, cpu_flags = _safe("cpu", lambda: _detect_cpu(root, os_name), _NO_CPU)
    return {
        "schema": PROBE_SCHEMA,
        "os": os_name,
        "arch": arch,
        "cpu_model": cpu_model,
        "cpu_flags": cpu_flags,
        "cores_logical": _safe("cores", lambda: _cores(True), None),
        "cores_physical": _safe("cores", lambda: _cores(False), None),
        "ram_bytes": _safe("ram", _ram_bytes, None),
        "disk_free_bytes": _safe("disk", lambda: _disk_free(disk), None),
        "disk_path": str(disk),
        "accelerators": _safe(
            "accelerators", lambda: _detect_accelerators(root, os_name, arch, cpu_model), _no_accs()
        ),
        "runtimes": {name: _runtime(name, runtimes) for name in RUNTIMES},
        "hostname": _safe("hostname", socket.gethostname, ""),
        "python": platform.python_version(),
    }
