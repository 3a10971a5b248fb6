"""The packaging commands of ``edgepack``: profiles, model, plan, keys, build, bundle, release.

:func:`add_commands` adds them to the host parser (:mod:`edgepack.cli`, which composes them with
the fleet's). Handlers only parse and call the packager's domain modules; human status goes to
stderr, machine output (``--json``) to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent._cli import dump, err
from agent.errors import ProfileError

if TYPE_CHECKING:
    from agent.profiles import DeviceProfile
    from packager.model import ModelInfo
    from packager.plan import Override

log = logging.getLogger("packager")

_err, _dump = err, dump


def _cache(args: argparse.Namespace) -> Path:
    from packager.cache import default_cache_dir

    return Path(args.cache_dir) if args.cache_dir else default_cache_dir()


def _profiles(args: argparse.Namespace) -> dict[str, DeviceProfile]:
    from agent.profiles import load_profiles

    return load_profiles(Path(args.profiles_dir) if args.profiles_dir else None)


def _selected_profiles(args: argparse.Namespace) -> list[DeviceProfile]:
    allp = _profiles(args)
    if args.all_profiles:
        return list(allp.values())
    if not args.profile:
        raise ProfileError("name at least one --profile, or --all-profiles",
                           hint=f"Known profiles: {', '.join(allp)}")
    missing = [p for p in args.profile if p not in allp]
    if missing:
        raise ProfileError(f"unknown profile(s): {', '.join(missing)}",
                           hint=f"Known profiles: {', '.join(allp)}")
    return [allp[p] for p in args.profile]


def _overrides(args: argparse.Namespace, profiles: list[DeviceProfile]) -> dict[str, Override]:
    """--precision / --quant for every selected profile, then each --override PROFILE=VALUE."""
    from packager.plan import Override

    every = args.precision or args.quant
    out = {p.name: Override(every) for p in profiles} if every else {}
    out.update(Override.parse_pair(text) for text in args.override or ())
    return out


def _model(args: argparse.Namespace) -> ModelInfo:
    from packager.catalog import resolve_model

    return resolve_model(args.model, cache_dir=_cache(args))


# --- profiles ------------------------------------------------------------------------------------


def cmd_profiles_list(args: argparse.Namespace) -> int:
    profiles = _profiles(args)
    if args.json:
        _dump([p.to_dict() for p in profiles.values()])
        return 0
    for p in profiles.values():
        t = p.target
        print(f"{p.name:18s} {p.device_class:9s} {t.runtime:9s} {t.format:12s} "
              f"{t.quant or t.precision:7s} {t.device:5s} {p.description}")
    return 0


def cmd_profiles_show(args: argparse.Namespace) -> int:
    profiles = _profiles(args)
    if args.name not in profiles:
        raise ProfileError(f"unknown profile {args.name!r}", hint=f"Known: {', '.join(profiles)}")
    _dump(profiles[args.name].to_dict())
    return 0


def cmd_profiles_match(args: argparse.Namespace) -> int:
    from agent.profiles import match_profile

    if args.facts:
        try:
            facts = json.loads(Path(args.facts).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ProfileError(f"cannot read facts {args.facts}: {e}") from e
    else:
        from agent.probe import probe

        facts = probe()
    result = match_profile(facts, _profiles(args))
    if args.json:
        _dump(result.to_dict())
    else:
        print(result.best or "no profile matches")
        for line in result.explain():
            _err(f"  {line}")
    return 0 if result.best else 1


# --- model / plan --------------------------------------------------------------------------------


def cmd_model_sample(args: argparse.Namespace) -> int:
    from packager.sample import ensure_sample

    s = ensure_sample(_cache(args))
    out = {"gguf": str(s.gguf), "hf_dir": str(s.hf_dir)}
    _dump(out) if args.json else print(f"GGUF:          {s.gguf}\nHF checkpoint: {s.hf_dir}")
    return 0


def cmd_model_tiny(args: argparse.Namespace) -> int:
    from packager.tiny import ensure_tiny_phi3

    t = ensure_tiny_phi3(_cache(args), seed=args.seed, eos_bias=args.eos_bias)
    out = {"hf_dir": str(t.hf_dir), "name": t.name, "seed": t.seed, "eos_bias": t.eos_bias,
           "key": t.key, "n_params": t.n_params, "vocab_size": t.vocab_size,
           "size_bytes": t.size_bytes, "built": t.built}
    if args.json:
        _dump(out)
        return 0
    print(t.hf_dir)  # the path alone on stdout: usable as $(edgepack model tiny)
    _err(f"{t.name}: random-weight Phi-3, {t.n_params / 1e6:.1f} M params, "
         f"{t.size_bytes / 1e6:.1f} MB ({'made now' if t.built else 'cached'})")
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    info = _model(args)
    _dump(info.to_dict())
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from packager.plan import plan, ram_budget_bytes

    profiles = _selected_profiles(args)
    bp = plan(profiles, _model(args), overrides=_overrides(args, profiles), force=args.force,
              max_loss_pct=args.max_loss)
    if args.json:
        _dump({"profiles": {n: {"variant": p.variant.key, "precision": p.variant.precision,
                                "quant": p.variant.quant, "estimate_bytes": p.estimate.total_bytes,
                                "ram_budget_bytes": ram_budget_bytes(p.profile),
                                "max_loss_pct": p.max_loss_pct, "context": p.context,
                                "choice": p.choice.to_dict(), "reasons": list(p.reasons)}
                            for n, p in bp.profiles.items()},
               "refused": bp.refused, "variants": [v.key for v in bp.variants]})
        return 0
    for n, p in bp.profiles.items():
        chosen = " (chosen by the user)" if p.choice.by == "user" else ""
        print(f"{n:18s} -> {p.variant.key:28s} {p.estimate}{chosen}")
        for r in p.reasons:
            _err(f"    {r}")
    for n, why in bp.refused.items():
        print(f"{n:18s} -> refused: {why}")
    print(f"{len(bp.variants)} distinct variant(s) to build: {', '.join(v.key for v in bp.variants)}")
    return 0


# --- keys / build / bundle -----------------------------------------------------------------------


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from packager.keys import generate_key_files

    kf = generate_key_files(args.name, Path(args.output), force=args.force)
    if not args.root:
        if args.json:
            _dump({"key_id": kf.key.key_id, "private": str(kf.private), "keyring": str(kf.keyring)})
        else:
            print(f"key id:   {kf.key.key_id}\nprivate:  {kf.private} (keep on the build host)\n"
                  f"keyring:  {kf.keyring} (copy to devices: edgepack-agent --keyring {kf.keyring.name})")
        return 0
    # A root key: it signs the first keyring (version 1) trusting the given release keys.
    from packager.keys import SIGNED_KEYRING_NAME, load_public_keys, next_keyring, sign_with

    release = [k for f in args.release or () for k in load_public_keys(f)]
    ring = next_keyring(None, add=release, roots=[kf.key.public])
    out = Path(args.output) / SIGNED_KEYRING_NAME
    _write_keyring(out, sign_with(ring, [kf.key]), force=args.force)
    return _show_keyring(args, out, ring, private=str(kf.private))


def _write_keyring(path: Path, doc: bytes, *, force: bool = True) -> None:
    from agent._fs import atomic_write
    from agent.errors import KeyringError

    if path.exists() and not force:
        raise KeyringError(f"{path} exists", hint="Use 'edgepack keys rotate' to make its next version.")
    atomic_write(path, doc)


def _read_keyring(path: str) -> tuple[bytes, Any]:
    from agent.bundle.trust import verify_keyring_update
    from agent.errors import KeyringError

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise KeyringError(f"cannot read {path}: {e}",
                           hint="Make one with 'edgepack keys generate --root'.") from e
    return data, verify_keyring_update(data, None, trust_on_first_use=True)


def _show_keyring(args: argparse.Namespace, path: Path, ring: Any, **extra: str) -> int:
    if args.json:
        _dump({**ring.summary(), "keyring": str(path), **extra})
        return 0
    print(f"keyring:  {path} v{ring.version} (devices: edgepack-agent keyring update {path.name})")
    print(f"root:     {', '.join(k.key_id[:16] for k in ring.root_keys)} "
          f"(threshold {ring.threshold})")
    for k in ring.release_keys:
        print(f"release:  {k.key_id[:16]} {k.name}")
    for r in sorted(ring.revoked):
        print(f"revoked:  {r[:16]}")
    for name, value in extra.items():
        print(f"{name}:  {value}")
    return 0


def cmd_keys_change(args: argparse.Namespace) -> int:
    """``keys rotate`` and ``keys revoke``: the keyring's next version, signed by the root."""
    from packager.keys import load_public_keys, load_signing_key, next_keyring, sign_with

    _, current = _read_keyring(args.keyring)
    signers = [load_signing_key(f) for f in args.root_key]
    new_roots = [load_signing_key(f) for f in args.new_root or ()]
    ring = next_keyring(
        current, add=[k for f in getattr(args, "add", None) or () for k in load_public_keys(f)],
        remove=getattr(args, "remove", None) or [], revoke=getattr(args, "key_ids", None) or [],
        roots=[k.public for k in new_roots] or None, threshold=args.threshold)
    doc = sign_with(ring, [*signers, *new_roots], current)
    path = Path(args.output or args.keyring)
    _write_keyring(path, doc)
    return _show_keyring(args, path, ring)


