"""The resumable extraction's bookkeeping (agent/bundle/archive.py): at every checkpoint, the
segments' heads and the staged files, in order, are exactly the archive's first bytes — which is
what lets a resumed install continue the whole download's sha256 — and a reader resumed from any
checkpoint stages the same files as one uninterrupted read."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import random
from pathlib import Path

import pytest
from bundlekit import make_manifest

from agent.bundle import SigningKey, archive
from agent.bundle.archive import BundleReader, Resume, Segment
from agent.errors import BundleFormatError
from packager.bundler import file_entries, write_bundle

MIB = 1 << 20


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict[str, bytes]]:
    rnd = random.Random(7)
    payload = {"model.bin": rnd.randbytes(3 * MIB + 511), "a/b/vocab.txt": rnd.randbytes(700),
               "empty.txt": b"", "weights.bin": rnd.randbytes(MIB + 1)}
    d = tmp_path_factory.mktemp("resume")
    files = {}
    for name, data in payload.items():
        p = d / "src" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        files[name] = p
    key = SigningKey.generate("resume-tests")
    write_bundle(d / "b.bundle", make_manifest(file_entries(files), key), key, files)
    return (d / "b.bundle").read_bytes(), payload


def prefix_of(segments: list[Segment], payload: dict[str, bytes]) -> bytes:
    return b"".join(s.head + payload[s.path][: s.staged] for s in segments)


def extract(data: bytes, dest: Path, monkeypatch: pytest.MonkeyPatch,
            resume: Resume | None = None) -> list[list[Segment]]:
    """Extract (from ``resume.offset`` when resuming) with a checkpoint every 256 KiB."""
    from agent.bundle import Manifest

    monkeypatch.setattr(archive, "CHECKPOINT_BYTES", 256 << 10)
    monkeypatch.setattr(archive, "CHUNK", 64 << 10)
    seen: list[list[Segment]] = []
    stream = io.BufferedReader(io.BytesIO(data[resume.offset if resume else 0:]))  # type: ignore[arg-type]
    reader = BundleReader(stream, resume=resume)
    first = BundleReader(io.BytesIO(data)).read_header()[0]
    if resume is None:
        reader.read_header()
    reader.extract_payload(Manifest.from_bytes(first), dest,
                           checkpoint=lambda segs: seen.append([dataclasses.replace(s) for s in segs]))
    return seen


def test_every_checkpoint_is_exactly_a_prefix_of_the_archive(bundle, tmp_path, monkeypatch):
    data, payload = bundle
    points = extract(data, tmp_path / "out", monkeypatch)
    assert len(points) >= 16  # inside the big files and at each file's end
    offsets = [Resume(p).offset for p in points]
    assert offsets == sorted(offsets)
    for segs in points:
        assert prefix_of(segs, payload) == data[: Resume(segs).offset]
        for s in segs:
            if not s.complete:
                assert s.staged_sha256 == hashlib.sha256(payload[s.path][: s.staged]).hexdigest()


def test_a_reader_resumed_at_any_checkpoint_stages_the_same_files(bundle, tmp_path, monkeypatch):
    data, payload = bundle
    points = extract(data, tmp_path / "full", monkeypatch)
    for i, segs in enumerate(points):
        dest = tmp_path / f"r{i}"
        for s in segs:  # what the killed run left on disk at that checkpoint
            (dest / s.path).parent.mkdir(parents=True, exist_ok=True)
            debris = b"" if s.complete else b"written after the checkpoint, never recorded"
            (dest / s.path).write_bytes(payload[s.path][: s.staged] + debris)
        tail = segs[-1]
        tail_hash = None if tail.complete else hashlib.sha256(payload[tail.path][: tail.staged])
        extract(data, dest, monkeypatch, Resume(segs, tail_hash))
        for name, content in payload.items():
            assert (dest / name).read_bytes() == content, (i, name)


def test_a_resumed_archive_cut_short_is_refused(bundle, tmp_path, monkeypatch):
    data, payload = bundle
    segs = next(p for p in extract(data, tmp_path / "full", monkeypatch) if not p[-1].complete)
    dest = tmp_path / "cut"
    for s in segs:
        (dest / s.path).parent.mkdir(parents=True, exist_ok=True)
        (dest / s.path).write_bytes(payload[s.path][: s.staged])
    offset = Resume(segs).offset
    short = data[: offset + 1000]
    from agent.bundle import Manifest

    reader = BundleReader(io.BytesIO(short[offset:]),
                          resume=Resume(segs, hashlib.sha256(payload[segs[-1].path][: segs[-1].staged])))
    manifest = Manifest.from_bytes(BundleReader(io.BytesIO(data)).read_header()[0])
    with pytest.raises(BundleFormatError, match="truncated"):
        reader.extract_payload(manifest, dest)
