"""OpenAI's request and response shapes, mapped onto ours (pure: no sockets, no clocks read here).

:func:`parse_chat` and :func:`parse_completion` turn a decoded request body into a
:class:`Call` — our :class:`~agent.protocol.InferRequest` (sampling held to
:data:`agent.sampling.LIMITS`, starting from :data:`agent.sampling.DEFAULTS`), the conversation
for the chat template, and how to answer — or raise :class:`ApiError` naming the field. The
``*_body`` / ``*_chunk`` functions build what goes back. :mod:`agent.http_api` does the I/O.

Fields (a request is strict, as our MQTT protocol is: an unknown field is a 400 naming it, so a
typo never falls back to a default silently):

* mapped: ``max_tokens`` / ``max_completion_tokens`` (the same value if both), ``temperature``,
  ``top_p``, ``stop`` (a string or a list), ``seed``, ``stream``,
  ``stream_options.include_usage``, and llama.cpp's server extensions ``top_k`` and
  ``repeat_penalty``. Defaults are ours, not OpenAI's (temperature 0.7, top_p 0.95, top_k 40,
  repeat_penalty 1.1, max_tokens 128), so both doors of the agent answer a bare request alike.
* accepted only at their neutral value, else refused (400, ``param`` names the field): ``n``
  (1), ``frequency_penalty`` / ``presence_penalty`` (0: the runtimes have one repetition penalty,
  ``repeat_penalty``, and a presence penalty is another sampler, not a rename of it),
  ``logprobs`` / ``top_logprobs``, ``logit_bias`` (empty), ``tools`` / ``functions`` (empty),
  ``tool_choice`` / ``function_call`` (``"none"``), ``response_format`` (``{"type": "text"}``),
  ``modalities`` (``["text"]``), and for completions ``echo`` (false), ``best_of`` (1),
  ``suffix`` (empty).
* ignored (they change nothing about the answer): ``model`` (the device serves its one current
  bundle; the answer's ``model`` names it and ``system_fingerprint`` says which version served),
  ``user``, ``metadata``, ``store``, ``service_tier``, ``parallel_tool_calls``,
  ``prompt_cache_key``, ``safety_identifier``, ``stream_options.include_obfuscation``.

Messages: roles ``system`` (``developer`` is read as ``system``), ``user`` and ``assistant``;
content a string or a list of ``{"type": "text"}`` parts (joined by newlines); the conversation
ends with a non-empty user message (the template adds the generation prompt after it). Tool
messages, tool calls and non-text parts are refused. A completion ``prompt`` is a string or a
list of one string (token arrays and batches are refused).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from agent.errors import EdgepackError
from agent.protocol import MAX_PROMPT_CHARS, InferRequest, ProtocolError
from agent.sampling import DEFAULTS, LIMITS, MAX_STOP_CHARS, MAX_STOP_STRINGS

MAX_MESSAGES: Final = 256
ROLES: Final = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Fields that change nothing about the answer (see the module docstring).
_IGNORED: Final = frozenset({"model", "user", "metadata", "store", "service_tier",
                             "parallel_tool_calls", "prompt_cache_key", "safety_identifier"})
# field -> the values we accept for features we do not have (None: the field is absent or null).
_NEUTRAL_COMMON: Final[dict[str, tuple[Any, ...]]] = {
    "n": (1,), "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},),
}
_NEUTRAL_CHAT: Final[dict[str, tuple[Any, ...]]] = {
    **_NEUTRAL_COMMON, "logprobs": (False,), "top_logprobs": (0,), "tools": ([],),
    "functions": ([],), "tool_choice": ("none",), "function_call": ("none",),
    "response_format": ({"type": "text"},), "modalities": (["text"],),
}
_NEUTRAL_COMPLETION: Final[dict[str, tuple[Any, ...]]] = {
    **_NEUTRAL_COMMON, "echo": (False,), "best_of": (1,), "suffix": ("",), "logprobs": (),
}
_SAMPLING: Final = ("temperature", "top_p", "top_k", "repeat_penalty", "seed")
_COMMON: Final = frozenset({"max_tokens", "stop", "stream", "stream_options", *_SAMPLING})
_CHAT_FIELDS: Final = frozenset({"messages", "max_completion_tokens", *_COMMON, *_IGNORED,
                                 *_NEUTRAL_CHAT})
_COMPLETION_FIELDS: Final = frozenset({"prompt", *_COMMON, *_IGNORED, *_NEUTRAL_COMPLETION})
_FINISH: Final = {"stop": "stop", "length": "length"}


class ApiError(EdgepackError):
    """An answer in OpenAI's error shape: HTTP ``status``, ``type``, ``param`` (the field at
    fault, or None) and ``code``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}``."""
        return error_body(str(self), type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code=code)


@dataclass(frozen=True)
class Call:
    """One mapped request.

    Attributes:
        kind: ``chat`` or ``completion`` (the answer's shape).
        request: what the inference server runs (``request_id`` is the answer's ``id``).
        messages: the conversation for the chat template (chat only).
        stream: answer with Server-Sent Events.
        include_usage: a streamed answer ends with a chunk carrying ``usage``.
    """

    kind: str
    request: InferRequest
    messages: tuple[dict[str, str], ...] | None
    stream: bool
    include_usage: bool


# --- requests -------------------------------------------------------------------------------------


def parse_chat(body: Mapping[str, Any], request_id: str) -> Call:
    """Map a ``POST /v1/chat/completions`` body.

    Args:
        body: the decoded JSON object.
        request_id: our id for it (``chatcmpl-...``), for cancel and the answer.

    Returns:
        The mapped call.

    Raises:
        ApiError: 400 naming the field that is unknown, missing, of the wrong type, out of range
            or asks for a feature we do not have.
    """
    _check_fields(body, _CHAT_FIELDS, _NEUTRAL_CHAT)
    messages = _messages(body.get("messages"))
    max_tokens = _max_tokens(body)
    last = messages[-1]["content"]
    return Call("chat", _infer_request(body, last, max_tokens, request_id, chat=True), messages,
                *_stream_flags(body))


def parse_completion(body: Mapping[str, Any], request_id: str) -> Call:
    """Map a ``POST /v1/completions`` body (see :func:`parse_chat`).

    Raises:
        ApiError: 400 naming the field at fault.
    """
    _check_fields(body, _COMPLETION_FIELDS, _NEUTRAL_COMPLETION)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise _bad("prompt", "must be a string or a list of one string (token arrays and batches "
                             "are not supported)", "unsupported_value")
    if not isinstance(prompt, str) or not prompt:
        raise _bad("prompt", "is required: a non-empty string",
                   "missing_required_parameter" if prompt is None else "invalid_type")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise _bad("prompt", f"is longer than {MAX_PROMPT_CHARS} characters", "string_above_max_length")
    if body.get("max_completion_tokens") is not None:
        raise _bad("max_completion_tokens", "is a chat field; completions take max_tokens",
                   "unknown_parameter")
    request = _infer_request(body, prompt, _max_tokens(body), request_id, chat=False)
    return Call("completion", request, None, *_stream_flags(body))


def _check_fields(body: Mapping[str, Any], known: frozenset[str],
                  neutral: Mapping[str, tuple[Any, ...]]) -> None:
    for name in sorted(body):
        if name not in known:
            raise ApiError(400, f"Unrecognized request argument supplied: {name}", param=name,
                           code="unknown_parameter")
    for name, allowed in neutral.items():
        value = body.get(name)
        if value is None or any(_same(value, a) for a in allowed):
            continue
        shown = " or ".join(_json(a) for a in allowed)
        only = f": only {shown} is accepted" if allowed else ""
        hint = " (use repeat_penalty)" if name.endswith("_penalty") else ""
        raise _bad(name, f"is not supported here{only}{hint}", "unsupported_value")
    if "model" in body and not isinstance(body["model"], str):
        raise _bad("model", "must be a string", "invalid_type")


def _same(value: Any, allowed: Any) -> bool:
    # 0 == False and 1 == True in Python; JSON's booleans and numbers are different things.
    if type(value) is type(allowed):
        return bool(value == allowed)
    return type(allowed) is int and type(value) is float and value == allowed


def _json(value: Any) -> str:
    return json.dumps(value)


def _messages(raw: object) -> tuple[dict[str, str], ...]:
    if raw is None:
        raise _bad("messages", "is required", "missing_required_parameter")
    if not isinstance(raw, list) or not raw:
        raise _bad("messages", "must be a non-empty array", "invalid_type")
    if len(raw) > MAX_MESSAGES:
        raise _bad("messages", f"has more than {MAX_MESSAGES} messages", "array_above_max_length")
    out: list[dict[str, str]] = []
    total = 0
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, "must be an object", "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"{where}.role", f"must be one of {', '.join(ROLES)} (tool messages are not "
                                        "supported)", "unsupported_value")
        for k in sorted(m):
            if k in ("role", "content", "name") or (k in ("refusal", "tool_calls") and not m[k]):
                continue
            code = "unsupported_value" if k == "tool_calls" else "unknown_parameter"
            raise _bad(f"{where}.{k}", "is not supported", code)
        content = _content(m.get("content"), f"{where}.content")
        total += len(content)
        out.append({"role": ROLES[role], "content": content})
    if total > MAX_PROMPT_CHARS:
        raise _bad("messages", f"hold more than {MAX_PROMPT_CHARS} characters", "string_above_max_length")
    if out[-1]["role"] != "user" or not out[-1]["content"]:
        raise _bad(f"messages[{len(out) - 1}]", "the conversation must end with a non-empty user "
                                                "message", "unsupported_value")
    return tuple(out)


def _content(raw: object, where: str) -> str:
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list):
        texts = []
        for j, part in enumerate(raw):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                    part.get("text"), str):
                raise _bad(f"{where}[{j}]", "only {type: text, text: str} parts are supported",
                           "unsupported_value")
            texts.append(part["text"])
        return "\n".join(texts)
    raise _bad(where, "must be a string or an array of text parts", "invalid_type")


def _max_tokens(body: Mapping[str, Any]) -> int:
    given = {k: body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None}
    for name, value in given.items():
        _limit(name, "max_tokens", value)
    if len(set(given.values())) > 1:
        raise _bad("max_tokens", "differs from max_completion_tokens; send one of them")
    return int(next(iter(given.values()), DEFAULTS.max_tokens))


def _limit(param: str, ours: str, value: object) -> None:
    limit = LIMITS[ours]
    if not limit.admits(value):
        wrong_type = isinstance(value, bool) or not isinstance(value, int if limit.integer else int | float)
        code = "invalid_type" if wrong_type else "invalid_value"
        raise _bad(param, f"must be {limit.describe()}, got {value!r:.40}", code)


def _stop(raw: object) -> tuple[str, ...]:
    if raw is None:
        return ()
    stops = [raw] if isinstance(raw, str) else raw
    if not isinstance(stops, list):
        raise _bad("stop", "must be a string or an array of strings", "invalid_type")
    if len(stops) > MAX_STOP_STRINGS:
        raise _bad("stop", f"has more than {MAX_STOP_STRINGS} strings", "array_above_max_length")
    for i, s in enumerate(stops):
        if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_CHARS:
            raise _bad(f"stop[{i}]" if not isinstance(raw, str) else "stop",
                       f"must be a string of 1 to {MAX_STOP_CHARS} characters")
    return tuple(stops)


def _stream_flags(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream", "must be a boolean", "invalid_type")
    opts = body.get("stream_options")
    if opts is None:
        return bool(stream), False
    if not isinstance(opts, dict):
        raise _bad("stream_options", "must be an object", "invalid_type")
    for k in sorted(opts):
        if k not in ("include_usage", "include_obfuscation"):
            raise _bad(f"stream_options.{k}", "is not supported", "unknown_parameter")
    usage = opts.get("include_usage")
    if usage is not None and not isinstance(usage, bool):
        raise _bad("stream_options.include_usage", "must be a boolean", "invalid_type")
    return bool(stream), bool(usage)


def _infer_request(body: Mapping[str, Any], prompt: str, max_tokens: int, request_id: str, *,
                   chat: bool) -> InferRequest:
    sampling: dict[str, Any] = {}
    for name in _SAMPLING:
        value = body.get(name)
        if value is not None:
            _limit(name, name, value)
            sampling[name] = value
    try:
        return InferRequest(prompt=prompt, max_tokens=max_tokens, stop=_stop(body.get("stop")),
                            chat=chat, request_id=request_id, **sampling)
    except ProtocolError as e:  # our own checks above should have caught it: still a 400
        raise _bad(e.field or "request", str(e)) from None


# --- answers --------------------------------------------------------------------------------------


def usage_body(usage: Mapping[str, Any] | None) -> dict[str, int]:
    """OpenAI's ``usage`` from ours."""
    u = usage or {}
    p, c = int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0))
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def timings_body(usage: Mapping[str, Any] | None) -> dict[str, Any]:
    """The device's own timings (an extension, as llama.cpp's server has ``timings``)."""
    u = usage or {}
    return {"ttft_ms": u.get("ttft_ms"), "decode_tok_s": u.get("decode_tok_s")}


