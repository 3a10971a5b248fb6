"""Download a bundle to the device: resumable, capped, hashed as it is written. Stdlib only.

Invariants: never more than ``size`` bytes reach the disk (every read is capped, TUF-style); the
file at ``dest`` only ever appears whole, with the expected length and sha256 (a mismatch deletes
the partial file); a dropped connection or a killed agent resumes from ``dest.part``.

HTTP(S) workflow: (1) check free disk for what is still missing, (2) hash an existing ``.part``
(a previous run's bytes), (3) request ``Range: bytes=N-`` when N > 0, (4) append + hash each
capped chunk, (5) on a dropped connection or a 5xx back off (jittered, exponential, bounded) and
resume from (3), (6) check length + sha256, fsync, rename to ``dest``. A server that answers 200
to a Range request sends the whole file again, so the ``.part`` restarts from byte 0.

``file://`` URLs are copied the same way (capped, hashed, fsynced, renamed) but are not retried.
The bundle's signature is checked later by the store; the sha256 here protects the download and
the disk, it is not the trust decision.

:func:`open_download` is the same download read as a stream, for installing without a second copy
on disk: the store's verifying stager reads it (manifest first, then each payload file straight into
its slot). Nothing is written here; a dropped connection resumes with ``Range`` from the bytes
already read, and reading the end checks the whole file's length and sha256 (the store reads a
stream to its end before it switches). It can also start at byte N with the sha256 of the bytes
before it (``start``, ``prefix``): the store's resumed staging (agent/store.py) already holds them.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import logging
import os
import random
import re
import shutil
import ssl
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from agent._fs import fsync_dir
from agent.errors import (
    DigestMismatchError,
    DownloadRestartError,
    InstallError,
    InsufficientResourcesError,
    TransportError,
    UntrustedDataError,
)

log = logging.getLogger("agent.fetch")

__all__ = ["DownloadStream", "fetch", "open_download", "part_path"]

CHUNK_BYTES = 1 << 20  # read/write unit: large enough for SHA-NI speed, small enough to cancel fast
MAX_REDIRECTS = 5
BACKOFF_CAP_S = 30.0  # longest pause between attempts
_MAX_ATTEMPTS_FACTOR = 20  # attempts that made progress do not use up retries; this still bounds them
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_USER_AGENT = "edgepack-agent"

Progress = Callable[[int, int], None]
DiskFree = Callable[[Path], int]


class _Retry(Exception):
    """An attempt failed in a way worth retrying (dropped connection, timeout, 5xx)."""


class _Restart(Exception):
    """The server's answer cannot continue our ``.part``: start again from byte 0."""


def part_path(dest: Path) -> Path:
    """Where the partial download of ``dest`` lives (``dest`` + ``.part``)."""
    return dest.with_name(dest.name + ".part")


def fetch(
    url: str,
    dest: Path,
    *,
    sha256: str,
    size: int,
    progress: Progress | None = None,
    timeout: float = 30.0,
    max_retries: int = 5,
    cancel: threading.Event | None = None,
    ca_file: Path | None = None,
    backoff_base: float = 0.5,
    disk_free: DiskFree | None = None,
) -> Path:
    """Download ``url`` to ``dest``, resuming, retrying, and checking length and sha256.

    Args:
        url: ``http://``, ``https://`` or ``file://`` URL of the bundle.
        dest: final path; the partial download is ``dest`` + ``.part`` in the same folder.
        sha256: expected lowercase hex digest of the whole file.
        size: expected length in bytes; nothing beyond it is ever written.
        progress: called as ``progress(bytes_done, size)`` after each chunk.
        timeout: seconds for connecting and for each read.
        max_retries: attempts after a failure that made no progress before giving up.
        cancel: set it to stop at the next chunk (the ``.part`` is kept for a later resume).
        ca_file: PEM bundle of CAs to trust for ``https://`` instead of the system store.
        backoff_base: first pause between attempts in seconds (doubles, jittered, capped at 30 s).
        disk_free: free bytes at a path (default ``shutil.disk_usage``); tests inject it.

    Returns:
        ``dest``, now holding exactly ``size`` bytes with the expected sha256.

    Raises:
        UntrustedDataError: unsupported URL scheme, file:// on another host, or malformed sha256.
        DigestMismatchError: the server or file offers more or fewer bytes than ``size``, or
            the sha256 differs (the partial file is deleted).
        InsufficientResourcesError: not enough free disk for the bytes still missing.
        TransportError: the download failed after the retries (carries the URL and the reason),
            or the server refused it (4xx).
        InstallError: the download was cancelled (``step="fetch"``), or the file cannot be written.
    """
    sha256, scheme = _check_request(url, sha256, size)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    job = _Job(url, dest, sha256, size, progress, cancel or threading.Event())
    if scheme == "file":
        job.check_disk(0, disk_free)
        return job.copy_file()
    return job.download(
        timeout=timeout, max_retries=max_retries, ca_file=ca_file, backoff_base=backoff_base,
        disk_free=disk_free,
    )


