"""``edgepack rollout ...``, ``edgepack fleet controller`` and ``edgepack fleet keyring push|status``:
parse, then call the fleet's domain modules (:mod:`fleet.rollout_ops`, :mod:`fleet.controller`,
:mod:`fleet.keyring_ops`).

Every option has an environment default, as the agent's do, so a systemd unit can configure the
controller with an env file: EDGEPACK_FLEET_DB, EDGEPACK_BROKER, EDGEPACK_FLEET, EDGEPACK_KEYRING
(':'-separated), EDGEPACK_MQTT_USERNAME / _PASSWORD / _CA, EDGEPACK_BASE_URL, EDGEPACK_SERVE_HOST,
EDGEPACK_SERVE_PORT, EDGEPACK_CONSOLE_HTTP, EDGEPACK_CONSOLE_KEY_FILE.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent._cli import dump, env, err
from agent.errors import EdgepackError

if TYPE_CHECKING:
    from fleet.console import Console
    from fleet.controller import Controller

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_ACTIVE_PHASES = ("new", "running", "paused", "open")


def duration(text: str) -> float:
    """``90``, ``30s``, ``15m``, ``2h``, ``1d`` -> seconds (argparse type).

    Raises:
        argparse.ArgumentTypeError: not a duration.
    """
    m = _DURATION.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad duration {text!r} (e.g. 30s, 15m, 2h)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _db(args: argparse.Namespace) -> Path:
    from fleet.store import default_db_path

    return Path(args.db) if args.db else default_db_path()


def _keyring(args: argparse.Namespace) -> list[Path]:
    if not args.keyring:
        raise EdgepackError("no keyring: releases cannot be verified",
                            hint="Pass --keyring FILE (the public keyring of the release key) or set "
                                 "EDGEPACK_KEYRING.")
    return [Path(k) for k in args.keyring]


# --- handlers ----------------------------------------------------------------------------------


def cmd_controller(args: argparse.Namespace) -> int:
    """``edgepack fleet controller``: run until SIGTERM / Ctrl-C."""
    from fleet.controller import Controller, ControllerConfig

    cfg = ControllerConfig(db=_db(args), broker_url=args.broker, fleet=args.fleet,
                           keyring=_keyring(args), username=args.username, password=args.password,
                           ca_file=args.ca_file, client_id=args.client_id or "",
                           base_url=args.base_url, serve_host=args.serve_host,
                           serve_port=args.serve_port)
    ctl = Controller(cfg)
    console = _console(args, ctl)  # bound before run(): a busy port fails at once, not later
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: ctl.request_stop())
    err(f"controller of fleet {cfg.fleet}: broker {cfg.broker_url}, database {cfg.db}"
        + (f", console {console.url}" if console else ""))
    try:
        ctl.run()
    finally:
        if console:
            console.stop()
    return 0


def _console(args: argparse.Namespace, ctl: Controller) -> Console | None:
    """The read-only web console of ``--http`` (None without), started."""
    if not args.http:
        return None
    from agent.http_api import parse_listen, read_key_file
    from fleet.console import Console, ConsoleConfig

    try:
        host, port = parse_listen(args.http)
        key = read_key_file(Path(args.http_key_file)) if args.http_key_file else None
        console = Console.for_controller(ctl, ConsoleConfig(host=host, port=port, key=key))
        console.start()
    except EdgepackError:
        ctl.stop()  # releases the database lock and the MQTT session it opened
        raise
    return console


def cmd_start(args: argparse.Namespace) -> int:
    from fleet.rollout import FailureThreshold, RegressionLimits, Selection, Waves
    from fleet.rollout_ops import start_rollout

    fields: dict[str, Any] = {
        "rollout_id": args.id, "fleet": args.fleet, "selection": Selection.parse(args.select or ""),
        "waves": Waves.parse(args.waves), "max_parallel": args.max_parallel,
        "device_timeout": args.device_timeout, "retries": args.retries,
        "max_failures": FailureThreshold.parse(args.max_failures), "min_executed": args.min_executed,
        "max_regression": RegressionLimits.parse(args.max_regression),
        "min_agreement": args.min_agreement, "rollback_on_abort": args.rollback_on_abort,
        "dynamic": args.dynamic, "soak": args.soak, "offline_is_failure": args.offline_is_failure,
    }
    r = start_rollout(_db(args), Path(args.release), _keyring(args), fields, base_url=args.base_url)
    if args.json:
        dump(r.status_report())
    else:
        print(r.spec.rollout_id, flush=True)
        err(f"recorded rollout {r.spec.rollout_id} of {r.spec.release_id} to fleet {r.spec.fleet} "
            f"(waves {','.join(r.spec.waves.steps)}); the controller starts it. Follow it with: "
            f"edgepack rollout status {r.spec.rollout_id} --watch")
    return 0


def cmd_command(args: argparse.Namespace) -> int:
    from fleet.rollout_ops import request

    cid = request(_db(args), args.rollout, args.rollout_cmd, args.reason or "")
    if args.json:
        dump({"rollout": args.rollout, "command": args.rollout_cmd, "id": cid, "queued": True})
    else:
        err(f"{args.rollout_cmd} of {args.rollout} queued; the controller applies it on its next tick")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from fleet.rollout_ops import status

    while True:
        doc = status(_db(args), args.rollout, fleet=args.fleet_filter)
        if args.json:
            dump(doc)
        else:
            print(format_status(doc), flush=True)
        if not args.watch or doc["status"] not in _ACTIVE_PHASES:
            return 0
        time.sleep(args.watch)
        if not args.json:
            print(flush=True)


def cmd_list(args: argparse.Namespace) -> int:
    from fleet.rollout_ops import list_rollouts

    items = list_rollouts(_db(args), args.fleet_filter)
    if args.json:
        dump(items)
        return 0
    if not items:
        err("no rollouts recorded yet")
    for i in items:
        wave = f"wave {i['wave']}/{i['waves']}" if i["waves"] else "-"
        print(f"{i['rollout']:24s} {i['release']:28s} {i['fleet']:12s} {i['status']:9s} {wave:10s} "
              f"{i['reason']}")
    return 0


def format_status(doc: dict[str, Any]) -> str:
    """The human ``rollout status``: the rollout, one line per wave, totals, the reason, history."""
    lines = [f"rollout {doc['rollout']}  release {doc['release']}  fleet {doc['fleet']}  "
             f"{doc['status'].upper()}" + (f": {doc['reason']}" if doc["reason"] else "")]
    for w in doc["wave_reports"]:
        counts = ", ".join(f"{n} {s}" for s, n in w["counts"].items() if n) or "empty"
        reg = ", ".join(f"{k} {v:+.1%}" for k, v in w["median_regression"].items() if v is not None)
        agree = f", agreement {w['median_agreement']:.3f}" if w["median_agreement"] is not None else ""
        lines.append(f"  wave {w['wave']}/{len(doc['wave_reports'])} {w['phase']:8s} {w['size']:5d} "
                     f"device(s): {counts}" + (f"  [median {reg}{agree}]" if reg or agree else ""))
    t = doc["totals"]
    lines.append(f"  not in waves: {t.get('incompatible', 0)} incompatible, "
                 f"{t.get('already_installed', 0)} already installed")
    for h in doc["history"][-5:]:
        lines.append(f"  {time.strftime('%H:%M:%S', time.localtime(h['ts']))} {h['text']}")
    return "\n".join(lines)


def cmd_keyring_push(args: argparse.Namespace) -> int:
    from fleet.keyring_ops import push_keyring

    k = push_keyring(_db(args), Path(args.file), args.fleet, [Path(p) for p in args.keyring or []])
    if args.json:
        dump({"fleet": args.fleet, "version": k.version, "keyring": k.summary(), "recorded": True})
    else:
        err(f"recorded keyring v{k.version} as the desired keyring of fleet {args.fleet}; its "
            f"controller pushes it to every device on an older one. Follow it with: "
            f"edgepack fleet keyring status --fleet {args.fleet}")
    return 0


def cmd_keyring_status(args: argparse.Namespace) -> int:
    from fleet.keyring_ops import format_keyring_status, keyring_status

    doc = keyring_status(_db(args), args.fleet_filter)
    if args.json:
        dump(doc)
    else:
        print(format_keyring_status(doc), flush=True)
    return 0


# --- parser ---------------------------------------------------------------------------------------


def _db_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=env("FLEET_DB"),
                   help="the controller's SQLite database [EDGEPACK_FLEET_DB, default "
                        "~/.local/state/edgepack/fleet.db]")


def _keyring_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keyring", action="append",
                   default=[k for k in (env("KEYRING") or "").split(":") if k] or None,
                   help="trusted keyring for releases, repeatable [EDGEPACK_KEYRING, ':'-separated]")


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                 fleet_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``rollout`` to the host CLI and ``controller`` and ``keyring`` to its ``fleet`` group."""
    e = os.environ.get
    s = fleet_sub.add_parser("controller", help="run the rollout controller of a fleet (a service)")
    s.add_argument("--broker", default=e("EDGEPACK_BROKER") or DEFAULT_BROKER,
                   help=f"[EDGEPACK_BROKER, default {DEFAULT_BROKER}]")
    s.add_argument("--fleet", default=e("EDGEPACK_FLEET") or "default", help="[EDGEPACK_FLEET]")
    s.add_argument("--username", default=e("EDGEPACK_MQTT_USERNAME"), help="[EDGEPACK_MQTT_USERNAME]")
    s.add_argument("--password", default=e("EDGEPACK_MQTT_PASSWORD"), help="[EDGEPACK_MQTT_PASSWORD]")
    s.add_argument("--ca-file", default=e("EDGEPACK_MQTT_CA"), help="[EDGEPACK_MQTT_CA]")
    s.add_argument("--client-id", default=e("EDGEPACK_CLIENT_ID"),
                   help="fixed MQTT client id [default edgepack-controller-FLEET]")
    s.add_argument("--base-url", default=e("EDGEPACK_BASE_URL"),
                   help="where devices download bundles [EDGEPACK_BASE_URL; default: serve the "
                        "release folder ourselves]")
    s.add_argument("--serve-host", default=e("EDGEPACK_SERVE_HOST") or "127.0.0.1",
                   help="address to serve bundles on [EDGEPACK_SERVE_HOST, default loopback only]")
    s.add_argument("--serve-port", type=int, default=int(e("EDGEPACK_SERVE_PORT") or "8080"),
                   help="[EDGEPACK_SERVE_PORT, default 8080]")
    s.add_argument("--http", default=e("EDGEPACK_CONSOLE_HTTP"), metavar="HOST:PORT",
                   help="serve the read-only web console, e.g. 127.0.0.1:8400 (a bare port is on "
                        "loopback) [EDGEPACK_CONSOLE_HTTP; default: no console]")
    s.add_argument("--http-key-file", default=e("EDGEPACK_CONSOLE_KEY_FILE"), metavar="FILE",
                   help="the console's key (bearer, or the basic-auth password); required beyond "
                        "loopback [EDGEPACK_CONSOLE_KEY_FILE]")
    _db_option(s)
    _keyring_option(s)
    s.set_defaults(func=cmd_controller)

    kr = fleet_sub.add_parser("keyring", help="push a root-signed keyring to the fleet (by its controller)")
    ksub = kr.add_subparsers(dest="keyring_cmd", required=True)
    s = ksub.add_parser("push", help="record FILE as the fleet's desired keyring; the controller sends it")
    s.add_argument("file", help="the signed keyring (edgepack keys generate --root|rotate|revoke)")
    s.add_argument("--fleet", default=e("EDGEPACK_FLEET") or "default", help="[EDGEPACK_FLEET]")
    s.add_argument("--keyring", action="append",
                   help="a signed keyring the devices hold, repeatable: the first push must verify "
                        "as its update (later ones are checked against the recorded one)")
    s.add_argument("--json", action="store_true")
    _db_option(s)
    s.set_defaults(func=cmd_keyring_push)
    s = ksub.add_parser("status", help="the desired keyring and, per device, its version and push outcome")
    s.add_argument("--fleet", dest="fleet_filter", help="only this fleet (default: every fleet)")
    s.add_argument("--json", action="store_true")
    _db_option(s)
    s.set_defaults(func=cmd_keyring_status)

    ro = sub.add_parser("rollout", help="roll a signed release out to a fleet in waves")
    rsub = ro.add_subparsers(dest="rollout_cmd", required=True)
    s = rsub.add_parser("start", help="record a rollout of RELEASE (release.json) for the controller")
    s.add_argument("release", help="release.json written by 'edgepack build' (its .sig beside it)")
    s.add_argument("--fleet", default=e("EDGEPACK_FLEET") or "default", help="[EDGEPACK_FLEET]")
    s.add_argument("--select", help="profile=NAME[|NAME],device=GLOB[|GLOB] (default: every device)")
    s.add_argument("--waves", default="1,10%,50%,100%",
                   help="cumulative wave sizes, counts or %% of the targets (default 1,10%%,50%%,100%%)")
    s.add_argument("--max-parallel", type=int, default=0, help="devices in flight at once (0: a wave)")
    s.add_argument("--device-timeout", type=duration, default=900.0,
                   help="time for one install, and for an offline device to return (default 15m)")
    s.add_argument("--retries", type=int, default=2, help="extra attempts after a timeout (default 2)")
    s.add_argument("--max-failures", default="5%",
                   help="abort when a wave's failures exceed N or N%% (default 5%%)")
    s.add_argument("--min-executed", type=int, default=10,
                   help="committed devices in a wave before its median regressions are judged "
                        "mid-wave (default 10; always judged when the wave is done)")
    s.add_argument("--max-regression", default="decode=10%,ttft=25%,rss=20%",
                   help="abort when a wave's median regression exceeds these (off disables one)")
    s.add_argument("--min-agreement", type=float,
                   help="abort when a wave's median fidelity agreement falls below this (0-1)")
    s.add_argument("--rollback-on-abort", action="store_true",
                   help="roll the aborted wave's committed devices back")
    s.add_argument("--dynamic", action="store_true",
                   help="stay open after the last wave: devices that join later get the bundle")
    s.add_argument("--soak", type=duration, default=0.0,
                   help="time a done wave's devices must stay online on the new bundle (e.g. 10m)")
    s.add_argument("--offline-is-failure", action="store_true",
                   help="count devices offline past --device-timeout as failures")
    s.add_argument("--base-url", help="where devices download the bundles (default: the controller's)")
    s.add_argument("--id", help="rollout id (default ro-YYYYMMDD-xxxxxx)")
    s.add_argument("--json", action="store_true")
    _db_option(s)
    _keyring_option(s)
    s.set_defaults(func=cmd_start)

    s = rsub.add_parser("status", help="a rollout's waves, devices and history (default: the latest)")
    s.add_argument("rollout", nargs="?")
    s.add_argument("--fleet", dest="fleet_filter", help="the latest of this fleet")
    s.add_argument("--watch", type=duration, nargs="?", const=2.0, default=None,
                   help="print again every N seconds (default 2) until it is done")
    s.add_argument("--json", action="store_true")
    _db_option(s)
    s.set_defaults(func=cmd_status)

    for name, what in (("pause", "stop dispatching (in-flight installs finish)"),
                       ("resume", "dispatch again"), ("abort", "stop the rollout for good")):
        s = rsub.add_parser(name, help=what)
        s.add_argument("rollout")
        s.add_argument("--reason", help="recorded with the command")
        s.add_argument("--json", action="store_true")
        _db_option(s)
        s.set_defaults(func=cmd_command)

    s = rsub.add_parser("list", help="every rollout, oldest first")
    s.add_argument("--fleet", dest="fleet_filter")
    s.add_argument("--json", action="store_true")
    _db_option(s)
    s.set_defaults(func=cmd_list)


__all__ = ["add_commands", "duration", "format_status"]
