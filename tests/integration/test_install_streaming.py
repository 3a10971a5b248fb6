"""An install over the network needs one copy of disk space (issue 12, item 7).

The installer streams the download (agent.fetch.open_download) straight into the store's verifying
stager, so nothing lands on disk but the slot. Tested against a real fleet.serve.BundleServer on
loopback, with a dropped connection, and on a real small tmpfs that fits one copy of the bundle
(plus the store's margin) but not two.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from bundlekit import make_manifest, partial_offset
from need import need

from agent._fs import file_digest
from agent.bundle import Keyring, SigningKey
from agent.errors import DigestMismatchError, InstallError, InsufficientResourcesError, UntrustedDataError
from agent.fetch import fetch
from agent.installer import Installer
from agent.protocol import InstallRequest, error_code
from agent.resident import ResidentModel
from agent.store import DISK_MARGIN_BYTES, Store
from fleet.serve import BundleServer
from packager.bundler import file_entries, write_bundle

pytestmark = pytest.mark.integration

MIB = 1 << 20
PAYLOAD = 48 * MIB  # one copy + margin: 112 MiB; two copies + margin: 160 MiB


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Keyring]:
    key = SigningKey.generate("stream-tests")
    d = tmp_path_factory.mktemp("served")
    src = tmp_path_factory.mktemp("src")
    files = {"model.bin": src / "model.bin", "tokenizer.json": src / "tokenizer.json"}
    files["model.bin"].write_bytes(os.urandom(PAYLOAD - 4096))
    files["tokenizer.json"].write_bytes(os.urandom(4096))
    write_bundle(d / "big.bundle", make_manifest(file_entries(files), key, version=1), key, files)
    return d, Keyring([key.public])


def request(server: BundleServer, bundle: Path, *, sha256: str | None = None) -> InstallRequest:
    digest = sha256 or hashlib.sha256(bundle.read_bytes()).hexdigest()
    return InstallRequest(url=server.url_for(bundle.name), sha256=digest, size=bundle.stat().st_size)


def installer(state: Path, keys: Keyring, events: list[tuple[str, dict[str, Any]]]) -> Installer:
    store = Store(state, keys, ram_total=lambda: 1 << 34)
    return Installer(store, ResidentModel(), events=lambda _job, stage, **d: events.append((stage, d)),
                     load_check=False)


@pytest.fixture
def small_disk(tmp_path: Path):
    """Mount a real tmpfs of the asked size (MiB); unmounted after the test."""
    mounts: list[Path] = []

    def mount(mib: int) -> Path:
        mnt = tmp_path / f"disk{mib}"
        mnt.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(mnt)],
                           capture_output=True, text=True)
        need(r.returncode == 0, f"cannot mount a small tmpfs here (needs root): {r.stderr.strip()}")
        mounts.append(mnt)
        return mnt

    yield mount
    for mnt in mounts:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_an_install_streams_into_its_slot_and_resumes_a_dropped_connection(served, tmp_path):
    folder, keys = served
    bundle = folder / "big.bundle"
    cut = 5 * MIB + 77
    events: list[tuple[str, dict[str, Any]]] = []
    with BundleServer(folder, drop_after_bytes=cut) as srv:
        inst = installer(tmp_path / "state", keys, events)
        out = inst.install(request(srv, bundle), "job-1")
        assert srv.wait_requests(2)
        assert [r.range for r in srv.requests if r.method == "GET"] == [None, f"bytes={cut}-"]
        assert srv.bytes_served == bundle.stat().st_size  # nothing downloaded twice
    assert out["installed"]["version"] == 1
    stages = [s for s, _d in events]
    assert stages[0] == "downloading" and "verified" in stages and stages[-1] == "committed"
    assert not (tmp_path / "state" / "downloads").exists()  # no second copy, ever
    assert list(inst.store.staging_dir.iterdir()) == []


def test_one_copy_of_disk_space_is_enough(served, small_disk):
    folder, keys = served
    bundle = folder / "big.bundle"
    size = bundle.stat().st_size
    mnt = small_disk(136)  # one copy + the margin fits (112 MiB); two copies do not (160 MiB)
    free = shutil.disk_usage(mnt).free
    assert PAYLOAD + DISK_MARGIN_BYTES <= free < 2 * size + DISK_MARGIN_BYTES
    used: list[int] = []
    events: list[tuple[str, dict[str, Any]]] = []
    with BundleServer(folder) as srv:
        # The old way on this disk: download to a file, then stage it. The second copy is refused.
        fetch(srv.url_for(bundle.name), mnt / "dl" / "big.bundle", sha256=request(srv, bundle).sha256,
              size=size)
        with pytest.raises(InsufficientResourcesError):
            Store(mnt / "old", keys, ram_total=lambda: 1 << 34).install(mnt / "dl" / "big.bundle")
        shutil.rmtree(mnt / "dl")
        shutil.rmtree(mnt / "old")
        # Streamed: it fits.
        store = Store(mnt / "state", keys, ram_total=lambda: 1 << 34)

        def event(_job: str, stage: str, **d: Any) -> None:
            events.append((stage, d))
            used.append(shutil.disk_usage(mnt).used)

        out = Installer(store, ResidentModel(), events=event, load_check=False).install(
            request(srv, bundle), "job-1")
    assert out["installed"]["version"] == 1 and events[-1][0] == "committed"
    assert "installed" in [s for s, _d in events]  # measured once the payload was all staged
    assert max(used) < size + 8 * MIB  # one copy of the bundle on the disk at every step


def test_a_bundle_that_does_not_fit_once_is_refused_saying_what_it_needs(served, small_disk):
    folder, keys = served
    bundle = folder / "big.bundle"
    mnt = small_disk(100)  # less than one copy + the margin
    events: list[tuple[str, dict[str, Any]]] = []
    with BundleServer(folder) as srv:
        inst = installer(mnt / "state", keys, events)
        with pytest.raises(InsufficientResourcesError) as e:
            inst.install(request(srv, bundle), "job-1")
        served_bytes = srv.bytes_served
    msg = str(e.value)
    assert e.value.needed == PAYLOAD + DISK_MARGIN_BYTES
    assert f"{(PAYLOAD + DISK_MARGIN_BYTES) >> 20} MiB free disk" in msg
    assert f"{PAYLOAD >> 20} MiB payload + {DISK_MARGIN_BYTES >> 20} MiB margin" in msg
    assert "Serving now: nothing (no model is installed)." in e.value.diagnostics()
    # Refused after the manifest, not after the download: most of the bundle was never sent.
    assert served_bytes < bundle.stat().st_size // 2
    assert list((mnt / "state" / "staging").iterdir()) == []


def test_a_download_of_another_file_is_refused_before_the_switch(served, tmp_path):
    """The signed bundle is fine, but it is not the file the command named: nothing switches."""
    folder, keys = served
    bundle = folder / "big.bundle"
    events: list[tuple[str, dict[str, Any]]] = []
    with BundleServer(folder) as srv:
        inst = installer(tmp_path / "state", keys, events)
        with pytest.raises(DigestMismatchError):
            inst.install(request(srv, bundle, sha256="0" * 64), "job-1")
    assert inst.store.current() is None and list(inst.store.staging_dir.iterdir()) == []
    assert list(inst.store.slots_dir.iterdir()) == []
    assert "installed" not in [s for s, _d in events]


# --- the stream itself ----------------------------------------------------------------------------


@pytest.fixture
def blob(tmp_path: Path) -> tuple[Path, bytes, str]:
    data = os.urandom(3 * MIB + 12345)
    (tmp_path / "blob.bin").write_bytes(data)
    return tmp_path, data, hashlib.sha256(data).hexdigest()


def read_all(url: str, digest: str, size: int) -> bytes:
    from agent.fetch import open_download

    with open_download(url, sha256=digest, size=size, backoff_base=0.01, timeout=10.0) as s:
        return s.read()


def test_a_server_ignoring_range_after_a_drop_is_skipped_to_where_the_reader_was(blob):
    folder, data, digest = blob
    with BundleServer(folder, drop_after_bytes=MIB + 5, ignore_range=True) as srv:
        assert read_all(srv.url_for("blob.bin"), digest, len(data)) == data
        assert srv.wait_requests(2)
        assert [r.range for r in srv.requests if r.method == "GET"] == [None, f"bytes={MIB + 5}-"]


def test_a_stream_checks_the_length_and_digest_at_its_end(blob):
    folder, data, digest = blob
    url = (folder / "blob.bin").as_uri()
    assert read_all(url, digest, len(data)) == data  # file:// streams the same way
    with pytest.raises(DigestMismatchError, match="offers"):
        read_all(url, digest, len(data) - 1)  # one byte more than announced: refused
    with pytest.raises(DigestMismatchError, match="expected"):
        read_all(url, digest, len(data) + 1)  # one byte short
    with BundleServer(folder) as srv, pytest.raises(DigestMismatchError, match="sha256"):
        read_all(srv.url_for("blob.bin"), "1" * 64, len(data))


# --- a download that outlives its agent (agent/partial.py) ---------------------------------------


def stopped_mid_download(state: Path, keys: Keyring, srv: BundleServer, bundle: Path,
                         at_least: int, events: list[tuple[str, dict[str, Any]]] | None = None
                         ) -> tuple[Store, BaseException]:
    """Install from a server that stalls; once the journal says ``at_least`` bytes are
    checkpointed, stop the installer as SIGTERM does (bounded: 60 s). Returns the store and the
    install's error; the stalled response is cut and recorded."""
    store = Store(state, keys, ram_total=lambda: 1 << 34)
    stop = threading.Event()
    sink = events if events is not None else []
    inst = Installer(store, ResidentModel(), events=lambda _j, st, **d: sink.append((st, d)),
                     load_check=False, stop=stop, download_timeout=1.0)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            inst.install(request(srv, bundle), "job-1")
        except BaseException as e:  # the test inspects it
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert srv.wait_stalled(60)
    deadline = time.monotonic() + 60
    while partial_offset(store.staging_dir) < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
    assert partial_offset(store.staging_dir) >= at_least
    stop.set()  # what SIGTERM does: the download is cancelled
    t.join(30)
    assert not t.is_alive() and len(errors) == 1
    srv.release()
    assert srv.wait_requests(1)
    return store, errors[0]