def _check_request(url: str, sha256: str, size: int) -> tuple[str, str]:
    """The lowercase sha256 and the URL's scheme, or UntrustedDataError for a malformed request."""
    sha256 = sha256.lower()
    if not _SHA256_RE.fullmatch(sha256):
        raise UntrustedDataError(f"expected sha256 is not 64 hex digits: {sha256!r}")
    if size < 0:
        raise UntrustedDataError(f"expected size is negative: {size}")
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https", "file"):
        raise UntrustedDataError(
            f"refusing to fetch {url!r}: scheme {scheme or '(none)'!r} is not http, https or file"
        )
    return sha256, scheme


class _Job:
    """One fetch: the expected result, the ``.part`` on disk and the running hash over it."""

    def __init__(self, url: str, dest: Path, sha256: str, size: int, progress: Progress | None,
                 cancel: threading.Event) -> None:
        self.url = url
        self.dest = dest
        self.part = part_path(dest)
        self.sha256 = sha256
        self.size = size
        self.progress = progress
        self.cancel = cancel
        self.hasher = hashlib.sha256()
        self.done = 0  # bytes in .part, all of them fed to self.hasher
        self.stale = False  # the .part holds bytes from an earlier run, not yet proven by the digest

    # --- shared steps -------------------------------------------------------------------------

    def check_disk(self, already: int, disk_free: DiskFree | None) -> None:
        needed = self.size - already
        available = (disk_free or _disk_free)(self.dest.parent)
        if needed > available:
            raise InsufficientResourcesError(
                f"not enough free disk in {self.dest.parent} to download {self.url}: "
                f"{needed} bytes needed, {available} available",
                needed=needed, available=available, resource="disk",
            )

    def check_cancel(self) -> None:
        if self.cancel.is_set():
            raise InstallError(f"download of {self.url} cancelled", step="fetch")

    def reset(self) -> None:
        """Forget the ``.part``: the next bytes start the file again."""
        with contextlib.suppress(FileNotFoundError):
            self.part.unlink()
        self.hasher = hashlib.sha256()
        self.done = 0
        self.stale = False

    def too_long(self, announced: int) -> DigestMismatchError:
        self.reset()
        return DigestMismatchError(
            f"{self.url} offers {announced} bytes, expected {self.size}: refused",
            path=self.url, expected=str(self.size), actual=str(announced),
        )

    def append(self, out: BinaryIO, chunk: bytes) -> None:
        try:
            out.write(chunk)
        except OSError as e:
            raise InstallError(f"cannot write {self.part}: {e}", step="fetch") from e
        self.hasher.update(chunk)
        self.done += len(chunk)
        if self.progress is not None:
            self.progress(self.done, self.size)

    def finish(self) -> Path:
        """Check length + digest of the complete ``.part``, then fsync and rename it to ``dest``."""
        actual = self.hasher.hexdigest()
        if self.done != self.size or actual != self.sha256:
            done = self.done
            self.reset()
            if done != self.size:
                raise DigestMismatchError(
                    f"{self.url}: got {done} bytes, expected {self.size}",
                    path=self.url, expected=str(self.size), actual=str(done),
                )
            raise DigestMismatchError(
                f"{self.url}: sha256 {actual} differs from the expected {self.sha256}",
                path=self.url, expected=self.sha256, actual=actual,
            )
        try:
            with open(self.part, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(self.part, self.dest)
            fsync_dir(self.dest.parent)
        except OSError as e:
            raise InstallError(f"cannot move {self.part} to {self.dest}: {e}", step="fetch") from e
        log.info("fetched %s -> %s (%d bytes)", self.url, self.dest, self.size)
        return self.dest

    # --- file:// ------------------------------------------------------------------------------

    def copy_file(self) -> Path:
        parts = urllib.parse.urlsplit(self.url)
        if parts.netloc not in ("", "localhost"):
            raise UntrustedDataError(f"refusing {self.url!r}: file:// URLs must name this host")
        src = Path(urllib.request.url2pathname(parts.path))
        self.reset()  # a local copy is fast: no resume, so no stale bytes can sneak in
        try:
            with open(src, "rb") as inp, open(self.part, "wb") as out:
                # Read one byte past the expected size so a longer file is caught, never copied.
                while self.done < self.size + 1:
                    self.check_cancel()
                    chunk = inp.read(min(CHUNK_BYTES, self.size + 1 - self.done))
                    if not chunk:
                        break
                    if self.done + len(chunk) > self.size:
                        raise self.too_long(self.done + len(chunk))
                    self.append(out, chunk)
        except FileNotFoundError as e:
            self.reset()
            raise TransportError(f"cannot read {self.url}: no such file") from e
        except OSError as e:
            self.reset()
            raise TransportError(f"cannot read {self.url}: {e}") from e
        return self.finish()

    # --- http(s):// ---------------------------------------------------------------------------

    def download(self, *, timeout: float, max_retries: int, ca_file: Path | None,
                 backoff_base: float, disk_free: DiskFree | None) -> Path:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self._hash_existing_part()
        self.check_disk(self.done, disk_free)
        failures = 0
        for attempt in range(1, (max_retries + 1) * _MAX_ATTEMPTS_FACTOR + 1):
            self.check_cancel()
            if self.done == self.size and self.part.exists():
                if self.stale and self.hasher.hexdigest() != self.sha256:
                    # Bytes left by an earlier run belong to another file: one fresh download.
                    log.warning("%s does not match %s; downloading again", self.part, self.url)
                    self.reset()
                else:
                    return self.finish()
            before = self.done
            try:
                self._attempt(timeout, context)
            except _Restart as e:
                log.warning("%s: %s; restarting from byte 0", self.url, e)
                self.reset()
                reason = str(e)
            except _Retry as e:
                reason = str(e)
            else:
                continue  # complete: the check at the top verifies and renames
            # A failure that moved the download forward does not use up a retry: a flaky link
            # that drops every few MB must still finish; the attempt range above bounds the loop.
            failures = 0 if self.done > before else failures + 1
            if failures > max_retries:
                raise TransportError(
                    f"download of {self.url} failed after {max_retries} retries: {reason}",
                    hint="Check that the bundle server is reachable from the device.",
                )
            delay = min(BACKOFF_CAP_S, backoff_base * 2 ** max(failures - 1, 0))
            delay *= random.uniform(0.5, 1.0)  # jitter: a fleet must not retry in lockstep
            log.info("%s: attempt %d failed (%s); retrying in %.2fs at byte %d",
                     self.url, attempt, reason, delay, self.done)
            if self.cancel.wait(delay):
                self.check_cancel()
        raise TransportError(f"download of {self.url} did not finish in the allowed attempts")

    def _hash_existing_part(self) -> None:
        self.hasher = hashlib.sha256()
        self.done = 0
        try:
            have = self.part.stat().st_size
        except FileNotFoundError:
            return
        if have > self.size:
            log.warning("%s is longer than the expected %d bytes; discarding it", self.part, self.size)
            self.reset()
            return
        with open(self.part, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                self.hasher.update(chunk)
                self.done += len(chunk)
        self.stale = self.done > 0
        log.info("resuming %s at byte %d of %d", self.url, self.done, self.size)

    def _attempt(self, timeout: float, context: ssl.SSLContext) -> None:
        """One request from ``self.done``; returns once ``size`` bytes are in the ``.part``."""
        resp, conn = self._request(timeout, context)
        try:
            start = self._check_response(resp)
            if start == 0 and self.done:
                self.reset()  # a 200 to our Range request: the whole file is coming again
            with open(self.part, "ab") as out:
                while self.done < self.size:
                    self.check_cancel()
                    try:
                        chunk = resp.read(min(CHUNK_BYTES, self.size - self.done))
                    except (OSError, http.client.HTTPException) as e:
                        raise _Retry(f"connection lost at byte {self.done}: {e!r}") from e
                    if not chunk:
                        raise _Retry(f"connection closed at byte {self.done} of {self.size}")
                    self.append(out, chunk)
            # Nothing may follow the last expected byte (a body without a length, e.g. chunked).
            try:
                extra = resp.read(1)
            except (OSError, http.client.HTTPException):
                extra = b""  # tolerated: all the expected bytes arrived; the digest decides
            if extra:
                raise self.too_long(self.size + 1)
        finally:
            conn.close()

    def _request(self, timeout: float, context: ssl.SSLContext
                 ) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
        url = self.url
        for _ in range(MAX_REDIRECTS + 1):
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise UntrustedDataError(f"refusing redirect of {self.url!r} to {url!r}")
            conn: http.client.HTTPConnection
            if parts.scheme == "https":
                conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout,
                                                   context=context)
            else:
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
            headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity", "Connection": "close"}
            if self.done:
                headers["Range"] = f"bytes={self.done}-"
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            try:
                conn.request("GET", target, headers=headers)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise _Retry(f"{type(e).__name__}: {e}") from e
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location")
                conn.close()
                if not location:
                    raise TransportError(f"{url}: redirect {resp.status} without a Location")
                url = urllib.parse.urljoin(url, location)
                continue
            return resp, conn
        raise TransportError(f"{self.url}: more than {MAX_REDIRECTS} redirects")

    def _check_response(self, resp: http.client.HTTPResponse) -> int:
        """Validate status and lengths; return the offset the body starts at."""
        if resp.status in _RETRY_STATUS:
            raise _Retry(f"HTTP {resp.status} {resp.reason}")
        length_header = resp.getheader("Content-Length")
        length = int(length_header) if length_header and length_header.isdigit() else None
        if resp.status == 200:
            if length is not None and length != self.size:
                raise self.too_long(length) if length > self.size else DigestMismatchError(
                    f"{self.url} offers {length} bytes, expected {self.size}",
                    path=self.url, expected=str(self.size), actual=str(length),
                )
            return 0
        if resp.status == 206 and self.done:
            m = _CONTENT_RANGE_RE.fullmatch((resp.getheader("Content-Range") or "").strip())
            if not m:
                raise _Restart(f"206 with a malformed Content-Range {resp.getheader('Content-Range')!r}")
            first, last, total = int(m[1]), int(m[2]), m[3]
            if total != "*" and int(total) != self.size:
                raise self.too_long(int(total)) if int(total) > self.size else DigestMismatchError(
                    f"{self.url} is {total} bytes, expected {self.size}",
                    path=self.url, expected=str(self.size), actual=total,
                )
            if first != self.done or last >= self.size or (
                    length is not None and length != last - first + 1):
                raise _Restart(f"206 for bytes {first}-{last}, asked from {self.done}")
            return first
        if resp.status == 416 and self.done:
            # Our .part does not fit the file the server has (e.g. it was replaced): start over.
            raise _Restart("416 Range Not Satisfiable for our partial file")
        raise TransportError(
            f"download of {self.url} refused: HTTP {resp.status} {resp.reason}",
            hint="Check the bundle URL and that the server still has the file.",
        )


def _disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


# --- streaming: the download read once, never stored ------------------------------------------


class _StreamJob(_Job):
    """A :class:`_Job` whose bytes go to a reader instead of a ``.part``: nothing to delete."""

    def __init__(self, url: str, sha256: str, size: int, progress: Progress | None,
                 cancel: threading.Event) -> None:
        super().__init__(url, Path(os.devnull), sha256, size, progress, cancel)  # no file is written

    def reset(self) -> None:
        self.hasher = hashlib.sha256()
        self.done = 0


def open_download(
    url: str,
    *,
    sha256: str,
    size: int,
    progress: Progress | None = None,
    timeout: float = 30.0,
    max_retries: int = 5,
    cancel: threading.Event | None = None,
    ca_file: Path | None = None,
    backoff_base: float = 0.5,
    start: int = 0,
    prefix: Any = None,
) -> io.BufferedReader:
    """Open ``url`` as a readable stream of exactly ``size`` bytes with the given sha256.

    Same arguments and checks as :func:`fetch`, but nothing is written to disk: the caller reads
    the bytes (the store stages them straight into a slot). Use it as a context manager.

    ``start`` > 0 reads from that byte on (``Range``); ``prefix`` is then the hashlib sha256 of
    the bytes before it, which the caller holds, so the end still checks the whole file's sha256.

    Raises:
        UntrustedDataError: unsupported URL scheme, file:// on another host, or malformed sha256.

    Reading raises what :func:`fetch` raises: :class:`DigestMismatchError` for more or fewer bytes
    than ``size`` or another sha256 (when the end is read), :class:`TransportError` after the
    retries or for a refusal, :class:`InstallError` when cancelled.
    """
    sha256, scheme = _check_request(url, sha256, size)
    if scheme == "file" and urllib.parse.urlsplit(url).netloc not in ("", "localhost"):
        raise UntrustedDataError(f"refusing {url!r}: file:// URLs must name this host")
    if not 0 <= start <= size or (start and prefix is None):
        raise UntrustedDataError(f"cannot start a download of {size} bytes at byte {start}")
    job = _StreamJob(url, sha256, size, progress, cancel or threading.Event())
    if start:
        job.done, job.hasher = start, prefix
    raw = DownloadStream(job, timeout=timeout, max_retries=max_retries, ca_file=ca_file,
                         backoff_base=backoff_base)
    return io.BufferedReader(raw, buffer_size=CHUNK_BYTES)


class DownloadStream(io.RawIOBase):
    """A bundle download as a readable binary stream (see :func:`open_download`).

    Each read is capped at what is still expected; a dropped connection or a 5xx is retried with
    jittered backoff from the byte reached (``Range``), and a failure that made progress does not
    use up a retry. Reading the end checks one byte more (refused if present) and the sha256.
    """

    def __init__(self, job: _StreamJob, *, timeout: float, max_retries: int,
                 ca_file: Path | None, backoff_base: float) -> None:
        super().__init__()
        self._job = job
        self._timeout = timeout
        self._max_retries = max_retries
        self._backoff_base = backoff_base
        self._local = job.url.lower().startswith("file:")
        self._context = None if self._local else \
            ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self._resp: http.client.HTTPResponse | None = None
        self._conn: http.client.HTTPConnection | None = None
        self._file: BinaryIO | None = None
        self._failures = 0
        self._ended = False

    @property
    def bytes_read(self) -> int:
        return self._job.done

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        job = self._job
        want = len(buffer)
        if want == 0 or self._ended:
            return 0
        while True:
            job.check_cancel()
            if job.done == job.size:
                self._end()
                return 0
            try:
                chunk = self._read(min(want, CHUNK_BYTES, job.size - job.done))
            except _Retry as e:
                self._disconnect()
                self._pause(str(e))
                continue
            self._failures = 0
            job.hasher.update(chunk)
            job.done += len(chunk)
            if job.progress is not None:
                job.progress(job.done, job.size)
            buffer[: len(chunk)] = chunk
            return len(chunk)

    def close(self) -> None:
        self._release()
        super().close()

    def _release(self) -> None:
        self._disconnect()
        if self._file is not None:
            self._file.close()
            self._file = None

    # --- one source at a time -------------------------------------------------------------------

    def _read(self, n: int) -> bytes:
        if self._local:
            return self._read_file(n)
        if self._resp is None:
            self._connect()
        assert self._resp is not None
        try:
            chunk = self._resp.read(n)
        except (OSError, http.client.HTTPException) as e:
            raise _Retry(f"connection lost at byte {self._job.done}: {e!r}") from e
        if not chunk:
            raise _Retry(f"connection closed at byte {self._job.done} of {self._job.size}")
        return chunk

    def _read_file(self, n: int) -> bytes:
        job = self._job
        try:
            if self._file is None:
                path = urllib.request.url2pathname(urllib.parse.urlsplit(job.url).path)
                self._file = open(path, "rb")  # closed in close()
                self._file.seek(job.done)  # a resumed stream starts where its caller's bytes end
            chunk = self._file.read(n)
        except FileNotFoundError as e:
            raise TransportError(f"cannot read {job.url}: no such file") from e
        except OSError as e:
            raise TransportError(f"cannot read {job.url}: {e}") from e
        if not chunk:
            raise DigestMismatchError(f"{job.url}: got {job.done} bytes, expected {job.size}",
                                      path=job.url, expected=str(job.size), actual=str(job.done))
        return chunk

    def _connect(self) -> None:
        job = self._job
        assert self._context is not None
        resp, conn = job._request(self._timeout, self._context)
        self._resp, self._conn = resp, conn
        try:
            start = job._check_response(resp)
        except _Restart as e:
            # The bytes read so far are gone into the stager: this stream cannot start again.
            self._disconnect()
            raise DownloadRestartError(
                f"download of {job.url} cannot resume at byte {job.done}: {e}",
                hint="Nothing was changed; sent again, the install starts from byte 0.") from e
        except BaseException:
            self._disconnect()
            raise
        if start == 0 and job.done:
            # A 200 to our Range request: the whole file again; skip what was already read (the
            # final sha256 still covers every byte the reader got).
            skip = job.done
            while skip:
                try:
                    got = resp.read(min(skip, CHUNK_BYTES))
                except (OSError, http.client.HTTPException) as e:
                    raise _Retry(f"connection lost while skipping to byte {job.done}: {e!r}") from e
                if not got:
                    raise _Retry(f"connection closed while skipping to byte {job.done}")
                skip -= len(got)

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._resp = self._conn = None

    def _pause(self, reason: str) -> None:
        job = self._job
        self._failures += 1
        if self._failures > self._max_retries:
            raise TransportError(
                f"download of {job.url} failed after {self._max_retries} retries: {reason}",
                hint="Check that the bundle server is reachable from the device.",
            )
        delay = min(BACKOFF_CAP_S, self._backoff_base * 2 ** (self._failures - 1))
        delay *= random.uniform(0.5, 1.0)  # jitter: a fleet must not retry in lockstep
        log.info("%s: %s; retrying in %.2fs at byte %d", job.url, reason, delay, job.done)
        if job.cancel.wait(delay):
            job.check_cancel()

    def _end(self) -> None:
        """All ``size`` bytes were read: nothing may follow, and the digest must match."""
        job = self._job
        extra = b""
        try:
            if self._local and self._file is not None:
                extra = self._file.read(1)
            elif self._resp is not None:
                extra = self._resp.read(1)
        except (OSError, http.client.HTTPException):
            extra = b""  # tolerated: all the expected bytes arrived; the digest decides
        self._ended = True
        # Release the connection and file, but stay open: reading on returns b"" (the end), as
        # any file does, whichever reader (tarfile's read-ahead, the store's drain) gets there.
        self._release()
        if extra:
            raise job.too_long(job.size + 1)
        actual = job.hasher.hexdigest()
        if actual != job.sha256:
            raise DigestMismatchError(
                f"{job.url}: sha256 {actual} differs from the expected {job.sha256}",
                path=job.url, expected=job.sha256, actual=actual,
            )
        log.info("streamed %s (%d bytes)", job.url, job.size)
