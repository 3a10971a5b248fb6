"""Generated attacks on the bundle at scale (issue 12, item 9): hundreds of tampered bundles, none
accepted.

The named attack tests (test_bundle_attacks.py) show one attack each; this module derives them by
the hundred from one genuine bundle (a few KiB in five members: manifest, signature, three payload
files) and its keys, each case named by a stable id (``family/member/where``):

- bit flips in every member's tar header (the first byte of every ustar field) and data (five
  positions), and header edits with the checksum recomputed, as a deliberate editor would;
- manifest field edits left unsigned, or re-signed with an untrusted key (as itself, or claiming a
  trusted key's id) or a revoked one; manifests a trusted key signed that are invalid or lie about
  the payload; wrong keys, unknown signers, transplanted and malformed signatures;
- downgrades, replays of older genuine bundles, and a reused version with other content;
- symlink, hard link, device, fifo, folder, sparse, ``..`` and absolute-path members, also smuggled
  through pax and GNU extension headers; duplicated, extra, missing and reordered members;
- truncations at every member's header and data boundaries; size claims larger and smaller than
  the data, oversize claims, and a manifest (and a signature) larger than its cap.

Each goes through the real install paths on a copy of a real state folder where the real
``edgepack-agent install`` put v1 and then v2 (v2 serves, v1 is the rollback; the tests' fake
runtime loads them, tests/fakeruntime.py): the store's ``install`` from a file and from a stream
(as a download arrives), then the CLI in process. After each: refused with the case's EdgepackError
subclass before anything was switched (never a raw exception, never a rolled-back install), the
state folder byte for byte as it was (so nothing new was accepted and no staging debris is left),
the serving bundle's signature and files verifying, and nothing written outside the state folder.
The generator's own building blocks are shown to produce installable bundles when they change
nothing (:func:`test_the_generator_without_an_attack_builds_bundles_that_install`), so a case is
refused for its attack and not for a broken build. Two offers are not refusals and are tested as
what they are: the serving bundle offered again is a no-op before its payload is read (so a
tampered copy of it changes nothing), and a bundle missing only its end-of-archive blocks lacks
nothing signed.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
from bundlekit import (
    BLOCK,
    END_OF_ARCHIVE,
    HEADER_FIELDS,
    TarMember,
    set_checksum,
    size_field,
    tar_layout,
    tar_member,
)

from agent.bundle import (
    FileEntry,
    Keyring,
    Manifest,
    SigningKey,
    Target,
    check_file,
    verify_manifest,
)
from agent.bundle.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, MAX_SIGNATURE_BYTES, SIGNATURE_NAME
from agent.cli import main as agent_cli
from agent.errors import (
    BundleFormatError,
    DigestMismatchError,
    DowngradeError,
    EdgepackError,
    InstallError,
    InsufficientResourcesError,
    ManifestError,
    SignatureError,
    UntrustedDataError,
)
from agent.runtimes import RUNTIMES, RuntimeInfo
from agent.store import Store
from packager.bundler import write_bundle

pytestmark = pytest.mark.integration

MODEL = "gen"
PAYLOAD = ("model.bin", "tok/vocab.txt", "config.json")
MEMBERS = (MANIFEST_NAME, SIGNATURE_NAME, *PAYLOAD)
ESCAPE = "../../../../escape.bin"  # from staging/<tmp>/payload/ up to the case's folder
INSTALL_EVENTS = ("staged:", "switched:", "committed:", "rolled_back:")  # CLI lines after verify
FAKE = RuntimeInfo("fake", "fake", "fakeruntime", (), "tests/fakeruntime.py", "fakeruntime:FakeRuntime")


def payload(version: int, salt: str = "") -> dict[str, bytes]:
    rnd = random.Random(f"{version}{salt}")
    return {"model.bin": rnd.randbytes(4096 + 123), "tok/vocab.txt": rnd.randbytes(700),
            "config.json": b'{"v": %d}' % version}


def manifest_of(files: dict[str, bytes], key: SigningKey, version: int) -> Manifest:
    entries = [FileEntry(n, len(d), hashlib.sha256(d).hexdigest()) for n, d in files.items()]
    return Manifest(model_name=MODEL, version=version, profile="gen-test",
                    target=Target("fake", "fake", "int8", "", "cpu", "model.bin"),
                    files=entries, signer_key_id=key.key_id)


def canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def flip(data: bytes, at: int, mask: int = 0x01) -> bytes:
    b = bytearray(data)
    b[at] ^= mask
    return bytes(b)


def member_data(bundle: bytes, name: str) -> bytes:
    m = next(m for m in tar_layout(bundle) if m.name == name)
    return bundle[m.data:m.end]


def envelope(key_id: str, sig: bytes) -> bytes:
    return canonical({"format": "edgepack-signature/1",
                      "signatures": [{"key_id": key_id, "sig": sig.hex()}]})


# --- the kit: keys, genuine bundles, and a state folder serving v2 ------------------------------


@dataclass
class Kit:
    release: SigningKey  # trusted: signed every genuine bundle
    other: SigningKey  # trusted too (a second release key)
    attacker: SigningKey  # not trusted
    revoked: SigningKey  # listed and revoked
    keyring: Keyring
    keyring_file: Path  # the CLI's --keyring (release and other)
    template: Path  # the state folder every case starts from
    snapshot: dict[str, str]  # of the template: relative path -> sha256 ("dir" for folders)
    serving: str  # the template's current manifest digest
    genuine: dict[str, bytes]  # "v0" ... "v3", "v1-other", "v2-other": whole bundles
    layout: list[TarMember]  # of v3's members

    @property
    def v3(self) -> bytes:
        return self.genuine["v3"]

    def at(self, name: str) -> TarMember:
        return next(m for m in self.layout if m.name == name)

    def part(self, name: str) -> bytes:
        m = self.at(name)
        return self.v3[m.header:m.next]

    def data(self, name: str) -> bytes:
        m = self.at(name)
        return self.v3[m.data:m.end]

    @property
    def manifest_bytes(self) -> bytes:
        return self.data(MANIFEST_NAME)

    def manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_bytes)  # a fresh copy to edit

    def bundle(self, *parts: bytes) -> bytes:
        return b"".join(parts) + END_OF_ARCHIVE

    def parts(self, names: tuple[str, ...] = MEMBERS) -> list[bytes]:
        return [self.part(n) for n in names]

    def signed(self, manifest_bytes: bytes, key: SigningKey | None = None, *,
               key_id: str | None = None, payload: list[bytes] | None = None) -> bytes:
        """A bundle of ``manifest_bytes`` signed by ``key`` (default: the release key) under
        ``key_id`` (default: the key's own), with v3's payload members unless given."""
        k = key or self.release
        sig = envelope(key_id or k.key_id, k.sign(manifest_bytes))
        return self.bundle(tar_member(MANIFEST_NAME, manifest_bytes),
                           tar_member(SIGNATURE_NAME, sig),
                           *(self.parts(PAYLOAD) if payload is None else payload))

    def with_sig(self, sig: bytes) -> bytes:
        return self.bundle(self.part(MANIFEST_NAME), tar_member(SIGNATURE_NAME, sig),
                           *self.parts(PAYLOAD))


def snapshot(state: Path) -> dict[str, str]:
    out = {}
    for p in sorted(state.rglob("*")):
        rel = str(p.relative_to(state))
        if p.is_symlink():
            out[rel] = "symlink"
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def write_genuine(src: Path, files: dict[str, bytes], key: SigningKey, version: int) -> bytes:
    """A bundle written by the real producer (packager.bundler.write_bundle)."""
    paths = {}
    for name, data in files.items():
        p = src / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        paths[name] = p
    out = src.with_suffix(".bundle")
    write_bundle(out, manifest_of(files, key, version), key, paths)
    return out.read_bytes()


def cli_install(state: Path, kit: Kit, bundle: Path) -> int:
    return agent_cli(["--state-dir", str(state), "--keyring", str(kit.keyring_file), "install",
                      str(bundle), "--no-gate"])


@pytest.fixture(scope="module")
def fake_runtime() -> Iterator[None]:
    # The manifests name the "fake" runtime so the CLI's load check can load what it installs.
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(RUNTIMES, "fake", FAKE)
        yield


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory, fake_runtime: None) -> Kit:
    d = tmp_path_factory.mktemp("generated-attacks")
    release, other = SigningKey.generate("release"), SigningKey.generate("other-release")
    attacker, revoked = SigningKey.generate("attacker"), SigningKey.generate("revoked")
    keyring = Keyring([release.public, other.public, revoked.public], revoked=[revoked.key_id])
    keyring_file = d / "keyring.json"
    keyring_file.write_bytes(Keyring([release.public, other.public]).to_bytes())
    genuine = {f"v{v}": write_genuine(d / f"v{v}", payload(v), release, v) for v in (0, 1, 2, 3)}
    for v in (1, 2):
        genuine[f"v{v}-other"] = write_genuine(d / f"v{v}-other", payload(v, "other"), release, v)
    template = d / "state"
    k = Kit(release, other, attacker, revoked, keyring, keyring_file, template, {}, "", genuine,
            tar_layout(genuine["v3"]))
    for name in ("v1", "v2"):  # the real CLI, its load check through the fake runtime
        (d / f"{name}.bundle").write_bytes(genuine[name])
        assert cli_install(template, k, d / f"{name}.bundle") == 0
    assert [m.name for m in k.layout] == list(MEMBERS)
    store = Store(template, keyring)
    cur, prev = store.current(), store.previous()
    assert cur is not None and cur.manifest.version == 2
    assert prev is not None and prev.manifest.version == 1
    k.serving, k.snapshot = cur.digest, snapshot(template)
    return k


# --- the cases ----------------------------------------------------------------------------------


# (kit, the case's own folder) -> the bundle's bytes; "..." lets the generators bind their loop
# variables as lambda defaults.
Build = Callable[..., bytes]


@dataclass(frozen=True)
class Case:
    id: str
    build: Build
    refused_as: type[EdgepackError] = UntrustedDataError


POSITIONS = {"first": 0.0, "quarter": 0.25, "half": 0.5, "three-quarters": 0.75, "last": 1.0}


def _pos(m: TarMember, where: str) -> int:
    return m.data + round(POSITIONS[where] * (m.size - 1))


def header_flips() -> Iterator[Case]:
    # Raw: the lowest bit of each field's first byte. In any field the header checksum catches it;
    # in the checksum's own digits the stored value changes. (Not bit 4: it turns a leading "0"
    # into a space, which tar reads as the same number.)
    for name in MEMBERS:
        for fname, (off, _len) in HEADER_FIELDS.items():
            yield Case(f"header-flip/{name}/{fname}",
                       lambda k, _d, name=name, off=off: flip(k.v3, k.at(name).header + off))


def _edit_header(k: Kit, name: str, at: int, mask: int) -> bytes:
    m = k.at(name)
    b = bytearray(flip(k.v3, m.header + at, mask))
    b[m.header:m.data] = set_checksum(bytearray(b[m.header:m.data]))
    return bytes(b)


def header_edits() -> Iterator[Case]:
    # The same flips with the checksum recomputed, in the fields whose meaning changes.
    for name in MEMBERS:
        where = {"name-first": (0, 0x01), "name-last": (len(name) - 1, 0x01),
                 "name-end": (len(name), 0x01), "prefix": (345, 0x01)}
        where |= {f"size-digit{i}": (124 + i, 0x01) for i in (0, 5, 9, 10)}
        where |= {f"typeflag-bit{b}": (156, 1 << b) for b in range(8)}
        for what, (at, mask) in where.items():
            yield Case(f"header-edit/{name}/{what}",
                       lambda k, _d, name=name, at=at, mask=mask: _edit_header(k, name, at, mask))


def data_flips() -> Iterator[Case]:
    for name in MEMBERS:
        refused: type[EdgepackError] = DigestMismatchError if name in PAYLOAD else SignatureError
        for where in POSITIONS:
            yield Case(f"data-flip/{name}/{where}",
                       lambda k, _d, name=name, where=where: flip(k.v3, _pos(k.at(name), where)),
                       refused)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if value is _DELETE:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return edit


_DELETE = object()
_OTHER_SHA = hashlib.sha256(b"evil weights").hexdigest()

# Field edits of the v3 manifest, as JSON changes (re-serialized canonically).
FIELD_EDITS: dict[str, Callable[[dict[str, Any]], None]] = {
    "model.name": _set("model.name", "gen2"),
    "model.version-up": _set("model.version", 4),
    "model.version-down": _set("model.version", 1),
    "model.version-string": _set("model.version", "3"),
    "profile": _set("profile", "other-profile"),
    "target.runtime": _set("target.runtime", "llamacpp"),
    "target.format": _set("target.format", "gguf"),
    "target.precision": _set("target.precision", "fp16"),
    "target.quant": _set("target.quant", "F16"),
    "target.device": _set("target.device", "cuda"),
    "target.entrypoint": _set("target.entrypoint", "tok/vocab.txt"),
    "files.0.size": lambda d: d["files"][0].update(size=d["files"][0]["size"] + 1),
    "files.0.sha256": _set("files.0.sha256", _OTHER_SHA),
    "files.1.path": _set("files.1.path", "tok/other.txt"),
    "files-drop-last": lambda d: d["files"].pop(),
    "files-add": lambda d: d["files"].append({"path": "x.bin", "size": 1, "sha256": _OTHER_SHA}),
    "files-reorder": lambda d: d["files"].reverse(),
    "requirements.arch": _set("requirements.arch", ["riscv64"]),
    "requirements.min_ram_bytes": _set("requirements.min_ram_bytes", 1 << 40),
    "requirements.min_disk_bytes": _set("requirements.min_disk_bytes", 1 << 40),
    "signer-removed": _set("signer", _DELETE),
    "format_version-major": _set("format_version", "2.0"),
    "format_version-minor": _set("format_version", "1.1"),
    "created": _set("created", "2030-01-01T00:00:00Z"),
    "unknown-field": _set("x-evil", True),
    "generation.threads": _set("generation", {"threads": 64}),
    "slo": _set("slo", {"min_decode_tok_s": 0}),
}
# Byte edits: the same JSON document in other bytes (verification is over the exact bytes).
BYTE_EDITS: dict[str, Callable[[bytes], bytes]] = {
    "pretty-printed": lambda b: json.dumps(json.loads(b), indent=2, sort_keys=True).encode(),
    "keys-unsorted": lambda b: json.dumps(dict(reversed(json.loads(b).items()))).encode(),
    "trailing-newline": lambda b: b + b"\n",
    "leading-bom": lambda b: b"\xef\xbb\xbf" + b,
    "trailing-nul": lambda b: b + b"\0",
    "ascii-escaped": lambda b: json.dumps(json.loads(b), sort_keys=True, separators=(",", ":"),
                                          ensure_ascii=True).replace("gen", "g\\u0065n").encode(),
}


def _edited(k: Kit, what: str) -> bytes:
    if what in BYTE_EDITS:
        return BYTE_EDITS[what](k.manifest_bytes)
    doc = k.manifest()
    FIELD_EDITS[what](doc)
    return canonical(doc)


def _resigned(k: Kit, what: str, mode: str) -> bytes:
    mb = _edited(k, what)
    if mode == "unsigned":  # the original signature stays
        return k.bundle(tar_member(MANIFEST_NAME, mb), *k.parts((SIGNATURE_NAME, *PAYLOAD)))
    key = k.revoked if mode == "revoked" else k.attacker
    if mode != "attacker-as-release" and what not in BYTE_EDITS and what != "signer-removed":
        doc = json.loads(mb)
        doc["signer"] = {"key_id": key.key_id}  # the signer field names the key that signs
        mb = canonical(doc)
    return k.signed(mb, key, key_id=k.release.key_id if mode == "attacker-as-release" else None)


def manifest_edits() -> Iterator[Case]:
    for mode in ("unsigned", "attacker", "attacker-as-release", "revoked"):
        for what in (*FIELD_EDITS, *BYTE_EDITS):
            yield Case(f"manifest-{mode}/{what}",
                       lambda k, _d, what=what, mode=mode: _resigned(k, what, mode), SignatureError)


def _trusted(edit: Callable[..., Any], payload_: Callable[..., list[bytes]] | None = None) -> Build:
    """A bundle whose manifest the release key signs after ``edit`` (a dict edit, or one returning
    the manifest's bytes), with v3's payload or ``payload_(kit, folder)``."""
    def build(k: Kit, d: Path) -> bytes:
        doc = k.manifest()
        out = edit(doc)
        mb = out if isinstance(out, bytes) else canonical(doc)
        return k.signed(mb, payload=payload_(k, d) if payload_ else None)
    return build


def _rename_first(name: str | Callable[[Path], str]) -> Build:
    def build(k: Kit, d: Path) -> bytes:
        n = name(d) if callable(name) else name
        doc = k.manifest()
        doc["files"][0]["path"] = n
        doc["target"]["entrypoint"] = n
        return k.signed(canonical(doc), payload=[tar_member(n, k.data("model.bin")),
                                                 *k.parts(PAYLOAD[1:])])
    return build


def _nested_generation(doc: dict[str, Any]) -> bytes:
    # 200 000 levels of nesting, within the manifest's size cap: a parser must not crash on it.
    canon = canonical({**doc, "generation": {}})
    return canon.replace(b'"generation":{}', b'"generation":{"n":' + b"[" * 200_000 + b"]" * 200_000
                         + b"}")


def _many_files(doc: dict[str, Any]) -> None:
    doc["files"] += [{"path": f"f{i:05}", "size": 0, "sha256": hashlib.sha256(b"").hexdigest()}
                     for i in range(10_001)]


def _longer_than_claimed(k: Kit, name: str, extra: int) -> list[bytes]:
    # The header claims the manifest's (inflated) size; the data is the genuine one.
    size = len(k.data(name)) + extra
    return [tar_member(n, k.data(n), size=size if n == name else None) for n in PAYLOAD]


def signed_invalid() -> Iterator[Case]:
    """Manifests the release key signed that are invalid, or lie about the payload."""
    bad_paths = {"traversal": ESCAPE, "dot": "tok/./vocab.txt", "double-slash": "tok//vocab.txt",
                 "backslash": "tok\\vocab.txt", "newline": "model.bin\n", "reserved": SIGNATURE_NAME,
                 "empty": "", "trailing-slash": "model.bin/"}
    for what, p in bad_paths.items():
        yield Case(f"signed-invalid/path-{what}", _rename_first(p), ManifestError)
    yield Case("signed-invalid/path-absolute",
               _rename_first(lambda d: str(d / "abs-escape.bin")), ManifestError)
    edits: dict[str, Callable[[dict[str, Any]], Any]] = {
        "file-listed-twice": lambda d: d["files"].append(dict(d["files"][0])),
        "file-and-folder": lambda d: d["files"].append({"path": "tok", "size": 0,
                                                        "sha256": _OTHER_SHA}),
        "entrypoint-missing": _set("target.entrypoint", "nope.bin"),
        "format-major-2": _set("format_version", "2.0"),
        "version-negative": _set("model.version", -1),
        "version-bool": _set("model.version", True),
        "version-string": _set("model.version", "3"),
        "version-float": _set("model.version", 3.0),
        "name-traversal": _set("model.name", "../gen"),
        "name-empty": _set("model.name", ""),
        "files-empty": _set("files", []),
        "files-not-a-list": _set("files", {"model.bin": 1}),
        "file-not-an-object": _set("files.0", "model.bin"),
        "sha256-upper-case": lambda d: d["files"][0].update(sha256=d["files"][0]["sha256"].upper()),
        "sha256-short": lambda d: d["files"][0].update(sha256=d["files"][0]["sha256"][:63]),
        "size-negative": _set("files.0.size", -1),
        "size-bool": _set("files.0.size", True),
        "size-string": lambda d: d["files"][0].update(size=str(d["files"][0]["size"])),
        "min-ram-negative": _set("requirements.min_ram_bytes", -1),
        "arch-not-a-list": _set("requirements.arch", "x86_64"),
        "generation-a-list": _set("generation", [1]),
        "fidelity-threshold-nan": lambda d: d.update(fidelity={
            "probe_sha256": _OTHER_SHA, "window": 8, "top1": [1], "positions": 1,
            "threshold": float("nan"), "runtime": "fake"}),
        "json-array": lambda d: b"[" + canonical(d) + b"]",
        "not-utf8": lambda d: canonical(d).replace(b'"gen-test"', b'"gen-t\xe9st"'),
        "not-json": lambda d: canonical(d)[:-1],
        "nested-200000-levels": _nested_generation,
        "too-many-files": _many_files,
    }
    for what, edit in edits.items():
        yield Case(f"signed-invalid/{what}", _trusted(edit), ManifestError)
    yield Case("signed-invalid/signer-names-other-trusted-key",
               lambda k, _d: k.signed(k.manifest_bytes, k.other), ManifestError)
    # Consistent manifests that lie about the payload.
    yield Case("signed-lie/sha256-of-other-data", _trusted(_set("files.0.sha256", _OTHER_SHA)),
               DigestMismatchError)
    yield Case("signed-lie/size-larger-header-honest",
               _trusted(lambda d: d["files"][0].update(size=d["files"][0]["size"] + 100)),
               DigestMismatchError)
    for name in PAYLOAD:
        i = PAYLOAD.index(name)
        yield Case(
            f"signed-lie/size-larger-header-agrees/{name}",
            _trusted(lambda d, i=i: d["files"][i].update(size=d["files"][i]["size"] + 100),
                     lambda k, _d, name=name: _longer_than_claimed(k, name, 100)))
    yield Case("signed-lie/lists-a-file-not-in-the-tar",
               _trusted(lambda d: d["files"].append({"path": "x.bin", "size": 1,
                                                     "sha256": _OTHER_SHA})),
               BundleFormatError)
    yield Case("signed-lie/omits-a-file-in-the-tar", _trusted(lambda d: d["files"].pop()),
               BundleFormatError)


def signatures() -> Iterator[Case]:
    def env(entries: Any) -> Callable[[Kit], bytes]:
        return lambda k: canonical({"format": "edgepack-signature/1", "signatures": entries(k)})

    good = lambda k: k.release.sign(k.manifest_bytes)  # noqa: E731
    rid = lambda k: k.release.key_id  # noqa: E731
    sigs: dict[str, Callable[[Kit], bytes]] = {
        "untrusted-key": lambda k: envelope(k.attacker.key_id, k.attacker.sign(k.manifest_bytes)),
        "untrusted-key-as-trusted-id": lambda k: envelope(rid(k), k.attacker.sign(k.manifest_bytes)),
        "revoked-key": lambda k: envelope(k.revoked.key_id, k.revoked.sign(k.manifest_bytes)),
        "revoked-key-as-trusted-id": lambda k: envelope(rid(k), k.revoked.sign(k.manifest_bytes)),
        "transplanted-from-v2": lambda k: member_data(k.genuine["v2"], SIGNATURE_NAME),
        "over-other-bytes": lambda k: envelope(rid(k), k.release.sign(k.manifest_bytes + b" ")),
        "sig-truncated": lambda k: envelope(rid(k), good(k)[:63]),
        "sig-extended": lambda k: envelope(rid(k), good(k) + b"\0"),
        "sig-zero": lambda k: envelope(rid(k), bytes(64)),
        "sig-ones": lambda k: envelope(rid(k), b"\xff" * 64),
        "sig-empty": lambda k: envelope(rid(k), b""),
        "key-id-upper-case": lambda k: envelope(rid(k).upper(), good(k)),
        "key-id-prefix": lambda k: envelope(rid(k)[:16], good(k)),
        "empty-file": lambda k: b"",
        "not-json": lambda k: b"\x00\x01 not json",
        "not-utf8": lambda k: b"\xff\xfe{}",
        "json-list": lambda k: b"[]",
        "json-string": lambda k: b'"sig"',
        "other-format": lambda k: canonical({"format": "edgepack-signature/2",
                                             "signatures": [{"key_id": rid(k),
                                                             "sig": good(k).hex()}]}),
        "no-format": lambda k: canonical({"signatures": [{"key_id": rid(k), "sig": good(k).hex()}]}),
        "no-signatures": env(lambda k: None),
        "signatures-empty": env(lambda k: []),
        "signature-a-string": env(lambda k: [good(k).hex()]),
        "key-id-a-number": env(lambda k: [{"key_id": 7, "sig": good(k).hex()}]),
        "sig-not-hex": env(lambda k: [{"key_id": rid(k), "sig": "zz" * 64}]),
        "sig-odd-hex": env(lambda k: [{"key_id": rid(k), "sig": good(k).hex()[:-1]}]),
        "sig-missing": env(lambda k: [{"key_id": rid(k)}]),
        "sig-a-number": env(lambda k: [{"key_id": rid(k), "sig": 12}]),
        "untrusted-then-trusted-id-garbage": env(lambda k: [
            {"key_id": k.attacker.key_id, "sig": k.attacker.sign(k.manifest_bytes).hex()},
            {"key_id": rid(k), "sig": "00" * 64}]),
        "two-hundred-garbage-entries": env(lambda k: [{"key_id": rid(k), "sig": f"{i:0128x}"}
                                                      for i in range(200)]),
        # Nested deeper than the JSON parser's stack, within the signature's size cap.
        "nested-30000-levels": lambda k: b"[" * 30_000 + b"]" * 30_000,
        "nested-object-10000-levels": lambda k: b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
    }
    for what, sig in sigs.items():
        yield Case(f"signature/{what}", lambda k, _d, sig=sig: k.with_sig(sig(k)), SignatureError)
    yield Case("signature/over-its-cap", lambda k, _d: k.with_sig(
        envelope(k.release.key_id, k.release.sign(k.manifest_bytes)).ljust(
            MAX_SIGNATURE_BYTES + 1, b" ")), BundleFormatError)


def downgrades() -> Iterator[Case]:
    yield Case("downgrade/replay-v1", lambda k, _d: k.genuine["v1"], DowngradeError)
    yield Case("downgrade/replay-v0", lambda k, _d: k.genuine["v0"], DowngradeError)
    yield Case("downgrade/v1-other-content", lambda k, _d: k.genuine["v1-other"], DowngradeError)
    yield Case("downgrade/v2-other-content", lambda k, _d: k.genuine["v2-other"], DowngradeError)

    def v2_as(k: Kit, key: SigningKey | None, pretty: bool = False) -> bytes:
        mb = member_data(k.genuine["v2"], MANIFEST_NAME)
        doc = json.loads(mb)
        if key is not None:
            doc["signer"] = {"key_id": key.key_id}
        mb = json.dumps(doc, indent=2).encode() if pretty else canonical(doc)
        rest = k.genuine["v2"]
        layout = tar_layout(rest)
        return k.signed(mb, key or k.release,
                        payload=[rest[m.header:m.next] for m in layout[2:]])

    yield Case("downgrade/v2-resigned-by-other-trusted-key", lambda k, _d: v2_as(k, k.other),
               DowngradeError)
    yield Case("downgrade/v2-reserialized-and-resigned", lambda k, _d: v2_as(k, None, True),
               DowngradeError)

    def v1_tampered(k: Kit, _d: Path) -> bytes:
        b = k.genuine["v1"]
        m = tar_layout(b)[2]
        return flip(b, m.data + 10)

    yield Case("downgrade/replay-v1-with-a-flipped-payload", v1_tampered, DowngradeError)
    yield Case("downgrade/replay-v1-cut-after-its-manifest",
               lambda k, _d: k.genuine["v1"][:tar_layout(k.genuine["v1"])[2].data + 100],
               DowngradeError)


# Members that are not regular files: (typeflag, linkname).
SPECIAL: dict[str, tuple[bytes, Callable[[Path], str]]] = {
    "symlink-absolute": (tarfile.SYMTYPE, lambda d: "/etc/passwd"),
    "symlink-escaping": (tarfile.SYMTYPE, lambda d: ESCAPE),
    "symlink-outside": (tarfile.SYMTYPE, lambda d: str(d / "outside")),
    "hardlink-to-manifest": (tarfile.LNKTYPE, lambda d: MANIFEST_NAME),
    "hardlink-absolute": (tarfile.LNKTYPE, lambda d: "/etc/passwd"),
    "char-device": (tarfile.CHRTYPE, lambda d: ""),
    "block-device": (tarfile.BLKTYPE, lambda d: ""),
    "fifo": (tarfile.FIFOTYPE, lambda d: ""),
    "folder": (tarfile.DIRTYPE, lambda d: ""),
    "unknown-type": (b"Z", lambda d: ""),
}


def _special(name: str, kind: bytes, link: str) -> bytes:
    return tar_member(name, b"", kind=kind, linkname=link, fmt=tarfile.USTAR_FORMAT)


def _replace(k: Kit, name: str, new: bytes) -> list[bytes]:
    return [new if n == name else k.part(n) for n in MEMBERS]


def member_types() -> Iterator[Case]:
    for name in MEMBERS:
        for what, (kind, link) in SPECIAL.items():
            if name not in PAYLOAD and what not in ("symlink-absolute", "hardlink-to-manifest",
                                                    "folder", "fifo"):
                continue
            yield Case(f"member-type/{name}/{what}",
                       lambda k, d, name=name, kind=kind, link=link:
                       k.bundle(*_replace(k, name, _special(name, kind, link(d)))),
                       BundleFormatError)
        if name in PAYLOAD:
            yield Case(f"member-type/{name}/gnu-sparse", lambda k, _d, name=name: k.bundle(
                *_replace(k, name, _typed(k.part(name), b"S"))))
    # A link to a folder outside, then a file written "through" it.
    yield Case("member-type/symlinked-folder-then-its-file", lambda k, d: k.bundle(
        *k.parts((MANIFEST_NAME, SIGNATURE_NAME, "model.bin")),
        _special("tok", tarfile.SYMTYPE, str(d / "outside")), *k.parts(PAYLOAD[1:])),
        BundleFormatError)
    yield Case("member-type/folder-then-its-file", lambda k, _d: k.bundle(
        *k.parts((MANIFEST_NAME, SIGNATURE_NAME, "model.bin")),
        _special("tok", tarfile.DIRTYPE, ""), *k.parts(PAYLOAD[1:])), BundleFormatError)


def _typed(part: bytes, kind: bytes) -> bytes:
    h = bytearray(part[:BLOCK])
    h[156:157] = kind
    return set_checksum(h) + part[BLOCK:]


# Member names that must never be written: (name, or a function of the case's folder).
EVIL_NAMES: dict[str, str | Callable[[Path], str]] = {
    "parent": "../escape.bin",
    "escaping": ESCAPE,
    "inner-escaping": "tok/../../../../../escape.bin",
    "absolute": lambda d: str(d / "abs-escape.bin"),
    "dot-slash": "./model.bin",
    "trailing-slash": "model.bin/",
    "double-slash": "tok//vocab.txt",
    "backslash": "tok\\vocab.txt",
    "newline": "model.bin\n",
    "empty": "",
    "dot": ".",
    "dot-dot": "..",
    "reserved-manifest": MANIFEST_NAME,
    "reserved-signature": SIGNATURE_NAME,
    "other-case": "Model.bin",
    "long-4096": "a/" * 2047 + "b",
    "non-utf8": "model\udcff.bin",
}


def _named(d: Path, evil: str | Callable[[Path], str], how: str, data: bytes) -> bytes:
    n = evil(d) if callable(evil) else evil
    if how == "pax":  # an innocent ustar name, the real one in a pax record
        return tar_member("model.bin", data, pax={"path": n})
    if how == "gnu":
        return tar_member(n, data, fmt=tarfile.GNU_FORMAT)
    if how == "pax-global":
        return tarfile.TarInfo.create_pax_global_header({"path": n}) + tar_member("model.bin", data)
    return tar_member(n, data)


def member_names() -> Iterator[Case]:
    for what, evil in EVIL_NAMES.items():
        yield Case(f"member-name/replacing-model.bin/{what}", lambda k, d, evil=evil: k.bundle(
            *_replace(k, "model.bin", _named(d, evil, "", k.data("model.bin")))),
            BundleFormatError)
        yield Case(f"member-name/extra-at-end/{what}", lambda k, d, evil=evil: k.bundle(
            *k.parts(), _named(d, evil, "", b"#!/bin/sh\nrm -rf /\n")), BundleFormatError)
    for how in ("pax", "gnu", "pax-global"):
        for what in ("escaping", "absolute"):
            evil = EVIL_NAMES[what]
            yield Case(f"member-name/{how}-header/{what}", lambda k, d, evil=evil, how=how:
                       k.bundle(*_replace(k, "model.bin", _named(d, evil, how,
                                                                  k.data("model.bin")))),
                       BundleFormatError)
    yield Case("member-name/pax-linkpath-on-a-file", lambda k, _d: k.bundle(*_replace(
        k, "model.bin", tar_member("model.bin", k.data("model.bin"), pax={"linkpath": "/etc/passwd"})
    ), tar_member("model.bin", b"", kind=tarfile.SYMTYPE, pax={"linkpath": "/etc/passwd"})),
        BundleFormatError)
    yield Case("member-name/pax-size-override", lambda k, _d: k.bundle(*_replace(
        k, "model.bin", tar_member("model.bin", k.data("model.bin"), pax={"size": "99999999"}))))
    yield Case("member-name/pax-malformed-record", lambda k, _d: k.bundle(*_replace(
        k, "model.bin", _raw_pax(b"99 path=x\n") + k.part("model.bin"))))


def _raw_pax(records: bytes) -> bytes:
    ti = tarfile.TarInfo("././@PaxHeader")
    ti.type = tarfile.XHDTYPE
    ti.size = len(records)
    return ti.tobuf(tarfile.USTAR_FORMAT) + records + bytes(-len(records) % BLOCK)


def member_sets() -> Iterator[Case]:
    """Duplicated, extra, missing and reordered members."""
    layouts: dict[str, tuple[str, ...]] = {}
    for i, name in enumerate(PAYLOAD):
        rest = tuple(n for n in PAYLOAD if n != name)
        layouts[f"duplicated-next/{name}"] = (*MEMBERS[:2 + i + 1], name, *MEMBERS[2 + i + 1:])
        layouts[f"duplicated-at-end/{name}"] = (*MEMBERS, name)
        layouts[f"missing/{name}"] = (MANIFEST_NAME, SIGNATURE_NAME, *rest)
    layouts |= {
        "duplicated/manifest-after-signature": (MANIFEST_NAME, SIGNATURE_NAME, MANIFEST_NAME,
                                                *PAYLOAD),
        "duplicated/signature-after-signature": (MANIFEST_NAME, SIGNATURE_NAME, SIGNATURE_NAME,
                                                 *PAYLOAD),
        "duplicated/manifest-twice-first": (MANIFEST_NAME, *MEMBERS),
        "missing/all-payload": (MANIFEST_NAME, SIGNATURE_NAME),
        "missing/manifest": (SIGNATURE_NAME, *PAYLOAD),
        "missing/signature": (MANIFEST_NAME, *PAYLOAD),
        "missing/manifest-and-signature": PAYLOAD,
        "order/signature-first": (SIGNATURE_NAME, MANIFEST_NAME, *PAYLOAD),
        "order/payload-first": (*PAYLOAD, MANIFEST_NAME, SIGNATURE_NAME),
        "order/signature-last": (MANIFEST_NAME, *PAYLOAD, SIGNATURE_NAME),
        "order/manifest-last": (SIGNATURE_NAME, *PAYLOAD, MANIFEST_NAME),
    }
    # The first two members must be the manifest and its signature; an absent signature is
    # refused as unsigned, anything else out of place as a broken archive.
    unsigned = ("missing/signature", "duplicated/manifest-twice-first", "order/signature-last")
    for what, names in layouts.items():
        refused: type[EdgepackError] = SignatureError if what in unsigned else BundleFormatError
        yield Case(f"members/{what}", lambda k, _d, names=names: k.bundle(*k.parts(names)), refused)
    for at in range(2, len(MEMBERS) + 1):
        yield Case(f"members/extra-unlisted-at-{at}", lambda k, _d, at=at: k.bundle(
            *k.parts(MEMBERS[:at]), tar_member("extra.bin", b"extra"), *k.parts(MEMBERS[at:])),
            BundleFormatError)
    yield Case("members/empty-extra-unlisted", lambda k, _d: k.bundle(
        *k.parts(), tar_member("extra.bin", b"")), BundleFormatError)
    yield Case("members/another-bundle-appended", lambda k, _d: b"".join(k.parts())
               + k.genuine["v2"], BundleFormatError)
    yield Case("members/itself-appended", lambda k, _d: b"".join(k.parts()) + k.v3,
               BundleFormatError)


def truncations() -> Iterator[Case]:
    for name in MEMBERS:
        where: dict[str, Callable[[TarMember], int]] = {
            "header+0": lambda m: m.header, "header+1": lambda m: m.header + 1,
            "header+256": lambda m: m.header + 256, "header+511": lambda m: m.header + 511,
            "data+1": lambda m: m.data + 1, "data-half": lambda m: m.data + m.size // 2,
            "data-end-1": lambda m: m.end - 1,
        }
        if name == PAYLOAD[-1]:
            where["padding"] = lambda m: m.end  # the data complete, its padding cut
            where["padding-last"] = lambda m: m.next - 1
        for what, cut in where.items():
            yield Case(f"truncated/{name}/{what}",
                       lambda k, _d, name=name, cut=cut: k.v3[:cut(k.at(name))])


def _claiming(k: Kit, name: str, size: int) -> bytes:
    m = k.at(name)
    h = bytearray(k.v3[m.header:m.data])
    h[124:136] = size_field(size)
    return k.v3[:m.header] + set_checksum(h) + k.v3[m.data:]


def size_claims() -> Iterator[Case]:
    # The tar header's size, checksum fixed, data unchanged: the manifest is not touched.
    claims: dict[str, Callable[[int], int]] = {
        "plus-1": lambda n: n + 1, "plus-a-block": lambda n: n + BLOCK, "minus-1": lambda n: n - 1,
        "zero": lambda n: 0, "octal-max": lambda n: 8**11 - 1, "base256-2^62": lambda n: 1 << 62,
        "base256-negative": lambda n: -1, "base256-very-negative": lambda n: -(1 << 62),
    }
    for name in MEMBERS:
        for what, claim in claims.items():
            yield Case(f"size-claim/{name}/{what}", lambda k, _d, name=name, claim=claim:
                       _claiming(k, name, claim(k.at(name).size)))


def _padded_manifest(k: Kit, size: int) -> bytes:
    doc = k.manifest()
    doc["x-padding"] = ""
    pad = size - len(canonical(doc))
    doc["x-padding"] = "x" * pad
    mb = canonical(doc)
    assert len(mb) == size
    return mb


def oversize() -> Iterator[Case]:
    yield Case("oversize/min-ram-2^60", _trusted(_set("requirements.min_ram_bytes", 1 << 60)),
               InsufficientResourcesError)
    yield Case("oversize/min-disk-2^60", _trusted(_set("requirements.min_disk_bytes", 1 << 60)),
               InsufficientResourcesError)
    yield Case("oversize/file-size-2^50-claimed-everywhere",
               _trusted(_set("files.0.size", 1 << 50), lambda k, _d: [
                   tar_member("model.bin", k.data("model.bin"), size=1 << 50),
                   *k.parts(PAYLOAD[1:])]), InsufficientResourcesError)
    yield Case("oversize/files-summing-past-2^64",
               _trusted(lambda d: [f.update(size=1 << 63) for f in d["files"]]),
               InsufficientResourcesError)
    yield Case("oversize/arch-riscv64", _trusted(_set("requirements.arch", ["riscv64"])),
               InstallError)
    # A manifest over the cap: signed by the release key, or claimed by the header only.
    yield Case("manifest-cap/signed-one-byte-over", lambda k, _d: k.signed(
        _padded_manifest(k, MAX_MANIFEST_BYTES + 1)), BundleFormatError)
    yield Case("manifest-cap/signed-4-MiB", lambda k, _d: k.signed(
        _padded_manifest(k, 4 * MAX_MANIFEST_BYTES)), BundleFormatError)
    yield Case("manifest-cap/unsigned-one-byte-over", lambda k, _d: k.bundle(
        tar_member(MANIFEST_NAME, _padded_manifest(k, MAX_MANIFEST_BYTES + 1)),
        *k.parts(MEMBERS[1:])), BundleFormatError)
    yield Case("manifest-cap/header-claims-one-byte-over",
               lambda k, _d: _claiming(k, MANIFEST_NAME, MAX_MANIFEST_BYTES + 1), BundleFormatError)
    yield Case("manifest-cap/header-claims-2^40",
               lambda k, _d: _claiming(k, MANIFEST_NAME, 1 << 40), BundleFormatError)


CASES: list[Case] = [
    *header_flips(), *header_edits(), *data_flips(), *manifest_edits(), *signed_invalid(),
    *signatures(), *downgrades(), *member_types(), *member_names(), *member_sets(),
    *truncations(), *size_claims(), *oversize(),
]


# --- the checks ---------------------------------------------------------------------------------


def assert_serving_intact(state: Path, kit: Kit, where: Path) -> None:
    assert snapshot(state) == kit.snapshot, "the state folder changed"
    cur = Store(state, kit.keyring).current()
    assert cur is not None and cur.digest == kit.serving
    verify_manifest((cur.path / MANIFEST_NAME).read_bytes(), (cur.path / SIGNATURE_NAME).read_bytes(),
                    kit.keyring)
    for f in cur.manifest.files:
        data = (cur.payload_dir / f.path).read_bytes()
        check_file(f, len(data), hashlib.sha256(data).hexdigest())
    assert sorted(p.name for p in where.iterdir()) == ["attack.bundle", "state"], \
        "something was written outside the state folder"


def store_install(state: Path, kit: Kit, source: Path | IO[bytes]
                  ) -> tuple[Exception | None, list[str]]:
    """Install through the store; returns what it raised (None: accepted) and its events."""
    events: list[str] = []
    try:
        Store(state, kit.keyring).install(source, on_event=lambda e, _d: events.append(e))
    except Exception as e:  # whatever it is, assert_refused judges it: a raw one fails there
        return e, events
    return None, events


def assert_refused(case: Case, err: BaseException, events: list[str]) -> None:
    assert isinstance(err, EdgepackError), f"a raw {type(err).__name__}: {err}"
    assert isinstance(err, case.refused_as), f"{type(err).__name__}: {err}"
    assert isinstance(err, UntrustedDataError | InsufficientResourcesError) or (
        isinstance(err, InstallError) and err.step == "check" and not err.rolled_back), err
    assert "v2" in err.serving, err.serving
    assert not {"staged", "switched", "committed", "rolled_back"} & set(events), events


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_generated_attack_is_refused(case: Case, kit: Kit, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    data = case.build(kit, tmp_path)
    bundle = tmp_path / "attack.bundle"
    bundle.write_bytes(data)
    state = tmp_path / "state"
    shutil.copytree(kit.template, state)
    for source in (bundle, io.BufferedReader(io.BytesIO(data))):  # a file, then a stream
        err, events = store_install(state, kit, source)
        if err is None:
            pytest.fail(f"{case.id}: ACCEPTED from a {type(source).__name__}")
        assert_refused(case, err, events)
        assert_serving_intact(state, kit, tmp_path)
    capsys.readouterr()
    assert cli_install(state, kit, bundle) == 1
    stderr = capsys.readouterr().err
    assert "error:" in stderr and not any(e in stderr for e in INSTALL_EVENTS), stderr
    assert_serving_intact(state, kit, tmp_path)


def test_at_least_200_generated_attacks_in_every_family() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "case ids are not unique"
    assert len(CASES) >= 200
    families = Counter(i.split("/")[0] for i in ids)
    for family in ("header-flip", "header-edit", "data-flip", "manifest-unsigned",
                   "manifest-attacker", "manifest-revoked", "signed-invalid", "signature",
                   "downgrade", "member-type", "member-name", "members", "truncated", "size-claim",
                   "oversize", "manifest-cap"):
        assert families[family] >= 2, (family, families)
    for name in MEMBERS:  # every member's header and data
        assert sum(i.startswith(f"header-flip/{name}/") for i in ids) == len(HEADER_FIELDS)
        assert sum(i.startswith(f"data-flip/{name}/") for i in ids) == len(POSITIONS)


def test_the_generator_without_an_attack_builds_bundles_that_install(kit: Kit, tmp_path: Path
                                                                     ) -> None:
    """The controls: each building block, changing nothing, gives a bundle the device installs,
    so every case is refused for its attack alone."""
    controls = {
        "reassembled": kit.bundle(*kit.parts()),
        "re-signed": kit.signed(kit.manifest_bytes),
        "re-signed-canonical": kit.signed(canonical(kit.manifest())),
        "re-headed": kit.bundle(*(tar_member(n, kit.data(n)) for n in MEMBERS)),
        "re-checksummed": _edit_header(kit, "model.bin", 100, 0),
        "size-claimed-as-is": _claiming(kit, "model.bin", kit.at("model.bin").size),
        "longer-than-claimed-by-0": kit.signed(kit.manifest_bytes, payload=_longer_than_claimed(
            kit, "model.bin", 0)),
        "manifest-padded-to-the-cap": kit.signed(_padded_manifest(kit, MAX_MANIFEST_BYTES)),
        # The end-of-archive blocks carry nothing signed; the content is complete without them.
        "without-end-of-archive": kit.v3[:kit.at(PAYLOAD[-1]).next],
    }
    assert controls["reassembled"] == kit.v3[:len(controls["reassembled"])]
    for what, data in controls.items():
        state = tmp_path / what
        shutil.copytree(kit.template, state)
        bundle = tmp_path / f"{what}.bundle"
        bundle.write_bytes(data)
        res = Store(state, kit.keyring).install(bundle)
        assert res.bundle.manifest.version == 3, what
    # The genuine v3 from a stream, and through the real CLI (its load check through the fake
    # runtime).
    shutil.copytree(kit.template, tmp_path / "stream")
    res = Store(tmp_path / "stream", kit.keyring).install(io.BufferedReader(io.BytesIO(kit.v3)))
    assert res.bundle.manifest.version == 3
    state = tmp_path / "cli"
    shutil.copytree(kit.template, state)
    bundle = tmp_path / "v3.bundle"
    bundle.write_bytes(kit.v3)
    assert cli_install(state, kit, bundle) == 0
    cur = Store(state, kit.keyring).current()
    assert cur is not None and cur.manifest.version == 3


def test_a_tampered_copy_of_the_serving_bundle_changes_nothing(kit: Kit, tmp_path: Path) -> None:
    """Offering the serving v2 again is a no-op before its payload is read: a tampered payload in
    that copy is never read, written or served."""
    b = kit.genuine["v2"]
    m = tar_layout(b)[2]
    state = tmp_path / "state"
    shutil.copytree(kit.template, state)
    (tmp_path / "attack.bundle").write_bytes(flip(b, m.data + 10))
    res = Store(state, kit.keyring).install(tmp_path / "attack.bundle")
    assert res.already_installed
    assert_serving_intact(state, kit, tmp_path)
