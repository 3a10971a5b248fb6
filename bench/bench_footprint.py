"""Footprint of the agent binaries (one per runtime, PyInstaller) next to the venv agent and the anchors,
and the llama.cpp binary's decode rate next to a -march=native build of the same llama.cpp.

Per flavour (``--flavours``; each binary is built or taken from the packager cache by
``packager.agent_binary.build_agent_binary``, its environment made on first use):

1. size on disk of the one-folder and the one-file binary, and the files that dominate it;
2. start-up: process start -> the retained ``online`` state seen by a host subscriber, on a real
   mosquitto (``fleet.broker.Broker``), median of ``--starts`` cold starts with an empty state;
3. idle RSS and USS with no model loaded (psutil, after one health interval), and what the RSS is
   made of (``/proc/PID/smaps``, by mapped file);
4. RSS with the sample model loaded (its bundle installed, one short inference over MQTT);

each next to the same figures of the agent run from the virtual environment in the same run, and
next to the anchors' published figures (:data:`ANCHORS`, not measured here). Binaries run with an
empty environment (``PATH=/usr/bin:/bin``), as on a device without Python.

5. decode (llamacpp): the binary as shipped (ggml's pick among its CPU variants) against the same
   binary with llama.cpp rebuilt ``-march=native`` (libllama, libggml, libggml-base and one linked-in
   CPU backend, from the same sdist, built once into the cache; AMX off, see
   packager/_pyinstaller/hooks/hook-llama_cpp.py), and the venv's portable baseline for
   reference: ``edgepack-agent infer`` runs, interleaved, greedy, same prompt, threads and tokens.

    .venv/bin/python bench/bench_footprint.py [--flavours llamacpp,ortgenai,openvino] [--starts 5]
        [--reps 5] [--tokens 128] [--smoke]

Writes bench/results/footprint.json and footprint.md (``--smoke``: a temporary folder, llamacpp
only, one start, one short run, and the native comparison only if that build is already cached).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _agentbench import FLEET, HostClient, end
from _decode import PROMPT
from _sample import SampleBundle, sample_bundle, sample_source
from machine import median, parse

ROOT = Path(__file__).resolve().parents[1]
VENV_AGENT = Path(sys.executable).parent / "edgepack-agent"
THREADS = 2
CLEAN_PATH = "/usr/bin:/bin"
MiB = 2**20

# Published figures of the anchors, as the issue quotes them (not measured here).
ANCHORS = [
    {"name": "Mender client (Go)", "binary_mb": "8-10", "ram_mb": None},
    {"name": "aktualizr (C++, Uptane)", "binary_mb": "2-5", "ram_mb": "~20"},
    {"name": "AWS IoT Greengrass Nucleus (Java)", "binary_mb": None, "ram_mb": ">= 96"},
    {"name": "AWS IoT Greengrass Nucleus Lite (C)", "binary_mb": None, "ram_mb": "~5"},
]
TARGETS = {"start_to_online_s_onedir": 0.5, "idle_rss_mib": 35.0, "decode_vs_native": 0.97}

# A host profile per runtime for the loaded-model figure (the variants the test suite caches).
PROFILES: dict[str, dict[str, Any]] = {
    "ortgenai": {"name": "bench-onnx-int4", "description": "bench: ONNX int4 on this host", "class": "pc",
                 "match": {"arch": ["x86_64", "aarch64"]},
                 "target": {"runtime": "ortgenai", "format": "onnx", "precision": "int4", "device": "cpu",
                            "context": 1024, "threads": THREADS, "ram_budget_gb": 4.0,
                            "options": {"accuracy_level": 4, "block_size": 32}},
                 "budget": {"max_ppl_increase_pct": 100.0}},
    "openvino": {"name": "bench-ov-int8", "description": "bench: OpenVINO int8 on this host", "class": "pc",
                 "match": {"arch": ["x86_64", "aarch64"]},
                 "target": {"runtime": "openvino", "format": "openvino-ir", "precision": "int8",
                            "device": "cpu", "context": 1024, "threads": THREADS, "ram_budget_gb": 4.0},
                 "budget": {"max_ppl_increase_pct": 100.0}},
}


# --- processes and the host session --------------------------------------------------------------


def clean_env(home: Path, frozen: bool) -> dict[str, str]:
    """A binary gets what ``env -i`` gives; the venv agent keeps this environment (it needs its venv)."""
    if frozen:
        return {"PATH": CLEAN_PATH, "HOME": str(home), "OMP_NUM_THREADS": str(THREADS)}
    return {**os.environ, "OMP_NUM_THREADS": str(THREADS)}


def wait_online(host: HostClient, device: str, timeout: float = 60) -> float:
    """When ``device``'s retained ``online`` arrived (perf_counter), waiting for it if need be."""
    host.wait(lambda: (device, "online") in host.seen, timeout)
    return host.seen[(device, "online")]


