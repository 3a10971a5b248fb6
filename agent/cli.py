"""``edgepack-agent``: the device CLI (probe, install, rollback, list, remove, status, infer,
keyring, run).

Human status goes to stderr, machine output (``--json``) to stdout. Every flag has an environment
default (EDGEPACK_*) so a systemd unit can configure the agent with an env file. Only
:class:`~agent.errors.EdgepackError` is caught: it is printed with its hint and the exit code is 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent._cli import dispatch, dump, env, err, setup_logging
from agent.errors import EdgepackError, KeyringError, StoreError
from agent.protocol import default_device_id
from agent.sampling import DEFAULTS

if TYPE_CHECKING:
    from agent.gate import GateConfig
    from agent.http_api import HttpConfig
    from agent.store import Store

log = logging.getLogger("agent")


def default_state_dir() -> Path:
    """systemd's $STATE_DIRECTORY, /var/lib/edgepack-agent for root, else the XDG state folder."""
    if os.environ.get("STATE_DIRECTORY"):  # set by StateDirectory= (DynamicUser is not root)
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/edgepack-agent")
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "edgepack-agent"


def _keyring_paths(args: argparse.Namespace) -> list[Path]:
    if args.keyring:
        return [Path(p) for p in args.keyring]
    default = Path(args.state_dir) / "keyring.json"
    return [default] if default.exists() else []


def _has_signed_keyring(args: argparse.Namespace) -> bool:
    from agent.trust_store import TRUST_FILE

    return (Path(args.state_dir) / TRUST_FILE).exists()


def open_store(args: argparse.Namespace, *, need_keys: bool = False) -> Store:
    from agent.store import Store
    from agent.trust_store import TrustStore

    paths = _keyring_paths(args)
    if need_keys and not paths and not _has_signed_keyring(args):
        raise KeyringError(
            "no trusted keyring: nothing can be installed",
            hint=f"Pass --keyring FILE or put one at {Path(args.state_dir) / 'keyring.json'}.",
        )
    # The root-signed keyring, once installed, is the only source of release keys.
    store = Store(Path(args.state_dir), TrustStore(Path(args.state_dir), paths).release_keyring())
    if store.recovered:
        err(f"recovered: {store.recovered}")
    return store


# --- probe -------------------------------------------------------------------------------------


def cmd_probe(args: argparse.Namespace) -> int:
    from agent.probe import probe
    from agent.profiles import load_profiles, match_profile

    facts = probe(runtimes=args.runtimes, disk_path=Path(args.state_dir).parent
                  if not Path(args.state_dir).exists() else Path(args.state_dir))
    result = match_profile(facts, load_profiles())
    facts["profile"] = result.best
    facts["profile_match"] = result.to_dict()
    if args.json:
        dump(facts)
        return 0
    gib = 2**30
    ram = facts.get("ram_bytes")
    print(f"os/arch:     {facts.get('os')} / {facts.get('arch')}")
    print(f"cpu:         {facts.get('cpu_model')} ({facts.get('cores_physical')} cores, "
          f"{facts.get('cores_logical')} threads)")
    print(f"ram:         {ram / gib:.1f} GiB" if ram else "ram:         unknown")
    accel = ", ".join(f"{a['kind']} ({a['name']})" for a in facts.get("accelerators") or []) or "none"
    print(f"accelerators: {accel}")
    for name, rt in (facts.get("runtimes") or {}).items():
        state = f"installed {rt.get('version')}" if rt.get("installed") else "not installed"
        print(f"runtime {name:9s} {state}")
    print(f"profile:     {result.best or 'none matched'}")
    for line in result.explain():
        print(f"  {line}")
    return 0


# --- store ---------------------------------------------------------------------------------------


def gate_config(args: argparse.Namespace) -> GateConfig:
    """The gate configuration from ``--gate-tokens``, ``--no-gate`` and ``--slo`` flags.

    Raises:
        EdgepackError: a malformed ``--slo`` or an out-of-range ``--gate-tokens``.
    """
    from agent.gate import GateConfig, parse_slo_overrides

    return GateConfig(max_tokens=args.gate_tokens, enabled=not args.no_gate,
                      slo_overrides=parse_slo_overrides(args.slo or ()))


