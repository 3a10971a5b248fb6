"""agent.protocol: topics, strict command parsing, replies, status payloads."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import UntrustedDataError
from agent.protocol import (
    COMMANDS,
    MAX_PAYLOAD_BYTES,
    CancelRequest,
    DeviceId,
    InferChunk,
    InferRequest,
    InstallRequest,
    ProbeRequest,
    ProtocolError,
    Reply,
    RollbackRequest,
    StatusRequest,
    Topics,
    birth_payload,
    check_response_topic,
    event_payload,
    fleet_filter,
    health_payload,
    parse_command,
    parse_state,
    parse_status,
    parse_topic,
    reply_filter,
    state_payload,
)
from agent.sampling import DEFAULTS

SHA = "ab" * 32


def j(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def code_of(name: str, payload: bytes) -> str:
    with pytest.raises(ProtocolError) as ei:
        parse_command(name, payload)
    return ei.value.code


# --- topics ----------------------------------------------------------------------------------


def test_topics_layout() -> None:
    t = Topics("lab", "pi-01")
    assert t.state == "edgepack/v1/lab/pi-01/state"
    assert t.birth.endswith("/birth") and t.health.endswith("/health") and t.events.endswith("/events")
    assert t.cmd("infer") == "edgepack/v1/lab/pi-01/cmd/infer"
    assert t.cmd_filter == "edgepack/v1/lab/pi-01/cmd/+"
    assert t.reply("host-1") == "edgepack/v1/lab/pi-01/reply/host-1"
    assert reply_filter("lab", "host-1") == "edgepack/v1/lab/+/reply/host-1"
    assert fleet_filter("lab", "health") == "edgepack/v1/lab/+/health"
    assert fleet_filter("lab") == "edgepack/v1/lab/#"


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "#", "x" * 65, "sp ace", "é", "a\x00"])
def test_ids_refuse_wildcards_separators_and_junk(bad: str) -> None:
    with pytest.raises(ProtocolError):
        Topics(bad, "dev")
    with pytest.raises(ProtocolError):
        Topics("fleet", bad)


def test_device_ids_starting_with_underscore_are_reserved() -> None:
    # "_..." is kept for host-side namespaces; a device named so would own them via the ACL.
    with pytest.raises(ProtocolError):
        DeviceId("lab", "_clients")


def test_unknown_command_topic_refused() -> None:
    with pytest.raises(ProtocolError) as ei:
        Topics("lab", "d").cmd("reboot")
    assert ei.value.code == "unknown_command"


@pytest.mark.parametrize("kind", ["state", "birth", "health", "events"])
def test_parse_topic_round_trip(kind: str) -> None:
    t = Topics("lab", "pi-01")
    info = parse_topic(getattr(t, kind))
    assert (info.fleet, info.device, info.kind, info.name) == ("lab", "pi-01", kind, "")


def test_parse_topic_cmd_and_reply() -> None:
    assert parse_topic(Topics("f", "d").cmd("cancel")).name == "cancel"
    info = parse_topic(Topics("f", "d").reply("host"))
    assert (info.fleet, info.device, info.kind, info.name) == ("f", "d", "reply", "host")


def test_a_device_answers_only_inside_its_own_reply_subtree() -> None:
    mine = Topics("lab", "pi-01")
    assert check_response_topic(mine, mine.reply("host-1")) == mine.reply("host-1")


@pytest.mark.parametrize("topic", [
    "edgepack/v1/lab/pi-02/reply/host-1",  # another device's reply topic
    "edgepack/v1/lab/_clients/host-1/reply",  # the old shared reply namespace
    "edgepack/v1/other/pi-01/reply/host-1",  # another fleet
    "edgepack/v1/lab/pi-01/reply/", "edgepack/v1/lab/pi-01/reply/+", "edgepack/v1/lab/pi-01/reply/#",
    "edgepack/v1/lab/pi-01/reply/a/b", "edgepack/v1/lab/pi-01/reply/host\n",
    "edgepack/v1/lab/pi-01/state", "edgepack/v1/lab/pi-01/cmd/install", "anything/else", "",
])
def test_a_response_topic_outside_the_devices_reply_subtree_is_refused(topic: str) -> None:
    with pytest.raises(ProtocolError) as ei:
        check_response_topic(Topics("lab", "pi-01"), topic)
    assert ei.value.code == "bad_response_topic" and ei.value.field == "response_topic"


@pytest.mark.parametrize("topic", [
    "edgepack/v2/f/d/state", "edgepack/v1/f/d", "edgepack/v1/f/d/state/x", "edgepack/v1/f/d/cmd",
    "edgepack/v1/f/d/cmd/reboot", "edgepack/v1/f/d/other", "edgepack/v1/f/+/state",
    "edgepack/v1/f/_clients/h", "edgepack/v1/#/d/state", "edgepack/v1/f/_x/state",
    "edgepack/v1/f/_clients/h/reply", "edgepack/v1/f/d/reply", "edgepack/v1/f/d/reply/h/x",
    "edgepack/v1/f/d/reply/+",
])
def test_parse_topic_refuses(topic: str) -> None:
    with pytest.raises(ProtocolError):
        parse_topic(topic)


# --- commands: the good ones -------------------------------------------------------------------


def test_minimal_commands() -> None:
    assert parse_command("status", b"{}") == StatusRequest()
    assert parse_command("rollback", b"{}") == RollbackRequest()
    assert parse_command("probe", b'{"runtimes": true}') == ProbeRequest(runtimes=True)
    assert parse_command("cancel", b'{"request_id": "r-1"}') == CancelRequest("r-1")


def test_install_request() -> None:
    r = parse_command("install", j({"url": "https://h.example/b.bundle", "sha256": SHA, "size": 10}))
    assert r == InstallRequest("https://h.example/b.bundle", SHA, 10)
    assert parse_command("install", j({"url": "file:///srv/b.bundle", "sha256": SHA, "size": 1})) \
        == InstallRequest("file:///srv/b.bundle", SHA, 1)


def test_infer_defaults_and_round_trip() -> None:
    r = parse_command("infer", b'{"prompt": "hi"}')
    assert r == InferRequest("hi")
    assert isinstance(r, InferRequest)
    assert (r.max_tokens, r.temperature, r.top_p, r.top_k, r.repeat_penalty) == (
        DEFAULTS.max_tokens, DEFAULTS.temperature, DEFAULTS.top_p, DEFAULTS.top_k, DEFAULTS.repeat_penalty)
    full = InferRequest("hé", max_tokens=4096, temperature=0, top_p=1, top_k=0, repeat_penalty=2,
                        stop=("\n", "END"), chat=True, seed=7, request_id="job:1")
    assert parse_command("infer", full.to_bytes()) == full
    assert full.temperature == 0.0 and isinstance(full.temperature, float)


# --- commands: everything malformed gets a precise code ------------------------------------------


@pytest.mark.parametrize(("name", "payload", "code"), [
    ("reboot", b"{}", "unknown_command"),
    ("", b"{}", "unknown_command"),
    ("status", b"", "bad_json"),
    ("status", b"\xff\xfe{}", "bad_json"),
    ("status", b"{", "bad_json"),
    ("status", b'{"a":1,"a":2}', "bad_json"),
    ("infer", b'{"prompt":"x","temperature":NaN}', "bad_json"),
    ("infer", b'{"prompt":"x","temperature":Infinity}', "bad_json"),
    ("infer", b'{"prompt":"x","temperature":1e400}', "bad_field"),
    ("status", b"[]", "not_object"),
    ("status", b"null", "not_object"),
    ("status", b'"{}"', "not_object"),
    ("status", b'{"verbose":true}', "unknown_field"),
    ("infer", b'{"prompt":"x","max_token":5}', "unknown_field"),
    ("infer", b"{}", "missing_field"),
    ("install", j({"url": "https://h/b", "sha256": SHA}), "missing_field"),
    ("cancel", b"{}", "missing_field"),
    ("infer", b'{"prompt":""}', "bad_field"),
    ("infer", j({"prompt": "x" * 32769}), "bad_field"),
    ("infer", b'{"prompt":"\\ud800"}', "bad_field"),
    ("infer", b'{"prompt":5}', "bad_field"),
    ("infer", b'{"prompt":"x","max_tokens":true}', "bad_field"),
    ("infer", b'{"prompt":"x","max_tokens":1.0}', "bad_field"),
    ("infer", b'{"prompt":"x","max_tokens":0}', "bad_field"),
    ("infer", b'{"prompt":"x","max_tokens":4097}', "bad_field"),
    ("infer", b'{"prompt":"x","temperature":2.01}', "bad_field"),
    ("infer", b'{"prompt":"x","temperature":false}', "bad_field"),
    ("infer", b'{"prompt":"x","temperature":"0.5"}', "bad_field"),
    ("infer", b'{"prompt":"x","top_p":0}', "bad_field"),
    ("infer", b'{"prompt":"x","top_p":1.5}', "bad_field"),
    ("infer", b'{"prompt":"x","top_k":1001}', "bad_field"),
    ("infer", b'{"prompt":"x","repeat_penalty":0.4}', "bad_field"),
    ("infer", b'{"prompt":"x","stop":"END"}', "bad_field"),
    ("infer", j({"prompt": "x", "stop": ["a"] * 9}), "bad_field"),
    ("infer", j({"prompt": "x", "stop": ["a" * 65]}), "bad_field"),
    ("infer", j({"prompt": "x", "stop": [1]}), "bad_field"),
    ("infer", b'{"prompt":"x","chat":1}', "bad_field"),
    ("infer", b'{"prompt":"x","seed":-1}', "bad_field"),
    ("infer", b'{"prompt":"x","seed":true}', "bad_field"),
    ("infer", b'{"prompt":"x","request_id":"a b"}', "bad_field"),
    ("install", j({"url": "ftp://h/b", "sha256": SHA, "size": 1}), "bad_field"),
    ("install", j({"url": "https:///nohost", "sha256": SHA, "size": 1}), "bad_field"),
    ("install", j({"url": "file:relative", "sha256": SHA, "size": 1}), "bad_field"),
    ("install", j({"url": "https://h/b c", "sha256": SHA, "size": 1}), "bad_field"),
    ("install", j({"url": "https://h/b", "sha256": SHA.upper(), "size": 1}), "bad_field"),
    ("install", j({"url": "https://h/b", "sha256": SHA[:-1], "size": 1}), "bad_field"),
    ("install", j({"url": "https://h/b", "sha256": SHA, "size": 0}), "bad_field"),
    ("install", j({"url": "https://h/b", "sha256": SHA, "size": True}), "bad_field"),
    ("install", j({"url": "https://h/b", "sha256": SHA, "size": 1, "force": "yes"}), "unknown_field"),
    ("probe", b'{"runtimes":null}', "bad_field"),
    ("cancel", b'{"request_id":""}', "bad_field"),
])
def test_malformed_commands_refused_with_code(name: str, payload: bytes, code: str) -> None:
    assert code_of(name, payload) == code


def test_oversized_payload_refused_before_parsing() -> None:
    big = b'{"prompt":"' + b"x" * MAX_PAYLOAD_BYTES + b'"}'
    assert code_of("infer", big) == "too_large"


def test_deep_nesting_and_huge_integers_are_bad_json_not_crashes() -> None:
    assert code_of("status", b"[" * 50_000 + b"]" * 50_000) == "too_large"
    assert code_of("status", b'{"a":' + b"[" * 30_000 + b"]" * 30_000 + b"}") == "bad_json"
    assert code_of("infer", b'{"prompt":"x","seed":' + b"9" * 5000 + b"}") == "bad_json"


def test_protocol_error_is_untrusted_data_and_renders_a_reply_error() -> None:
    with pytest.raises(UntrustedDataError) as ei:
        parse_command("infer", b'{"prompt": 1}')
    err = ei.value
    assert isinstance(err, ProtocolError) and err.field == "prompt"
    assert Reply.failure(**err.to_error()).error == {"code": "bad_field", "message": str(err)}


# --- the property: anything in, a request or a ProtocolError out ------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20,
)
field_names = st.sampled_from([
    "url", "sha256", "size", "runtimes", "prompt", "max_tokens", "temperature", "top_p",
    "top_k", "repeat_penalty", "stop", "chat", "seed", "request_id", "x",
])
near_valid = st.dictionaries(field_names, json_values | st.just(SHA) | st.just("https://h/b"), max_size=8)


def _check(name: str, payload: bytes) -> None:
    try:
        r = parse_command(name, payload)
    except ProtocolError as e:
        assert e.code in {"bad_json", "not_object", "unknown_command", "bad_field", "missing_field",
                          "unknown_field", "too_large"}
        return
    assert name == r.NAME
    # A request we accept serializes back to something we accept as the same request.
    assert parse_command(name, r.to_bytes()) == r


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(COMMANDS) | st.text(max_size=12), payload=st.binary(max_size=300))
def test_any_bytes_give_a_request_or_protocol_error(name: str, payload: bytes) -> None:
    _check(name, payload)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(COMMANDS), obj=near_valid)
def test_any_json_object_gives_a_request_or_protocol_error(name: str, obj: dict[str, Any]) -> None:
    try:
        payload = json.dumps(obj).encode("utf-8", "surrogatepass")
    except ValueError:
        return
    _check(name, payload)


# --- replies ---------------------------------------------------------------------------------------


def test_reply_round_trip_and_compact() -> None:
    ok = Reply.success({"bundles": ["a"]})
    assert ok.to_bytes() == b'{"ok":true,"result":{"bundles":["a"]},"error":null}'
    assert Reply.from_bytes(ok.to_bytes()) == ok
    bad = Reply.failure("bad_field", "nope")
    assert Reply.from_bytes(bad.to_bytes()) == bad
    assert Reply.from_bytes(b'{"ok":true,"result":{},"future":1}') == Reply(True, {})


@pytest.mark.parametrize("payload", [
    b'{"ok":false}', b'{"ok":true,"error":{"code":"x","message":"y"}}', b'{"ok":1}', b"{}",
    b'{"ok":false,"error":{"code":1,"message":"y"}}', b'{"ok":true,"result":[]}', b"nope",
])
def test_bad_replies_refused(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        Reply.from_bytes(payload)


def test_reply_with_unserializable_result_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        Reply.success({"x": float("nan")}).to_bytes()


def test_infer_chunk_round_trip() -> None:
    c = InferChunk(3, "he", False)
    assert InferChunk.from_bytes(c.to_bytes()) == c
    last = InferChunk(4, "", True, {"completion_tokens": 5})
    assert InferChunk.from_bytes(last.to_bytes()) == last
    err = InferChunk.failure(0, "no_model", "nothing installed")
    assert InferChunk.from_bytes(err.to_bytes()) == err and err.done


@pytest.mark.parametrize("payload", [
    b'{"seq":-1,"text":""}', b'{"seq":true,"text":""}', b'{"seq":0}', b'{"seq":0,"text":1}',
    b'{"seq":0,"text":"","done":false,"error":{"code":"x","message":"y"}}',
])
def test_bad_chunks_refused(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        InferChunk.from_bytes(payload)


# --- status payloads -------------------------------------------------------------------------------


def test_status_payloads_carry_schema() -> None:
    assert parse_state(state_payload("lost")) == "lost"
    assert json.loads(state_payload("online", ts=1.5)) == {"state": "online", "ts": 1.5, "schema": 1}
    with pytest.raises(ProtocolError):
        state_payload("sleeping")
    b = parse_status(birth_payload({"agent_version": "0.1.0", "facts": {"arch": "x86_64"}}))
    assert b["schema"] == 1 and b["facts"] == {"arch": "x86_64"}
    h = parse_status(health_payload({"rss": 1}, ts=2.0))
    assert h["ts"] == 2.0
    e = parse_status(event_payload("job-1", "verified", ts=3.0, detail={"bytes": 9}))
    assert (e["job"], e["stage"], e["bytes"]) == ("job-1", "verified", 9)
    with pytest.raises(ProtocolError):
        event_payload("job-1", "teleported", ts=0)
    with pytest.raises(ProtocolError):
        parse_status(b'{"schema":2}')