def finish_reason(usage: Mapping[str, Any] | None) -> str | None:
    """OpenAI's ``finish_reason`` from ours; None for ``cancelled`` (the caller answers an error)."""
    return _FINISH.get(str((usage or {}).get("finish_reason", "stop")))


@dataclass(frozen=True)
class Answer:
    """What every chunk of one answer repeats: id, creation time (epoch s), model, fingerprint."""

    kind: str
    id: str
    created: int
    model: str
    fingerprint: str

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def body(self, text: str, usage: Mapping[str, Any] | None) -> dict[str, Any]:
        """The non-streamed answer."""
        if self.kind == "chat":
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text,
                                                              "refusal": None},
                                      "logprobs": None, "finish_reason": finish_reason(usage)}
            head = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(usage)}
            head = self._head("text_completion")
        return {**head, "choices": [choice], "usage": usage_body(usage), "timings": timings_body(usage)}

    def chunk(self, text: str | None = None, *, role: bool = False,
              finish: str | None = None, with_usage: bool = False) -> dict[str, Any]:
        """One streamed chunk: text (and, first in a chat, the role), or the finish reason.

        ``with_usage``: this answer ends with a usage chunk, so every chunk carries
        ``usage: null`` as OpenAI's do.
        """
        if self.kind == "chat":
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None,
                                      "finish_reason": finish}
            out = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            out = {**self._head("text_completion"),
                   "choices": [{"index": 0, "text": text or "", "logprobs": None,
                                "finish_reason": finish}]}
        if with_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, usage: Mapping[str, Any] | None) -> dict[str, Any]:
        """The last chunk of a stream with ``include_usage``: no choices, the usage."""
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage_body(usage),
                "timings": timings_body(usage)}


