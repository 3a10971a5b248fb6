"""The agent binary (``edgepack agent-binary``) runs where no Python is.

The llama.cpp flavour is built once per machine: the packager caches the build by its inputs
(environment, agent sources, profiles, hooks, options), so a second session only hard-links it. It
is built with every CPU variant when that wheel is already in the packager cache (compiling it
takes ~35 minutes on 2 cores, once: ``edgepack agent-binary --runtime llamacpp``), else with the
portable baseline wheel pip has cached from set-up, so a clean CI machine pays about two minutes
(environment + PyInstaller), not a compile. ``EDGEPACK_TEST_LLAMA_CPU`` forces one or the other.
The ortgenai and openvino flavours are built too (about a minute each, once per machine) and
install and stream the sample variants the runtime tests build.

Every run of the binary gets an empty environment (``PATH=/usr/bin:/bin`` and a ``HOME``, as
``env -i`` gives: no venv, no PYTHONPATH) and another working directory.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentkit import Host
from need import need

from agent.bundle import Keyring, Manifest, SigningKey, Target
from agent.bundle.manifest import Requirements
from agent.errors import DigestMismatchError, ManifestError
from agent.protocol import InferRequest, StatusRequest
from agent.runtimes.registry import RUNTIMES
from packager.agent_binary import BinaryManifest, all_variants_wheel, build_agent_binary, verify_binary
from packager.bundler import file_entries, write_bundle
from packager.cache import default_cache_dir

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
CLEAN_PATH = "/usr/bin:/bin"
DEV = "bin-a"
PROMPT = "The capital of France is"
MAX_EXPOSURE = 5.0  # as tests/integration/test_systemd_unit.py: the unit's hardening must hold
# Variants older than AVX2: ggml must not settle for one of these on a CPU that has AVX2.
PRE_AVX2 = {"x64", "sse42", "sandybridge", "ivybridge", "piledriver"}


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BinaryManifest, Path]:
    """(executable, manifest, manifest path) of the one-folder llamacpp binary, placed in a temp dir."""
    cache = default_cache_dir()
    llama_cpu = os.environ.get("EDGEPACK_TEST_LLAMA_CPU") or (
        "all-variants" if all_variants_wheel(cache) else "baseline")
    out = tmp_path_factory.mktemp("dist")
    path, m = build_agent_binary("llamacpp", out, cache_dir=cache, llama_cpu=llama_cpu)
    return path.parent / m.entry, m, path


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    return {"PATH": CLEAN_PATH, "HOME": str(home), **extra}


def run(exe: Path, *args: str, cwd: Path, timeout: float = 300,
        **env: str) -> subprocess.CompletedProcess[str]:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout,
                          env=clean_env(cwd, **env), cwd=cwd, check=False)


def test_the_manifest_describes_the_binary_and_catches_a_changed_file(binary, tmp_path) -> None:
    _, m, manifest = binary
    assert (m.flavour, m.layout, m.entry) == ("llamacpp", "onedir", "edgepack-agent-llamacpp/edgepack-agent")
    assert m.versions["python"] == platform.python_version()
    assert m.versions["llama-cpp-python"] == "0.3.36" and m.versions["pyinstaller"] == "6.22.3"
    assert m.platform["arch"] == platform.machine() and m.platform["glibc"]
    assert m.size_bytes == sum(f.size for f in m.files) and len(m.files) > 20
    assert verify_binary(manifest).to_dict() == m.to_dict()
    # Tamper with a copy (the placed binary is hard-linked to the build cache).
    copy = tmp_path / "copy"
    shutil.copytree(manifest.parent / m.name, copy / m.name, symlinks=True)
    shutil.copy(manifest, copy / manifest.name)
    lib = next((copy / m.name).rglob("libllama.so"))
    lib.write_bytes(lib.read_bytes() + b"\0")
    with pytest.raises(DigestMismatchError):
        verify_binary(copy / manifest.name)
    lib.unlink()
    (copy / m.name / "extra.so").write_bytes(b"x")
    with pytest.raises(ManifestError, match=r"missing .*libllama\.so.*not in the manifest: extra\.so"):
        verify_binary(copy / manifest.name)


def test_probe_runs_without_python_and_names_the_cpu_variant(binary, tmp_path) -> None:
    exe, m, _ = binary
    r = run(exe, "--state-dir", str(tmp_path / "state"), "probe", "--json", "--runtimes",
            cwd=tmp_path / "elsewhere")
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    # The bundled interpreter, not /usr/bin/python3 (Debian's 3.11.2 here) nor the venv's.
    assert facts["python"] == m.versions["python"]
    assert facts["profile"], facts["profile_match"]  # the profiles travel with the binary
    llama = facts["runtimes"]["llamacpp"]
    assert llama["installed"] and llama["error"] is None and llama["version"] == "0.3.36"
    assert not facts["runtimes"]["ortgenai"]["installed"]
    if m.options["llama_cpu"] == "baseline":
        assert llama["cpu_variant"] == "built-in"
    else:
        variants = {p.name[len("libggml-cpu-"):-3] for p in exe.parent.rglob("libggml-cpu-*.so")}
        assert len(variants) > 5 and llama["cpu_variant"] in variants, (llama, variants)
        if "avx2" in (facts["cpu_flags"] or []):
            assert llama["cpu_variant"] not in PRE_AVX2, llama


def test_install_and_streamed_infer_of_the_real_sample(binary, agent_bundles, tmp_path) -> None:
    exe, _, _ = binary
    state = ["--state-dir", str(tmp_path / "state"), "--keyring", str(agent_bundles["keyring"])]
    r = run(exe, *state, "install", str(agent_bundles["v1"]), "--json", cwd=tmp_path / "wd")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["installed"]["runtime"] == "llamacpp" and res["check"]["decode_tok_s"] > 0
    r = run(exe, *state, "infer", PROMPT, "--max-tokens", "24", "--temperature", "0", "--json",
            cwd=tmp_path / "wd")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    text = "".join(x.get("text", "") for x in lines)
    assert lines[-1]["done"] and lines[-1]["usage"]["completion_tokens"] > 0
    assert len(lines) > 3 and len(text.split()) >= 5, lines  # streamed, and words


def test_a_bundle_of_another_runtime_is_refused_naming_its_flavour(binary, tmp_path) -> None:
    exe, _, _ = binary
    key = SigningKey.generate("other-runtime")
    ring = tmp_path / "keyring.json"
    ring.write_bytes(Keyring([key.public]).to_bytes())
    payload = tmp_path / "src" / "model.onnx"
    payload.parent.mkdir()
    payload.write_bytes(b"onnx" * 1024)
    entries = file_entries({"model.onnx": payload})
    m = Manifest(model_name="tiny", version=1, profile="android-arm64",
                 target=Target("ortgenai", "onnx", "int4", "", "cpu", "model.onnx"),
                 files=entries, requirements=Requirements(), signer_key_id=key.key_id)
    bundle = tmp_path / "tiny-ortgenai.bundle"
    write_bundle(bundle, m, key, {"model.onnx": payload})
    state = ["--state-dir", str(tmp_path / "state"), "--keyring", str(ring)]
    r = run(exe, *state, "install", str(bundle), cwd=tmp_path / "wd")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "this edgepack-agent binary is the llamacpp flavour" in r.stderr, r.stderr
    assert "edgepack agent-binary --runtime ortgenai" in r.stderr, r.stderr
    st = json.loads(run(exe, *state, "status", "--json", cwd=tmp_path / "wd").stdout)
    assert st["current"] is None  # rolled back: nothing half-installed


@contextlib.contextmanager
def notify_socket(path: Path) -> Iterator[socket.socket]:
    """A fake systemd notify socket that records each sender's pid (SO_PASSCRED)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.bind(str(path))
    sock.settimeout(0.5)
    try:
        yield sock
    finally:
        sock.close()