def cmd_keys_show(args: argparse.Namespace) -> int:
    _, ring = _read_keyring(args.keyring)
    return _show_keyring(args, Path(args.keyring), ring)


def cmd_build(args: argparse.Namespace) -> int:
    from packager.build import build
    from packager.keys import load_signing_key
    from packager.quality import describe_loss

    key = load_signing_key(args.key)
    cache = _cache(args)
    profiles = _selected_profiles(args)
    report = build(_model(args), profiles, key, Path(args.output),
                   cache_dir=cache, bundle_version=args.bundle_version, threads=args.threads,
                   overrides=_overrides(args, profiles), force=args.force,
                   max_loss_pct=args.max_loss)
    if args.json:
        _dump(report.to_dict())
    else:
        for b in report.bundles:
            q = b.manifest.quality
            print(f"{b.profile:18s} {b.path}  ({b.size_bytes / 2**20:.0f} MiB, ppl "
                  f"{q.get('ppl', 0):.2f}, {describe_loss(q)})")
        for p, why in {**report.refused, **report.over_budget}.items():
            _err(f"{p:18s} refused: {why}")
        _err(f"report: {Path(args.output) / 'build-report.md'}")
        if report.release:
            _err(f"release: {report.release} (signed; edgepack release inspect {report.release})")
    explicitly_refused = [p for p in report.refused if not args.all_profiles]
    return 1 if report.over_budget or explicitly_refused or not report.bundles else 0


