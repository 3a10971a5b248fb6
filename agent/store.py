"""The device's on-disk store: verified install with A/B pointers, rollback, and recovery.

Layout under ``state_dir``::

    slots/<id>/manifest.json, manifest.sig, payload/...   one folder per installed bundle
    pointers.json      {"current": id, "previous": id, "pending": bool,
                        "versions": {model_name: {"version": n, "digest": d}}}  written atomically
    staging/           extractions in progress; wiped on start, except the newest streamed
                       install's partial and its journal, kept to resume (agent/partial.py)
    lock               flock: one install/rollback at a time

``versions`` is the high-water mark: the highest version committed per model. It lives in the same
file as the pointers, so the commit that makes a bundle current raises it in the same rename: no
crash can leave a committed bundle without its high-water mark (which would let the older version be
replayed). Stores written by older agents kept it in ``versions.json``; it is read once, merged, and
removed after the first write of ``pointers.json``.

Install, in order: (1) read + verify the signed manifest before any payload, refusing downgrades,
(2) check arch, RAM and free disk, (3) stream the payload into staging while hashing, (4) fsync and
rename staging to its slot, (5) switch ``current``/``previous`` in one atomic write marked pending,
(6) run the load check, (7) commit (clear pending and raise the high-water mark, one atomic write)
or switch back. A kill at any point leaves the old or the new model whole: on the next start a
pending switch is undone, unreferenced slots and temp files are removed, and the high-water mark is
raised to every committed slot's version (repairing stores of older agents).

Every error of an install or a rollback says what serves now (``EdgepackError.serving``). Each
disk-changing step is a numbered crash point (agent/_crashpoint.py, a test hook).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from agent import partial
from agent._crashpoint import crash_point
from agent._fs import atomic_write, fsync_dir, fsync_tree
from agent.bundle import MANIFEST_NAME, SIGNATURE_NAME, Keyring, Manifest, verify_manifest
from agent.errors import EdgepackError, InstallError, InsufficientResourcesError, StoreError
from agent.profiles.schema import normalize_arch

log = logging.getLogger("agent.store")

GATE_NAME = "gate.json"  # in a slot: the gate report measured on it here
DISK_MARGIN_BYTES = 64 << 20  # keep this much free beyond the payload: logs and state must still fit
EventSink = Callable[[str, dict[str, Any]], None]
LoadCheck = Callable[["InstalledBundle"], dict[str, Any] | None]
StreamOpener = Callable[[int, Any], contextlib.AbstractContextManager[IO[bytes]]]


@dataclass(frozen=True)
class InstalledBundle:
    """A bundle in a slot: its verified manifest and where its payload lives."""

    slot: str
    digest: str  # sha256 hex of the exact manifest bytes
    manifest: Manifest
    path: Path  # the slot folder

    @property
    def payload_dir(self) -> Path:
        return self.path / "payload"

    @property
    def entrypoint(self) -> Path:
        return self.payload_dir / (self.manifest.target.entrypoint or self.manifest.files[0].path)

    @property
    def gate(self) -> dict[str, Any] | None:
        """The post-install gate report this device measured on this bundle (None: never gated)."""
        try:
            data = json.loads((self.path / GATE_NAME).read_bytes())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "slot": self.slot, "digest": self.digest, "model": m.model_name, "version": m.version,
            "profile": m.profile, "runtime": m.target.runtime, "format": m.target.format,
            "precision": m.target.precision, "quant": m.target.quant,
            "size_bytes": m.payload_bytes, "quality": m.quality, "gate": self.gate,
        }


@dataclass(frozen=True)
class InstallResult:
    bundle: InstalledBundle
    previous: InstalledBundle | None
    already_installed: bool = False
    check: dict[str, Any] | None = None


def _default_ram() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


class Store:
    """The device's bundle store.

    Args:
        state_dir: the agent's state folder (created if missing).
        keyring: keys whose signatures are trusted.
        arch: this device's architecture (default: this machine's).
        ram_total: returns total RAM in bytes (injected for tests).
        disk_free: returns free bytes at a path (injected for tests).
    """

    def __init__(
        self,
        state_dir: Path,
        keyring: Keyring,
        *,
        arch: str | None = None,
        ram_total: Callable[[], int] = _default_ram,
        disk_free: Callable[[Path], int] = lambda p: shutil.disk_usage(p).free,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.keyring = keyring
        self.arch = normalize_arch(arch or platform.machine())
        self._ram_total = ram_total
        self._disk_free = disk_free
        self.slots_dir = self.state_dir / "slots"
        self.staging_dir = self.state_dir / "staging"
        self._pointers = self.state_dir / "pointers.json"
        self._legacy_versions = self.state_dir / "versions.json"  # older agents' high-water file
        for d in (self.state_dir, self.slots_dir, self.staging_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.recovered: str | None = None
        with self._locked(busy_ok=True) as mine:
            # A live process holds the lock (an install streaming its download, say): its staging
            # and its pending switch are work in progress, not a crash to undo. Reads still work.
            if mine:
                self._recover()

    # --- state files -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, *, busy_ok: bool = False) -> Iterator[bool]:
        # Yields True with the lock held; False when another process holds it and busy_ok is set.
        fd = os.open(self.state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as e:
                if not busy_ok:
                    raise StoreError(f"another install or rollback is running on {self.state_dir}",
                                     hint="Wait for it to finish.") from e
                yield False
                return
            yield True
        finally:
            os.close(fd)  # closing releases the flock

    def _read_json(self, path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"state file {path} is unreadable: {e}",
                             hint="It is written atomically; was it edited by hand?") from e
        return data if isinstance(data, dict) else {}

    def _pointers_get(self) -> dict[str, Any]:
        """The pointers document, with ``versions`` always present (merged from an old store's
        ``versions.json`` when this store has not yet written it itself)."""
        p = self._read_json(self._pointers)
        if not isinstance(p.get("versions"), dict):
            p["versions"] = self._read_json(self._legacy_versions)
        return p

    def _pointers_set(self, current: str | None, previous: str | None, pending: bool,
                      versions: dict[str, Any]) -> None:
        doc = {"current": current, "previous": previous, "pending": pending, "versions": versions}
        atomic_write(self._pointers, json.dumps(doc, sort_keys=True).encode())
        if self._legacy_versions.exists():
            # Merged into the file just written (whose rename is durable): the old copy can go.
            self._legacy_versions.unlink()
            fsync_dir(self.state_dir)

    def _recover(self) -> None:
        # (a) extractions that never became slots, and temp files of atomic writes that were never
        # renamed: drop them; but keep the newest streamed install's partial, to resume from.
        partial.sweep(self.staging_dir, keep=partial.newest(self.staging_dir))
        for folder in (self.state_dir, *(d for d in self.slots_dir.iterdir() if d.is_dir())):
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
        # (b) a switch that was not committed (killed before its commit): undo it.
        p = self._pointers_get()
        versions: dict[str, Any] = p["versions"]
        changed = False
        if p.get("pending"):
            failed = p.get("current")
            prev = p.get("previous")
            # The failed slot recorded what "previous" was before it was switched in.
            prev_of_prev = (
                self._read_json(self._slot_dir(failed) / "previous.json").get("previous")
                if failed and self._slot_dir(failed).is_dir() else None
            )
            p.update(current=prev, previous=prev_of_prev, pending=False)
            changed = True
            self.recovered = f"an interrupted install of slot {failed} was undone"
        # (c) every committed slot's version is at most the high-water mark: a store written by an
        # older agent may have been killed between its commit and its separate versions write.
        for slot in (p.get("current"), p.get("previous")):
            try:
                b = self._load_slot(slot) if slot else None
            except EdgepackError:  # a damaged slot is reported when it is used, not at start
                b = None
            if b is not None:
                hw = versions.get(b.manifest.model_name)
                if not isinstance(hw, dict) or b.manifest.version > int(hw.get("version", -1)):
                    versions[b.manifest.model_name] = {"version": b.manifest.version,
                                                       "digest": b.digest}
                    changed = True
        if changed or self._legacy_versions.exists():
            self._pointers_set(p.get("current"), p.get("previous"), False, versions)
        if self.recovered:
            self.recovered += f"; serving {self.serving()}"
            log.warning(self.recovered)
        # (d) only the current and previous slots are kept: a slot renamed into place but never
        # switched to, or half removed by a garbage collection, is dropped.
        self._gc({p.get("current"), p.get("previous")})

    def _slot_dir(self, slot: str) -> Path:
        if not slot or "/" in slot or slot.startswith("."):
            raise StoreError(f"bad slot id {slot!r}")
        return self.slots_dir / slot

    def _load_slot(self, slot: str) -> InstalledBundle:
        d = self._slot_dir(slot)
        try:
            mb = (d / MANIFEST_NAME).read_bytes()
        except OSError as e:
            raise StoreError(f"slot {slot} is missing or damaged: {e}") from e
        # The slot's manifest was verified at install; it is read back from our own state.
        return InstalledBundle(slot, hashlib.sha256(mb).hexdigest(), Manifest.from_bytes(mb), d)

    # --- queries -------------------------------------------------------------------------------

    def current(self) -> InstalledBundle | None:
        """The bundle that serves now, or None."""
        cur = self._pointers_get().get("current")
        return self._load_slot(cur) if cur else None

    def previous(self) -> InstalledBundle | None:
        prev = self._pointers_get().get("previous")
        return self._load_slot(prev) if prev else None

    def list(self) -> list[tuple[InstalledBundle, str]]:
        """Every installed bundle with its role: "current", "previous" or "" (kept, unused)."""
        p = self._pointers_get()
        out = []
        for d in sorted(self.slots_dir.iterdir()):
            if not d.is_dir():
                continue
            role = "current" if d.name == p.get("current") else \
                "previous" if d.name == p.get("previous") else ""
            out.append((self._load_slot(d.name), role))
        return out

    def high_water(self, model_name: str) -> tuple[int | None, str | None]:
        """The highest version of ``model_name`` ever committed here and its manifest digest."""
        v = self._pointers_get()["versions"].get(model_name)
        if not isinstance(v, dict):
            return None, None
        return int(v["version"]), str(v["digest"])

    def kept_partial(self) -> dict[str, Any] | None:
        """The streamed install kept to resume (agent/partial.py): ``{"sha256", "size",
        "resumes_at_byte"}``, or None."""
        return partial.describe(self.staging_dir)

    def serving(self) -> str:
        """A human phrase for what serves now: ``"gemma v2 (slot ab12...)"`` or ``"nothing ..."``."""
        try:
            cur = self.current()
        except EdgepackError:
            return "unknown (the store is unreadable)"
        if cur is None:
            return "nothing (no model is installed)"
        return f"{cur.manifest.model_name} v{cur.manifest.version} (slot {cur.slot})"

    @contextlib.contextmanager
    def _telling_what_serves(self) -> Iterator[None]:
        # Every install/rollback error names what serves after it, read from the pointers then.
        try:
            yield
        except EdgepackError as e:
            e.serving = self.serving()
            raise

    # --- install -------------------------------------------------------------------------------

    def install(
        self,
        source: Path | IO[bytes],
        *,
        load_check: LoadCheck | None = None,
        on_event: EventSink | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> InstallResult:
        """Verify and install a bundle, then make it current (or keep the old one).

        Args:
            source: the bundle file, or a readable binary stream of it (staged as it is read, one
                copy on disk; a stream is read to its end before the switch, where a download
                checks its sha256). For a download that resumes, see :meth:`install_download`.
            load_check: loads the new bundle and returns measured figures; raising rolls back.
            on_event: receives ("verified" | "staged" | "switched" | "committed" |
                "rolled_back", details) as the install progresses.
            progress: called with byte counts while the payload is written.

        Returns:
            What was installed and what it replaced.

        Raises:
            UntrustedDataError: signature, manifest, archive, digest or downgrade refused.
            InsufficientResourcesError: not enough disk or RAM (checked before writing).
            InstallError: the load check failed; ``rolled_back`` is True and the old bundle serves.
            StoreError: another install runs, or the state is unreadable.
            Each error's ``serving`` names what serves after it (its ``diagnostics()`` says it).
        """
        with self._telling_what_serves(), self._locked(), contextlib.ExitStack() as stack:
            if isinstance(source, (str, Path)):
                try:
                    stream: IO[bytes] = stack.enter_context(open(source, "rb"))
                except OSError as e:
                    raise InstallError(f"cannot read bundle {source}: {e}", step="read") from e
                return self._install(stream, None, None, load_check, on_event, progress)
            return self._install(source, None, None, load_check, on_event, progress, to_end=True)

    def install_download(
        self,
        sha256: str,
        size: int,
        open_stream: StreamOpener,
        *,
        load_check: LoadCheck | None = None,
        on_event: EventSink | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> InstallResult:
        """:meth:`install` of a download that survives the agent (agent/partial.py): staged as it
        arrives, checkpointed, and when this download was interrupted before (the agent died, or
        the network gave up), continued from the last checkpoint instead of byte 0.

        Args:
            sha256: the whole download's sha256 (it names the kept partial).
            size: its length in bytes.
            open_stream: ``open_stream(start, prefix)`` returns a context manager of the download
                from byte ``start`` whose end check includes ``prefix`` (the hashlib sha256 of the
                bytes before ``start``, or None from byte 0), e.g. :func:`agent.fetch.open_download`.
            load_check, on_event, progress: as for :meth:`install`; ``on_event`` also receives
                ("resumed", {"from_byte", "staged_bytes"}).

        Raises:
            What :meth:`install` raises. A download that failed in a way that may pass (the
            network, a cancel) keeps what it staged and says so in the error's hint.
        """
        emit = on_event or (lambda _e, _d: None)
        with self._telling_what_serves(), self._locked():
            kept = partial.load(self.staging_dir, sha256, size)
            start, prefix = (kept.offset, kept.hasher.copy()) if kept else (0, None)
            with open_stream(start, prefix) as stream:
                if kept is not None:
                    emit("resumed", {"from_byte": kept.offset, "staged_bytes": kept.staged_bytes})
                return self._install(stream, (sha256, size), kept, load_check, on_event, progress,
                                     to_end=True)

    def _install(self, stream: IO[bytes], download: tuple[str, int] | None,
                 kept: partial.Partial | None, load_check: LoadCheck | None,
                 on_event: EventSink | None, progress: Callable[[int], None] | None,
                 *, to_end: bool = False) -> InstallResult:
        # Runs with the lock held. ``download``: stage into a partial that can resume; ``kept``:
        # the partial being resumed (its header was read at first, and is verified again here).
        emit = on_event or (lambda _e, _d: None)
        from agent.bundle.archive import BundleReader  # lazily: tarfile only when installing

        if kept is not None:
            reader = BundleReader(stream, resume=kept.resume)
            manifest_bytes, sig_bytes = kept.manifest_bytes, kept.sig_bytes
        else:
            reader = BundleReader(stream)
            # (1) verify the signed manifest before reading any payload.
            manifest_bytes, sig_bytes = reader.read_header()
        try:
            manifest, digest = self._verify(manifest_bytes, sig_bytes)
        except EdgepackError:
            if kept is not None:
                kept.drop()  # a key revoked, a newer version committed since: it will not resume
            raise
        slot = digest[:16]
        crash_point("verified")
        emit("verified", {"model": manifest.model_name, "version": manifest.version,
                          "digest": digest, "signer": manifest.signer_key_id})
        pointers = self._pointers_get()
        old_current = pointers.get("current")
        if kept is not None and (old_current == slot or self._slot_dir(slot).is_dir()):
            kept.drop()  # the bundle is here already
        if old_current == slot:
            log.info("bundle %s is already current", slot)
            return InstallResult(self._load_slot(slot), self.previous(), already_installed=True)
        # (2) resources before writing anything (what a resumed partial staged is on disk already).
        self._check_requirements(manifest, staged=kept.staged_bytes if kept else 0)
        # (3) stream into staging while hashing; (4) fsync and move into place.
        if not self._slot_dir(slot).is_dir():
            self._stage(reader, stream, manifest, manifest_bytes, sig_bytes, slot, download, kept,
                        progress, to_end)
        crash_point("staged")
        emit("staged", {"slot": slot, "bytes": manifest.payload_bytes})
        new = self._load_slot(slot)
        # Remember what this slot replaced so an undo after a crash can restore both pointers.
        atomic_write(new.path / "previous.json",
                     json.dumps({"previous": pointers.get("previous")}).encode())
        # (5) switch, marked pending until the load check passes; the high-water mark stays.
        versions: dict[str, Any] = pointers["versions"]
        self._pointers_set(slot, old_current, True, versions)
        emit("switched", {"slot": slot, "previous": old_current})
        # (6) load check; (7) commit or switch back.
        figures: dict[str, Any] | None = None
        if load_check is not None:
            crash_point("load check starts")
            try:
                figures = load_check(new)
            except Exception as e:  # any failure to serve the new bundle means roll back
                self._pointers_set(old_current, pointers.get("previous"), False, versions)
                crash_point("switched back")
                if slot != pointers.get("previous"):  # a reinstall of the previous bundle keeps it
                    shutil.rmtree(new.path, ignore_errors=True)
                reason = str(e)
                emit("rolled_back", {"slot": slot, "reason": reason, "serving": old_current})
                raise InstallError(
                    f"the new bundle failed its load check and was rolled back: {reason}",
                    rolled_back=True, step="load_check",
                    hint="The previous model serves again." if old_current else
                    "This was the first install here: there is no previous model to serve.",
                ) from e
            crash_point("load check passed")
        # The commit: pending cleared and the high-water mark raised in one atomic rename.
        hw = versions.get(manifest.model_name)
        if not isinstance(hw, dict) or manifest.version >= int(hw.get("version", -1)):
            versions = {**versions,
                        manifest.model_name: {"version": manifest.version, "digest": digest}}
        self._pointers_set(slot, old_current, False, versions)
        self._gc({slot, old_current})
        crash_point("committed")
        emit("committed", {"slot": slot, "version": manifest.version, "check": figures})
        prev = self._load_slot(old_current) if old_current else None
        return InstallResult(new, prev, check=figures)

    def _verify(self, manifest_bytes: bytes, sig_bytes: bytes) -> tuple[Manifest, str]:
        digest = hashlib.sha256(manifest_bytes).hexdigest()
        # The high-water mark is keyed by model name, which we only know after parsing;
        # verify once without it (signature first), then apply the version rule.
        manifest = verify_manifest(manifest_bytes, sig_bytes, self.keyring)
        hw_version, hw_digest = self.high_water(manifest.model_name)
        verify_manifest(manifest_bytes, sig_bytes, self.keyring, hw_version, hw_digest, digest)
        return manifest, digest

    def _stage(self, reader: Any, stream: IO[bytes], manifest: Manifest, manifest_bytes: bytes,
               sig_bytes: bytes, slot: str, download: tuple[str, int] | None,
               kept: partial.Partial | None, progress: Callable[[int], None] | None,
               to_end: bool) -> None:
        """Stream the payload into staging while hashing, then fsync it and rename it to its slot."""
        part = kept
        if part is None and download is not None:
            part = partial.create(self.staging_dir, *download, manifest_bytes, sig_bytes)
        staging = part.dir if part is not None else \
            Path(tempfile.mkdtemp(prefix=f"{slot}.", dir=self.staging_dir))
        try:
            reader.extract_payload(manifest, staging / "payload", progress,
                                   part.checkpoint if part is not None else None)
            if to_end:
                # Read a stream to its end (the tar's padding): a download checks the whole
                # file's length and sha256 there, before anything is switched.
                while stream.read(1 << 20):
                    pass
            atomic_write(staging / MANIFEST_NAME, manifest_bytes)
            atomic_write(staging / SIGNATURE_NAME, sig_bytes)
            fsync_tree(staging)
            os.replace(staging, self._slot_dir(slot))
            crash_point("staging renamed to its slot")
            fsync_dir(self.slots_dir)
        except BaseException as e:
            if part is not None and partial.keeps(e):
                if isinstance(e, EdgepackError) and part.resume is not None:
                    e.hint = (f"{part.staged_bytes} bytes of it are staged: sent again, the "
                              f"install continues from byte {part.offset}.")
                log.info("kept the partial install of %s to resume: %s", slot, e)
                raise
            if part is not None:
                part.drop()
            else:
                shutil.rmtree(staging, ignore_errors=True)
            if isinstance(e, OSError):
                raise InstallError(f"writing the bundle failed: {e}", step="stage",
                                   hint="Nothing was changed; check free disk space.") from e
            raise
        if part is not None:
            part.finished()

    def record_gate(self, slot: str, report: dict[str, Any]) -> None:
        """Keep the gate report measured on an installed bundle beside it (atomically)."""
        d = self._slot_dir(slot)
        if d.is_dir():
            atomic_write(d / GATE_NAME, json.dumps(report, sort_keys=True).encode())

    def _check_requirements(self, m: Manifest, *, staged: int = 0) -> None:
        req = m.requirements
        if req.arch and self.arch not in {normalize_arch(a) for a in req.arch}:
            raise InstallError(
                f"bundle is for {', '.join(req.arch)}; this device is {self.arch}", step="check",
                hint="Build for this device's profile (edgepack-agent probe shows it).",
            )
        ram = self._ram_total()
        if req.min_ram_bytes and ram < req.min_ram_bytes:
            raise InsufficientResourcesError(
                f"bundle needs {req.min_ram_bytes / 2**30:.2f} GiB RAM; device has "
                f"{ram / 2**30:.2f} GiB", needed=req.min_ram_bytes, available=ram, resource="ram",
            )
        payload = max(m.payload_bytes, req.min_disk_bytes)
        need = max(payload - staged, 0) + DISK_MARGIN_BYTES
        free = self._disk_free(self.state_dir)
        if free < need:
            # One copy: the payload is staged straight from the bundle (or its download stream).
            resumed = f", {staged / 2**20:.0f} MiB of it staged already" if staged else ""
            raise InsufficientResourcesError(
                f"bundle needs {need / 2**20:.0f} MiB free disk in {self.state_dir} "
                f"({payload / 2**20:.0f} MiB payload{resumed} + {DISK_MARGIN_BYTES >> 20} MiB "
                f"margin); {free / 2**20:.0f} MiB free", needed=need, available=free, resource="disk",
            )

    def _gc(self, keep: set[str | None]) -> None:
        # Keep current and previous only: edge disks are small, and rollback is one step.
        for d in sorted(self.slots_dir.iterdir()):
            if d.is_dir() and d.name not in keep:
                crash_point(f"removing unused slot {d.name}")
                shutil.rmtree(d, ignore_errors=True)

    # --- rollback / remove -----------------------------------------------------------------------

    def rollback(self) -> InstalledBundle:
        """Make the previous bundle current again (a local, explicit operation).

        Raises:
            StoreError: there is no previous bundle (its ``serving`` says what still serves).
        """
        with self._telling_what_serves(), self._locked():
            p = self._pointers_get()
            prev, cur = p.get("previous"), p.get("current")
            if not prev or not self._slot_dir(prev).is_dir():
                raise StoreError("there is no previous bundle to roll back to")
            crash_point("rollback starts")
            self._pointers_set(prev, cur, False, p["versions"])
            crash_point("rolled back")
            return self._load_slot(prev)

    def remove(self, slot: str) -> None:
        """Delete an installed bundle that is not current.

        Raises:
            StoreError: unknown slot, or it is the current one.
        """
        with self._locked():
            p = self._pointers_get()
            matches = [d.name for d in self.slots_dir.iterdir() if d.name.startswith(slot)]
            if len(matches) != 1:
                raise StoreError(f"no single installed bundle matches {slot!r}")
            name = matches[0]
            if name == p.get("current"):
                raise StoreError(f"{name} is the current bundle; install or roll back first")
            if name == p.get("previous"):
                self._pointers_set(p.get("current"), None, False, p["versions"])
            shutil.rmtree(self._slot_dir(name))


__all__ = ["InstallResult", "InstalledBundle", "Store"]
