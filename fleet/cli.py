"""``edgepack fleet ...`` and ``edgepack serve``: the host CLI's fleet commands.

:func:`add_commands` adds them to the host parser (:mod:`edgepack.cli`); each handler is
``func(args) -> int`` and raises :class:`~agent.errors.EdgepackError` subclasses, which the host's
``main`` prints with their hint (exit 1). Results go to stdout (``--json``: one JSON document);
progress, events and usage go to stderr, so ``--json`` output can be piped.

Common ``fleet`` options may come before or after the subcommand (``edgepack fleet --broker X
devices`` or ``edgepack fleet devices --broker X``); each has an environment default for scripts
and systemd units: EDGEPACK_BROKER, EDGEPACK_FLEET, EDGEPACK_MQTT_USERNAME, EDGEPACK_MQTT_PASSWORD,
EDGEPACK_MQTT_CA.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import signal
import sys
import threading
import urllib.parse
from pathlib import Path
from types import FrameType
from typing import Any

from agent._cli import dump, err
from agent.errors import EdgepackError, TransportError
from agent.protocol import InferRequest
from fleet.client import (
    COMMAND_TIMEOUT,
    INFER_TIMEOUT,
    INSTALL_TIMEOUT,
    FleetClient,
    bundle_info,
    client_for,
    local_path,
)
from fleet.inventory import DeviceRecord

__all__ = ["add_commands"]

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
_SAMPLING: dict[str, type] = {"max_tokens": int, "temperature": float, "top_p": float, "top_k": int,
                              "repeat_penalty": float}
DEFAULT_FLEET = "default"


_err, _dump = err, dump


def _timeout(args: argparse.Namespace, default: float) -> float:
    return float(args.timeout) if args.timeout is not None else default


# --- formatting ----------------------------------------------------------------------------------


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # unreachable; keeps mypy's return check simple


def _bundle(b: dict[str, Any] | None) -> str:
    if not b:
        return "-"
    name = f"{b.get('model', '?')} v{b.get('version', '?')}"
    return f"{name} {b['quant']}" if b.get("quant") else name


def _age(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.0f}h"


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_table(records: list[DeviceRecord]) -> str:
    """The human ``fleet devices`` table (one header line, one line per device)."""
    head = ("DEVICE", "STATE", "PROFILE", "CURRENT", "TOK/S", "CPU%", "RSS", "HEALTH AGE")
    rows = [head] + [
        (r.device, r.state or "?", r.profile or "-", _bundle(r.current), _num(r.last_decode_tok_s, ".1f"),
         _num(r.cpu_percent, ".0f"), _bytes(r.rss_bytes), _age(r.health_age_s))
        for r in records
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def event_line(ev: dict[str, Any]) -> str:
    """One human line for an install event (``downloading``, ``verified``, ``failed``, ...)."""
    stage = str(ev.get("stage", "?"))
    if stage == "downloading" and isinstance(ev.get("bytes"), int):
        total = ev.get("total") if isinstance(ev.get("total"), int) else None
        pct = f" ({100 * ev['bytes'] / total:.0f}%)" if total else ""
        return f"  downloading {_bytes(ev['bytes'])} / {_bytes(total)}{pct}"
    if stage == "downloading" and isinstance(ev.get("url"), str):
        total = ev.get("total") if isinstance(ev.get("total"), int) else None
        return f"  downloading {ev['url']} ({_bytes(total)})"
    if stage == "failed":
        back = " (rolled back: the previous bundle serves)" if ev.get("rolled_back") is True else ""
        return f"  failed ({ev.get('code', '?')}): {ev.get('reason', '')}{back}"
    detail = {k: v for k, v in ev.items() if k not in ("schema", "job", "stage", "ts")}
    return f"  {stage}" + (f" {json.dumps(detail, sort_keys=True, default=str)}" if detail else "")


# --- handlers ------------------------------------------------------------------------------------


def cmd_devices(args: argparse.Namespace) -> int:
    """``edgepack fleet devices``: the device table from retained state/birth/health."""
    with client_for(args) as c:
        records = c.devices(wait=args.wait)
    if args.json:
        _dump([r.to_dict() for r in records])
    elif records:
        print(format_table(records), flush=True)
    else:
        _err(f"no devices seen in fleet {args.fleet!r} on {args.broker} within {args.wait:.1f}s")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """``edgepack fleet status DEVICE``."""
    with client_for(args) as c:
        res = c.status(args.device, timeout=_timeout(args, COMMAND_TIMEOUT))
    if args.json:
        _dump(res)
        return 0
    print(f"device:    {res.get('device', args.device)} (agent {res.get('agent_version', '?')})")
    print(f"current:   {_bundle(res.get('current'))}")
    print(f"previous:  {_bundle(res.get('previous'))}")
    print(f"loaded:    {res.get('model_loaded') or '-'}   busy: {res.get('busy')}   "
          f"queue: {res.get('queue')}")
    usage = res.get("last_usage") or {}
    if usage:
        print(f"last run:  {usage.get('decode_tok_s', 0):.1f} tok/s, TTFT {usage.get('ttft_ms', 0):.0f} ms")
    if res.get("last_install"):
        print(f"install:   {json.dumps(res['last_install'], sort_keys=True)}")
    part = res.get("partial_install")
    if isinstance(part, dict):
        at, size = int(part.get("resumes_at_byte") or 0), int(part.get("size") or 0)
        print(f"partial:   {str(part.get('sha256'))[:16]}… {at / 2**20:.0f} of {size / 2**20:.0f} MiB "
              "staged (the install sent again continues there)")
    sys.stdout.flush()
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    """``edgepack fleet probe DEVICE``."""
    default = COMMAND_TIMEOUT * 6 if args.runtimes else COMMAND_TIMEOUT  # runtime checks load libraries
    with client_for(args) as c:
        res = c.probe(args.device, runtimes=args.runtimes, timeout=_timeout(args, default))
    if args.json:
        _dump(res)
        return 0
    f = res.get("facts") or {}
    print(f"device:    {args.device}   profile: {res.get('profile') or '-'}")
    print(f"os/arch:   {f.get('os')}/{f.get('arch')}   cpu: {f.get('cpu_model')}")
    print(f"cores:     {f.get('cores_physical')} physical, {f.get('cores_logical')} logical   "
          f"RAM {_bytes(f.get('ram_bytes'))}   disk free {_bytes(f.get('disk_free_bytes'))}")
    for k in ("accelerators", "runtimes"):
        if f.get(k):
            print(f"{k + ':':<10} {json.dumps(f[k], sort_keys=True, default=str)}")
    sys.stdout.flush()
    return 0


def resolve_bundle(spec: str, sha256: str | None, size: int | None) -> tuple[str, str, int]:
    """The install URL, sha256 and size for ``BUNDLE``: a URL, or a local path (sent as a
    ``file://`` URL, which the device must be able to read). Missing sha256/size are looked up
    with :func:`fleet.client.bundle_info`.

    Raises:
        TransportError, UntrustedDataError, EdgepackError: as :func:`fleet.client.bundle_info`.
    """
    is_url = urllib.parse.urlsplit(spec).scheme in ("http", "https", "file")
    url = spec if is_url else local_path(spec).resolve().as_uri()
    if sha256 is None or size is None:
        found_sha, found_size = bundle_info(url)
        sha256 = sha256 or found_sha
        size = size if size is not None else found_size
    return url, sha256, size


def cmd_install(args: argparse.Namespace) -> int:
    """``edgepack fleet install DEVICE BUNDLE``: prints events as they come, then the result."""
    url, sha, size = resolve_bundle(args.bundle, args.sha256, args.size)
    _err(f"installing {url} ({_bytes(size)}, sha256 {sha[:16]}...) on {args.device}")

    def on_event(ev: dict[str, Any]) -> None:
        _err(event_line(ev))

    with client_for(args) as c:
        res = c.install(args.device, url, sha, size, on_event=on_event,
                        timeout=_timeout(args, INSTALL_TIMEOUT))
    if args.json:
        _dump(res)
        return 0
    verb = "already installed" if res.get("already_installed") else "installed"
    check = res.get("check") or {}
    extra = f", load {check['load_ms']:.0f} ms, TTFT {check.get('ttft_ms', 0):.0f} ms" \
        if isinstance(check.get("load_ms"), int | float) else ""
    print(f"{verb}: {_bundle(res.get('installed'))} on {args.device}"
          f" (previous: {_bundle(res.get('previous'))}{extra})", flush=True)
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    """``edgepack fleet infer DEVICE PROMPT``: tokens to stdout as they arrive, usage to stderr.

    Ctrl-C cancels the generation on the device (every request gets a ``request_id`` for that).
    """
    rid = args.request_id or f"cli-{secrets.token_hex(8)}"
    # Options left unset take the protocol's defaults, so the CLI cannot drift from them.
    given = {k: v for k in _SAMPLING if (v := getattr(args, k)) is not None}
    req = InferRequest(prompt=args.prompt, stop=tuple(args.stop or ()), chat=args.chat, seed=args.seed,
                       request_id=rid, **given)
    text: list[str] = []
    usage: dict[str, Any] | None = None
    with client_for(args) as c:
        try:
            for chunk in c.infer(args.device, req, timeout=_timeout(args, INFER_TIMEOUT)):
                if chunk.text:
                    text.append(chunk.text)
                    if not args.json:
                        sys.stdout.write(chunk.text)
                        sys.stdout.flush()  # show each token as it arrives
                if chunk.done:
                    usage = chunk.usage
        except KeyboardInterrupt:
            _cancel_quietly(c, args.device, rid)
            raise
    if args.json:
        _dump({"device": args.device, "request_id": rid, "text": "".join(text), "usage": usage})
        return 0
    sys.stdout.write("\n")
    sys.stdout.flush()
    if usage:
        _err(f"[{usage.get('completion_tokens', '?')} tokens, TTFT {usage.get('ttft_ms', 0):.0f} ms, "
             f"{usage.get('decode_tok_s', 0):.1f} tok/s, finish: {usage.get('finish_reason', '?')}]")
    return 0


def _cancel_quietly(c: FleetClient, device: str, rid: str) -> None:
    try:
        c.cancel(device, rid, timeout=2.0)
        _err(f"cancelled {rid} on {device}")
    except EdgepackError as e:  # tolerated: the user is leaving; the generation may have ended
        _err(f"could not cancel {rid}: {e}")


def cmd_rollback(args: argparse.Namespace) -> int:
    """``edgepack fleet rollback DEVICE``."""
    with client_for(args) as c:
        res = c.rollback(args.device, timeout=_timeout(args, COMMAND_TIMEOUT * 6))
    if args.json:
        _dump(res)
    else:
        print(f"{args.device} now serves {_bundle(res.get('current'))}", flush=True)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    """``edgepack fleet cancel DEVICE REQUEST_ID``."""
    with client_for(args) as c:
        res = c.cancel(args.device, args.request_id, timeout=_timeout(args, COMMAND_TIMEOUT))
    if args.json:
        _dump(res)
    else:
        print(f"cancelled {args.request_id} on {args.device}", flush=True)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """``edgepack serve DIR``: serve bundles until Ctrl-C or SIGTERM; prints their URLs."""
    from fleet.serve import BundleServer

    try:
        server = BundleServer(Path(args.directory), host=args.host, port=args.port)
    except NotADirectoryError as e:
        raise EdgepackError(str(e)) from e
    except OSError as e:
        raise TransportError(f"cannot listen on {args.host}:{args.port}: {e}") from e
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        with server:
            _err(f"serving {server.directory} at {server.url_for('')} (index: "
                 f"{server.url_for('index.json')}); Ctrl-C to stop")
            names = server.bundle_names()
            for n in names:
                print(server.url_for(n), flush=True)
            if not names:
                _err("no *.bundle files here yet; they are served as soon as they appear")
            try:
                while not stop.wait(0.5):  # a timed wait, so Ctrl-C is seen promptly
                    pass
            except KeyboardInterrupt:
                pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    _err("stopped")
    return 0


# --- parser --------------------------------------------------------------------------------------


def _common_options(p: argparse.ArgumentParser, *, suppress: bool) -> None:
    # On the subcommands the defaults are SUPPRESSed, so an option given before the subcommand
    # (on ``fleet``) is not overwritten by the subcommand's default.
    def d(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    env = os.environ.get
    p.add_argument("--broker", default=d(env("EDGEPACK_BROKER") or DEFAULT_BROKER),
                   help=f"mqtt://host:port or mqtts://host:port [EDGEPACK_BROKER, default {DEFAULT_BROKER}]")
    p.add_argument("--fleet", default=d(env("EDGEPACK_FLEET") or DEFAULT_FLEET),
                   help=f"fleet id [EDGEPACK_FLEET, default {DEFAULT_FLEET}]")
    p.add_argument("--username", default=d(env("EDGEPACK_MQTT_USERNAME")),
                   help="broker user [EDGEPACK_MQTT_USERNAME]")
    p.add_argument("--password", default=d(env("EDGEPACK_MQTT_PASSWORD")),
                   help="broker password [EDGEPACK_MQTT_PASSWORD]")
    p.add_argument("--ca-file", default=d(env("EDGEPACK_MQTT_CA")),
                   help="CA bundle for mqtts [EDGEPACK_MQTT_CA]")
    p.add_argument("--timeout", type=float, default=d(None),
                   help="seconds to wait for the device (default depends on the command)")


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``fleet`` (devices, status, probe, install, infer, rollback, cancel) and ``serve`` to
    the host CLI's subcommands.

    Args:
        sub: the result of ``parser.add_subparsers(...)`` of the ``edgepack`` parser.
    """
    fleet = sub.add_parser("fleet", help="operate devices over MQTT")
    _common_options(fleet, suppress=False)
    fsub = fleet.add_subparsers(dest="fleet_cmd", required=True)

    def command(name: str, help: str, func: Any) -> argparse.ArgumentParser:
        s = fsub.add_parser(name, help=help)
        _common_options(s, suppress=True)
        s.add_argument("--json", action="store_true", help="machine output on stdout")
        s.set_defaults(func=func)
        return s

    s = command("devices", "the fleet's devices from their retained state, birth and health",
                cmd_devices)
    s.add_argument("--wait", type=float, default=1.0, help="seconds to collect status (default 1)")

    s = command("status", "a device's bundles, model and queue", cmd_status)
    s.add_argument("device")

    s = command("probe", "a device's hardware facts and matched profile", cmd_probe)
    s.add_argument("device")
    s.add_argument("--runtimes", action="store_true", help="also check which runtimes can run (slow)")

    s = command("install", "install a bundle on a device and follow its progress", cmd_install)
    s.add_argument("device")
    s.add_argument("bundle", help="URL from 'edgepack serve', or a path the device can read")
    s.add_argument("--sha256", help="bundle sha256 (default: from index.json, or hashed)")
    s.add_argument("--size", type=int, help="bundle size in bytes (default: as --sha256)")

    s = command("infer", "generate on a device; tokens stream to stdout", cmd_infer)
    s.add_argument("device")
    s.add_argument("prompt")
    defaults = {f.name: f.default for f in dataclasses.fields(InferRequest)}
    for name, kind in _SAMPLING.items():
        s.add_argument("--" + name.replace("_", "-"), type=kind,
                       help=f"default {defaults[name]}")
    s.add_argument("--stop", action="append", help="stop string, repeatable")
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    s.add_argument("--seed", type=int)
    s.add_argument("--request-id", help="id for 'fleet cancel' (default: random cli-<hex>)")

    s = command("rollback", "switch a device back to its previous bundle", cmd_rollback)
    s.add_argument("device")

    s = command("cancel", "cancel a running inference", cmd_cancel)
    s.add_argument("device")
    s.add_argument("request_id")

    from fleet import enroll

    enroll.add_arguments(command("enroll", "give a device its own broker account and config file", None),
                         command("revoke", "remove a device's broker account", None))

    from fleet import simulator

    s = command("simulate", "simulate N devices on the real protocol in one process (fleet scale)",
                simulator.cmd_simulate)
    simulator.add_arguments(s)

    from fleet.rollout_cli import add_commands as add_rollout_commands

    add_rollout_commands(sub, fsub)  # rollout start|status|pause|resume|abort|list, fleet controller

    s = sub.add_parser("serve", help="serve a folder of bundles over HTTP (with index.json)")
    s.add_argument("directory")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    s.add_argument("--port", type=int, default=8080)
    s.set_defaults(func=cmd_serve)

