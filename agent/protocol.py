"""The MQTT protocol between the fleet (host) and a device agent: topics, commands, replies.

Pure data, no networking: :mod:`agent.transport.mqtt` moves bytes, this module says what they mean.

Topic tree (``Topics``)::

    edgepack/v1/<fleet>/<device>/state        retained {"schema", "state"}: online | offline | lost
    edgepack/v1/<fleet>/<device>/birth        retained: agent version, facts, profile, bundles
    edgepack/v1/<fleet>/<device>/health       periodic: cpu, rss, temperature, disk, tok/s, ...
    edgepack/v1/<fleet>/<device>/events       job progress of an install
    edgepack/v1/<fleet>/<device>/cmd/<name>   requests (host -> device), MQTT 5 Response Topic +
                                              Correlation Data say where the replies go
    edgepack/v1/<fleet>/<device>/reply/<client>   the device's replies to host client <client>

Invariants:
- Fleet, device and client ids match ``[A-Za-z0-9_-]{1,64}``; device ids must not start with
  ``_`` (reserved for host-side namespaces, which a device must never own through an ACL pattern).
- Replies live in the replying device's own subtree (``<device>/reply/<client>``), so the broker
  ACL that confines a device to ``<device>/...`` also keeps it from answering for another device.
  The agent answers only on a Response Topic inside its own ``reply/`` subtree
  (:func:`check_response_topic`); the host accepts a reply only on the topic of the device it
  asked (:meth:`Topics.reply`).
- Every command a host sends carries an MQTT 5 Message Expiry Interval (:data:`COMMAND_EXPIRY`):
  the broker drops it once expired, and the agent drops one that expired while queued behind
  others on the device.
- Everything arriving from the network goes through :func:`parse_command` (or ``from_bytes``),
  which returns a typed, range-checked request or raises :class:`ProtocolError` — never anything
  else, whatever the bytes (a property test holds us to it). The agent answers a ``ProtocolError``
  with ``Reply.failure(err.code, str(err))``, it does not crash.
- Requests are strict (unknown fields refused: a typo in ``max_tokens`` must not silently fall back
  to a default); replies and status payloads are read tolerantly (unknown fields ignored) so an
  older host can read a newer agent.
- Every JSON we write is compact, UTF-8, without NaN/Infinity; every status payload carries
  ``schema`` (:data:`SCHEMA`).
- An ``infer`` request is answered only with :class:`InferChunk` messages, ``seq`` 0, 1, 2, ...;
  the last has ``done=True`` (an error is a final chunk with ``error`` set). Every other command
  gets exactly one :class:`Reply`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import socket
from dataclasses import dataclass
from typing import Any, ClassVar, Final, TypeAlias
from urllib.parse import urlsplit

from agent.errors import (
    BundleFormatError,
    DigestMismatchError,
    DowngradeError,
    FidelityError,
    GateFailedError,
    InferenceError,
    InstallError,
    InsufficientResourcesError,
    KeyringError,
    ManifestError,
    RuntimeUnavailableError,
    SignatureError,
    StoreError,
    TransportError,
    UntrustedDataError,
)
from agent.sampling import DEFAULTS, LIMITS, MAX_STOP_CHARS, MAX_STOP_STRINGS

PREFIX: Final = "edgepack/v1"
SCHEMA: Final = 1
MAX_PAYLOAD_BYTES: Final = 64 << 10  # 64 KiB: a command is small; refuse before parsing
MAX_PROMPT_CHARS: Final = 32_768
MAX_KEYRING_CHARS: Final = 48 << 10  # a signed keyring (agent.bundle.trust.MAX_TRUST_BYTES)
COMMANDS: Final = ("install", "rollback", "status", "probe", "infer", "cancel", "keyring")
# "revoked": written by the host that removed the device's broker account (`edgepack fleet revoke`),
# since a broker that drops a client on a reload may send no last will for it.
STATES: Final = ("online", "offline", "lost", "revoked")
EVENT_STAGES: Final = (
    "downloading", "verified", "installed", "benchmarked", "committed", "rolled_back", "failed",
)
DEVICE_KINDS: Final = ("state", "birth", "health", "events", "cmd")
REPLY_SEGMENT: Final = "reply"
# Message Expiry Interval per command, seconds: how long a command may wait (in the broker's
# session for an offline device, then in the device's queue) before running it is pointless.
# Interactive commands are short (nobody waits a day for a status); an install is long (a rollout
# waits for devices that are offline at dispatch, and its own timeout resends it).
COMMAND_EXPIRY: Final[dict[str, int]] = {
    "status": 60, "probe": 120, "cancel": 60, "infer": 120, "rollback": 3_600, "install": 86_400,
    "keyring": 86_400,
}
ERROR_CODES: Final = (
    "bad_json", "not_object", "unknown_command", "bad_field", "missing_field", "unknown_field",
    "too_large",
)

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_MAX_URL_CHARS = 4096
_MAX_SIZE = 1 << 44  # 16 TiB: far above any bundle, keeps the number a sane integer


class ProtocolError(UntrustedDataError):
    """A message from the network is malformed; ``code`` says how (one of :data:`ERROR_CODES`).

    ``field`` names the offending field when there is one.
    """

    hint = "The message was refused; nothing was changed on the device."

    def __init__(self, message: str, *, code: str, field: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.field = field

    def to_error(self) -> dict[str, str]:
        """The ``{"code", "message"}`` object for a :class:`Reply` or :class:`InferChunk`."""
        return {"code": self.code, "message": str(self)}


# --- ids and topics ------------------------------------------------------------------------------


def default_device_id() -> str:
    """This host's name, reduced to a valid device id (the agent's ``--device`` default)."""
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    return name.lstrip("_")[:64] or "device"


def check_id(value: object, what: str = "id") -> str:
    """Return ``value`` if it is a valid fleet/device/client id.

    Args:
        value: the candidate id.
        what: its role, for the error message.

    Returns:
        ``value`` unchanged.

    Raises:
        ProtocolError: ``bad_field`` if it is not a str matching ``[A-Za-z0-9_-]{1,64}`` (so it
            can hold no MQTT wildcard, separator or control character).
    """
    if not isinstance(value, str) or not _ID.fullmatch(value):  # match() admits a final "\n"
        raise ProtocolError(f"bad {what} {value!r}: want [A-Za-z0-9_-]{{1,64}}", code="bad_field",
                            field=what)
    return value


@dataclass(frozen=True)
class DeviceId:
    """A device within a fleet; both parts validated on construction.

    Raises:
        ProtocolError: a malformed id, or a device id starting with ``_`` (reserved).
    """

    fleet: str
    device: str

    def __post_init__(self) -> None:
        check_id(self.fleet, "fleet")
        check_id(self.device, "device")
        if self.device.startswith("_"):
            raise ProtocolError(f"device id {self.device!r} must not start with '_' (reserved)",
                                code="bad_field", field="device")

    def __str__(self) -> str:
        return f"{self.fleet}/{self.device}"


@dataclass(frozen=True)
class Topics:
    """The topics of one device: ``Topics("lab", "pi-01").state`` etc.

    Raises:
        ProtocolError: as :class:`DeviceId`.
    """

    fleet: str
    device: str

    def __post_init__(self) -> None:
        DeviceId(self.fleet, self.device)  # validates both parts

    @property
    def base(self) -> str:
        return f"{PREFIX}/{self.fleet}/{self.device}"

    @property
    def state(self) -> str:
        return f"{self.base}/state"

    @property
    def birth(self) -> str:
        return f"{self.base}/birth"

    @property
    def health(self) -> str:
        return f"{self.base}/health"

    @property
    def events(self) -> str:
        return f"{self.base}/events"

    @property
    def cmd_filter(self) -> str:
        """The subscription filter for every command of this device."""
        return f"{self.base}/cmd/+"

    def cmd(self, name: str) -> str:
        """The topic of command ``name``.

        Raises:
            ProtocolError: ``unknown_command`` if ``name`` is not in :data:`COMMANDS`.
        """
        if name not in COMMANDS:
            raise ProtocolError(f"unknown command {name!r} (known: {', '.join(COMMANDS)})",
                            code="unknown_command", field="name")
        return f"{self.base}/cmd/{name}"

    @property
    def reply_prefix(self) -> str:
        """The start of every reply topic of this device (its own subtree, under the ACL)."""
        return f"{self.base}/{REPLY_SEGMENT}/"

    def reply(self, client_id: str) -> str:
        """The topic this device answers host client ``client_id`` on:
        ``edgepack/v1/<fleet>/<device>/reply/<client>``.

        Raises:
            ProtocolError: a malformed client id.
        """
        return self.reply_prefix + check_id(client_id, "client")


def reply_filter(fleet: str, client_id: str) -> str:
    """The subscription of host client ``client_id`` to its replies from every device of ``fleet``:
    ``edgepack/v1/<fleet>/+/reply/<client>``. The device level says who answered; check it
    against the device that was asked.

    Raises:
        ProtocolError: a malformed fleet or client id.
    """
    return f"{PREFIX}/{check_id(fleet, 'fleet')}/+/{REPLY_SEGMENT}/{check_id(client_id, 'client')}"


def check_response_topic(topics: Topics, response_topic: str) -> str:
    """Return ``response_topic`` if the device of ``topics`` may answer on it.

    A device answers only inside its own reply subtree, ``<device>/reply/<client>``: never on
    another device's topics or outside the tree, whoever asked (a broker without our ACL, a
    confused or hostile publisher must not turn one device into a forger of another's replies).

    Args:
        topics: the answering device's topics.
        response_topic: the MQTT 5 Response Topic of a command.

    Returns:
        ``response_topic`` unchanged.

    Raises:
        ProtocolError: ``bad_response_topic`` for any other topic (wildcards included).
    """
    prefix = topics.reply_prefix
    client = response_topic[len(prefix):] if isinstance(response_topic, str) else ""
    if not (isinstance(response_topic, str) and response_topic.startswith(prefix)
            and _ID.fullmatch(client)):
        raise ProtocolError(f"response topic {str(response_topic)[:200]!r} is outside this device's "
                            f"reply subtree {prefix}<client>", code="bad_response_topic",
                            field="response_topic")
    return response_topic


def fleet_filter(fleet: str, kind: str = "#") -> str:
    """A host subscription filter over a whole fleet, e.g. ``fleet_filter("lab", "health")``.

    Args:
        fleet: the fleet id.
        kind: one of :data:`DEVICE_KINDS` except ``cmd``, or ``"#"`` for everything.

    Raises:
        ProtocolError: a malformed fleet id or kind.
    """
    check_id(fleet, "fleet")
    if kind == "#":
        return f"{PREFIX}/{fleet}/#"
    if kind not in DEVICE_KINDS or kind == "cmd":
        raise ProtocolError(f"bad topic kind {kind!r}", code="bad_field", field="kind")
    return f"{PREFIX}/{fleet}/+/{kind}"


@dataclass(frozen=True)
class TopicInfo:
    """A parsed topic. ``kind`` is a device kind or ``"reply"``; ``name`` is the command name for
    ``cmd`` topics, the host client id for ``reply`` topics, else ``""``."""

    fleet: str
    device: str
    kind: str
    name: str = ""


def parse_topic(topic: str) -> TopicInfo:
    """Split a concrete topic of our tree back into its parts, validating each.

    Args:
        topic: a topic name as received (no wildcards).

    Returns:
        The :class:`TopicInfo`.

    Raises:
        ProtocolError: ``bad_field`` for a topic outside our tree or with a malformed part;
            ``unknown_command`` for ``cmd/<name>`` with an unknown name.
    """
    if not isinstance(topic, str) or len(topic) > 512:
        raise ProtocolError("bad topic", code="bad_field", field="topic")
    parts = topic.split("/")
    if len(parts) < 5 or "/".join(parts[:2]) != PREFIX:
        raise ProtocolError(f"topic {topic!r} is not under {PREFIX}/", code="bad_field", field="topic")
    fleet, device, rest = parts[2], parts[3], parts[4:]
    check_id(fleet, "fleet")
    DeviceId(fleet, device)
    kind = rest[0]
    if kind == REPLY_SEGMENT:
        if len(rest) != 2:
            raise ProtocolError(f"bad reply topic {topic!r}", code="bad_field", field="topic")
        return TopicInfo(fleet, device, "reply", check_id(rest[1], "client"))
    if kind == "cmd":
        if len(rest) != 2:
            raise ProtocolError(f"bad command topic {topic!r}", code="bad_field", field="topic")
        if rest[1] not in COMMANDS:
            raise ProtocolError(f"unknown command {rest[1]!r}", code="unknown_command", field="name")
        return TopicInfo(fleet, device, "cmd", rest[1])
    if len(rest) != 1 or kind not in DEVICE_KINDS:
        raise ProtocolError(f"unknown topic kind in {topic!r}", code="bad_field", field="topic")
    return TopicInfo(fleet, device, kind)


# --- field checks (shared by the request dataclasses) -----------------------------------------------


def _bad(name: str, why: str) -> ProtocolError:
    return ProtocolError(f"field {name!r} {why}", code="bad_field", field=name)


def _check_str(name: str, v: object, lo: int, hi: int) -> str:
    if not isinstance(v, str):
        raise _bad(name, f"must be a string, not {_json_type(v)}")
    if not lo <= len(v) <= hi:
        raise _bad(name, f"must have {lo}..{hi} characters, has {len(v)}")
    try:
        # JSON can carry lone surrogates ("\ud800"); they cannot be re-encoded for a reply or a log.
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(name, "is not valid Unicode") from None
    return v


def _check_int(name: str, v: object, lo: int, hi: int) -> int:
    # bool is an int subclass in Python and JSON true must not be read as 1.
    if type(v) is not int:
        raise _bad(name, f"must be an integer, not {_json_type(v)}")
    if not lo <= v <= hi:
        raise _bad(name, f"must be in {lo}..{hi}")
    return v


def _check_bool(name: str, v: object) -> bool:
    if not isinstance(v, bool):
        raise _bad(name, f"must be true or false, not {_json_type(v)}")
    return v


def _check_limit(name: str, v: object) -> int | float:
    limit = LIMITS[name]
    if not limit.admits(v):
        if isinstance(v, bool) or not isinstance(v, int | float):
            kind = "an integer" if limit.integer else "a number"
            raise _bad(name, f"must be {kind}, not {_json_type(v)}")
        raise _bad(name, f"must be {limit.describe()}")
    assert isinstance(v, int | float)  # admits() checked it
    return int(v) if limit.integer else float(v)


def _json_type(v: object) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            tuple: "array", dict: "object", type(None): "null"}.get(type(v), type(v).__name__)


# --- requests ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    """Base of the typed requests: strict ``from_dict`` (no unknown, no missing fields)."""

    NAME: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Command:
        """Build and validate a request from a decoded JSON object.

        Raises:
            ProtocolError: ``unknown_field``, ``missing_field`` or ``bad_field``.
        """
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names)
        if unknown:
            raise ProtocolError(f"{cls.NAME}: unknown field {unknown[0]!r}", code="unknown_field",
                                field=str(unknown[0]))
        for n, f in names.items():
            if n not in d and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{cls.NAME}: missing field {n!r}", code="missing_field", field=n)
        return cls(**d)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this request (tuples become lists)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    def to_bytes(self) -> bytes:
        """The compact UTF-8 JSON payload to publish on ``cmd/<NAME>``."""
        return _dumps(self.to_dict())


@dataclass(frozen=True)
class InstallRequest(_Request):
    """Install the bundle at ``url`` (http, https or file), whose sha256 and size are given.

    ``job`` names the install (a rollout derives it from itself and the device): the agent keeps
    the outcome of every named job, so the same job sent again — a controller that restarted and
    resends what it had in flight — is answered with the recorded outcome, never executed twice.
    """

    NAME: ClassVar[str] = "install"
    url: str
    sha256: str
    size: int
    job: str | None = None

    def __post_init__(self) -> None:
        _check_str("url", self.url, 1, _MAX_URL_CHARS)
        if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in self.url):
            raise _bad("url", "must not contain whitespace or control characters")
        try:
            parts = urlsplit(self.url)
        except ValueError:
            raise _bad("url", "is not a URL") from None
        if parts.scheme not in ("http", "https", "file"):
            raise _bad("url", "must be an http://, https:// or file:// URL")
        if not self.url.startswith(parts.scheme + "://"):
            raise _bad("url", "must be an absolute URL (scheme://...)")
        if parts.scheme == "file":
            if not parts.path.startswith("/"):
                raise _bad("url", "file:// URL needs an absolute path")
        elif not parts.hostname:
            raise _bad("url", "needs a host")
        if not isinstance(self.sha256, str) or not _SHA256.match(self.sha256):
            raise _bad("sha256", "must be 64 lowercase hex digits")
        _check_int("size", self.size, 1, _MAX_SIZE)
        if self.job is not None:
            _check_job(self.job)


@dataclass(frozen=True)
class RollbackRequest(_Request):
    """Switch back to the previously installed bundle.

    ``job`` makes it idempotent as for :class:`InstallRequest` (a rollback done twice would swap
    back). ``from_digest``, the manifest digest of the bundle to leave, makes it conditional: if
    something else is current, nothing changes and the reply says so.
    """

    NAME: ClassVar[str] = "rollback"
    job: str | None = None
    from_digest: str | None = None

    def __post_init__(self) -> None:
        if self.job is not None:
            _check_job(self.job)
        if self.from_digest is not None and (not isinstance(self.from_digest, str)
                                             or not _SHA256.match(self.from_digest)):
            raise _bad("from_digest", "must be 64 lowercase hex digits")


@dataclass(frozen=True)
class StatusRequest(_Request):
    """Report installed bundles, the serving model and current jobs."""

    NAME: ClassVar[str] = "status"


@dataclass(frozen=True)
class ProbeRequest(_Request):
    """Report hardware facts; ``runtimes=True`` also checks which runtimes can run here."""

    NAME: ClassVar[str] = "probe"
    runtimes: bool = False

    def __post_init__(self) -> None:
        _check_bool("runtimes", self.runtimes)


@dataclass(frozen=True)
class InferRequest(_Request):
    """Generate from the serving model; answered by a stream of :class:`InferChunk`.

    ``stop`` is kept as a tuple (frozen, hashable); JSON lists are accepted. ``seed=None`` means
    random; ``request_id`` lets a later ``cancel`` name this request.
    """

    NAME: ClassVar[str] = "infer"
    prompt: str
    max_tokens: int = DEFAULTS.max_tokens
    temperature: float = DEFAULTS.temperature
    top_p: float = DEFAULTS.top_p
    top_k: int = DEFAULTS.top_k
    repeat_penalty: float = DEFAULTS.repeat_penalty
    stop: tuple[str, ...] = ()
    chat: bool = False
    seed: int | None = None
    request_id: str | None = None

    def __post_init__(self) -> None:
        _check_str("prompt", self.prompt, 1, MAX_PROMPT_CHARS)
        for name in ("max_tokens", "temperature", "top_p", "top_k", "repeat_penalty"):
            value = _check_limit(name, getattr(self, name))
            # Normalize numbers to float so InferRequest(temperature=1) == one parsed from "1.0".
            object.__setattr__(self, name, value)
        if not isinstance(self.stop, list | tuple):
            raise _bad("stop", f"must be an array of strings, not {_json_type(self.stop)}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise _bad("stop", f"must have at most {MAX_STOP_STRINGS} items")
        for i, s in enumerate(self.stop):
            _check_str(f"stop[{i}]", s, 1, MAX_STOP_CHARS)
        object.__setattr__(self, "stop", tuple(self.stop))
        _check_bool("chat", self.chat)
        if self.seed is not None:
            _check_limit("seed", self.seed)
        if self.request_id is not None:
            _check_request_id(self.request_id)


@dataclass(frozen=True)
class KeyringRequest(_Request):
    """Replace the device's root-signed keyring with ``keyring`` (the signed-keyring file's text,
    agent/bundle/trust.py); the device verifies it against the keyring it holds."""

    NAME: ClassVar[str] = "keyring"
    keyring: str

    def __post_init__(self) -> None:
        _check_str("keyring", self.keyring, 2, MAX_KEYRING_CHARS)


@dataclass(frozen=True)
class CancelRequest(_Request):
    """Cancel the running inference whose ``request_id`` is given."""

    NAME: ClassVar[str] = "cancel"
    request_id: str

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)


def _check_request_id(v: object, name: str = "request_id") -> None:
    if not isinstance(v, str) or not _REQUEST_ID.match(v):
        raise _bad(name, "must match [A-Za-z0-9_.:-]{1,128}")


def _check_job(v: object) -> None:
    _check_request_id(v, "job")


Command: TypeAlias = (
    InstallRequest | RollbackRequest | StatusRequest | ProbeRequest | InferRequest | CancelRequest
    | KeyringRequest
)
REQUEST_TYPES: Final[dict[str, type[_Request]]] = {
    c.NAME: c
    for c in (InstallRequest, RollbackRequest, StatusRequest, ProbeRequest, InferRequest, CancelRequest,
              KeyringRequest)
}


def parse_command(name: str, payload: bytes) -> Command:
    """Validate a command from the network and return its typed request.

    Args:
        name: the command name (the last topic level of ``cmd/<name>``).
        payload: the raw MQTT payload.

    Returns:
        One of the request dataclasses, fully validated.

    Raises:
        ProtocolError: ``unknown_command``, ``too_large`` (over :data:`MAX_PAYLOAD_BYTES`),
            ``bad_json`` (not UTF-8 JSON, NaN/Infinity, duplicate keys, too deep), ``not_object``,
            ``unknown_field``, ``missing_field`` or ``bad_field`` (wrong type or out of range).
    """
    cls = REQUEST_TYPES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ProtocolError(f"unknown command {name!r} (known: {', '.join(COMMANDS)})",
                            code="unknown_command", field="name")
    d = decode_object(payload)
    return cls.from_dict(d)


# --- JSON in and out -----------------------------------------------------------------------------


def _refuse_constant(s: str) -> Any:
    raise ProtocolError(f"JSON constant {s} is not allowed", code="bad_json")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        # Two parsers may keep different duplicates; refuse rather than guess which one counts.
        raise ProtocolError("duplicate key in JSON object", code="bad_json")
    return d


def decode_object(payload: bytes, *, limit: int = MAX_PAYLOAD_BYTES) -> dict[str, Any]:
    """Decode an untrusted payload that must be one JSON object.

    Args:
        payload: raw bytes.
        limit: the size cap in bytes, checked before parsing.

    Returns:
        The decoded dict.

    Raises:
        ProtocolError: ``too_large``, ``bad_json`` or ``not_object``.
    """
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise ProtocolError("payload must be bytes", code="bad_json")
    if len(payload) > limit:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {limit}", code="too_large")
    try:
        text = bytes(payload).decode("utf-8")
        value = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_no_duplicates)
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as e:
        # ValueError covers bad UTF-8, bad JSON and over-long integers; RecursionError deep nesting.
        raise ProtocolError(f"payload is not UTF-8 JSON: {type(e).__name__}", code="bad_json") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"payload must be a JSON object, not {_json_type(value)}", code="not_object")
    return value


def _dumps(obj: Any) -> bytes:
    try:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError, UnicodeEncodeError) as e:
        raise ProtocolError(f"cannot encode payload: {e}", code="bad_field") from None


def _check_error(v: object, where: str) -> dict[str, str] | None:
    if v is None:
        return None
    if (not isinstance(v, dict) or not isinstance(v.get("code"), str)
            or not isinstance(v.get("message"), str)):
        raise ProtocolError(f"{where}.error must be {{code: str, message: str}}", code="bad_field",
                            field="error")
    return {"code": v["code"], "message": v["message"]}


def _opt_dict(v: object, name: str) -> dict[str, Any] | None:
    if v is not None and not isinstance(v, dict):
        raise _bad(name, f"must be an object or null, not {_json_type(v)}")
    return v


# --- error codes ---------------------------------------------------------------------------------


def error_code(e: BaseException) -> str:
    """A stable machine code for an error, for replies and events.

    ``slo_failed``: the new model loaded but missed its SLO in the post-install gate and was
    rolled back; ``fidelity_failed``: it loaded but computes other tokens than the build host did
    (the gate's fidelity check, agent.fidelity) and was rolled back; ``install_failed`` is any
    other failed load check; ``interrupted``: the agent stopped during the install (its download
    was cancelled, or the agent died and says so when it is back): sent again, it resumes.
    """
    # The store wraps whatever the load check raised in InstallError(rolled_back=True); the
    # cause says whether it was the gate, which a rollout reacts to differently (the build is
    # too slow for the profile, or this device computes it wrong: not a transient failure).
    gate = e if isinstance(e, GateFailedError) else (
        e.__cause__ if isinstance(e, InstallError) else None)
    if isinstance(gate, FidelityError):
        return "fidelity_failed"
    if isinstance(gate, GateFailedError):
        return "slo_failed"
    if isinstance(e, ProtocolError):
        return e.code
    if isinstance(e, InstallError) and e.step == "fetch":
        return "interrupted"  # the download was cancelled because the agent stops: send it again
    for cls, code in _ERROR_CODES:
        if isinstance(e, cls):
            return code
    return "internal"


_ERROR_CODES: Final[tuple[tuple[type[BaseException], str], ...]] = (
    (DowngradeError, "downgrade"), (SignatureError, "signature"),
    (DigestMismatchError, "digest_mismatch"), (BundleFormatError, "bad_bundle"),
    (ManifestError, "bad_manifest"), (InsufficientResourcesError, "insufficient_resources"),
    (InstallError, "install_failed"), (TransportError, "download_failed"),
    (StoreError, "store"), (RuntimeUnavailableError, "runtime_unavailable"),
    (InferenceError, "inference_failed"), (KeyringError, "bad_keyring"),
)


# --- replies -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """The one answer to a non-streaming command: ``ok`` with ``result``, or an ``error``.

    Raises:
        ProtocolError: ``bad_field`` if ``ok`` and ``error`` disagree or a field has a wrong type.
    """

    ok: bool
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None

    def __post_init__(self) -> None:
        _check_bool("ok", self.ok)
        _opt_dict(self.result, "result")
        object.__setattr__(self, "error", _check_error(self.error, "reply"))
        if self.ok == (self.error is not None):
            raise _bad("error", "must be set exactly when ok is false")

    @classmethod
    def success(cls, result: dict[str, Any] | None = None) -> Reply:
        return cls(True, result if result is not None else {}, None)

    @classmethod
    def failure(cls, code: str, message: str) -> Reply:
        return cls(False, None, {"code": code, "message": message})

    def to_bytes(self) -> bytes:
        """Compact JSON. Raises ProtocolError if ``result`` is not JSON-serializable."""
        return _dumps({"ok": self.ok, "result": self.result, "error": self.error})

    @classmethod
    def from_bytes(cls, payload: bytes) -> Reply:
        """Parse a reply (unknown fields ignored, for newer agents).

        Raises:
            ProtocolError: malformed payload or fields.
        """
        d = decode_object(payload, limit=MAX_PAYLOAD_BYTES * 16)
        if "ok" not in d:
            raise ProtocolError("reply: missing field 'ok'", code="missing_field", field="ok")
        return cls(d["ok"], d.get("result"), d.get("error"))


@dataclass(frozen=True)
class InferChunk:
    """One ordered piece of an inference answer; the last one has ``done=True``.

    ``usage`` (token counts, timings) comes with the last chunk; ``error`` ends a failed stream.

    Raises:
        ProtocolError: ``bad_field`` on a wrong type or a negative ``seq``.
    """

    seq: int
    text: str
    done: bool = False
    usage: dict[str, Any] | None = None
    error: dict[str, str] | None = None

    def __post_init__(self) -> None:
        _check_int("seq", self.seq, 0, 1 << 53)
        if not isinstance(self.text, str):
            raise _bad("text", f"must be a string, not {_json_type(self.text)}")
        _check_bool("done", self.done)
        _opt_dict(self.usage, "usage")
        object.__setattr__(self, "error", _check_error(self.error, "chunk"))
        if self.error is not None and not self.done:
            raise _bad("done", "must be true on a chunk carrying an error")

    @classmethod
    def failure(cls, seq: int, code: str, message: str) -> InferChunk:
        return cls(seq, "", True, None, {"code": code, "message": message})

    def to_bytes(self) -> bytes:
        """Compact JSON. Raises ProtocolError if ``usage`` is not JSON-serializable."""
        return _dumps({"seq": self.seq, "text": self.text, "done": self.done, "usage": self.usage,
                       "error": self.error})

    @classmethod
    def from_bytes(cls, payload: bytes) -> InferChunk:
        """Parse a chunk (unknown fields ignored).

        Raises:
            ProtocolError: malformed payload or fields.
        """
        d = decode_object(payload, limit=MAX_PAYLOAD_BYTES * 16)
        for k in ("seq", "text"):
            if k not in d:
                raise ProtocolError(f"chunk: missing field {k!r}", code="missing_field", field=k)
        return cls(d["seq"], d["text"], d.get("done", False), d.get("usage"), d.get("error"))


# --- status payloads (device -> host) -------------------------------------------------------------

def _envelope(body: dict[str, Any], **fields: Any) -> bytes:
    if not isinstance(body, dict):
        raise _bad("body", "must be an object")
    return _dumps({**body, **fields, "schema": SCHEMA})


def state_payload(state: str, *, ts: float | None = None) -> bytes:
    """The retained ``state`` payload. The last will uses ``state_payload("lost")`` (no ``ts``:
    it is fixed at connect time, long before it is sent).

    Raises:
        ProtocolError: ``bad_field`` for a state not in :data:`STATES`.
    """
    if state not in STATES:
        raise _bad("state", f"must be one of {STATES}")
    return _envelope({}, state=state, **({"ts": ts} if ts is not None else {}))


def parse_state(payload: bytes) -> str:
    """The state name from a ``state`` payload.

    Raises:
        ProtocolError: malformed payload or unknown state.
    """
    d = decode_object(payload)
    if d.get("state") not in STATES:
        raise _bad("state", f"must be one of {STATES}")
    return str(d["state"])


def birth_payload(body: dict[str, Any]) -> bytes:
    """The retained ``birth`` payload: ``body`` (agent_version, facts, profile, bundles, ...) plus
    ``schema``.

    Raises:
        ProtocolError: ``bad_field`` if ``body`` is not JSON-serializable.
    """
    return _envelope(body)


def health_payload(body: dict[str, Any], *, ts: float) -> bytes:
    """The periodic ``health`` payload: ``body`` (cpu, rss, temperature, disk, ...) plus ``schema``
    and ``ts`` (seconds since the epoch; the caller reads the clock).

    Raises:
        ProtocolError: ``bad_field`` if ``body`` is not JSON-serializable.
    """
    return _envelope(body, ts=ts)


def event_payload(job: str, stage: str, *, ts: float, detail: dict[str, Any] | None = None) -> bytes:
    """An ``events`` payload: job ``job`` reached ``stage`` (one of :data:`EVENT_STAGES`).

    Raises:
        ProtocolError: ``bad_field`` for an unknown stage, a malformed job id or bad ``detail``.
    """
    _check_request_id(job)
    if stage not in EVENT_STAGES:
        raise _bad("stage", f"must be one of {EVENT_STAGES}")
    return _envelope(detail or {}, job=job, stage=stage, ts=ts)


def parse_status(payload: bytes) -> dict[str, Any]:
    """Decode a birth/health/event payload (host side), checking only the ``schema`` major.

    Raises:
        ProtocolError: malformed payload, or ``bad_field`` if ``schema`` is not :data:`SCHEMA`.
    """
    d = decode_object(payload, limit=MAX_PAYLOAD_BYTES * 16)
    if d.get("schema") != SCHEMA or isinstance(d.get("schema"), bool):
        raise _bad("schema", f"must be {SCHEMA}")
    return d


__all__ = [
    "COMMANDS", "COMMAND_EXPIRY", "EVENT_STAGES", "MAX_PAYLOAD_BYTES", "PREFIX", "SCHEMA", "STATES",
    "CancelRequest", "Command", "DeviceId", "InferChunk", "InferRequest", "InstallRequest",
    "KeyringRequest", "ProbeRequest", "ProtocolError", "Reply", "RollbackRequest", "StatusRequest",
    "TopicInfo", "Topics", "birth_payload", "check_id", "check_response_topic", "decode_object",
    "default_device_id", "error_code", "event_payload", "fleet_filter", "health_payload",
    "parse_command", "parse_state", "parse_status", "parse_topic", "reply_filter", "state_payload",
]