@contextlib.contextmanager
def agent(exe: Path, state: Path, ring: Path, broker_url: str, device: str,
          frozen: bool) -> Iterator[tuple[subprocess.Popen[bytes], float]]:
    """``run`` as its own process; yields it and its start time (perf_counter)."""
    state.parent.mkdir(parents=True, exist_ok=True)
    log = (state.parent / f"{device}.log").open("ab")
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(exe), "--state-dir", str(state), "--keyring", str(ring), "run",
                             "--broker", broker_url, "--device", device, "--fleet", FLEET,
                             "--health-interval", "1", "--threads", str(THREADS)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=state.parent,
                            env=clean_env(state.parent, frozen))
    log.close()
    try:
        yield proc, t0
    finally:
        end(proc)


def memory(pid: int) -> dict[str, float]:
    """RSS and USS (MiB) of the process and, for a one-file binary, of its Python child."""
    import psutil

    p = psutil.Process(pid)
    procs = [p, *p.children(recursive=True)]
    infos = [q.memory_full_info() for q in procs]
    out = {"rss_mib": sum(i.rss for i in infos) / MiB, "uss_mib": sum(i.uss for i in infos) / MiB}
    if len(procs) > 1:  # one-file: the bootloader waits while its child runs the agent
        out["python_rss_mib"] = infos[-1].rss / MiB
        out["bootloader_rss_mib"] = infos[0].rss / MiB
    return out