def cmd_bundle_inspect(args: argparse.Namespace) -> int:
    from packager.bundler import read_manifest

    m = read_manifest(Path(args.bundle))
    if args.json:
        _dump({"verified": False, "manifest": m.to_dict()})
        return 0
    _err("(unverified: use 'edgepack bundle verify --keyring FILE' to check signature and hashes)")
    t = m.target
    print(f"model:     {m.model_name} v{m.version}\nprofile:   {m.profile}\n"
          f"target:    {t.runtime} / {t.format} / {t.precision} {t.quant} on {t.device}\n"
          f"signer:    {m.signer_key_id}\ncreated:   {m.created}")
    q = m.quality
    if q and q.get("delta_pct") is not None:
        print(f"quality:   {q.get('metric')} {q.get('ppl', 0):.3f} vs {q.get('reference')} "
              f"{q.get('reference_ppl', 0):.3f} ({q.get('delta_pct', 0):+.2f}%), top-1 agreement "
              f"{q.get('top1_agreement') or 0:.3f} over {q.get('tokens')} tokens")
    elif q:
        print(f"quality:   {q.get('metric')} {q.get('ppl', 0):.3f}, not measured against a reference "
              f"(a ready folder, shipped as it is)")
    if m.choice:
        from packager.build import describe_choice

        print(f"chosen:    {describe_choice(m.choice)}")
    print(f"requires:  arch {', '.join(m.requirements.arch) or 'any'}, RAM "
          f"{m.requirements.min_ram_bytes / 2**30:.2f} GiB")
    for f in m.files:
        print(f"file:      {f.path}  {f.size} bytes  sha256 {f.sha256}")
    return 0


def cmd_bundle_verify(args: argparse.Namespace) -> int:
    from agent.bundle import load_keyring
    from packager.bundler import verify_bundle

    m = verify_bundle(Path(args.bundle), load_keyring([Path(k) for k in args.keyring]))
    out = {"verified": True, "model": m.model_name, "version": m.version, "profile": m.profile,
           "signer": m.signer_key_id, "files": len(m.files)}
    _dump(out) if args.json else print(f"OK: {m.model_name} v{m.version} for {m.profile}, signed by "
                                       f"{m.signer_key_id[:16]}, {len(m.files)} file(s) match")
    return 0


