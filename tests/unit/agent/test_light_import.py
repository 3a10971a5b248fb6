"""The agent stays light: it imports and runs its CLI without the packager, the fleet or any
host-only dependency, and ``probe`` does not even import the MQTT stack or the daemon."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

# Block every host-only dependency (and the packager itself) before anything is imported.
BLOCKER = """
import importlib.abc, sys
HEAVY = {"torch", "transformers", "accelerate", "numpy", "gguf", "safetensors", "sentencepiece",
         "huggingface_hub", "packager", "fleet", "edgepack", "llama_cpp", "onnxruntime_genai",
         "openvino", "openvino_genai"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ImportError(f"blocked heavy import: {name}")
        return None
sys.meta_path.insert(0, Block())
"""


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCKER + code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_agent_modules_import_without_packager_dependencies():
    r = run("import agent, agent.bundle, agent.store, agent.profiles, agent.probe, agent.runtimes, "
            "agent.cli, agent.daemon, agent.installer, agent.serving, agent.dispatch; print('ok')")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_agent_cli_probe_runs_without_packager_dependencies(tmp_path):
    r = run(f"from agent.cli import main; raise SystemExit(main(['--state-dir', {str(tmp_path)!r}, "
            "'probe', '--json']))")
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    assert facts["profile"] == "x86-64-cpu" or facts["arch"] != "x86_64"


def test_agent_cli_probe_imports_neither_paho_nor_the_daemon(tmp_path):
    r = run("import contextlib, io, sys\n"
            "from agent.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    main(['--state-dir', {str(tmp_path)!r}, 'probe', '--json'])\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'paho' or m in "
            "('agent.daemon', 'agent.store', 'agent.gate', 'agent.transport.mqtt')))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    # Positive control: run does import them.
    r = run("import sys, agent.daemon; print('paho' in sys.modules)")
    assert r.stdout.strip() == "True", r.stderr


def test_the_idle_daemon_does_not_load_cryptography_until_it_checks_a_signature(tmp_path):
    # Its Rust extension is ~6.6 MiB of idle RSS (bench/results/footprint.md); the daemon with an
    # empty store and a keyring file has nothing to verify yet.
    from agent.bundle import Keyring, SigningKey

    ring = tmp_path / "ring.json"
    ring.write_bytes(Keyring([SigningKey.generate("t").public]).to_bytes())
    r = run("import sys\n"
            "from pathlib import Path\n"
            "import agent.daemon, agent.cli\n"
            "from agent.bundle import load_keyring\n"
            "from agent.store import Store\n"
            f"s = Store(Path({str(tmp_path / 'state')!r}), load_keyring([Path({str(ring)!r})]))\n"
            "print(s.serving(), 'cryptography' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("False"), r.stdout
    # Positive control: checking a signature loads it.
    r = run("import sys\n"
            "from agent.bundle.keys import PublicKey\n"
            "PublicKey(bytes(32)).verify(bytes(64), b'x')\n"
            "print('cryptography' in sys.modules)")
    assert r.stdout.strip() == "True", r.stderr