def notifications(sock: socket.socket) -> list[tuple[int, str]]:
    out = []
    with contextlib.suppress(TimeoutError):
        while True:
            data, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
            pid = -1
            for level, kind, cred in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = array.array("i", cred[:12])[0]
            out += [(pid, line) for line in data.decode().splitlines()]
    return out


def foreign_mappings(pid: int, exe: Path) -> list[str]:
    """Files the process maps from a Python installation instead of the binary's folder."""
    pythons = {str(ROOT / ".venv"), sys.prefix, sys.base_prefix, "/usr/lib/python3"}
    maps = Path(f"/proc/{pid}/maps").read_text()
    paths = {line.split(None, 5)[5] for line in maps.splitlines() if len(line.split(None, 5)) == 6}
    return sorted(p for p in paths if any(p.startswith(x) for x in pythons)
                  and not p.startswith(str(exe.parent)))


def test_run_serves_status_and_streamed_inference_over_mqtt(binary, agent_bundles, broker, tmp_path) -> None:
    exe, _, _ = binary
    state = ["--state-dir", str(tmp_path / "state"), "--keyring", str(agent_bundles["keyring"])]
    assert run(exe, *state, "install", str(agent_bundles["v1"]), "--no-gate",
               cwd=tmp_path / "wd").returncode == 0
    host = Host(broker.url)
    log = (tmp_path / "agent.log").open("wb")
    with notify_socket(tmp_path / "notify.sock") as sock:
        proc = subprocess.Popen(
            [str(exe), "-v", *state, "run", "--broker", broker.url, "--device", DEV, "--fleet",
             "test", "--health-interval", "1"], stdout=log, stderr=subprocess.STDOUT,
            cwd=tmp_path / "wd", env=clean_env(tmp_path / "wd", NOTIFY_SOCKET=str(tmp_path / "notify.sock")))
        try:
            host.wait_for(DEV, "state", lambda m: m["state"] == "online", timeout=60)
            st = host.requests.call(DEV, "status", StatusRequest(), timeout=60)
            assert st.ok and st.result["current"]["version"] == 1, st
            chunks = list(host.requests.stream(
                DEV, InferRequest(prompt=PROMPT, max_tokens=24, temperature=0.0), timeout=120))
            assert [c.seq for c in chunks] == list(range(len(chunks))) and chunks[-1].done
            assert len("".join(c.text for c in chunks).split()) >= 5
            assert chunks[-1].usage["decode_tok_s"] > 0
            # READY=1 from the main process itself: a Type=notify unit with NotifyAccess=main
            # accepts it (the one-folder bootloader execs Python in place, it does not fork).
            got = notifications(sock)
            assert (proc.pid, "READY=1") in got, got
            assert foreign_mappings(proc.pid, exe) == []  # nothing from a Python installation
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=30)
            host.close()
            log.close()
    assert rc == 0, (tmp_path / "agent.log").read_text()[-3000:]


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("systemd-analyze")
    need(exe, "systemd-analyze not installed (apt-get install systemd)")
    assert exe is not None
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, check=False)