# --- release -------------------------------------------------------------------------------------


def cmd_release_inspect(args: argparse.Namespace) -> int:
    from agent.bundle.release import read_release_unverified
    from packager.release import describe

    r = read_release_unverified(Path(args.release))
    if args.json:
        _dump({"verified": False, "release_id": r.release_id, "release": r.to_dict()})
        return 0
    _err("(unverified: use 'edgepack release verify RELEASE --keyring FILE' to check its signature)")
    for line in describe(r):
        print(line)
    return 0


def cmd_release_verify(args: argparse.Namespace) -> int:
    from agent.bundle import load_keyring
    from packager.release import verify_release_dir

    r, checks = verify_release_dir(Path(args.release),
                                   load_keyring([Path(k) for k in args.keyring]),
                                   bundles=args.bundles)
    bad = [c for c in checks if not c.ok]
    if args.json:
        _dump({"verified": True, "release_id": r.release_id, "signer": r.signer_key_id,
               "bundles": {c.profile: {"file": c.file, "ok": c.ok, "reason": c.reason}
                           for c in checks} if args.bundles else None,
               "ok": not bad})
    else:
        print(f"OK: release {r.release_id} signed by {r.signer_key_id[:16]}, "
              f"{len(r.bundles)} bundle(s) listed")
        for c in checks:
            print(f"{c.profile:18s} {c.file}  {'OK' if c.ok else 'FAILED: ' + c.reason}")
    return 1 if bad else 0


# --- parser --------------------------------------------------------------------------------------


def _add_profile_selection(s: argparse.ArgumentParser) -> None:
    g = s.add_mutually_exclusive_group()
    g.add_argument("--profile", action="append", help="profile name, repeatable")
    g.add_argument("--all-profiles", action="store_true")


