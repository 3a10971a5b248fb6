"""The bundle manifest: what a signed bundle contains and promises.

Invariants:
- The manifest travels as exact bytes (``manifest.json``); signatures cover those bytes. We parse
  only after verifying, and never re-serialize to verify.
- ``to_bytes()`` is canonical (sorted keys, compact, UTF-8) so the producer's bytes are stable.
- Unknown fields survive a round trip (``unrecognized``) so an older agent can read a newer minor
  format; a different major ``format_version`` is refused.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

from agent.errors import ManifestError

FORMAT_VERSION = "1.0"
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
MAX_MANIFEST_BYTES = 1 << 20  # 1 MiB: a manifest is small; cap the read before parsing
MAX_SIGNATURE_BYTES = 64 << 10
MAX_FILES = 10_000
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_member_path(path: str) -> str:
    """Return ``path`` if it is a safe relative POSIX path inside the bundle, else raise.

    Raises:
        ManifestError: absolute, empty, ``..``/``.`` components, backslashes, or control chars.
    """
    if not isinstance(path, str) or not path or len(path) > 1024:
        raise ManifestError(f"bad file path {path!r}")
    if path.startswith("/") or "\\" in path or any(ord(c) < 32 for c in path):
        raise ManifestError(f"file path {path!r} must be relative POSIX without control chars")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts) or posixpath.normpath(path) != path:
        raise ManifestError(f"file path {path!r} must not contain '', '.' or '..' components")
    if path in (MANIFEST_NAME, SIGNATURE_NAME):
        raise ManifestError(f"{path!r} is reserved")
    return path


def _req(d: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise ManifestError(f"{where}: missing {key!r}")
    v = d[key]
    # bool is an int subclass; a version of True is not a version.
    if isinstance(v, bool) and typ is not bool and bool not in (typ if isinstance(typ, tuple) else (typ,)):
        raise ManifestError(f"{where}.{key} has the wrong type")
    if not isinstance(v, typ):
        raise ManifestError(f"{where}.{key} has the wrong type ({type(v).__name__})")
    return v


def _split(d: dict[str, Any], known: set[str]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in known}


@dataclass(frozen=True)
class FileEntry:
    """One payload file: its path inside the bundle, exact size and sha256 (hex)."""

    path: str
    size: int
    sha256: str

    def __post_init__(self) -> None:
        check_member_path(self.path)
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise ManifestError(f"file {self.path}: size must be a non-negative integer")
        if not isinstance(self.sha256, str) or not _SHA256.match(self.sha256):
            raise ManifestError(f"file {self.path}: sha256 must be 64 lowercase hex digits")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FileEntry:
        if not isinstance(d, dict):
            raise ManifestError("files[] entries must be objects")
        return cls(
            path=_req(d, "path", str, "file"),
            size=_req(d, "size", int, "file"),
            sha256=_req(d, "sha256", str, "file"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


MAX_FIDELITY_POSITIONS = 1024
MAX_FIDELITY_WINDOW = 4096


@dataclass(frozen=True)
class Fidelity:
    """What the build host computed on the fixed probe text through the serving runtime.

    The ``fidelity`` table of a manifest (see agent/fidelity.py for the check): the top-1
    next-token id at each of the first ``positions`` positions of the probe, scored by
    ``Runtime.evaluate_nll(probe, window=window)``, and the fraction of them a device must
    reproduce. Unknown keys survive a round trip.
    """

    probe_sha256: str  # sha256 of the probe text's UTF-8 bytes: which text the ids belong to
    window: int  # the scoring window the ids were measured with
    top1: tuple[int, ...]  # one token id per position; positions == len(top1)
    threshold: float  # agreement in [0, 1] a device must reach; 0 = unchecked
    runtime: str  # the runtime that measured them (the one that serves the bundle)
    device: str = "cpu"  # the build host's device they were measured on
    measured_as: str = ""  # another variant's key when this one cannot load there (its CPU build)
    unrecognized: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.probe_sha256, str) or not _SHA256.match(self.probe_sha256):
            raise ManifestError("fidelity.probe_sha256 must be 64 lowercase hex digits")
        if isinstance(self.window, bool) or not isinstance(self.window, int) \
                or not 1 <= self.window <= MAX_FIDELITY_WINDOW:
            raise ManifestError(f"fidelity.window must be an integer in [1, {MAX_FIDELITY_WINDOW}]")
        ids = tuple(self.top1) if isinstance(self.top1, list | tuple) else None
        if not ids or len(ids) > MAX_FIDELITY_POSITIONS or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise ManifestError(f"fidelity.top1 must list 1-{MAX_FIDELITY_POSITIONS} token ids "
                                "(integers >= 0)")
        object.__setattr__(self, "top1", ids)
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0.0 <= t <= 1.0:
            raise ManifestError("fidelity.threshold must be a number in [0, 1]")
        object.__setattr__(self, "threshold", float(t))
        if not isinstance(self.runtime, str) or not self.runtime:
            raise ManifestError("fidelity.runtime must be a non-empty string")

    @property
    def positions(self) -> int:
        return len(self.top1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fidelity:
        """Validate a manifest's ``fidelity`` table.

        Raises:
            ManifestError: a field is missing, of the wrong type, or ``positions`` does not count
                ``top1``.
        """
        if not isinstance(d, dict):
            raise ManifestError("manifest.fidelity must be an object")
        top1 = _req(d, "top1", list, "fidelity")
        positions = _req(d, "positions", int, "fidelity")
        if positions != len(top1):
            raise ManifestError(f"fidelity.positions is {positions} but top1 lists {len(top1)} ids")
        known = {"probe_sha256", "window", "top1", "positions", "threshold", "runtime", "device",
                 "measured_as"}
        return cls(
            probe_sha256=_req(d, "probe_sha256", str, "fidelity"),
            window=_req(d, "window", int, "fidelity"),
            top1=tuple(top1),
            threshold=_req(d, "threshold", (int, float), "fidelity"),
            runtime=_req(d, "runtime", str, "fidelity"),
            device=str(d.get("device", "cpu")),
            measured_as=str(d.get("measured_as", "")),
            unrecognized=_split(d, known),
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.unrecognized)
        d.update({"probe_sha256": self.probe_sha256, "window": self.window,
                  "positions": self.positions, "top1": list(self.top1),
                  "threshold": self.threshold, "runtime": self.runtime, "device": self.device})
        if self.measured_as:
            d["measured_as"] = self.measured_as
        return d


@dataclass(frozen=True)
class Target:
    """How the payload runs: runtime plugin, format, precision and the tool's quant name."""

    runtime: str
    format: str
    precision: str
    quant: str = ""
    device: str = "cpu"
    entrypoint: str = ""  # the file (or folder) the runtime loads, relative to the bundle root