def cmd_install(args: argparse.Namespace) -> int:
    from agent.resident import ResidentModel
    from agent.store import InstalledBundle

    gate = gate_config(args)  # before touching the store: a typo in --slo changes nothing
    store = open_store(args, need_keys=True)
    total = 0
    last = [0.0]

    def progress(n: int) -> None:
        nonlocal total
        total += n
        now = time.monotonic()
        if not args.json and now - last[0] > 0.5:
            last[0] = now
            print(f"\r  staged {total / 2**20:8.1f} MiB", end="", file=sys.stderr, flush=True)

    def event(name: str, data: dict[str, Any]) -> None:
        if not args.json:
            if total:
                print(file=sys.stderr)
            err(f"{name}: " + ", ".join(f"{k}={v}" for k, v in data.items() if v is not None))

    def check(bundle: InstalledBundle) -> dict[str, Any]:
        with ResidentModel() as model:  # loaded for the gate only; this process then exits
            return model.load_and_gate(bundle, gate)

    res = store.install(Path(args.bundle), load_check=None if args.no_load_check else check,
                        on_event=event, progress=progress)
    out = {"installed": res.bundle.summary(),
           "previous": res.previous.summary() if res.previous else None,
           "already_installed": res.already_installed, "check": res.check}
    if args.json:
        dump(out)
    else:
        b = res.bundle.manifest
        note = " (already current)" if res.already_installed else ""
        err(f"current: {b.model_name} v{b.version} "
             f"{b.target.runtime}/{b.target.quant or b.target.precision} [{res.bundle.slot}]{note}")
        c = res.check or {}
        if "decode_tok_s" in c:
            err(f"gate: TTFT {c['ttft_ms']} ms, decode {c['decode_tok_s']} tok/s over "
                 f"{c.get('decode_tokens', '?')} tokens, peak RSS {c['peak_rss_mb']} MiB "
                 f"(SLO: {c.get('thresholds') or 'none set'})")
            fid = c.get("fidelity") or {}
            err(f"fidelity: top-1 agreement {fid['agreement']} over {fid['positions']} positions "
                f"(threshold {fid['threshold']})" if fid.get("checked")
                else f"fidelity: not checked ({fid.get('reason', 'no report')})")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    store = open_store(args)
    b = store.rollback()
    if args.json:
        dump(b.summary())
    else:
        err(f"rolled back: current is {b.manifest.model_name} v{b.manifest.version} [{b.slot}]")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    store = open_store(args)
    items = [{**b.summary(), "role": role} for b, role in store.list()]
    if args.json:
        dump(items)
        return 0
    if not items:
        err("no bundles installed")
    for i in items:
        print(f"{i['role'] or '-':9s} {i['slot']}  {i['model']} v{i['version']}  {i['profile']}  "
              f"{i['runtime']}/{i['quant'] or i['precision']}  {i['size_bytes'] / 2**20:.0f} MiB")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    open_store(args).remove(args.slot)
    err(f"removed {args.slot}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    store = open_store(args)
    cur, prev = store.current(), store.previous()
    out: dict[str, Any] = {
        "agent_version": __version__, "state_dir": str(store.state_dir),
        "current": cur.summary() if cur else None, "previous": prev.summary() if prev else None,
        "trusted_keys": [k.key_id for k in store.keyring.public_keys()],
        "recovered": store.recovered}
    from agent.trust_store import TrustStore

    trusted = TrustStore(store.state_dir).load()
    out["keyring"] = trusted.summary() if trusted else None
    out["current_signer_revoked"] = bool(cur and trusted and cur.manifest.signer_key_id in trusted.revoked)
    if args.json:
        dump(out)
    else:
        for k in ("current", "previous"):
            b = out[k]
            desc = (f"{b['model']} v{b['version']} {b['runtime']}/{b['quant'] or b['precision']} "
                    f"[{b['slot']}]") if b else "none"
            print(f"{k:9s} {desc}")
        print(f"keys      {len(out['trusted_keys'])} trusted")
    return 0


# --- infer ---------------------------------------------------------------------------------------


def cmd_infer(args: argparse.Namespace) -> int:
    from agent.runtimes import GenerationParams, runtime_for

    store = open_store(args)
    bundle = store.current()
    if bundle is None:
        raise StoreError("no bundle is installed", hint="edgepack-agent install BUNDLE first.")
    params = GenerationParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, repeat_penalty=args.repeat_penalty, stop=tuple(args.stop or ()),
        seed=args.seed,
    )
    rt, opts = runtime_for(bundle.manifest, threads=args.threads)
    chat = args.chat
    with rt:
        rt.load(bundle.entrypoint, opts)
        usage = None
        for chunk in rt.stream(args.prompt, params, chat=chat):
            if chunk.text:
                if args.json:
                    print(json.dumps({"text": chunk.text}), flush=True)
                else:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
            if chunk.done:
                usage = chunk.usage
    if args.json:
        print(json.dumps({"done": True, "usage": usage.__dict__ if usage else None}), flush=True)
    else:
        print()
        if usage:
            err(f"[{usage.completion_tokens} tokens, TTFT {usage.ttft_ms:.0f} ms, "
                 f"{usage.decode_tok_s:.1f} tok/s, {usage.finish_reason}]")
    return 0


