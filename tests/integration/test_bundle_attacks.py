"""Attacks on the bundle, each through the real verifier and installer with real signatures.

Every test installs a good v1 first, then offers a hostile bundle and checks (a) the right error
class, (b) v1 is still current with its files intact, (c) nothing was left in staging or slots.
Where the refusal could come from the bundle being broken some other way, the test also shows the
same bundle without the attack installs (the positive control); ``rewrite`` itself is checked by
``test_rewrite_of_a_good_bundle_without_edits_installs``.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest
from bundlekit import make_manifest, raw_tar, read_members, reg

from agent.bundle import FileEntry, Keyring, SigningKey, sign_manifest
from agent.errors import (
    BundleFormatError,
    DigestMismatchError,
    DowngradeError,
    InstallError,
    InsufficientResourcesError,
    ManifestError,
    SignatureError,
    UntrustedDataError,
)
from agent.store import Store

pytestmark = pytest.mark.integration


@pytest.fixture
def store(tmp_path: Path, keyring: Keyring, make_bundle) -> Store:
    s = Store(tmp_path / "state", keyring)
    s.install(make_bundle({"model.bin": b"good weights " * 4096, "tok/vocab.txt": b"a b c"},
                          version=1))
    return s


def assert_v1_intact(store: Store) -> None:
    cur = store.current()
    assert cur is not None and cur.manifest.version == 1
    for f in cur.manifest.files:
        data = (cur.payload_dir / f.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == f.sha256
    assert list(store.staging_dir.iterdir()) == []
    assert [d.name for d in store.slots_dir.iterdir()] == [cur.slot]


def rewrite(bundle: Path, out: Path, edit) -> Path:
    members = read_members(bundle)
    new = edit(members)
    out.write_bytes(raw_tar([reg(n, d) for n, d in new]))
    return out


def test_rewrite_of_a_good_bundle_without_edits_installs(store, make_bundle, tmp_path):
    # The control for every attack built with rewrite(): re-packing alone breaks nothing.
    good = make_bundle({"model.bin": b"new weights " * 4096, "tok/vocab.txt": b"x y z"}, version=2)
    same = rewrite(good, tmp_path / "same.bundle", lambda ms: ms)
    assert store.install(same).bundle.manifest.version == 2


def test_bit_flip_in_each_payload_file_is_refused(store, make_bundle, tmp_path):
    good = make_bundle({"model.bin": b"new weights " * 4096, "tok/vocab.txt": b"x y z"}, version=2)
    for target in ("model.bin", "tok/vocab.txt"):
        def flip(members, target=target):
            out = []
            for n, d in members:
                if n == target:
                    d = bytearray(d)
                    d[len(d) // 2] ^= 0x01
                    d = bytes(d)
                out.append((n, d))
            return out
        bad = rewrite(good, tmp_path / f"flip-{target.replace('/', '_')}.bundle", flip)
        with pytest.raises(DigestMismatchError) as e:
            store.install(bad)
        assert e.value.path == target
        assert_v1_intact(store)


def test_edited_manifest_is_refused(store, make_bundle, tmp_path):
    good = make_bundle(version=2)

    def edit(members):
        m = json.loads(members[0][1])
        m["target"]["quant"] = "F16"  # any change to the signed bytes
        return [("manifest.json", json.dumps(m).encode()), *members[1:]]

    with pytest.raises(SignatureError, match="does not match the manifest"):
        store.install(rewrite(good, tmp_path / "edited.bundle", edit))
    assert_v1_intact(store)


def test_edited_manifest_with_matching_payload_hash_is_refused(store, make_bundle, tmp_path):
    """An attacker swaps the payload AND fixes its hash in the manifest: the signature breaks."""
    good = make_bundle(version=2)
    evil = b"evil weights" * 100

    def edit(members):
        m = json.loads(members[0][1])
        m["files"][0].update(size=len(evil), sha256=hashlib.sha256(evil).hexdigest())
        return [("manifest.json", json.dumps(m).encode()), members[1], ("model.bin", evil)]

    with pytest.raises(SignatureError):
        store.install(rewrite(good, tmp_path / "swap.bundle", edit))
    assert_v1_intact(store)


def test_signature_by_untrusted_key_is_refused(store, make_bundle, tmp_path):
    attacker = SigningKey.generate("attacker")
    bundle = make_bundle(version=2, key=attacker)
    with pytest.raises(SignatureError, match="untrusted key"):
        store.install(bundle)
    assert_v1_intact(store)
    # The control: the bundle itself is sound; only the key is not trusted here.
    assert Store(tmp_path / "other", Keyring([attacker.public])).install(bundle).bundle.manifest.version == 2


def test_untrusted_key_claiming_trusted_key_id_is_refused(store, make_bundle, signing_key, tmp_path):
    attacker = SigningKey.generate("attacker")
    good = make_bundle(version=2, key=attacker)

    def relabel(members):
        sig = json.loads(members[1][1])
        sig["signatures"][0]["key_id"] = signing_key.key_id
        return [members[0], ("manifest.sig", json.dumps(sig).encode()), *members[2:]]

    with pytest.raises(SignatureError):
        store.install(rewrite(good, tmp_path / "relabel.bundle", relabel))
    assert_v1_intact(store)


def test_missing_signature_is_refused(store, make_bundle, tmp_path):
    good = make_bundle(version=2)
    with pytest.raises(SignatureError, match="no signature"):
        store.install(rewrite(good, tmp_path / "nosig.bundle",
                              lambda ms: [ms[0], *ms[2:]]))
    assert_v1_intact(store)


def test_empty_signature_is_refused(store, make_bundle, tmp_path):
    good = make_bundle(version=2)
    with pytest.raises(SignatureError):
        store.install(rewrite(good, tmp_path / "emptysig.bundle",
                              lambda ms: [ms[0], ("manifest.sig", b""), *ms[2:]]))
    assert_v1_intact(store)


def test_downgrade_is_refused(tmp_path, keyring, make_bundle):
    store = Store(tmp_path / "state", keyring)
    store.install(make_bundle(version=5))
    with pytest.raises(DowngradeError) as e:
        store.install(make_bundle(version=4))
    assert (e.value.offered, e.value.installed) == (4, 5)
    assert store.current().manifest.version == 5  # type: ignore[union-attr]


def test_replay_of_an_older_bundle_is_refused(store, make_bundle):
    """The genuine, validly signed v1 file is replayed after v2 was installed."""
    v1_again = make_bundle({"model.bin": b"good weights " * 4096, "tok/vocab.txt": b"a b c"},
                           version=1)
    store.install(make_bundle(version=2))
    with pytest.raises(DowngradeError):
        store.install(v1_again)
    assert store.current().manifest.version == 2  # type: ignore[union-attr]
    # Rollback is the local, explicit way back, and it is allowed.
    assert store.rollback().manifest.version == 1


def test_reused_version_with_other_content_is_refused(store, make_bundle):
    with pytest.raises(DowngradeError, match="never reused"):
        store.install(make_bundle({"model.bin": b"other"}, version=1))
    assert_v1_intact(store)


def test_tar_member_outside_the_manifest_is_refused(store, make_bundle, tmp_path):
    good = make_bundle(version=2)
    with pytest.raises(BundleFormatError, match="not listed"):
        store.install(rewrite(good, tmp_path / "extra.bundle",
                              lambda ms: [*ms, ("payload.sh", b"rm -rf /")]))
    assert_v1_intact(store)


@pytest.mark.parametrize("evil", ["../escape.bin", "tok/../../escape.bin", "/etc/evil", "./model.bin"])
def test_path_traversal_member_is_refused(store, make_bundle, tmp_path, evil):
    good = make_bundle(version=2)
    with pytest.raises(BundleFormatError, match="unsafe member path"):
        store.install(rewrite(good, tmp_path / "trav.bundle", lambda ms: [*ms[:2], (evil, b"x")]))
    assert_v1_intact(store)
    assert not (tmp_path / "escape.bin").exists() and not (store.state_dir / "escape.bin").exists()


def _link_bundle(good: Path, kind: bytes) -> bytes:
    ms = read_members(good)
    link = tarfile.TarInfo("model.bin")
    link.type = kind
    link.linkname = "/etc/passwd"
    return raw_tar([reg(*ms[0]), reg(*ms[1]), (link, None)])


def test_symlink_member_is_refused(store, make_bundle, tmp_path):
    bad = tmp_path / "symlink.bundle"
    bad.write_bytes(_link_bundle(make_bundle(version=2), tarfile.SYMTYPE))
    with pytest.raises(BundleFormatError, match="symlink"):
        store.install(bad)
    assert_v1_intact(store)


def test_hardlink_member_is_refused(store, make_bundle, tmp_path):
    bad = tmp_path / "hardlink.bundle"
    bad.write_bytes(_link_bundle(make_bundle(version=2), tarfile.LNKTYPE))
    with pytest.raises(BundleFormatError, match="hard link"):
        store.install(bad)
    assert_v1_intact(store)


def test_size_mismatch_is_refused(store, make_bundle, tmp_path):
    good = make_bundle(version=2)
    with pytest.raises(DigestMismatchError, match="bytes, manifest says"):
        store.install(rewrite(good, tmp_path / "size.bundle",
                              lambda ms: [*ms[:2], (ms[2][0], ms[2][1] + b"appended")]))
    assert_v1_intact(store)


def test_truncated_bundle_is_refused(store, make_bundle, tmp_path):
    whole = make_bundle(version=2)
    data = whole.read_bytes()
    bad = tmp_path / "trunc.bundle"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(UntrustedDataError):
        store.install(bad)
    assert_v1_intact(store)
    assert store.install(whole).bundle.manifest.version == 2  # the control: the whole file installs


def test_missing_listed_file_is_refused(store, make_bundle, tmp_path):
    good = make_bundle({"a.bin": b"a", "b.bin": b"b"}, version=2)
    with pytest.raises(BundleFormatError, match="missing listed files"):
        store.install(rewrite(good, tmp_path / "missing.bundle", lambda ms: ms[:3]))
    assert_v1_intact(store)


def test_duplicate_member_is_refused(store, make_bundle, tmp_path):
    good = make_bundle(version=2)
    with pytest.raises(BundleFormatError, match="twice"):
        store.install(rewrite(good, tmp_path / "dup.bundle", lambda ms: [*ms, ms[2]]))
    assert_v1_intact(store)


def test_payload_before_manifest_is_refused(store, make_bundle, tmp_path):
    good = make_bundle(version=2)
    with pytest.raises(BundleFormatError, match="must come first"):
        store.install(rewrite(good, tmp_path / "order.bundle", lambda ms: [ms[2], ms[0], ms[1]]))
    assert_v1_intact(store)


def test_not_a_tar_is_refused(store, tmp_path):
    bad = tmp_path / "garbage.bundle"
    bad.write_bytes(b"\x7fELF" + bytes(5000))
    with pytest.raises(UntrustedDataError):
        store.install(bad)
    assert_v1_intact(store)


def test_manifest_with_traversal_path_signed_by_trusted_key_is_refused(store, signing_key, tmp_path):
    """Even a correctly signed manifest cannot name a path outside the slot."""
    m = make_manifest([FileEntry("model.bin", 1, "0" * 64)], signing_key, version=2).to_dict()
    m["files"][0]["path"] = "../../escape"
    mb = json.dumps(m).encode()
    bad = tmp_path / "signed-trav.bundle"
    bad.write_bytes(raw_tar([reg("manifest.json", mb), reg("manifest.sig", sign_manifest(mb, signing_key)),
                             reg("../../escape", b"x")]))
    with pytest.raises(ManifestError):
        store.install(bad)
    assert_v1_intact(store)


def test_bundle_for_another_arch_is_refused(store, make_bundle):
    with pytest.raises(InstallError, match="this device is"):
        store.install(make_bundle(version=2, arch=("riscv64",)))
    assert_v1_intact(store)
    # The control: the same requirement naming this device's arch is met.
    assert store.install(make_bundle(version=2, arch=("riscv64", store.arch))).bundle.manifest.version == 2


def test_not_enough_ram_is_refused_before_writing(store, make_bundle):
    with pytest.raises(InsufficientResourcesError) as e:
        store.install(make_bundle(version=2, min_ram=1 << 50))
    assert e.value.resource == "ram"
    assert_v1_intact(store)
    assert store.install(make_bundle(version=2, min_ram=1 << 20)).bundle.manifest.version == 2  # control


def test_full_disk_is_refused_before_writing(tmp_path, keyring, make_bundle):
    store = Store(tmp_path / "state", keyring)
    store.install(make_bundle(version=1))
    tight = Store(tmp_path / "state", keyring, disk_free=lambda _p: 1024)
    v2 = make_bundle(version=2)
    with pytest.raises(InsufficientResourcesError) as e:
        tight.install(v2)
    assert e.value.resource == "disk"
    assert_v1_intact(tight)
    assert store.install(v2).bundle.manifest.version == 2  # the control: with the real free space


def test_failed_load_check_rolls_back_to_previous(store, make_bundle):
    def broken(_bundle):
        raise RuntimeError("model does not load")

    with pytest.raises(InstallError) as e:
        store.install(make_bundle(version=2), load_check=broken)
    assert e.value.rolled_back and "does not load" in str(e.value)
    assert_v1_intact(store)
    # The failed version did not raise the high-water mark: a fixed v2 can still install.
    assert store.install(make_bundle({"model.bin": b"fixed"}, version=2)).bundle.manifest.version == 2
