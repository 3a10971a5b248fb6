"""The probe: its shape on this machine, parsing a fake /proc,/sys,/dev tree, and never raising."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
from need import need

import agent.probe as probe_mod
from agent.probe import probe
from agent.profiles import load_profiles, match_profile
from agent.profiles.schema import ACCELERATORS
from agent.runtimes import registry

ROOT = Path(__file__).resolve().parents[3]
RUNTIME_MODULES = ("llama_cpp", "onnxruntime_genai", "openvino", "openvino_genai")


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def assert_shape(facts: dict[str, Any]) -> None:
    assert list(facts) == [
        "schema", "os", "arch", "cpu_model", "cpu_flags", "cores_logical", "cores_physical",
        "ram_bytes", "disk_free_bytes", "disk_path", "accelerators", "runtimes", "hostname",
        "python",
    ]  # fmt: skip
    assert facts["schema"] == 1
    assert facts["os"] in ("linux", "darwin", "windows", "android", None)
    for key in ("cores_logical", "cores_physical", "ram_bytes", "disk_free_bytes"):
        assert facts[key] is None or (isinstance(facts[key], int) and facts[key] > 0), key
    flags = facts["cpu_flags"]
    assert flags is None or flags == sorted({f.lower() for f in flags})
    for acc in facts["accelerators"]:
        assert set(acc) == {"kind", "name", "source"} and acc["kind"] in ACCELERATORS
    assert set(facts["runtimes"]) == {"llamacpp", "ortgenai", "openvino"}
    for info in facts["runtimes"].values():
        assert set(info) == {"installed", "version", "devices", "error"}
        assert isinstance(info["installed"], bool)
    assert isinstance(facts["hostname"], str) and isinstance(facts["disk_path"], str)
    assert facts["python"] == platform.python_version()
    json.dumps(facts)


def test_shape_on_this_machine(tmp_path: Path) -> None:
    facts = probe(disk_path=tmp_path)
    assert_shape(facts)
    assert facts["disk_path"] == str(tmp_path)
    assert facts["ram_bytes"] and facts["cores_logical"] and facts["disk_free_bytes"]
    if sys.platform.startswith("linux"):
        assert facts["cpu_flags"] and facts["cpu_model"]


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
    reason="the dev/CI machine is x86_64 Linux without accelerators",
)
def test_this_machine_matches_x86_64_cpu() -> None:
    facts = probe()
    result = match_profile(facts, load_profiles(ROOT / "profiles"))
    assert result.best == "x86-64-cpu", "\n".join(result.explain())


def test_empty_root_gives_unknowns_not_errors(tmp_path: Path) -> None:
    facts = probe(root=tmp_path)
    assert_shape(facts)
    assert facts["cpu_model"] is None and facts["cpu_flags"] is None
    assert facts["accelerators"] == []
    assert facts["disk_path"] == str(tmp_path)


def test_unreadable_files_and_missing_disk_path(tmp_path: Path) -> None:
    (tmp_path / "proc" / "cpuinfo").mkdir(parents=True)  # a directory where a file should be
    (tmp_path / "sys" / "class").mkdir(parents=True)
    write(tmp_path / "sys" / "class" / "drm", "not a directory")
    facts = probe(root=tmp_path, disk_path=tmp_path / "does-not-exist")
    assert_shape(facts)
    assert facts["cpu_flags"] is None and facts["disk_free_bytes"] is None


def test_psutil_failures_become_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no /proc/meminfo")

    for name in ("virtual_memory", "disk_usage", "cpu_count"):
        monkeypatch.setattr(psutil, name, boom)
    facts = probe(root=tmp_path)
    assert facts["ram_bytes"] is None and facts["disk_free_bytes"] is None
    assert facts["cores_logical"] is None and facts["cores_physical"] is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads a Linux-style tree")
def test_raspberry_pi_tree(tmp_path: Path) -> None:
    write(
        tmp_path / "proc" / "cpuinfo",
        "processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32"
        " atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\n\n"
        "processor\t: 1\nFeatures\t: fp\n\nRevision\t: d04170\nModel\t\t: Raspberry Pi 5 Model B"
        " Rev 1.0\n",
    )
    facts = probe(root=tmp_path)
    assert facts["cpu_model"] == "Raspberry Pi 5 Model B Rev 1.0"
    assert facts["cpu_flags"] is not None
    assert "asimddp" in facts["cpu_flags"] and len(facts["cpu_flags"]) == 16
    assert facts["accelerators"] == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads a Linux-style tree")
def test_jetson_tree_uses_device_tree_model_and_tegra_gpu(tmp_path: Path) -> None:
    write(tmp_path / "proc" / "cpuinfo", "processor\t: 0\nFeatures\t: fp asimd\n")
    write(tmp_path / "proc" / "device-tree" / "model", "NVIDIA Jetson Orin Nano Developer Kit\x00")
    write(tmp_path / "etc" / "nv_tegra_release", "# R36 (release), REVISION: 4.0\n")
    facts = probe(root=tmp_path)
    assert facts["cpu_model"] == "NVIDIA Jetson Orin Nano Developer Kit"
    assert facts["accelerators"] == [
        {
            "kind": "nvidia-gpu",
            "name": "NVIDIA Jetson Orin Nano Developer Kit (integrated GPU)",
            "source": "/etc/nv_tegra_release",
        }
    ]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads a Linux-style tree")
def test_ai_pc_tree_finds_npu_igpu_dgpu(tmp_path: Path) -> None:
    write(
        tmp_path / "proc" / "cpuinfo", "model name\t: Intel(R) Core(TM) Ultra 7 155H\nflags\t\t: AVX2 fma\n"
    )
    # Intel NPU through the accel subsystem, with its /dev node.
    write(tmp_path / "sys" / "class" / "accel" / "accel0" / "device" / "vendor", "0x8086\n")
    write(tmp_path / "sys" / "class" / "accel" / "accel0" / "device" / "device", "0x7d1d\n")
    write(tmp_path / "dev" / "accel" / "accel0", "")
    # An accel node without its /dev node is not usable here (container): ignored.
    write(tmp_path / "sys" / "class" / "accel" / "accel1" / "device" / "vendor", "0x17cb\n")
    # Intel iGPU and AMD dGPU through DRM; connectors are not devices.
    drm = tmp_path / "sys" / "class" / "drm"
    write(drm / "card0" / "device" / "vendor", "0x1002\n")
    write(drm / "card1" / "device" / "vendor", "0x8086\n")
    write(drm / "card1" / "device" / "device", "0x7d55\n")
    write(drm / "card1-eDP-1" / "device" / "vendor", "0x8086\n")
    write(tmp_path / "dev" / "dri" / "renderD128", "")
    # A discrete NVIDIA card with its driver loaded.
    write(
        tmp_path / "proc" / "driver" / "nvidia" / "gpus" / "0000:01:00.0" / "information",
        "Model: \t\t NVIDIA GeForce RTX 4060 Laptop GPU\nIRQ: 180\n",
    )
    facts = probe(root=tmp_path)
    assert facts["cpu_model"] == "Intel(R) Core(TM) Ultra 7 155H"
    assert facts["cpu_flags"] == ["avx2", "fma"]
    assert [(a["kind"], a["name"]) for a in facts["accelerators"]] == [
        ("nvidia-gpu", "NVIDIA GeForce RTX 4060 Laptop GPU"),
        ("intel-npu", "Intel NPU (device 0x7d1d)"),
        ("amd-gpu", "AMD GPU (device ?)"),
        ("intel-gpu", "Intel GPU (device 0x7d55)"),
    ]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads a Linux-style tree")
def test_drm_gpu_needs_a_render_node(tmp_path: Path) -> None:
    write(tmp_path / "sys" / "class" / "drm" / "card0" / "device" / "vendor", "0x8086\n")
    assert probe(root=tmp_path)["accelerators"] == []
    write(tmp_path / "dev" / "dri" / "renderD128", "")  # the control: with the node it counts
    assert [a["kind"] for a in probe(root=tmp_path)["accelerators"]] == ["intel-gpu"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Android runs a Linux kernel")
def test_android_phone_tree(tmp_path: Path) -> None:
    write(tmp_path / "system" / "build.prop", "ro.product.model=Pixel 8\n")
    write(tmp_path / "dev" / "fastrpc-cdsp", "")
    write(tmp_path / "dev" / "nvidia0", "")
    facts = probe(root=tmp_path)
    assert facts["os"] == "android"
    assert [(a["kind"], a["source"]) for a in facts["accelerators"]] == [
        ("nvidia-gpu", "/dev/nvidia0"),
        ("qualcomm-npu", "/dev/fastrpc-cdsp"),
    ]


def test_inferred_windows_accelerators() -> None:
    snap = probe_mod._inferred_from_cpu(
        "Snapdragon(R) X Elite - X1E78100 - Qualcomm(R) Oryon(TM) CPU", "aarch64"
    )
    assert [a["kind"] for a in snap] == ["qualcomm-npu"]
    ultra = probe_mod._inferred_from_cpu("Intel(R) Core(TM) Ultra 7 258V", "x86_64")
    assert [a["kind"] for a in ultra] == ["intel-gpu", "intel-npu"]
    assert probe_mod._inferred_from_cpu(None, None) == []


def test_runtimes_are_located_without_importing_them() -> None:
    """A fresh interpreter: probe() must import no runtime and not py-cpuinfo (~1 s) on Linux."""
    code = (
        "import json, sys\n"
        "from agent.probe import probe\n"
        "facts = probe()\n"
        f"print(json.dumps([m for m in {(*RUNTIME_MODULES, 'cpuinfo')!r} if m in sys.modules]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, cwd=ROOT
    )
    loaded = json.loads(out.stdout)
    expected = [] if sys.platform.startswith("linux") else ["cpuinfo"]
    assert loaded == expected


def test_runtimes_true_reports_devices() -> None:
    rts = probe(runtimes=True)["runtimes"]
    llama = rts["llamacpp"]
    need(llama["installed"], "llama-cpp-python not installed (the llamacpp extra)")
    assert llama["error"] is None and llama["version"]
    assert llama["devices"] and llama["devices"][0] == "cpu"


def test_a_broken_runtime_is_an_error_not_an_exception(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    # A located package whose import fails (a missing shared library, say): real modules on
    # sys.path that raise ImportError on import, put in the registry in place of the runtimes'.
    for name in list(registry.RUNTIMES):
        mod = f"edgepack_broken_{name}"
        (tmp_path / f"{mod}.py").write_text(
            f"raise ImportError('lib{name}.so: cannot open shared object file')\n")
        monkeypatch.setitem(registry.RUNTIMES, name, dataclasses.replace(
            registry.RUNTIMES[name], module=mod, distributions=(mod,)))
    monkeypatch.syspath_prepend(str(tmp_path))
    rts = probe(runtimes=True)["runtimes"]
    for name, info in rts.items():
        assert info["installed"] is True
        assert info["error"].startswith("RuntimeUnavailableError: ")
        assert f"cannot load: lib{name}.so: cannot open shared object file" in info["error"]