# --- service -------------------------------------------------------------------------------------


def cmd_keyring(args: argparse.Namespace) -> int:
    """``keyring update FILE`` (verified against the installed keyring) and ``keyring show``."""
    from agent.trust_store import TrustStore

    trust = TrustStore(Path(args.state_dir))
    if args.sub == "update":
        try:
            data = Path(args.file).read_bytes()
        except OSError as e:
            raise KeyringError(f"cannot read {args.file}: {e}") from e
        trusted, changed = trust.update(data, trust_on_first_use=args.init)
        err(f"keyring v{trusted.version} " + ("installed" if changed else "already installed"))
        out: dict[str, Any] | None = {**trusted.summary(), "changed": changed}
    else:
        t = trust.load()
        out = t.summary() if t else None
    if args.json:
        dump(out)
    elif out is None:
        print("no root-signed keyring (release keys come from --keyring files)")
    else:
        print(f"version   {out['version']}\nroot      {', '.join(k[:16] for k in out['root_keys'])} "
              f"(threshold {out['threshold']})")
        for k in out["release_keys"]:
            print(f"release   {k['key_id'][:16]} {k['name']}")
        for r in out["revoked"]:
            print(f"revoked   {r[:16]}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import signal

    from agent.daemon import Agent, AgentConfig

    _apply_config(args)
    paths = _keyring_paths(args)
    if not paths and not _has_signed_keyring(args):
        raise KeyringError("no trusted keyring: the agent could never install anything",
                           hint="Pass --keyring FILE or put one at STATE_DIR/keyring.json.")
    cfg = AgentConfig(
        state_dir=Path(args.state_dir), keyring=paths, broker_url=args.broker,
        device_id=args.device, fleet=args.fleet, username=args.username, password=args.password,
        ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file,
        health_interval=args.health_interval, infer_queue=args.queue, threads=args.threads,
        chunk_interval=args.chunk_interval, gate=gate_config(args), http=_http_config(args),
    )
    agent = Agent(cfg)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.request_stop())
    err(f"edgepack-agent {__version__}: device {cfg.device_id} in fleet {cfg.fleet}, "
         f"broker {cfg.broker_url}, state {cfg.state_dir}")
    agent.run()
    return 0


def _http_config(args: argparse.Namespace) -> HttpConfig | None:
    """The HTTP door's configuration from ``--http`` and ``--http-key-file`` (None: no door).

    Raises:
        EdgepackError: a malformed address, or a key file that cannot be read.
    """
    if not args.http:
        if args.http_key_file:
            raise EdgepackError("--http-key-file needs --http HOST:PORT")
        return None
    from agent.http_api import HttpConfig, parse_listen, read_key_file

    host, port = parse_listen(args.http)
    key = read_key_file(Path(args.http_key_file)) if args.http_key_file else None
    return HttpConfig(host=host, port=port, api_key=key)


def cmd_install_service(args: argparse.Namespace) -> int:
    import shutil
    import subprocess

    from agent.service import install_service

    _apply_config(args)
    # A frozen agent binary installs itself, never whatever edgepack-agent is first on PATH.
    frozen = sys.executable if getattr(sys, "frozen", False) else None
    exe = args.exec_path or frozen or shutil.which("edgepack-agent") or sys.argv[0]
    env = {"EDGEPACK_BROKER": args.broker, "EDGEPACK_FLEET": args.fleet,
           "EDGEPACK_DEVICE": args.device, "EDGEPACK_STATE_DIR": "/var/lib/edgepack-agent",
           "EDGEPACK_KEYRING": args.service_keyring}
    for k, v in (("EDGEPACK_MQTT_USERNAME", args.username), ("EDGEPACK_MQTT_PASSWORD", args.password),
                 ("EDGEPACK_MQTT_CA", args.ca_file)):
        if v:
            env[k] = v
    unit, env_file = install_service(str(Path(exe).resolve()), env, unit_dir=Path(args.unit_dir),
                                     env_path=Path(args.env_file))
    err(f"wrote {unit} and {env_file}")
    if frozen and exe == frozen and Path(getattr(sys, "_MEIPASS", exe)).parent != Path(exe).parent:
        # One-file: the bootloader stays the main process and Python runs in its child, so
        # systemd (NotifyAccess=main) ignores the child's READY=1 and the start times out.
        err("warning: a one-file agent binary cannot be a Type=notify service's main process; "
            "install the one-folder build (edgepack agent-binary without --onefile) under systemd")
    if args.enable:
        for cmd in (["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", unit.name]):
            subprocess.run(cmd, check=False)
    else:
        err(f"next: systemctl daemon-reload && systemctl enable --now {unit.name}")
    return 0