def model_body(summary: Mapping[str, Any], *, context: int, created: int) -> dict[str, Any]:
    """One entry of ``GET /v1/models``: OpenAI's model object plus what the bundle says.

    Args:
        summary: ``InstalledBundle.summary()``.
        context: the bundle's context length in tokens.
        created: epoch seconds (the bundle's ``created``, or 0 when it has none).
    """
    return {"id": summary["model"], "object": "model", "created": created, "owned_by": "edgepack",
            "model": summary["model"], "version": summary["version"], "quant": summary["quant"],
            "precision": summary["precision"], "runtime": summary["runtime"], "context": context,
            "profile": summary["profile"], "digest": summary["digest"], "slot": summary["slot"]}


def fingerprint(model: str, version: int, digest: str) -> str:
    """``system_fingerprint``: which bundle served, ``<model>-v<version>-<digest[:12]>``."""
    return f"{model}-v{version}-{digest[:12]}"


# The runtimes' InferenceError messages that are the request's fault, not the device's.
_REQUEST_FAULTS: Final = (
    ("does not fit the context", "context_length_exceeded"),
    ("has no chat template", "chat_template_missing"),
)


def failure(code: str, message: str, kind: str) -> ApiError:
    """The HTTP answer to a failed generation (an ``InferChunk.error``).

    Args:
        code: our error code (``no_model``, ``runtime_unavailable``, ``inference_failed``, ...).
        message: its message.
        kind: ``chat`` or ``completion`` (which field a too-long prompt is in).
    """
    if code == "no_model":
        return ApiError(503, message, type="server_error", code="model_not_loaded")
    if code == "runtime_unavailable":
        return ApiError(503, message, type="server_error", code="runtime_unavailable")
    if code == "inference_failed":
        for text, api_code in _REQUEST_FAULTS:
            if text not in message:
                continue
            if api_code == "chat_template_missing":
                return ApiError(400, "the installed bundle has no chat template: use /v1/completions, "
                                     "or install a bundle built with one", param="messages", code=api_code)
            return ApiError(400, message, param="messages" if kind == "chat" else "prompt", code=api_code)
    return ApiError(500, message, type="server_error", code=code)


__all__ = ["Answer", "ApiError", "Call", "error_body", "failure", "fingerprint", "model_body",
           "parse_chat", "parse_completion", "usage_body"]