def test_install_service_points_the_unit_at_the_binary(binary, tmp_path) -> None:
    exe, _, _ = binary
    units = tmp_path / "units"
    # Another edgepack-agent first on PATH (the venv's) must not win over the binary itself.
    r = subprocess.run([str(exe), "install-service", "--broker", "mqtt://broker:1883", "--device",
                        "d1", "--unit-dir", str(units), "--env-file", str(tmp_path / "agent.env")],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False,
                       env=clean_env(tmp_path, PATH=f"{ROOT / '.venv' / 'bin'}:{CLEAN_PATH}"))
    assert r.returncode == 0, r.stderr
    unit = units / "edgepack-agent.service"
    assert f"ExecStart={exe.resolve()} run\n" in unit.read_text()
    res = _analyze("verify", str(unit))
    assert res.returncode == 0 and res.stderr == "", res.stderr
    res = _analyze("security", "--offline=yes", str(unit))
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) (\w+)", res.stdout)
    assert m and float(m[1]) < MAX_EXPOSURE, res.stdout[-2000:]


@pytest.fixture(scope="module")
def onefile(tmp_path_factory: pytest.TempPathFactory, binary) -> tuple[Path, BinaryManifest]:
    out = tmp_path_factory.mktemp("dist-onefile")
    path, m = build_agent_binary("llamacpp", out, onefile=True, cache_dir=default_cache_dir(),
                                 llama_cpu=binary[1].options["llama_cpu"])
    return path.parent / m.entry, m


def test_onefile_unpacks_to_tmpdir_and_a_noexec_one_is_the_known_trap(onefile, tmp_path) -> None:
    exe, m = onefile
    assert m.layout == "onefile" and len(m.files) == 1 and exe.is_file()
    unpack = tmp_path / "unpack"
    unpack.mkdir()
    r = run(exe, "--state-dir", str(tmp_path / "state"), "probe", "--json", cwd=tmp_path / "wd",
            TMPDIR=str(unpack))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["python"] == m.versions["python"]
    assert list(unpack.iterdir()) == []  # unpacked to $TMPDIR/_MEIxxxxxx and removed on exit
    if os.geteuid() != 0:
        pytest.skip("mounting a noexec tmpfs needs root")
    noexec = tmp_path / "noexec"
    noexec.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "noexec,size=512m", "tmpfs", str(noexec)],
                      capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        r = run(exe, "--version", cwd=tmp_path / "wd", TMPDIR=str(noexec))
        assert r.returncode != 0  # libpython cannot be mapped executable from a noexec mount
    finally:
        subprocess.run(["umount", str(noexec)], check=False)