# --- parser ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgepack-agent", description="edgepack device agent")
    p.add_argument("--version", action="version", version=f"edgepack-agent {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    p.add_argument("--state-dir", default=env("STATE_DIR", str(default_state_dir())),
                   help="agent state folder [EDGEPACK_STATE_DIR]")
    p.add_argument("--keyring", action="append",
                   default=[k for k in (env("KEYRING") or "").split(":") if k] or None,
                   help="trusted keyring file, repeatable [EDGEPACK_KEYRING, ':'-separated; "
                        "default STATE_DIR/keyring.json]")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("probe", help="report hardware facts and the matched profile")
    s.add_argument("--json", action="store_true")
    s.add_argument("--runtimes", action="store_true", help="also import runtimes to list their devices")
    s.set_defaults(func=cmd_probe)

    s = sub.add_parser("install", help="verify and install a bundle file")
    s.add_argument("bundle")
    s.add_argument("--no-load-check", action="store_true",
                   help="switch without loading the model first (not recommended)")
    _add_gate_flags(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_install)

    s = sub.add_parser("rollback", help="make the previous bundle current again")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_rollback)

    s = sub.add_parser("list", help="list installed bundles")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("remove", help="delete an installed bundle that is not current")
    s.add_argument("slot", help="slot id (a unique prefix is enough)")
    s.set_defaults(func=cmd_remove)

    s = sub.add_parser("status", help="current and previous bundle, trusted keys")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("infer", help="stream a completion from the installed model")
    s.add_argument("prompt")
    s.add_argument("--chat", action="store_true", help="use the model's chat template")
    s.add_argument("--max-tokens", type=int, default=DEFAULTS.max_tokens)
    s.add_argument("--temperature", type=float, default=DEFAULTS.temperature)
    s.add_argument("--top-p", type=float, default=DEFAULTS.top_p)
    s.add_argument("--top-k", type=int, default=DEFAULTS.top_k)
    s.add_argument("--repeat-penalty", type=float, default=DEFAULTS.repeat_penalty,
                   help=f"base models need one to stay coherent (default {DEFAULTS.repeat_penalty})")
    s.add_argument("--stop", action="append", help="stop string, repeatable")
    s.add_argument("--seed", type=int)
    s.add_argument("--threads", type=int, help="override the profile's thread count")
    s.add_argument("--json", action="store_true", help="one JSON object per chunk on stdout")
    s.set_defaults(func=cmd_infer)

    kr = sub.add_parser("keyring", help="the root-signed keyring: which release keys are trusted")
    krs = kr.add_subparsers(dest="sub", required=True)
    s = krs.add_parser("update", help="install a newer signed keyring (verified by the current root)")
    s.add_argument("file", help="a signed keyring from 'edgepack keys generate --root|rotate|revoke'")
    s.add_argument("--init", action="store_true",
                   help="this device has no signed keyring yet: trust this one's own root")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_keyring)
    s = krs.add_parser("show", help="the installed keyring's version, roots, release and revoked keys")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_keyring)

    s = sub.add_parser("run", help="serve: MQTT births, health, commands, streamed inference")
    _add_mqtt_flags(s)
    s.add_argument("--health-interval", type=float,
                   default=float(env("HEALTH_INTERVAL") or "10"), help="seconds [EDGEPACK_HEALTH_INTERVAL]")
    s.add_argument("--queue", type=int, default=int(env("INFER_QUEUE") or "4"),
                   help="waiting inference requests before 'busy' [EDGEPACK_INFER_QUEUE]")
    s.add_argument("--threads", type=int, default=None, help="override the profile's threads")
    s.add_argument("--chunk-interval", type=float, default=float(env("CHUNK_INTERVAL") or "0.05"),
                   help="seconds of tokens per streamed chunk after the first; 0 = one per token "
                        "[EDGEPACK_CHUNK_INTERVAL]")
    s.add_argument("--http", default=env("HTTP") or None, metavar="HOST:PORT",
                   help="also serve the OpenAI-compatible HTTP API here (a bare PORT listens on "
                        "127.0.0.1 only) [EDGEPACK_HTTP]")
    s.add_argument("--http-key-file", default=env("HTTP_KEY_FILE") or None, metavar="FILE",
                   help="require 'Authorization: Bearer <the key in FILE>' on /v1/* "
                        "[EDGEPACK_HTTP_KEY_FILE]")
    _add_gate_flags(s)
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("install-service", help="write the systemd unit and its env file")
    _add_mqtt_flags(s)
    s.add_argument("--exec-path", help="edgepack-agent executable (default: this binary when run "
                   "from an agent binary, else the one on PATH)")
    s.add_argument("--service-keyring", default="/etc/edgepack/keyring.json",
                   help="keyring path the service reads")
    s.add_argument("--unit-dir", default="/etc/systemd/system")
    s.add_argument("--env-file", default="/etc/edgepack/agent.env")
    s.add_argument("--enable", action="store_true", help="also daemon-reload and enable --now")
    s.set_defaults(func=cmd_install_service)
    return p