def rss_by_file(pid: int, top: int = 8) -> list[tuple[str, float]]:
    """Resident memory of the process by mapped file (MiB), anonymous memory as ``[anon]``."""
    import psutil

    pids = [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    by: dict[str, float] = {}
    for one in pids[-1:]:  # the process that runs Python
        name = "[anon]"
        for line in Path(f"/proc/{one}/smaps").read_text().splitlines():
            head = line.split()
            if head and re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", head[0]):
                path = head[5] if len(head) > 5 else ""
                name = Path(path).name if path.startswith("/") else "[anon]"
            elif head and head[0] == "Rss:":
                by[name] = by.get(name, 0.0) + int(head[1]) / 1024
    return sorted(by.items(), key=lambda kv: -kv[1])[:top]


# --- the figures ----------------------------------------------------------------------------------


def starts_and_idle(exe: Path, frozen: bool, ring: Path, broker: Any, host: HostClient, work: Path,
                    label: str, starts: int) -> dict[str, Any]:
    """Cold starts with an empty state: start -> online, then idle memory after a health interval."""
    rows = []
    for i in range(starts + 1):  # the first one warms the page cache and is not counted
        dev = f"{label}-{i}-{secrets.token_hex(2)}"
        with agent(exe, work / dev / "state", ring, broker.url, dev, frozen) as (proc, t0):
            online = wait_online(host, dev) - t0
            time.sleep(1.5)  # one health interval: the steady idle state
            row = {"start_to_online_s": online, **memory(proc.pid)}
            if i == starts:
                row["rss_by_file_mib"] = rss_by_file(proc.pid)
        if i:
            rows.append(row)
        print(f"  {label}: online after {online * 1000:.0f} ms, RSS {row['rss_mib']:.1f} MiB", flush=True)
    return {"runs": rows, "start_to_online_s": median([r["start_to_online_s"] for r in rows]),
            "idle_rss_mib": median([r["rss_mib"] for r in rows]),
            "idle_uss_mib": median([r["uss_mib"] for r in rows]),
            "rss_by_file_mib": rows[-1]["rss_by_file_mib"],
            **({"python_rss_mib": median([r["python_rss_mib"] for r in rows])} if "python_rss_mib" in rows[0] else {})}


def loaded(exe: Path, frozen: bool, bundle: SampleBundle, broker: Any, host: HostClient, work: Path,
           label: str) -> dict[str, Any]:
    """RSS with the bundle installed and loaded (one 4-token inference over MQTT)."""
    from agent.protocol import InferRequest

    state = work / f"{label}-loaded" / "state"
    state.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([str(exe), "--state-dir", str(state), "--keyring", str(bundle.keyring), "install",
                        str(bundle.path), "--no-gate"], capture_output=True, text=True, timeout=600,
                       env=clean_env(state.parent, frozen), cwd=state.parent, check=False)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    dev = f"{label}-loaded"
    with agent(exe, state, bundle.keyring, broker.url, dev, frozen) as (proc, _):
        wait_online(host, dev)
        chunks = list(host.requests.stream(dev, InferRequest(prompt="Hello", max_tokens=4, temperature=0.0),
                                           timeout=300))
        time.sleep(1.5)
        out = {**memory(proc.pid), "rss_by_file_mib": rss_by_file(proc.pid), "answered": bool(chunks)}
    print(f"  {label}: RSS with the model {out['rss_mib']:.1f} MiB", flush=True)
    return out


def size_of(manifest: Any) -> dict[str, Any]:
    libs = sorted(((f.path, f.size) for f in manifest.files if f.link is None), key=lambda x: -x[1])
    return {"bytes": manifest.size_bytes, "mib": manifest.size_bytes / MiB, "files": len(manifest.files),
            "biggest_mib": [(p, s / MiB) for p, s in libs[:8]],
            "build_seconds": manifest.built.get("seconds")}


def venv_size() -> dict[str, Any]:
    """What the venv agent stands on, for scale: the interpreter's stdlib + site-packages it imports."""
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    total = sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
    return {"site_packages_mib": total / MiB, "note": "the whole dev venv (all runtimes, torch): not a device install"}


# --- decode against -march=native ------------------------------------------------------------------


NATIVE_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"  # AMX crashes here: see the hook
NATIVE_LIBS = ("libllama.so", "libggml.so.0", "libggml-base.so.0", "libggml-cpu.so.0")


def native_dir(cache: Path, version: str) -> Path:
    return cache / "native" / f"llama.cpp-{version}-march-native"


def ensure_native(cache: Path, version: str) -> Path:
    """llama.cpp of llama-cpp-python ``version``'s sdist built with ``-march=native`` (once)."""
    from packager.cache import atomic_dir

    dst = native_dir(cache, version)
    if (dst / "build.json").is_file():
        return dst
    t0 = time.monotonic()
    print(f"building llama.cpp {version} -march=native into {dst} (once, ~10 minutes)", flush=True)
    with tempfile.TemporaryDirectory(prefix="edgepack-native-") as tmp, atomic_dir(dst) as out:
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps",
                        "--no-binary", ":all:", "-d", tmp, "-q"], check=True)
        sdist = next(Path(tmp).glob("*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = next(Path(tmp).glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"
        build = Path(tmp) / "build"
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                        # one CPU backend linked in: ggml refuses GGML_NATIVE with GGML_BACKEND_DL
                        "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=ON", "-DGGML_BACKEND_DL=OFF",
                        "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON", "-DCMAKE_INSTALL_RPATH=$ORIGIN",
                        "-DGGML_BLAS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                        "-DLLAMA_BUILD_COMMON=OFF", f"-DCMAKE_C_FLAGS={NATIVE_FLAGS}",
                        f"-DCMAKE_CXX_FLAGS={NATIVE_FLAGS}"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(build), "--target", "llama", "ggml-cpu", "-j",
                        str(os.cpu_count() or 2)], check=True, stdout=subprocess.DEVNULL)
        for name in NATIVE_LIBS:
            found = next(build.rglob(name))
            shutil.copyfile(found.resolve(), out / name)
        (out / "build.json").write_text(json.dumps({"version": version, "flags": f"-march=native {NATIVE_FLAGS}",
                                                    "seconds": round(time.monotonic() - t0)}))
    return dst


