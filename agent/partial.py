"""A streamed install that survives the agent: its staging and journal, kept to resume from.

An install over the network stages the download straight into a folder (one copy of disk, see
agent/store.py). When the agent dies mid-download (power cut, OOM kill, ``systemctl stop``) or the
download gives up after its retries, that folder is kept with a journal of the archive up to the
last checkpoint (:class:`agent.bundle.archive.Segment`); the install of the same download sent
again continues from that byte with ``Range`` instead of byte 0. Layout under ``staging/``::

    partial-<sha256>/                  manifest.json, manifest.sig, payload/... as a slot has them
    partial-<sha256>.journal.json      {"format", "sha256", "size", "segments": [...]} atomic

The journal lives beside the folder, not in it, so the folder is renamed into its slot as it is and
the journal removed after: a kill in between leaves a journal without a folder, which is dropped.

Nothing kept here is trusted: a resumed install verifies the kept manifest's signature again
(against the keyring and high-water mark of now), every complete file's length and sha256 against
it, and re-hashes the journal's archive bytes and the staged files to continue the whole
download's sha256, checked at its end like a fresh one. Anything that does not add up drops the
partial and the install starts from byte 0. One partial at most is kept: an install of another
download drops it (edge disks are small).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent._fs import atomic_write, read_capped
from agent.bundle.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_BYTES,
    SIGNATURE_NAME,
    Manifest,
    check_member_path,
)
from agent.errors import DownloadRestartError, EdgepackError, InstallError, StoreError, TransportError

if TYPE_CHECKING:  # the archive module (tarfile) is imported only when an install runs
    from agent.bundle.archive import Resume, Segment

log = logging.getLogger("agent.partial")

PREFIX = "partial-"
JOURNAL_SUFFIX = ".journal.json"
FORMAT = 1
# The first segment's head carries the manifest and its signature; the rest are tar headers.
MAX_JOURNAL_BYTES = 4 * (MAX_MANIFEST_BYTES + MAX_SIGNATURE_BYTES)


@dataclass
class Partial:
    """One kept streamed install: its folder, the verified-at-first header, and where it stands."""

    dir: Path
    sha256: str
    size: int
    manifest_bytes: bytes
    sig_bytes: bytes
    resume: Resume | None = None  # None: nothing is staged yet
    hasher: Any = None  # sha256 of the download's first resume.offset bytes

    @property
    def journal(self) -> Path:
        return self.dir.with_name(self.dir.name + JOURNAL_SUFFIX)

    @property
    def offset(self) -> int:
        return self.resume.offset if self.resume else 0

    @property
    def staged_bytes(self) -> int:
        return sum(s.staged for s in self.resume.segments) if self.resume else 0

    def checkpoint(self, segments: list[Segment]) -> None:
        """Persist the segments (their staged bytes are fsynced): a restart resumes from here."""
        doc = {"format": FORMAT, "sha256": self.sha256, "size": self.size,
               "segments": [{"head": base64.b64encode(s.head).decode(), "path": s.path,
                             "staged": s.staged, "complete": s.complete,
                             "staged_sha256": s.staged_sha256} for s in segments]}
        atomic_write(self.journal, json.dumps(doc, separators=(",", ":")).encode())
        from agent.bundle.archive import Resume  # imported already: an extraction is running

        # What the journal now says (copies: the reader goes on mutating its segments).
        self.resume = Resume([dataclasses.replace(s) for s in segments])

    def drop(self) -> None:
        self.journal.unlink(missing_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def finished(self) -> None:
        """The folder became a slot: the journal describes nothing any more."""
        self.journal.unlink(missing_ok=True)


def folder(staging_dir: Path, sha256: str) -> Path:
    return staging_dir / f"{PREFIX}{sha256}"


def create(staging_dir: Path, sha256: str, size: int, manifest_bytes: bytes,
           sig_bytes: bytes) -> Partial:
    """A new partial for a download whose header was just verified (any other one is dropped)."""
    sweep(staging_dir, keep=None)
    d = folder(staging_dir, sha256)
    d.mkdir()
    atomic_write(d / MANIFEST_NAME, manifest_bytes)
    atomic_write(d / SIGNATURE_NAME, sig_bytes)
    return Partial(d, sha256, size, manifest_bytes, sig_bytes)


def load(staging_dir: Path, sha256: str, size: int) -> Partial | None:
    """The kept partial of this download, re-hashed and ready to resume; None when there is none
    or it does not add up (then it is dropped). Any other kept partial is dropped too."""
    d = folder(staging_dir, sha256)
    sweep(staging_dir, keep=d.name)
    if not d.is_dir():
        return None
    p = Partial(d, sha256, size, b"", b"")
    try:
        _load(p)
    except (OSError, ValueError, KeyError, TypeError, EdgepackError) as e:
        log.warning("dropping the kept partial install %s: %s", d.name, e)
        p.drop()
        return None
    log.info("resuming the install of %s at byte %d of %d (%d bytes staged)", sha256[:16],
             p.offset, size, p.staged_bytes)
    return p


def _read_journal(path: Path) -> tuple[dict[str, Any], list[Segment]]:
    """A journal as written by :meth:`Partial.checkpoint`: the document and its segments.

    Raises:
        OSError, ValueError, KeyError, TypeError, StoreError: unreadable or malformed.
    """
    from agent.bundle.archive import Segment

    doc = json.loads(read_capped(path, MAX_JOURNAL_BYTES, StoreError, "a partial's journal"))
    segments = [Segment(base64.b64decode(s["head"], validate=True), str(s["path"]), int(s["staged"]),
                        s["complete"] is True, str(s.get("staged_sha256", "")))
                for s in doc["segments"]]
    return doc, segments


def _load(p: Partial) -> None:
    from agent.bundle.archive import CHUNK, Resume

    doc, segments = _read_journal(p.journal)
    if doc.get("format") != FORMAT or doc.get("sha256") != p.sha256 or doc.get("size") != p.size:
        raise ValueError("its journal is for another download")
    p.manifest_bytes = read_capped(p.dir / MANIFEST_NAME, MAX_MANIFEST_BYTES, StoreError, "a manifest")
    p.sig_bytes = read_capped(p.dir / SIGNATURE_NAME, MAX_SIGNATURE_BYTES, StoreError, "a signature")
    entries = {f.path: f for f in Manifest.from_bytes(p.manifest_bytes).files}  # verified later
    if not segments or any(not s.complete for s in segments[:-1]):
        raise ValueError("its journal has no complete prefix")
    hasher, tail = hashlib.sha256(), None
    payload = p.dir / "payload"
    for s in segments:
        check_member_path(s.path)
        entry = entries[s.path]
        if not 0 <= s.staged <= entry.size or (s.complete and s.staged != entry.size):
            raise ValueError(f"{s.path}: {s.staged} bytes staged of {entry.size}")
        hasher.update(s.head)
        file_hash = hashlib.sha256()
        with open(payload / s.path, "rb") as f:  # fewer bytes than staged: damaged, dropped
            if s.complete and os.fstat(f.fileno()).st_size != s.staged:
                raise ValueError(f"{s.path} changed size since it was staged")
            left = s.staged
            while left:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    raise ValueError(f"{s.path} is shorter than its {s.staged} staged bytes")
                hasher.update(chunk)
                file_hash.update(chunk)
                left -= len(chunk)
        if file_hash.hexdigest() != (entry.sha256 if s.complete else s.staged_sha256):
            raise ValueError(f"{s.path} no longer matches what was staged")
        tail = None if s.complete else file_hash
    p.resume, p.hasher = Resume(segments, tail), hasher
    if p.offset > p.size:
        raise ValueError(f"its journal reaches byte {p.offset} of a {p.size}-byte download")
    # Files created after the last checkpoint were never recorded: their bytes come again.
    recorded = {payload / s.path for s in segments}
    for path in [q for q in payload.rglob("*") if q.is_file() or q.is_symlink()]:
        if path not in recorded:
            path.unlink()


def sweep(staging_dir: Path, keep: str | None) -> None:
    """Remove everything in staging except the partial named ``keep`` and its journal."""
    for entry in staging_dir.iterdir():
        if keep is not None and entry.name in (keep, keep + JOURNAL_SUFFIX):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def newest(staging_dir: Path) -> str | None:
    """The name of the most recently checkpointed partial (the one a restart keeps)."""
    journals = [j for j in staging_dir.glob(f"{PREFIX}*{JOURNAL_SUFFIX}")
                if (staging_dir / j.name[: -len(JOURNAL_SUFFIX)]).is_dir()]
    if not journals:
        return None
    return max(journals, key=lambda j: j.stat().st_mtime_ns).name[: -len(JOURNAL_SUFFIX)]


def describe(staging_dir: Path) -> dict[str, Any] | None:
    """What the newest kept partial says of itself (its journal, unchecked; for ``status``):
    ``{"sha256", "size", "resumes_at_byte"}``, or None."""
    name = newest(staging_dir)
    if name is None:
        return None
    from agent.bundle.archive import Resume

    try:
        doc, segments = _read_journal(staging_dir / (name + JOURNAL_SUFFIX))
        return {"sha256": str(doc["sha256"]), "size": int(doc["size"]),
                "resumes_at_byte": Resume(segments).offset}
    except (OSError, ValueError, KeyError, TypeError, EdgepackError):
        return None  # replaced or removed while read: the next status says


def keeps(e: BaseException) -> bool:
    """Whether an install that failed with ``e`` keeps its partial to resume: the network gave up
    or the agent is stopping; not for a refusal, a digest, a full disk or a server that cannot
    continue from the byte reached."""
    if isinstance(e, DownloadRestartError):
        return False
    if isinstance(e, TransportError):
        return True
    if isinstance(e, InstallError):
        return e.step == "fetch"  # cancelled: the agent stops
    return not isinstance(e, Exception)  # KeyboardInterrupt, SystemExit


__all__ = ["Partial", "create", "describe", "keeps", "load", "newest", "sweep"]