def _add_gate_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--gate-tokens", type=int, default=int(env("GATE_TOKENS") or "32"),
                   help="tokens the post-install benchmark generates [EDGEPACK_GATE_TOKENS]")
    s.add_argument("--no-gate", action="store_true",
                   help="load and smoke-test a new bundle, but do not benchmark it against its SLO")
    # Flags add to the env list, and a later value wins: a flag overrides the env for its key.
    s.add_argument("--slo", action="append", metavar="KEY=VALUE",
                   default=[i for i in (env("SLO") or "").split(",") if i.strip()] or None,
                   help="replace a manifest SLO threshold, repeatable: min_decode_tok_s, "
                        "max_ttft_ms, max_rss_mb, min_agreement (the fidelity check's, 0-1); "
                        "0 turns one off [EDGEPACK_SLO, ','-separated]")


def _add_mqtt_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--broker", default=env("BROKER", "mqtt://127.0.0.1:1883"),
                   help="mqtt://host:port or mqtts://host:port [EDGEPACK_BROKER]")
    s.add_argument("--device", default=env("DEVICE") or default_device_id(),
                   help="device id [EDGEPACK_DEVICE, default: hostname]")
    s.add_argument("--fleet", default=env("FLEET", "default"), help="[EDGEPACK_FLEET]")
    s.add_argument("--username", default=env("MQTT_USERNAME"), help="[EDGEPACK_MQTT_USERNAME]")
    s.add_argument("--password", default=env("MQTT_PASSWORD"), help="[EDGEPACK_MQTT_PASSWORD]")
    s.add_argument("--ca-file", default=env("MQTT_CA"), help="CA for mqtts:// [EDGEPACK_MQTT_CA]")
    s.add_argument("--cert-file", default=env("MQTT_CERT"), help="client cert [EDGEPACK_MQTT_CERT]")
    s.add_argument("--key-file", default=env("MQTT_KEY"), help="client key [EDGEPACK_MQTT_KEY]")
    s.add_argument("--config", default=env("CONFIG") or None, metavar="FILE",
                   help="device config from 'edgepack fleet enroll': its broker, fleet, device, "
                        "credentials, CA and keyring replace the flags above [EDGEPACK_CONFIG]")


def _apply_config(args: argparse.Namespace) -> None:
    """Fill the MQTT flags (and the keyring, unless given) from ``--config``."""
    if not getattr(args, "config", None):
        return
    from agent.device_config import load_device_config

    c = load_device_config(args.config)
    args.broker, args.fleet, args.device = c.broker, c.fleet, c.device
    args.username, args.password = c.username, c.password
    if c.ca_file:
        args.ca_file = c.ca_file
    if c.keyring:
        if not args.keyring:
            args.keyring = [c.keyring]
        if hasattr(args, "service_keyring"):
            args.service_keyring = c.keyring


def main(argv: Sequence[str] | None = None) -> int:
    """Run the agent CLI; returns the exit code (0 ok, 1 edgepack error, 2 usage)."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