def _add_precision_choice(s: argparse.ArgumentParser) -> None:
    from agent.profiles.schema import GGUF_QUANTS, PRECISIONS

    g = s.add_mutually_exclusive_group()
    g.add_argument("--precision", choices=PRECISIONS,
                   help="build every selected profile at this precision instead of its own choice")
    g.add_argument("--quant", choices=sorted(GGUF_QUANTS),
                   help="the same with a llama.cpp quant (GGUF profiles only)")
    s.add_argument("--override", action="append", metavar="PROFILE=VALUE",
                   help="a precision or GGUF quant for one profile (repeatable; wins over "
                   "--precision / --quant)")
    s.add_argument("--force", action="store_true",
                   help="build an override over its profile's RAM budget anyway (recorded)")
    s.add_argument("--max-loss", type=float, metavar="PCT",
                   help="quality budget (perplexity increase, %%) replacing the profiles' for "
                   "this build (recorded)")


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``profiles``, ``model``, ``plan``, ``keys``, ``build``, ``bundle`` and ``release`` to
    the host CLI.

    The handlers read ``args.profiles_dir`` and ``args.cache_dir`` (global options of the host
    parser).
    """

    prof = sub.add_parser("profiles", help="device profiles").add_subparsers(dest="sub", required=True)
    s = prof.add_parser("list")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_profiles_list)
    s = prof.add_parser("show")
    s.add_argument("name")
    s.set_defaults(func=cmd_profiles_show)
    s = prof.add_parser("match", help="best profile for probe facts (default: this machine)")
    s.add_argument("--facts", help="JSON from 'edgepack-agent probe --json'")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_profiles_match)

    model = sub.add_parser("model", help="source models").add_subparsers(dest="sub", required=True)
    s = model.add_parser("sample", help="make the Gemma 3 270M sample (GGUF + HF checkpoint)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_model_sample)
    from packager.tiny import EOS_STOPS_AT_ONCE, SUPPRESSED_BIAS  # light: no torch at import

    s = model.add_parser("tiny", help="make the tiny random-weight Phi-3 for fast tests "
                         "(--model tiny-phi3 names the default one)")
    s.add_argument("--seed", type=int, default=0, help="weights' seed (same seed, same bytes)")
    s.add_argument("--eos-bias", type=float, default=SUPPRESSED_BIAS,
                   help=f"EOS logit offset: {SUPPRESSED_BIAS:g} never stops (default), "
                   f"{EOS_STOPS_AT_ONCE:g} stops at once")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_model_tiny)
    s = model.add_parser("info", help="shape of a model (HF folder, .gguf, hub id, or 'sample')")
    s.add_argument("model")
    s.set_defaults(func=cmd_model_info)

    s = sub.add_parser("plan", help="what each profile would get, without building")
    s.add_argument("--model", required=True)
    _add_profile_selection(s)
    _add_precision_choice(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_plan)

    keys = sub.add_parser("keys", help="signing keys").add_subparsers(dest="sub", required=True)
    s = keys.add_parser("generate", help="new Ed25519 key: NAME.key (private) + NAME.pub.json")
    s.add_argument("--name", default="release")
    s.add_argument("-o", "--output", default="keys")
    s.add_argument("--force", action="store_true")
    s.add_argument("--root", action="store_true",
                   help="a root key: also write OUTPUT/keyring.signed.json (version 1), trusting "
                        "the --release keys")
    s.add_argument("--release", action="append", metavar="PUB",
                   help="with --root: a release key (NAME.pub.json or NAME.key) to trust, repeatable")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_keys_generate)

    def keyring_change(name: str, text: str) -> argparse.ArgumentParser:
        s = keys.add_parser(name, help=text)
        s.add_argument("--keyring", default="keys/keyring.signed.json",
                       help="the current signed keyring (rewritten unless -o)")
        s.add_argument("--root-key", action="append", required=True, metavar="KEY",
                       help="a current root private key, repeatable (as many as the threshold)")
        s.add_argument("--new-root", action="append", metavar="KEY",
                       help="rotate the root to these private keys (they sign too), repeatable")
        s.add_argument("--threshold", type=int, help="root signatures the next update needs")
        s.add_argument("-o", "--output", help="write the new version here instead")
        s.add_argument("--json", action="store_true")
        s.set_defaults(func=cmd_keys_change)
        return s

    s = keyring_change("rotate", "next keyring version: add/remove release keys, or a new root")
    s.add_argument("--add", action="append", metavar="PUB", help="release key to trust, repeatable")
    s.add_argument("--remove", action="append", metavar="KEY_ID",
                   help="release key to stop trusting (not revoked), repeatable")
    s = keyring_change("revoke", "next keyring version: these keys are never trusted again")
    s.add_argument("key_ids", nargs="+", metavar="KEY_ID", help="key id or a unique prefix (>= 8)")

    s = keys.add_parser("show", help="the signed keyring's version, roots, release and revoked keys")
    s.add_argument("--keyring", default="keys/keyring.signed.json")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_keys_show)

    s = sub.add_parser("build", help="build, measure and sign bundles")
    s.add_argument("--model", required=True,
                   help="HF folder, .gguf file, hub id, or 'sample' (Gemma 3 270M)")
    _add_profile_selection(s)
    _add_precision_choice(s)
    s.add_argument("--key", required=True, help="private key from 'edgepack keys generate'")
    s.add_argument("-o", "--output", required=True, help="folder for bundles and the report")
    s.add_argument("--bundle-version", type=int, help="monotonic version (default: UTC timestamp)")
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_build)

    bundle = sub.add_parser("bundle", help="inspect or verify bundles").add_subparsers(dest="sub",
                                                                                       required=True)
    s = bundle.add_parser("inspect")
    s.add_argument("bundle")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_bundle_inspect)
    s = bundle.add_parser("verify")
    s.add_argument("bundle")
    s.add_argument("--keyring", action="append", required=True)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_bundle_verify)

    release = sub.add_parser("release", help="inspect or verify a build's signed release "
                             "(release.json)").add_subparsers(dest="sub", required=True)
    s = release.add_parser("inspect", help="show a release WITHOUT checking its signature")
    s.add_argument("release", help="release.json, or the build folder holding it")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_release_inspect)
    s = release.add_parser("verify", help="check a release's signature (release.json.sig beside it)")
    s.add_argument("release", help="release.json, or the build folder holding it")
    s.add_argument("--keyring", action="append", required=True)
    s.add_argument("--bundles", action="store_true",
                   help="also check each listed bundle file beside it (size and sha256)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_release_verify)


__all__ = ["add_commands"]