def native_copy(binary_dir: Path, native: Path, work: Path) -> Path:
    """The binary folder with its llama.cpp libraries replaced by the native ones (hard links
    elsewhere; replaced files are new files, so the cache's copy is untouched)."""
    dst = work / "native-binary"
    shutil.copytree(binary_dir, dst, symlinks=True, copy_function=os.link)
    lib = next(dst.rglob("libllama.so")).parent
    for variant in lib.glob("libggml-cpu-*.so"):
        variant.unlink()
    for name in NATIVE_LIBS:
        with contextlib.suppress(FileNotFoundError):
            (lib / name).unlink()
        shutil.copyfile(native / name, lib / name)
    # PyInstaller links llama.cpp's libraries from _internal/ too, and the loader resolves
    # $ORIGIN through that link: the linked-in CPU backend must be found there as well.
    top = next(dst.glob("_internal"))
    link = top / "libggml-cpu.so.0"
    if not link.exists():
        link.symlink_to(lib.relative_to(top) / "libggml-cpu.so.0")
    return dst / "edgepack-agent"


def infer_run(exe: Path, state: Path, frozen: bool, tokens: int) -> dict[str, Any]:
    r = subprocess.run([str(exe), "--state-dir", str(state), "infer", PROMPT, "--max-tokens", str(tokens),
                        "--temperature", "0", "--threads", str(THREADS), "--json"], capture_output=True,
                       text=True, timeout=600, env=clean_env(state.parent, frozen), cwd=state.parent,
                       check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{exe} infer failed (exit {r.returncode}): {r.stderr[-2000:]}")
    usage = json.loads(r.stdout.splitlines()[-1])["usage"]
    variant = re.findall(r"libggml-cpu-([\w.]+)\.so", r.stderr)
    return {"decode_tok_s": usage["decode_tok_s"], "ttft_ms": usage["ttft_ms"],
            "tokens": usage["completion_tokens"], "variant": variant[0] if variant else None}


def decode(sides: dict[str, tuple[Path, bool]], bundle: SampleBundle, work: Path, reps: int,
           tokens: int) -> dict[str, Any]:
    """Interleaved ``infer`` runs of each side on one installed state (rotating who goes first)."""
    state = work / "decode" / "state"
    state.parent.mkdir(parents=True, exist_ok=True)
    exe0, frozen0 = next(iter(sides.values()))
    subprocess.run([str(exe0), "--state-dir", str(state), "--keyring", str(bundle.keyring), "install",
                    str(bundle.path), "--no-gate"], check=True, capture_output=True, timeout=600,
                   env=clean_env(state.parent, frozen0), cwd=state.parent)
    names = list(sides)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for n in names:  # warm-up, not counted
        infer_run(sides[n][0], state, sides[n][1], 16)
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for n in order:
            runs[n].append(infer_run(sides[n][0], state, sides[n][1], tokens))
        print("  decode rep", rep + 1, {n: round(runs[n][-1]["decode_tok_s"], 1) for n in names}, flush=True)
    out = {n: {"runs": runs[n], "decode_tok_s": median([r["decode_tok_s"] for r in runs[n]]),
               "ttft_ms": median([r["ttft_ms"] for r in runs[n]]), "variant": runs[n][0]["variant"]}
           for n in names}
    return out


# --- main --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--flavours", default="llamacpp,ortgenai,openvino")
    ap.add_argument("--starts", type=int, default=5, help="cold starts per side")
    ap.add_argument("--reps", type=int, default=5, help="decode runs per side, interleaved")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per decode run")
    ap.add_argument("--native", choices=("build", "cached", "off"), default="build",
                    help="the -march=native comparison: build it once (default), only if cached, or skip")
    args, results = parse(ap, argv, smoke={"flavours": "llamacpp", "starts": 1, "reps": 1, "tokens": 8,
                                           "native": "cached"})

    from fleet.broker import Broker
    from packager.agent_binary import all_variants_wheel, build_agent_binary
    from packager.cache import default_cache_dir

    cache = default_cache_dir()
    flavours = [f for f in args.flavours.split(",") if f]
    # As the tests: every CPU variant when that wheel was built here, else the portable baseline.
    llama_cpu = "all-variants" if all_variants_wheel(cache) else "baseline"
    work = Path(tempfile.mkdtemp(prefix="edgepack-bench-footprint-"))
    broker = host = None
    result: dict[str, Any] = {"flavours": {}, "anchors": ANCHORS, "targets": TARGETS, "llama_cpu": llama_cpu,
                              "threads": THREADS}
    try:
        bundles: dict[str, SampleBundle | str] = {"llamacpp": sample_bundle(work / "bundle-llamacpp")}
        broker = Broker(work / "broker").start()
        host = HostClient(broker.url)
        ring = bundles["llamacpp"].keyring  # type: ignore[union-attr]
        print("venv agent", flush=True)
        result["venv"] = {"idle": starts_and_idle(VENV_AGENT, False, ring, broker, host, work, "venv", args.starts),
                          "size": venv_size()}
        for flavour in flavours:
            print(f"flavour {flavour}: building (or reusing) its binaries", flush=True)
            onedir_m, onedir = build_agent_binary(flavour, work / "dist", cache_dir=cache, llama_cpu=llama_cpu)
            onefile_m, onefile = build_agent_binary(flavour, work / "dist", onefile=True, cache_dir=cache,
                                                    llama_cpu=llama_cpu)
            exe_dir, exe_file = onedir_m.parent / onedir.entry, onefile_m.parent / onefile.entry
            row: dict[str, Any] = {"size": {"onedir": size_of(onedir), "onefile": size_of(onefile)},
                                   "versions": onedir.versions, "options": onedir.options}
            row["onedir"] = starts_and_idle(exe_dir, True, ring, broker, host, work, f"{flavour}-dir", args.starts)
            row["onefile"] = starts_and_idle(exe_file, True, ring, broker, host, work, f"{flavour}-file",
                                             args.starts)
            if flavour not in bundles:
                bundles[flavour] = flavour_bundle(flavour, work)
            b = bundles[flavour]
            if isinstance(b, str):
                row["loaded"] = row["venv_loaded"] = {"error": b}
            else:
                row["loaded"] = loaded(exe_dir, True, b, broker, host, work, f"{flavour}-dir")
                row["venv_loaded"] = loaded(VENV_AGENT, False, b, broker, host, work, f"venv-{flavour}")
            if flavour == "llamacpp":
                row["decode"] = decode_vs_native(exe_dir, bundles["llamacpp"], work, args, cache,  # type: ignore[arg-type]
                                                 onedir.versions["llama-cpp-python"])
            result["flavours"][flavour] = row
    finally:
        if host:
            host.close()
        if broker:
            broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    result["checks"] = checks(result)
    results.write("footprint", result, markdown(result))
    return 0


def flavour_bundle(flavour: str, work: Path) -> SampleBundle | str:
    """The sample's bundle for ``flavour`` (:data:`PROFILES`), or why there is none."""
    from agent.errors import EdgepackError
    from agent.profiles import DeviceProfile
    from packager.build import build
    from packager.keys import generate_key_files

    try:
        model, cache = sample_source("hf")
        keys = generate_key_files("bench", work / f"keys-{flavour}")
        report = build(model, [DeviceProfile.from_dict(PROFILES[flavour])], keys.key, work / f"bundle-{flavour}",
                       cache_dir=cache, bundle_version=1, speed=False)
    except EdgepackError as e:
        return f"no {flavour} bundle: {e}"
    if not report.bundles:
        return f"no {flavour} bundle: {report.refused or report.over_budget}"
    return SampleBundle(report.bundles[0].path, keys.keyring)


def decode_vs_native(exe: Path, bundle: SampleBundle, work: Path, args: argparse.Namespace, cache: Path,
                     version: str) -> dict[str, Any]:
    native = native_dir(cache, version)
    if args.native == "build":
        native = ensure_native(cache, version)
    sides: dict[str, tuple[Path, bool]] = {"binary": (exe, True)}
    note = None
    if (native / "build.json").is_file() and args.native != "off":
        sides["native"] = (native_copy(exe.parent, native, work), True)
    else:
        note = "native build not cached: run the full benchmark once"
    sides["venv"] = (VENV_AGENT, False)
    out = decode(sides, bundle, work, args.reps, args.tokens)
    if "native" in out:
        out["native"]["variant"] = "-march=native"
        out["ratio_binary_vs_native"] = out["binary"]["decode_tok_s"] / out["native"]["decode_tok_s"]
        out["native_build"] = json.loads((native / "build.json").read_text())
    out["ratio_binary_vs_venv"] = out["binary"]["decode_tok_s"] / out["venv"]["decode_tok_s"]
    if note:
        out["note"] = note
    return out


def checks(r: dict[str, Any]) -> dict[str, bool]:
    out = {}
    for name, row in r["flavours"].items():
        out[f"{name}_onedir_start_le_0.5s"] = row["onedir"]["start_to_online_s"] <= TARGETS["start_to_online_s_onedir"]
        out[f"{name}_idle_rss_le_35MiB"] = row["onedir"]["idle_rss_mib"] <= TARGETS["idle_rss_mib"]
        ratio = row.get("decode", {}).get("ratio_binary_vs_native")
        if ratio is not None:
            out[f"{name}_decode_vs_native_ge_0.97"] = ratio >= TARGETS["decode_vs_native"]
    return out


def _f(x: Any, fmt: str = ".1f") -> str:
    return "—" if x is None else format(x, fmt)


def markdown(r: dict[str, Any]) -> str:
    v = r["venv"]["idle"]
    lines = ["# Agent binary footprint (PyInstaller, one per runtime) vs the venv agent and the anchors", "",
             f"Binaries run with an empty environment (`PATH={CLEAN_PATH}`); llama.cpp CPU build: "
             f"`{r['llama_cpu']}`; threads {r['threads']}. Start-up = process start -> retained `online` "
             "seen by a host subscriber (real mosquitto, empty state), median of cold starts; RSS/USS after one "
             "health interval. Generated by `bench/bench_footprint.py`.", "",
             "| agent | size on disk | start -> online | idle RSS | idle USS | RSS, sample loaded |",
             "|---|---|---|---|---|---|",
             f"| venv (`.venv/bin/edgepack-agent`) | (dev venv: {r['venv']['size']['site_packages_mib']:.0f} MiB) "
             f"| {v['start_to_online_s']:.3f} s | {v['idle_rss_mib']:.1f} MiB | {v['idle_uss_mib']:.1f} MiB | |"]
    for name, row in r["flavours"].items():
        for layout in ("onedir", "onefile"):
            x, s = row[layout], row["size"][layout]
            ld = row["loaded"] if layout == "onedir" else {}
            lines.append(f"| {name} binary, {layout} | {s['mib']:.1f} MiB ({s['files']} files) | "
                         f"{x['start_to_online_s']:.3f} s | {x['idle_rss_mib']:.1f} MiB | {x['idle_uss_mib']:.1f} MiB | "
                         f"{_f(ld.get('rss_mib'))}{' MiB' if ld.get('rss_mib') else ld.get('error', '')} |")
        vl = row["venv_loaded"]
        lines.append(f"| venv, {name} model loaded | | | | | {_f(vl.get('rss_mib'))}"
                     f"{' MiB' if vl.get('rss_mib') else vl.get('error', '')} |")
    lines += ["", "Anchors (published figures as quoted in the issue, not measured here):", "",
              "| anchor | binary | RAM |", "|---|---|---|"]
    lines += [f"| {a['name']} | {a['binary_mb'] or '—'} MB | {a['ram_mb'] or '—'} MB |" for a in r["anchors"]]
    for name, row in r["flavours"].items():
        lines += ["", f"## {name}: what dominates", "",
                  "Size (one folder): " + ", ".join(f"`{Path(p).name}` {m:.1f}" for p, m in row["size"]["onedir"]["biggest_mib"])
                  + " MiB.", "",
                  "Idle RSS by mapping: " + ", ".join(f"`{n}` {m:.1f}" for n, m in row["onedir"]["rss_by_file_mib"])
                  + " MiB."]
        d = row.get("decode")
        if d:
            lines += ["", "Decode (greedy, same bundle, prompt, threads; medians of interleaved `infer` runs):", "",
                      "| side | CPU backend | decode tok/s | TTFT ms |", "|---|---|---|---|"]
            for side in ("binary", "native", "venv"):
                if side in d:
                    lines.append(f"| {side} | {d[side]['variant'] or 'built-in'} | {d[side]['decode_tok_s']:.1f} | "
                                 f"{d[side]['ttft_ms']:.0f} |")
            if "ratio_binary_vs_native" in d:
                lines.append(f"\nbinary ÷ -march=native: **{d['ratio_binary_vs_native']:.3f}** (target >= 0.97); "
                             f"binary ÷ venv baseline: {d['ratio_binary_vs_venv']:.3f}.")
            elif d.get("note"):
                lines.append(f"\n{d['note']}")
    lines += ["", "Checks: " + ", ".join(f"{k} {'yes' if ok else 'NO'}" for k, ok in r["checks"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
