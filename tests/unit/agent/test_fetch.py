"""fetch's own logic (agent/fetch.py) without a network: argument and URL checks, the ``file://``
copy, the ``.part`` bookkeeping, and how each HTTP answer moves the resume offset.

The HTTP answers are small stand-ins for ``http.client.HTTPResponse`` (status, reason, headers)
fed to the response check; real servers, drops and resumes are in
tests/integration/test_fetch_serve.py.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

from agent.errors import (
    DigestMismatchError,
    InstallError,
    InsufficientResourcesError,
    TransportError,
    UntrustedDataError,
)
from agent.fetch import _Job, _Restart, _Retry, fetch, part_path

DATA = bytes(range(256)) * 40  # 10 KiB
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def src(tmp_path: Path) -> Path:
    p = tmp_path / "src" / "b.bundle"
    p.parent.mkdir()
    p.write_bytes(DATA)
    return p


def job(dest: Path, *, size: int = len(DATA), done: int = 0) -> _Job:
    j = _Job("http://h/b.bundle", dest, SHA, size, None, threading.Event())
    j.done = done
    return j


class Answer:
    """The parts of an HTTP response the check reads."""

    def __init__(self, status: int, reason: str = "", **headers: str) -> None:
        self.status, self.reason = status, reason
        self.headers = {k.replace("_", "-").lower(): v for k, v in headers.items()}

    def getheader(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def test_part_path_is_next_to_dest():
    assert part_path(Path("/var/lib/x/m v1.bundle")) == Path("/var/lib/x/m v1.bundle.part")


# --- arguments and URLs --------------------------------------------------------------------------------


@pytest.mark.parametrize("sha, match", [
    ("a" * 63, "not 64 hex digits"), ("g" * 64, "not 64 hex digits"), ("", "not 64 hex digits"),
])
def test_a_malformed_expected_digest_is_refused(tmp_path: Path, src: Path, sha: str, match: str):
    with pytest.raises(UntrustedDataError, match=match):
        fetch(src.as_uri(), tmp_path / "out", sha256=sha, size=len(DATA))


def test_the_expected_digest_may_be_upper_case(tmp_path: Path, src: Path):
    out = fetch(src.as_uri(), tmp_path / "out", sha256=SHA.upper(), size=len(DATA))
    assert out.read_bytes() == DATA


def test_a_negative_size_is_refused(tmp_path: Path, src: Path):
    with pytest.raises(UntrustedDataError, match="negative"):
        fetch(src.as_uri(), tmp_path / "out", sha256=SHA, size=-1)


@pytest.mark.parametrize("url", ["ftp://h/b.bundle", "b.bundle", "javascript:alert(1)",
                                 "file://otherhost/tmp/b.bundle"])
def test_other_schemes_and_remote_file_urls_are_refused(tmp_path: Path, url: str):
    with pytest.raises(UntrustedDataError, match="refusing"):
        fetch(url, tmp_path / "out", sha256=SHA, size=1)
    assert not (tmp_path / "out").exists() and not part_path(tmp_path / "out").exists()


def test_file_url_on_localhost_is_this_host(tmp_path: Path, src: Path):
    url = "file://localhost" + src.as_posix()
    assert fetch(url, tmp_path / "out", sha256=SHA, size=len(DATA)).read_bytes() == DATA


# --- file:// copies ----------------------------------------------------------------------------------------


def test_a_file_copy_reports_progress_and_leaves_no_part(tmp_path: Path, src: Path):
    seen: list[tuple[int, int]] = []
    dest = tmp_path / "deep" / "out.bundle"  # the folder is created
    fetch(src.as_uri(), dest, sha256=SHA, size=len(DATA), progress=lambda d, t: seen.append((d, t)))
    assert dest.read_bytes() == DATA and not part_path(dest).exists()
    assert seen and seen[-1] == (len(DATA), len(DATA))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_a_longer_file_is_refused_without_copying_past_the_size(tmp_path: Path, src: Path):
    dest = tmp_path / "out"
    with pytest.raises(DigestMismatchError, match="offers") as e:
        fetch(src.as_uri(), dest, sha256=SHA, size=len(DATA) - 1)
    assert e.value.expected == str(len(DATA) - 1)
    assert not dest.exists() and not part_path(dest).exists()


def test_a_shorter_file_is_refused(tmp_path: Path, src: Path):
    dest = tmp_path / "out"
    with pytest.raises(DigestMismatchError, match=f"got {len(DATA)} bytes, expected {len(DATA) + 1}"):
        fetch(src.as_uri(), dest, sha256=SHA, size=len(DATA) + 1)
    assert not dest.exists() and not part_path(dest).exists()


def test_another_digest_is_refused_and_nothing_is_left(tmp_path: Path, src: Path):
    dest = tmp_path / "out"
    with pytest.raises(DigestMismatchError, match="sha256") as e:
        fetch(src.as_uri(), dest, sha256="0" * 64, size=len(DATA))
    assert e.value.actual == SHA
    assert not dest.exists() and not part_path(dest).exists()


def test_a_missing_file_is_a_transport_error(tmp_path: Path):
    with pytest.raises(TransportError, match="no such file"):
        fetch((tmp_path / "absent").as_uri(), tmp_path / "out", sha256=SHA, size=1)


def test_a_cancelled_copy_stops_and_says_so(tmp_path: Path, src: Path):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(InstallError, match="cancelled") as e:
        fetch(src.as_uri(), tmp_path / "out", sha256=SHA, size=len(DATA), cancel=cancel)
    assert e.value.step == "fetch" and not (tmp_path / "out").exists()


def test_free_disk_is_checked_before_copying(tmp_path: Path, src: Path):
    with pytest.raises(InsufficientResourcesError) as e:
        fetch(src.as_uri(), tmp_path / "out", sha256=SHA, size=len(DATA),
              disk_free=lambda _p: len(DATA) - 1)
    assert (e.value.needed, e.value.available, e.value.resource) == (len(DATA), len(DATA) - 1, "disk")
    assert not part_path(tmp_path / "out").exists()
    out = fetch(src.as_uri(), tmp_path / "out", sha256=SHA, size=len(DATA), disk_free=lambda _p: len(DATA))
    assert out.read_bytes() == DATA  # exactly enough is enough


# --- the .part on disk --------------------------------------------------------------------------------


def test_an_existing_part_is_hashed_and_marked_stale(tmp_path: Path):
    j = job(tmp_path / "out")
    j.part.write_bytes(DATA[:1000])
    j._hash_existing_part()
    assert (j.done, j.stale) == (1000, True)
    j.hasher.update(DATA[1000:])
    assert j.hasher.hexdigest() == SHA  # the running hash continues where the part ends


def test_a_part_longer_than_the_file_is_discarded(tmp_path: Path):
    j = job(tmp_path / "out")
    j.part.write_bytes(DATA + b"x")
    j._hash_existing_part()
    assert (j.done, j.stale) == (0, False) and not j.part.exists()


def test_no_part_means_starting_at_zero(tmp_path: Path):
    j = job(tmp_path / "out")
    j._hash_existing_part()
    assert (j.done, j.stale) == (0, False)


def test_the_disk_check_counts_only_what_is_still_missing(tmp_path: Path):
    j = job(tmp_path / "out")
    j.check_disk(1000, lambda _p: len(DATA) - 1000)  # the part already holds 1000 bytes
    with pytest.raises(InsufficientResourcesError):
        j.check_disk(1000, lambda _p: len(DATA) - 1001)


# --- HTTP answers and the resume offset ---------------------------------------------------------------


def test_200_with_the_right_length_starts_at_zero(tmp_path: Path):
    assert job(tmp_path / "out")._check_response(Answer(200, Content_Length=str(len(DATA)))) == 0
    assert job(tmp_path / "out")._check_response(Answer(200)) == 0  # no length: the cap decides


def test_200_to_a_range_request_restarts_the_file(tmp_path: Path):
    # The server ignored Range and sends everything: the body starts at byte 0 again.
    assert job(tmp_path / "out", done=500)._check_response(Answer(200, Content_Length=str(len(DATA)))) == 0


@pytest.mark.parametrize("length", [len(DATA) - 1, len(DATA) + 1])
def test_200_announcing_another_length_is_refused(tmp_path: Path, length: int):
    j = job(tmp_path / "out")
    j.part.write_bytes(b"old")
    with pytest.raises(DigestMismatchError) as e:
        j._check_response(Answer(200, Content_Length=str(length)))
    assert e.value.actual == str(length)
    if length > len(DATA):
        assert not j.part.exists()  # a server offering too much: the part is dropped


@pytest.mark.parametrize("total", [str(len(DATA)), "*"])
def test_206_continuing_our_part_resumes_there(tmp_path: Path, total: str):
    j = job(tmp_path / "out", done=1000)
    answer = Answer(206, Content_Range=f"bytes 1000-{len(DATA) - 1}/{total}",
                    Content_Length=str(len(DATA) - 1000))
    assert j._check_response(answer) == 1000


@pytest.mark.parametrize("content_range, length", [
    ("bytes 0-99/10240", None),  # starts elsewhere than asked
    ("bytes 1000-10240/10240", None),  # runs past the end
    ("bytes 1000-10239/10240", "5"),  # length disagrees with the range
    ("bytes */10240", None),  # malformed
    ("", None),
])
def test_206_that_does_not_continue_our_part_restarts(tmp_path: Path, content_range: str,
                                                      length: str | None):
    headers = {"Content_Range": content_range} | ({"Content_Length": length} if length else {})
    with pytest.raises(_Restart):
        job(tmp_path / "out", done=1000)._check_response(Answer(206, **headers))


def test_206_for_a_file_of_another_size_is_refused(tmp_path: Path):
    with pytest.raises(DigestMismatchError):
        job(tmp_path / "out", done=1000)._check_response(
            Answer(206, Content_Range="bytes 1000-10239/99999"))


def test_416_for_our_part_restarts_from_zero(tmp_path: Path):
    with pytest.raises(_Restart):
        job(tmp_path / "out", done=1000)._check_response(Answer(416, "Range Not Satisfiable"))


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
def test_busy_or_failing_servers_are_retried(tmp_path: Path, status: int):
    with pytest.raises(_Retry, match=f"HTTP {status}"):
        job(tmp_path / "out")._check_response(Answer(status, "busy"))


@pytest.mark.parametrize("status, done", [(404, 0), (403, 0), (206, 0), (416, 0)])
def test_other_answers_are_refused_without_retrying(tmp_path: Path, status: int, done: int):
    # 206 or 416 to a request that asked for no range make no sense: refused, not resumed.
    with pytest.raises(TransportError, match=f"refused: HTTP {status}") as e:
        job(tmp_path / "out", done=done)._check_response(Answer(status, "Nope"))
    assert e.value.diagnostics()
