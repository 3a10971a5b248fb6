"""``edgepack``: the host CLI. Packaging (profiles, model, plan, keys, build, bundle), fleet
operations (fleet ..., serve) and the demo, each added by its own package; this module only
composes them and runs the parsed command.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from agent import __version__
from agent._cli import dispatch, setup_logging


def _cmd_demo(args: argparse.Namespace) -> int:
    from edgepack.demo import run_demo
    from packager.cache import default_cache_dir

    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    return run_demo(cache_dir=cache, prompt=args.prompt, state_dir=args.state_dir)


def build_parser() -> argparse.ArgumentParser:
    """The whole host parser (global options, then every subcommand)."""
    from fleet.cli import add_commands as add_fleet_commands
    from packager.agent_binary import add_command as add_agent_binary_command
    from packager.cli import add_commands as add_packager_commands

    p = argparse.ArgumentParser(prog="edgepack", description="package models per device profile "
                                "and roll them out to fleets")
    p.add_argument("--version", action="version", version=f"edgepack {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=1, help="more logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    p.add_argument("--profiles-dir", default=os.environ.get("EDGEPACK_PROFILES_DIR"),
                   help="folder of profile TOML files [EDGEPACK_PROFILES_DIR]")
    p.add_argument("--cache-dir", default=os.environ.get("EDGEPACK_CACHE"),
                   help="model and build cache [EDGEPACK_CACHE, default ~/.cache/edgepack]")
    sub = p.add_subparsers(dest="cmd", required=True)
    add_packager_commands(sub)
    add_agent_binary_command(sub)
    add_fleet_commands(sub)
    s = sub.add_parser("demo", help="sample -> bundle -> broker + agent -> install and infer over MQTT")
    s.add_argument("--prompt", default="The three things every hiker should carry are")
    s.add_argument("--state-dir", help="agent state folder (default: CACHE/demo/state)")
    s.set_defaults(func=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the host CLI; returns the exit code (0 ok, 1 edgepack error, 2 usage)."""
    args = build_parser().parse_args(argv)
    setup_logging(0 if args.quiet else args.verbose)
    return dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