def test_an_install_stopped_mid_download_keeps_what_it_staged_and_resumes_when_sent_again(
        served, tmp_path):
    folder, keys = served
    bundle = folder / "big.bundle"
    size = bundle.stat().st_size
    events: list[tuple[str, dict[str, Any]]] = []
    with BundleServer(folder, stall_after_bytes=30 * MIB) as srv:
        store, err = stopped_mid_download(tmp_path / "state", keys, srv, bundle, 16 * MIB, events)
        assert isinstance(err, InstallError) and error_code(err) == "interrupted"
        kept = partial_offset(store.staging_dir)
        assert kept >= 16 * MIB and f"continues from byte {kept}" in err.diagnostics()
        assert "Serving now: nothing (no model is installed)." in err.diagnostics()
        assert events[-1][0] == "failed" and events[-1][1]["code"] == "interrupted"
        # Sent again (a new agent process: a new store and installer on the same state folder).
        events.clear()
        store = Store(tmp_path / "state", keys, ram_total=lambda: 1 << 34)
        inst = Installer(store, ResidentModel(), events=lambda _j, st, **d: events.append((st, d)),
                         load_check=False)
        served_before = srv.bytes_served
        out = inst.install(request(srv, bundle), "job-2")
        assert srv.requests[-1].range == f"bytes={kept}-"
        assert srv.bytes_served - served_before == size - kept  # nothing staged comes again
    assert out["installed"]["version"] == 1
    resumed = [d for s, d in events if s == "downloading" and "from_byte" in d]
    assert resumed and resumed[0]["from_byte"] == kept
    assert list(store.staging_dir.iterdir()) == []
    for f in store.current().manifest.files:  # type: ignore[union-attr]
        assert file_digest(store.current().payload_dir / f.path).sha256 == f.sha256  # type: ignore[union-attr]