@dataclass(frozen=True)
class Requirements:
    """What the device must offer before anything is written."""

    arch: tuple[str, ...] = ()  # empty = any
    min_ram_bytes: int = 0
    min_disk_bytes: int = 0


@dataclass
class Manifest:
    """A parsed bundle manifest. Build with the constructor (producer) or :meth:`from_bytes`."""

    model_name: str
    version: int  # monotonic per model_name; the device refuses anything not newer
    profile: str
    target: Target
    files: list[FileEntry]
    requirements: Requirements = field(default_factory=Requirements)
    generation: dict[str, Any] = field(default_factory=dict)  # context, threads, chat_template, ...
    quality: dict[str, Any] = field(default_factory=dict)  # metric, reference, delta_pct, ...
    slo: dict[str, Any] = field(default_factory=dict)
    # The build host's top-1 ids on the fixed probe (agent/fidelity.py); None: an older bundle
    # without one (the gate then reports the check as not done).
    fidelity: Fidelity | None = None
    source: dict[str, Any] = field(default_factory=dict)  # kind, digest of the source model
    # Who chose the precision when not the profile (``by: "user"``, what was requested, what the
    # profile would have chosen, RAM forced, a replaced quality budget); empty: the profile chose.
    choice: dict[str, Any] = field(default_factory=dict)
    signer_key_id: str = ""
    created: str = ""  # ISO 8601 UTC, informational only (never used for trust)
    format_version: str = FORMAT_VERSION
    unrecognized: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _NAME.match(self.model_name):
            raise ManifestError(f"model name {self.model_name!r} must match {_NAME.pattern}")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 0:
            raise ManifestError("version must be a non-negative integer")
        if not _NAME.match(self.profile):
            raise ManifestError(f"profile {self.profile!r} must match {_NAME.pattern}")
        if not self.files:
            raise ManifestError("a bundle must list at least one file")
        if len(self.files) > MAX_FILES:
            raise ManifestError(f"too many files ({len(self.files)} > {MAX_FILES})")
        seen: set[str] = set()
        for f in self.files:
            if f.path in seen:
                raise ManifestError(f"file {f.path} is listed twice")
            seen.add(f.path)
        # A file and a folder of the same name cannot both be extracted.
        dirs = {"/".join(p.split("/")[:i]) for p in seen for i in range(1, p.count("/") + 1)}
        if dirs & seen:
            raise ManifestError(f"paths {sorted(dirs & seen)} are both files and folders")
        entry = self.target.entrypoint
        if entry and entry not in seen and entry not in dirs:
            raise ManifestError(f"entrypoint {entry!r} is not among the files")
        major = self.format_version.split(".")[0]
        if major != FORMAT_VERSION.split(".")[0]:
            raise ManifestError(
                f"manifest format {self.format_version} is not supported "
                f"(this agent reads {FORMAT_VERSION.split('.')[0]}.x)",
                hint="Upgrade the agent.",
            )

    # --- derived -------------------------------------------------------------------------------

    @property
    def payload_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> FileEntry | None:
        for f in self.files:
            if f.path == path:
                return f
        return None

    # --- serialization -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.unrecognized)
        d.update(
            {
                "format_version": self.format_version,
                "model": {"name": self.model_name, "version": self.version},
                "profile": self.profile,
                "target": {
                    "runtime": self.target.runtime,
                    "format": self.target.format,
                    "precision": self.target.precision,
                    "quant": self.target.quant,
                    "device": self.target.device,
                    "entrypoint": self.target.entrypoint,
                },
                "files": [f.to_dict() for f in self.files],
                "requirements": {
                    "arch": list(self.requirements.arch),
                    "min_ram_bytes": self.requirements.min_ram_bytes,
                    "min_disk_bytes": self.requirements.min_disk_bytes,
                },
                "generation": self.generation,
                "quality": self.quality,
                "slo": self.slo,
                "source": self.source,
                "signer": {"key_id": self.signer_key_id},
                "created": self.created,
            }
        )
        if self.fidelity is not None:  # absent, not null: older manifests keep their exact bytes
            d["fidelity"] = self.fidelity.to_dict()
        if self.choice:  # absent when the profile chose, likewise
            d["choice"] = self.choice
        return d

    def to_bytes(self) -> bytes:
        """Canonical bytes: sorted keys, no whitespace, UTF-8. These are what gets signed."""
        return json.dumps(
            self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode("utf-8")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        """Validate a manifest object.

        Raises:
            ManifestError: a field is missing, of the wrong type, or inconsistent.
        """
        if not isinstance(d, dict):
            raise ManifestError("manifest must be a JSON object")
        fv = _req(d, "format_version", str, "manifest")
        if fv.split(".")[0] != FORMAT_VERSION.split(".")[0]:
            raise ManifestError(
                f"manifest format {fv} is not supported (this agent reads "
                f"{FORMAT_VERSION.split('.')[0]}.x)",
                hint="Upgrade the agent.",
            )
        model = _req(d, "model", dict, "manifest")
        t = _req(d, "target", dict, "manifest")
        r = d.get("requirements", {})
        files = _req(d, "files", list, "manifest")
        signer = d.get("signer", {})
        for name, v in (("requirements", r), ("signer", signer)):
            if not isinstance(v, dict):
                raise ManifestError(f"manifest.{name} must be an object")
        for name in ("generation", "quality", "slo", "source", "choice"):
            if not isinstance(d.get(name, {}), dict):
                raise ManifestError(f"manifest.{name} must be an object")
        arch = r.get("arch", [])
        if not isinstance(arch, list) or not all(isinstance(a, str) for a in arch):
            raise ManifestError("requirements.arch must be a list of strings")
        known = {"format_version", "model", "profile", "target", "files", "requirements",
                 "generation", "quality", "slo", "fidelity", "source", "choice", "signer",
                 "created"}
        fidelity = Fidelity.from_dict(d["fidelity"]) if "fidelity" in d else None
        return cls(
            format_version=fv,
            model_name=_req(model, "name", str, "model"),
            version=_req(model, "version", int, "model"),
            profile=_req(d, "profile", str, "manifest"),
            target=Target(
                runtime=_req(t, "runtime", str, "target"),
                format=_req(t, "format", str, "target"),
                precision=_req(t, "precision", str, "target"),
                quant=str(t.get("quant", "")),
                device=str(t.get("device", "cpu")),
                entrypoint=str(t.get("entrypoint", "")),
            ),
            files=[FileEntry.from_dict(f) for f in files],
            requirements=Requirements(
                arch=tuple(arch),
                min_ram_bytes=_nonneg(r.get("min_ram_bytes", 0), "requirements.min_ram_bytes"),
                min_disk_bytes=_nonneg(r.get("min_disk_bytes", 0), "requirements.min_disk_bytes"),
            ),
            generation=dict(d.get("generation", {})),
            quality=dict(d.get("quality", {})),
            slo=dict(d.get("slo", {})),
            fidelity=fidelity,
            source=dict(d.get("source", {})),
            choice=dict(d.get("choice", {})),
            signer_key_id=str(signer.get("key_id", "")),
            created=str(d.get("created", "")),
            unrecognized=_split(d, known),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse manifest bytes (call only after the signature over them verified).

        Raises:
            ManifestError: too large, not UTF-8 JSON, or invalid.
        """
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest is {len(data)} bytes (limit {MAX_MANIFEST_BYTES})")
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # nesting too deep
            raise ManifestError(f"manifest is not valid UTF-8 JSON: {e}") from e
        return cls.from_dict(obj)


def _nonneg(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ManifestError(f"{what} must be a non-negative integer")
    return v
