"""agent.fetch against a real fleet.serve.BundleServer on loopback, faults injected into the socket."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import itertools
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.errors import (
    DigestMismatchError,
    InstallError,
    InsufficientResourcesError,
    TransportError,
    UntrustedDataError,
)
from agent.fetch import fetch, part_path
from fleet.serve import BundleServer

pytestmark = pytest.mark.integration

SIZE = 3 * (1 << 20) + 12345  # a few chunks, not a multiple of the chunk size


@pytest.fixture(scope="module")
def blob(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, str]:
    served = tmp_path_factory.mktemp("served")
    data = os.urandom(SIZE)
    (served / "tiny.bundle").write_bytes(data)
    (served.parent / "secret.txt").write_text("outside the served folder")
    return served, data, hashlib.sha256(data).hexdigest()


@pytest.fixture
def server(blob: tuple[Path, bytes, str]) -> Iterator[BundleServer]:
    with BundleServer(blob[0]) as srv:
        yield srv


def download(url: str, dest: Path, **kw: Any) -> Path:
    """fetch() with a short backoff: tests must not sleep through real retry pauses."""
    return fetch(url, dest, backoff_base=0.01, timeout=10.0, **kw)


def _get(srv: BundleServer, path: str, headers: dict[str, str] | None = None,
         method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _gets(srv: BundleServer, expected: int) -> list[str | None]:
    assert srv.wait_requests(expected)  # the handler records after the client has its bytes
    return [r.range for r in srv.requests if r.method == "GET"]


# --- the server ------------------------------------------------------------------------------


def test_full_download(server: BundleServer, blob: tuple[Path, bytes, str], tmp_path: Path) -> None:
    _, data, digest = blob
    seen: list[tuple[int, int]] = []
    dest = tmp_path / "dl" / "tiny.bundle"
    out = download(server.url_for("tiny.bundle"), dest, sha256=digest, size=SIZE,
                   progress=lambda d, t: seen.append((d, t)))
    assert out == dest and dest.read_bytes() == data
    assert not part_path(dest).exists()
    assert seen[-1] == (SIZE, SIZE) and all(a[0] < b[0] for a, b in itertools.pairwise(seen))
    assert server.wait_requests(1) and server.bytes_served == SIZE


def test_range_requests(server: BundleServer, blob: tuple[Path, bytes, str]) -> None:
    data = blob[1]
    status, h, body = _get(server, "/tiny.bundle", {"Range": "bytes=0-9"})
    assert (status, h["content-range"], body) == (206, f"bytes 0-9/{SIZE}", data[:10])
    status, h, body = _get(server, "/tiny.bundle", {"Range": f"bytes={SIZE - 7}-"})
    assert (status, h["content-range"], body) == (206, f"bytes {SIZE - 7}-{SIZE - 1}/{SIZE}", data[-7:])
    status, h, body = _get(server, "/tiny.bundle", {"Range": "bytes=-5"})
    assert (status, h["content-length"], body) == (206, "5", data[-5:])
    status, h, body = _get(server, "/tiny.bundle", {"Range": f"bytes=10-{SIZE + 100}"})
    assert (status, h["content-range"], len(body)) == (206, f"bytes 10-{SIZE - 1}/{SIZE}", SIZE - 10)
    for unsatisfiable in (f"bytes={SIZE}-", "bytes=-0"):
        status, h, body = _get(server, "/tiny.bundle", {"Range": unsatisfiable})
        assert (status, h["content-range"], body) == (416, f"bytes */{SIZE}", b"")
    status, h, body = _get(server, "/tiny.bundle", {"Range": "bytes=0-1,5-6"})  # several: ignored
    assert (status, len(body)) == (200, SIZE)


def test_head_and_index(server: BundleServer) -> None:
    status, h, body = _get(server, "/tiny.bundle", method="HEAD")
    assert (status, h["content-length"], h["accept-ranges"], body) == (200, str(SIZE), "bytes", b"")
    status, _, body = _get(server, "/")
    assert (status, body) == (200, b"tiny.bundle\n")


@pytest.mark.parametrize("path", [
    "/..%2fsecret.txt", "/%2e%2e%2fsecret.txt", "/../secret.txt", "/..%5csecret.txt", "/..",
    "/sub/tiny.bundle", "/.hidden", "/missing.bundle", "/tiny.bundle%00",
])
def test_path_traversal_refused(server: BundleServer, path: str) -> None:
    status, _, body = _get(server, path)
    assert status == 404 and b"outside" not in body


def test_symlink_out_of_the_folder_refused(blob: tuple[Path, bytes, str], tmp_path: Path) -> None:
    folder = tmp_path / "served"
    folder.mkdir()
    (folder / "link.bundle").symlink_to(blob[0].parent / "secret.txt")
    with BundleServer(folder) as srv:
        assert _get(srv, "/link.bundle")[0] == 404


def test_binds_loopback_by_default(blob: tuple[Path, bytes, str]) -> None:
    with BundleServer(blob[0]) as srv:
        assert srv._httpd.socket.getsockname()[0] == "127.0.0.1"
        assert srv.url_for("a b.bundle") == f"http://127.0.0.1:{srv.port}/a%20b.bundle"


# --- resume ----------------------------------------------------------------------------------


def test_resume_after_dropped_connection(blob: tuple[Path, bytes, str], tmp_path: Path) -> None:
    served, _, digest = blob
    cut = 1_000_000
    with BundleServer(served, drop_after_bytes=cut) as srv:
        dest = download(srv.url_for("tiny.bundle"), tmp_path / "t.bundle", sha256=digest, size=SIZE)
        assert hashlib.sha256(dest.read_bytes()).hexdigest() == digest
        assert _gets(srv, 2) == [None, f"bytes={cut}-"]
        assert srv.bytes_served == SIZE  # nothing downloaded twice


def test_part_from_killed_download_is_resumed(server: BundleServer, blob: tuple[Path, bytes, str],
                                              tmp_path: Path) -> None:
    _, data, digest = blob
    dest = tmp_path / "t.bundle"
    have = 2_000_000
    part_path(dest).write_bytes(data[:have])  # what a kill -9 mid-download leaves
    download(server.url_for("tiny.bundle"), dest, sha256=digest, size=SIZE)
    assert dest.read_bytes() == data
    assert _gets(server, 1) == [f"bytes={have}-"]
    assert server.bytes_served == SIZE - have


def test_stale_part_of_another_file_is_downloaded_again(
        server: BundleServer, blob: tuple[Path, bytes, str], tmp_path: Path) -> None:
    _, data, digest = blob
    dest = tmp_path / "t.bundle"
    part_path(dest).write_bytes(b"\0" * 1000)
    download(server.url_for("tiny.bundle"), dest, sha256=digest, size=SIZE)
    assert dest.read_bytes() == data
    assert _gets(server, 2) == ["bytes=1000-", None]


def test_server_ignoring_range_restarts_from_zero(blob: tuple[Path, bytes, str], tmp_path: Path) -> None:
    served, data, digest = blob
    dest = tmp_path / "t.bundle"
    part_path(dest).write_bytes(data[:500_000])
    with BundleServer(served, ignore_range=True) as srv:
        download(srv.url_for("tiny.bundle"), dest, sha256=digest, size=SIZE)
        assert _gets(srv, 1) == ["bytes=500000-"]
    assert dest.read_bytes() == data


def test_cancel_keeps_part_for_a_later_resume(server: BundleServer, blob: tuple[Path, bytes, str],
                                              tmp_path: Path) -> None:
    _, data, digest = blob
    dest, cancel = tmp_path / "t.bundle", threading.Event()
    with pytest.raises(InstallError, match="cancelled"):
        download(server.url_for("tiny.bundle"), dest, sha256=digest, size=SIZE, cancel=cancel,
                 progress=lambda done, total: cancel.set())
    have = part_path(dest).stat().st_size
    assert 0 < have < SIZE and not dest.exists()
    download(server.url_for("tiny.bundle"), dest, sha256=digest, size=SIZE)
    assert dest.read_bytes() == data and _gets(server, 2)[-1] == f"bytes={have}-"


# --- refusals --------------------------------------------------------------------------------


def test_sha256_mismatch_leaves_nothing(server: BundleServer, tmp_path: Path) -> None:
    dest = tmp_path / "t.bundle"
    with pytest.raises(DigestMismatchError) as e:
        download(server.url_for("tiny.bundle"), dest, sha256="0" * 64, size=SIZE)
    assert e.value.expected == "0" * 64
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("send_length", [True, False])
def test_more_bytes_than_announced_refused(blob: tuple[Path, bytes, str], tmp_path: Path,
                                           send_length: bool) -> None:
    served, data, _ = blob
    small = 1_500_000  # the command claims a smaller bundle than the server sends
    seen: list[int] = []
    with BundleServer(served, send_content_length=send_length) as srv, \
            pytest.raises(DigestMismatchError):
        download(srv.url_for("tiny.bundle"), tmp_path / "t.bundle",
                 sha256=hashlib.sha256(data[:small]).hexdigest(), size=small,
                 progress=lambda done, total: seen.append(done))
    assert max(seen, default=0) <= small  # never wrote past the announced size
    assert list(tmp_path.iterdir()) == []


def test_short_file_refused(server: BundleServer, blob: tuple[Path, bytes, str], tmp_path: Path) -> None:
    with pytest.raises(DigestMismatchError):
        download(server.url_for("tiny.bundle"), tmp_path / "t.bundle", sha256=blob[2], size=SIZE + 10)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x", "gopher://h/x", "/etc/passwd", "data:,x",
                                 "file://evil.example/etc/passwd"])
def test_unknown_scheme_or_host_refused(url: str, tmp_path: Path) -> None:
    with pytest.raises(UntrustedDataError):
        download(url, tmp_path / "t.bundle", sha256="0" * 64, size=1)
    assert list(tmp_path.iterdir()) == []


def test_file_url(blob: tuple[Path, bytes, str], tmp_path: Path) -> None:
    served, data, digest = blob
    src = (served / "tiny.bundle").as_uri()
    assert download(src, tmp_path / "t.bundle", sha256=digest, size=SIZE).read_bytes() == data
    with pytest.raises(DigestMismatchError):
        download(src, tmp_path / "u.bundle", sha256=digest, size=SIZE - 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.bundle"]
    with pytest.raises(TransportError):
        download((tmp_path / "missing").as_uri(), tmp_path / "v.bundle", sha256=digest, size=SIZE)


def test_http_404_is_not_retried(server: BundleServer, tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="404"):
        download(server.url_for("missing.bundle"), tmp_path / "t.bundle", sha256="0" * 64, size=10)
    assert server.wait_requests(1) and len(server.requests) == 1


def test_unreachable_server_gives_transport_error_after_retries(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/tiny.bundle"
    with pytest.raises(TransportError, match="after 2 retries") as e:
        download(url, tmp_path / "t.bundle", sha256="0" * 64, size=10, max_retries=2)
    assert url in str(e.value)


def test_insufficient_disk_is_checked_first(server: BundleServer, tmp_path: Path) -> None:
    with pytest.raises(InsufficientResourcesError) as e:
        download(server.url_for("tiny.bundle"), tmp_path / "t.bundle", sha256="0" * 64, size=SIZE,
                 disk_free=lambda p: 1000)
    assert (e.value.needed, e.value.available, e.value.resource) == (SIZE, 1000, "disk")
    assert server.requests == []


def test_wrong_content_range_restarts_from_zero(blob: tuple[Path, bytes, str], tmp_path: Path) -> None:
    # A broken proxy answers a range request with bytes from the wrong offset: appending them
    # would corrupt the file, so the client must drop its .part and ask for the whole file.
    _, data, digest = blob
    ranges: list[str | None] = []
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10.0)

    def serve_two() -> None:
        for _ in range(2):  # bounded: exactly the two requests the client should make
            conn, _addr = listener.accept()
            with conn, conn.makefile("rb") as rf:
                lines = [ln.decode().strip() for ln in iter(rf.readline, b"\r\n")][1:]
                rng = next((ln.split(":", 1)[1].strip() for ln in lines
                            if ln.lower().startswith("range:")), None)
                ranges.append(rng)
                status = "206 Partial Content" if rng else "200 OK"
                head = f"HTTP/1.1 {status}\r\nContent-Length: {SIZE}\r\nConnection: close\r\n"
                if rng:
                    head += f"Content-Range: bytes 0-{SIZE - 1}/{SIZE}\r\n"
                with contextlib.suppress(OSError):  # the client hangs up on the bad answer
                    conn.sendall(head.encode() + b"\r\n" + data)

    thread = threading.Thread(target=serve_two, daemon=True)
    thread.start()
    dest = tmp_path / "t.bundle"
    part_path(dest).write_bytes(data[:1000])
    try:
        download(f"http://127.0.0.1:{listener.getsockname()[1]}/t", dest, sha256=digest, size=SIZE)
    finally:
        thread.join(timeout=10.0)
        listener.close()
    assert ranges == ["bytes=1000-", None]
    assert dest.read_bytes() == data