def test_a_kept_partial_that_does_not_add_up_is_dropped_and_the_install_starts_again(served, tmp_path):
    """Staged bytes changed on disk, or the key revoked since: never installed from the partial."""
    folder, keys = served
    bundle = folder / "big.bundle"
    size = bundle.stat().st_size
    for damage in ("flip a staged byte", "signer no longer trusted", "journal garbled"):
        state = tmp_path / damage.replace(" ", "-")
        with BundleServer(folder, stall_after_bytes=30 * MIB) as srv:
            store, _err = stopped_mid_download(state, keys, srv, bundle, 16 * MIB)
            part = next(p for p in store.staging_dir.iterdir() if p.is_dir())
            trust = keys
            if damage == "flip a staged byte":
                with open(part / "payload" / "model.bin", "r+b") as f:
                    f.seek(MIB)
                    b = f.read(1)
                    f.seek(MIB)
                    f.write(bytes([b[0] ^ 1]))
            elif damage == "journal garbled":
                part.with_name(part.name + ".journal.json").write_bytes(b"{not json")
            else:
                trust = Keyring([SigningKey.generate("other").public])
            store = Store(state, trust, ram_total=lambda: 1 << 34)
            inst = Installer(store, ResidentModel(), events=lambda *_a, **_k: None, load_check=False)
            served_before = srv.bytes_served
            if damage == "signer no longer trusted":
                with pytest.raises(UntrustedDataError):
                    inst.install(request(srv, bundle), "job-2")
                assert list(store.staging_dir.iterdir()) == []  # dropped, not kept to retry
                assert store.current() is None
                continue
            out = inst.install(request(srv, bundle), "job-2")
            assert srv.requests[-1].range is None, damage  # from byte 0
            assert srv.bytes_served - served_before == size
            assert out["installed"]["version"] == 1 and list(store.staging_dir.iterdir()) == []


def test_only_one_partial_is_kept(served, tmp_path, make_bundle):
    """Edge disks are small: starting another download drops the partial of an abandoned one."""
    folder, keys = served
    bundle = folder / "big.bundle"
    with BundleServer(folder, stall_after_bytes=30 * MIB) as srv:
        store, _err = stopped_mid_download(tmp_path / "state", keys, srv, bundle, 16 * MIB)
    assert len(list(store.staging_dir.iterdir())) == 2  # the partial and its journal
    other = make_bundle(version=1)
    shutil.copy(other, folder / "other.bundle")
    try:
        # Signed by another key: refused, and the abandoned partial is gone all the same.
        with BundleServer(folder) as srv, pytest.raises(UntrustedDataError):
            Installer(Store(tmp_path / "state", keys, ram_total=lambda: 1 << 34), ResidentModel(),
                      events=lambda *_a, **_k: None, load_check=False).install(
                request(srv, folder / "other.bundle"), "job-3")
    finally:
        (folder / "other.bundle").unlink()
    assert list(store.staging_dir.iterdir()) == []