def test_onefile_under_systemd_notifies_from_a_child_so_install_service_warns(
        onefile, agent_bundles, broker, tmp_path) -> None:
    # Why the one-folder layout is the systemd one: a one-file binary's bootloader stays the main
    # process and runs Python in a child, whose READY=1 a NotifyAccess=main unit ignores.
    exe, _ = onefile
    host = Host(broker.url)
    wd = tmp_path / "wd"
    wd.mkdir()
    with notify_socket(tmp_path / "notify.sock") as sock:
        proc = subprocess.Popen(
            [str(exe), "--state-dir", str(tmp_path / "state"), "--keyring", str(agent_bundles["keyring"]),
             "run", "--broker", broker.url, "--device", "onefile-a", "--fleet", "test"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=wd,
            env=clean_env(wd, NOTIFY_SOCKET=str(tmp_path / "notify.sock")))
        try:
            host.wait_for("onefile-a", "state", lambda m: m["state"] == "online", timeout=60)
            ready = [pid for pid, line in notifications(sock) if line == "READY=1"]
            assert ready and proc.pid not in ready, (proc.pid, ready)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            host.close()
    r = run(exe, "install-service", "--broker", "mqtt://b:1883", "--device", "d1", "--unit-dir",
            str(tmp_path / "units"), "--env-file", str(tmp_path / "agent.env"), cwd=wd)
    assert r.returncode == 0 and "one-file agent binary cannot be a Type=notify" in r.stderr, r.stderr


# The other flavours, on the variants tests/integration/test_all_runtimes.py builds (same options,
# so the packager cache serves both): each binary is ~1 minute to build once per machine.
OTHER_FLAVOURS = {
    "ortgenai": {"format": "onnx", "precision": "int4",
                 "options": {"block_size": 16, "accuracy_level": 4, "algo_config": "k_quant_mixed"}},
    "openvino": {"format": "openvino-ir", "precision": "int8"},
}


@pytest.mark.parametrize("runtime", list(OTHER_FLAVOURS))
def test_other_flavours_install_and_stream_their_runtime(runtime, sample_model, tmp_path) -> None:
    from agent.profiles import DeviceProfile
    from packager.build import build
    from packager.model import resolve_source

    cache = default_cache_dir()
    manifest_path, m = build_agent_binary(runtime, tmp_path / "dist", cache_dir=cache)
    exe = manifest_path.parent / m.entry
    key = SigningKey.generate(f"flavour-{runtime}")
    ring = tmp_path / "keyring.json"
    ring.write_bytes(Keyring([key.public]).to_bytes())
    profile = DeviceProfile.from_dict({
        "name": f"host-{runtime}", "description": "test", "class": "pc",
        "match": {"arch": ["x86_64", "aarch64"]},
        "target": {"runtime": runtime, "device": "cpu", "context": 1024, "threads": 2,
                   **OTHER_FLAVOURS[runtime]},
        "budget": {"max_ppl_increase_pct": 50.0}})
    report = build(resolve_source(str(sample_model.hf_dir), cache_dir=cache), [profile], key,
                   tmp_path / "bundles", cache_dir=cache, bundle_version=1, speed=False)
    state = ["--state-dir", str(tmp_path / "state"), "--keyring", str(ring)]
    r = run(exe, *state, "install", str(report.bundles[0].path), "--json", cwd=tmp_path / "wd")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["installed"]["runtime"] == runtime
    r = run(exe, *state, "infer", PROMPT, "--max-tokens", "16", "--temperature", "0", "--json",
            cwd=tmp_path / "wd")
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert r.returncode == 0 and lines[-1]["done"] and len(lines) > 3, r.stderr
    assert len("".join(x.get("text", "") for x in lines).split()) >= 4
    assert m.flavour == runtime and m.versions[RUNTIMES[runtime].distributions[0]]
