"""The one Runtime contract every inference backend implements.

Invariants:

* One model resident per :class:`Runtime` instance: :meth:`Runtime.load` closes the previous model
  before loading the next, even if the new load then fails (we never hold two).
* Public methods are the only boundary: they call the private hooks (``_load``, ``_stream``,
  ``_evaluate_nll``, ``_close``) and turn any foreign exception into :class:`InferenceError`
  (``raise ... from e``), so callers only ever see our error classes.
* A runtime's library is imported lazily inside its methods; :meth:`Runtime.check` says whether it
  can run here and why not, by raising :class:`RuntimeUnavailableError`.
* Model access is serialized by one lock: a stream, an NLL evaluation, a load and a close never run
  at the same time on one instance. :meth:`Runtime.cancel` is the only method meant to be called
  while another thread is generating.

Workflow: ``check()`` -> ``load(path, LoadOptions(...))`` -> ``stream(prompt, GenerationParams(...))``
(text chunks, then one ``Chunk(done=True, usage=...)``) / ``evaluate_nll(text)`` -> ``close()``.

A chat prompt (``chat=True``) is one user turn (a str) or a whole conversation (a sequence of
``{"role", "content"}`` messages, :data:`CHAT_ROLES`); each runtime formats
:func:`chat_messages` of it with the bundle's template, so one template machinery serves both.
"""

from __future__ import annotations

import abc
import importlib
import importlib.util
import math
import threading
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

from agent.errors import EdgepackError, InferenceError, RuntimeUnavailableError
from agent.runtimes.registry import runtime_info
from agent.sampling import DEFAULTS, LIMITS

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

FINISH_REASONS = ("stop", "length", "cancelled")
CHAT_ROLES = ("system", "user", "assistant")
ChatMessage: TypeAlias = Mapping[str, str]  # {"role": one of CHAT_ROLES, "content": text}
Prompt: TypeAlias = str | Sequence[ChatMessage]  # a conversation only with chat=True
# Rows of logits turned into float64 at once when scoring: 16 x 262,144 (Gemma's vocab) x 8 bytes
# = 32 MiB, whatever the window size.
_SCORE_ROWS = 16


def _is_int(value: object) -> bool:
    # bool is an int subclass; True as max_tokens is a bug, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class GenerationParams:
    """How to sample one generation. Validated on construction against :data:`agent.sampling.LIMITS`.

    Attributes:
        max_tokens: Most tokens to generate.
        temperature: 0 means greedy.
        top_p: Nucleus mass in (0, 1].
        top_k: Keep the k most likely tokens; 0 disables the filter.
        repeat_penalty: 1.0 disables it. Base models need ~1.1-1.3 for coherent text.
        stop: Strings that end the generation; they are not part of the output.
        seed: Sampling seed in [0, 2**32), or None for the runtime's default.
        ignore_eos: Go on through end-of-sequence tokens until ``max_tokens`` (stop strings,
            cancellation and the context still end it): a benchmark then times a fixed number of
            tokens however early the model would have stopped. Each runtime honours it its own
            way (see its module); the token count is ``max_tokens`` in all of them.

    Raises:
        InferenceError: A value is out of range or of the wrong type.
    """

    max_tokens: int = DEFAULTS.max_tokens
    temperature: float = DEFAULTS.temperature
    top_p: float = DEFAULTS.top_p
    top_k: int = DEFAULTS.top_k
    repeat_penalty: float = DEFAULTS.repeat_penalty
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = DEFAULTS.ignore_eos

    def __post_init__(self) -> None:
        if not isinstance(self.ignore_eos, bool):
            raise InferenceError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        for name in ("max_tokens", "temperature", "top_p", "top_k", "repeat_penalty"):
            value = getattr(self, name)
            if not LIMITS[name].admits(value):
                raise InferenceError(f"{name} must be {LIMITS[name].describe()}, got {value!r}")
        if isinstance(self.stop, str) or not isinstance(self.stop, Sequence):
            raise InferenceError(f"stop must be a sequence of strings, got {self.stop!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise InferenceError(f"stop strings must be non-empty strings, got {self.stop!r}")
        # Accept a list from JSON but store a tuple so the value stays hashable and frozen.
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.seed is not None and not LIMITS["seed"].admits(self.seed):
            raise InferenceError(f"seed must be None or {LIMITS['seed'].describe()}, got {self.seed!r}")


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model. Validated on construction.

    Attributes:
        context: Context length in tokens (prompt + generation), >= 16.
        threads: CPU threads; 0 means the number of physical cores (see :meth:`resolved_threads`).
        chat_template: A Jinja chat template (Hugging Face style: ``messages``, ``bos_token``,
            ``add_generation_prompt``). When None, the model's own template is used if it has one.
        device: Where to run (``cpu``, ``gpu``, ``cuda``, ...); each runtime says what it supports.

    Raises:
        InferenceError: A value is out of range or of the wrong type.
    """

    context: int = 2048
    threads: int = 0
    chat_template: str | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not _is_int(self.context) or self.context < 16:
            raise InferenceError(f"context must be an integer >= 16, got {self.context!r}")
        if not _is_int(self.threads) or self.threads < 0:
            raise InferenceError(f"threads must be an integer >= 0, got {self.threads!r}")
        if self.chat_template is not None and (
            not isinstance(self.chat_template, str) or not self.chat_template.strip()
        ):
            raise InferenceError("chat_template must be None or a non-empty string")
        if not isinstance(self.device, str) or not self.device:
            raise InferenceError(f"device must be a non-empty string, got {self.device!r}")

    def resolved_threads(self) -> int:
        """The thread count to use: ``threads``, or the physical core count when it is 0.

        Returns:
            A positive thread count.
        """
        if self.threads:
            return self.threads
        import psutil  # the agent depends on psutil; imported here to keep module import cheap

        # Physical cores: llama.cpp and friends are memory-bound per core; hyperthreads hurt.
        return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


@dataclass(frozen=True)
class Usage:
    """What one generation cost.

    Attributes:
        prompt_tokens: Tokens in the prompt as the model saw it (template and BOS included).
        completion_tokens: Tokens generated.
        ttft_ms: Milliseconds from the start of generation to the first generated text.
        decode_tok_s: Tokens per second over the tokens generated after the first (0.0 if < 2).
        finish_reason: ``stop`` (EOS or a stop string), ``length`` (max_tokens) or ``cancelled``.
    """

    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float
    decode_tok_s: float
    finish_reason: str

    def to_dict(self) -> dict[str, Any]:
        """The usage as a plain dict, for the protocol's ``usage`` field."""
        return asdict(self)


@dataclass(frozen=True)
class Chunk:
    """One piece of a streamed generation; the last one has ``done=True`` and ``usage`` set."""

    text: str
    done: bool = False
    usage: Usage | None = None


@dataclass(frozen=True)
class NllResult:
    """Next-token negative log-likelihood of a text under a model.

    Attributes:
        mean_nll: Mean NLL in nats per scored token.
        perplexity: ``exp(mean_nll)``.
        tokens: Number of scored tokens.
        top1: The argmax next-token id at each scored position (same order), so two variants of a
            model can be compared by top-1 agreement; None if the runtime cannot provide it.
    """

    mean_nll: float
    perplexity: float
    tokens: int
    top1: tuple[int, ...] | None


@dataclass(frozen=True)
class StreamStats:
    """What a ``_stream`` hook returns when its generator ends (the base adds timings)."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


def score_logits(
    logits: npt.NDArray[np.float32], targets: Sequence[int]
) -> tuple[float, list[int]]:
    """Sum of ``-log softmax(logits)[target]`` over rows, and each row's argmax.

    Shared by runtimes so every backend scores the same way: log-sum-exp in float64, a few rows at
    a time so memory stays bounded with a large vocabulary.

    Args:
        logits: Shape (rows, vocab), one row per position, in any float dtype.
        targets: The next token id for each row.

    Returns:
        (sum of NLL in nats, argmax id per row).

    Raises:
        InferenceError: The shapes do not match or a logit is not finite.
    """
    import numpy as np  # runtimes bring numpy; the agent core does not depend on it

    if logits.ndim != 2 or logits.shape[0] != len(targets):
        raise InferenceError(f"logits shape {logits.shape} does not match {len(targets)} targets")
    total = 0.0
    top1: list[int] = []
    for start in range(0, logits.shape[0], _SCORE_ROWS):
        rows = logits[start : start + _SCORE_ROWS].astype(np.float64)
        tgt = np.asarray(targets[start : start + _SCORE_ROWS], dtype=np.int64)
        peak = rows.max(axis=1)
        lse = peak + np.log(np.exp(rows - peak[:, None]).sum(axis=1))
        picked = rows[np.arange(rows.shape[0]), tgt]
        total += float((lse - picked).sum())
        top1.extend(int(i) for i in rows.argmax(axis=1))
    if not math.isfinite(total):
        raise InferenceError("non-finite logits while scoring")
    return total, top1


class Runtime(abc.ABC):
    """Base of every inference runtime plugin.

    Subclasses set ``name`` (their registry key) and implement the private hooks ``_describe``,
    ``_load``, ``_stream``, ``_evaluate_nll``, ``_close`` (and ``_check_device`` when a device
    can be missing); a subclass ``__init__`` must call
    ``super().__init__()``. A ``_stream`` hook must look at :attr:`_cancel_event` between tokens
    and end soon after it is set; ``_evaluate_nll`` can score with :func:`score_logits` and build
    its result with :func:`nll_result` so every runtime scores alike.
    """

    name: ClassVar[str]

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancel_event = threading.Event()
        self._model_path: Path | None = None
        self._options: LoadOptions | None = None

    # --- viability ---------------------------------------------------------------------------

    @classmethod
    def check(cls, device: str = "cpu") -> None:
        """Say whether this runtime can run here, on ``device``.

        Imports the runtime's library (from the registry entry), then asks the plugin's
        :meth:`_check_device` hook about the device.

        Raises:
            RuntimeUnavailableError: With the reason (library missing or broken, device missing)
                and the package to install.
        """
        info = runtime_info(cls.name)
        require_module(cls.name, info.module, info.package, info.install_hint)
        cls._check_device(device)

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """Facts for the probe: ``runtime``, ``version``, ``devices`` and the plugin's own.

        Returns:
            A JSON-serializable dict.

        Raises:
            RuntimeUnavailableError: The runtime cannot run here.
        """
        cls.check()
        return {"runtime": cls.name, **cls._describe()}

    @classmethod  # noqa: B027 (optional hook)
    def _check_device(cls, device: str) -> None:
        """Raise RuntimeUnavailableError if ``device`` cannot be used (default: any is accepted;
        loading a model on a device the runtime lacks then fails with the reason)."""

    @classmethod
    @abc.abstractmethod
    def _describe(cls) -> dict[str, Any]:
        """``version`` and ``devices`` (our names) at least; the library is importable."""

    # --- lifecycle -----------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        """Whether a model is resident."""
        return self._model_path is not None

    @property
    def model_path(self) -> Path | None:
        """The resident model's path, or None."""
        return self._model_path

    def load(self, model_path: Path, options: LoadOptions | None = None) -> None:
        """Load a model, closing the resident one first.

        Args:
            model_path: The model file or folder, in the runtime's format.
            options: Context, threads, chat template, device; defaults when None.

        Raises:
            RuntimeUnavailableError: The runtime cannot run here.
            InferenceError: The model cannot be loaded (missing, malformed, unsupported).
        """
        options = options if options is not None else LoadOptions()
        type(self).check()
        path = Path(model_path)
        # A running generation would hold the lock until its consumer resumes it; ask it to stop.
        self._cancel_event.set()
        with self._lock:
            self._close_locked()
            if not path.exists():
                raise InferenceError(f"{self.name}: model not found: {path}")
            try:
                self._load(path, options)
            except EdgepackError:
                raise
            except Exception as e:
                raise InferenceError(f"{self.name}: cannot load {path}: {e}") from e
            self._model_path = path
            self._options = options

    def close(self) -> None:
        """Release the resident model (no-op when none is loaded).

        Raises:
            InferenceError: The runtime failed to release it (the model is forgotten anyway).
        """
        self._cancel_event.set()
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._model_path is None:
            return
        self._model_path = None
        self._options = None
        try:
            self._close()
        except EdgepackError:
            raise
        except Exception as e:
            raise InferenceError(f"{self.name}: cannot close the model: {e}") from e

    def __enter__(self) -> Runtime:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- generation ----------------------------------------------------------------------------

    def stream(
        self, prompt: Prompt, params: GenerationParams, *, chat: bool = False
    ) -> Generator[Chunk, None, None]:
        """Generate from a prompt, chunk by chunk.

        Args:
            prompt: Text to complete, or (``chat=True``) the user's message or the whole
                conversation (messages with ``role`` in :data:`CHAT_ROLES` and ``content``),
                formatted with the chat template given at load time or the model's own.
            params: Sampling parameters.
            chat: Format the prompt as a chat (one user turn when it is a str).

        Returns:
            A generator of text chunks in order, then exactly one ``Chunk(text="", done=True,
            usage=...)``. TTFT is measured from the first iteration.

        Raises:
            InferenceError: No model is loaded (raised at call time), another generation is
                running on this instance, or the runtime failed (raised while iterating).
        """
        if not isinstance(params, GenerationParams):
            raise InferenceError(f"params must be GenerationParams, got {type(params).__name__}")
        if not isinstance(prompt, str):
            if not chat:
                raise InferenceError(f"prompt must be a string, got {type(prompt).__name__}")
            prompt = _checked_messages(prompt)
        if not self.loaded:
            raise InferenceError("no model loaded")
        return self._stream_locked(prompt, params, chat)

    def _stream_locked(
        self, prompt: Prompt, params: GenerationParams, chat: bool
    ) -> Generator[Chunk, None, None]:
        # Non-blocking: a second concurrent stream is a caller bug; waiting could deadlock on a
        # generator its consumer never resumes.
        if not self._lock.acquire(blocking=False):
            raise InferenceError(f"{self.name}: busy: another generation or load is running")
        try:
            if not self.loaded:
                raise InferenceError("no model loaded")
            # cancel() targets the generation in progress, not a future one.
            self._cancel_event.clear()
            t0 = time.perf_counter()
            t_first = 0.0
            hook = self._stream(prompt, params, chat=chat)
            try:
                while True:
                    try:
                        piece = next(hook)
                    except StopIteration as stop:
                        stats: StreamStats = stop.value
                        break
                    if not t_first:
                        t_first = time.perf_counter()
                    if piece:
                        yield Chunk(piece)
            except EdgepackError:
                raise
            except Exception as e:
                raise InferenceError(f"{self.name}: generation failed: {e}") from e
            finally:
                hook.close()
            t_end = time.perf_counter()
            finish = "cancelled" if self._cancel_event.is_set() else stats.finish_reason
        finally:
            self._lock.release()
        if not t_first:
            t_first = t_end
        decoded = stats.completion_tokens - 1
        span = t_end - t_first
        yield Chunk(
            "",
            done=True,
            usage=Usage(
                prompt_tokens=stats.prompt_tokens,
                completion_tokens=stats.completion_tokens,
                ttft_ms=(t_first - t0) * 1000.0,
                decode_tok_s=decoded / span if decoded > 0 and span > 0 else 0.0,
                finish_reason=finish,
            ),
        )

    def cancel(self) -> None:
        """Ask the generation running in another thread to stop; it ends promptly with
        ``finish_reason == "cancelled"``. Safe to call from any thread, at any time; a no-op when
        nothing is generating.
        """
        self._cancel_event.set()

    def drop_prompt_cache(self) -> None:
        """Forget KV state kept from the previous generation, so the next prompt is evaluated whole.

        llama.cpp reuses the longest common prefix with the last prompt, which is what serving
        wants (a chat's next turn) and what a benchmark must not measure: the same prompt twice
        would report the second TTFT of one token. Runtimes that start every generation from an
        empty cache have nothing to drop.

        Raises:
            InferenceError: A generation is running on this instance, or the runtime failed.
        """
        if not self._lock.acquire(blocking=False):
            raise InferenceError(f"{self.name}: busy: another generation or load is running")
        try:
            if self._model_path is not None:
                self._drop_prompt_cache()
        except EdgepackError:
            raise
        except Exception as e:
            raise InferenceError(f"{self.name}: cannot drop the prompt cache: {e}") from e
        finally:
            self._lock.release()

    # --- quality -------------------------------------------------------------------------------

    def evaluate_nll(self, text: str, *, window: int = 512) -> NllResult:
        """Mean next-token NLL of ``text`` under the resident model.

        The text is tokenized once (no BOS) and split into non-overlapping windows of ``window``
        tokens; each window is scored from a fresh context that starts with BOS, so every text
        token is scored exactly once and results do not depend on earlier windows.

        Args:
            text: Evaluation text (non-empty).
            window: Tokens per window, >= 1 and at most the loaded context minus one (for BOS).

        Returns:
            The mean NLL, perplexity, number of scored tokens and top-1 ids.

        Raises:
            InferenceError: No model loaded, bad arguments, or the runtime failed.
        """
        if not isinstance(text, str) or not text:
            raise InferenceError("evaluate_nll needs a non-empty text")
        if not _is_int(window) or window < 1:
            raise InferenceError(f"window must be an integer >= 1, got {window!r}")
        with self._lock:
            if self._options is None:
                raise InferenceError("no model loaded")
            if window + 1 > self._options.context:
                raise InferenceError(
                    f"window {window} + BOS exceeds the loaded context {self._options.context}"
                )
            try:
                result = self._evaluate_nll(text, window)
            except EdgepackError:
                raise
            except Exception as e:
                raise InferenceError(f"{self.name}: NLL evaluation failed: {e}") from e
        if result.tokens < 1:
            raise InferenceError("the text produced no scorable tokens")
        return result

    def release_scoring(self) -> None:
        """Free what :meth:`evaluate_nll` keeps for a next call; the model stays loaded.

        OpenVINO compiles the model a second time for scoring (see its module) and keeps it until
        close: ~620 MiB of resident memory for the 270M sample. The post-install gate scores once
        and serving never does, so it frees that here. Other runtimes keep nothing.

        Raises:
            InferenceError: the runtime failed to release it.
        """
        with self._lock:
            try:
                self._release_scoring()
            except EdgepackError:
                raise
            except Exception as e:
                raise InferenceError(f"{self.name}: cannot release the scoring model: {e}") from e

    # --- hooks -----------------------------------------------------------------------------------

    @abc.abstractmethod
    def _load(self, model_path: Path, options: LoadOptions) -> None:
        """Load the model; nothing is resident when called."""

    @abc.abstractmethod
    def _stream(
        self, prompt: Prompt, params: GenerationParams, *, chat: bool
    ) -> Generator[str, None, StreamStats]:
        """Yield text pieces in order; return StreamStats. End soon after ``_cancel_event``.

        ``prompt`` is a str unless ``chat`` (then format :func:`chat_messages` of it)."""

    @abc.abstractmethod
    def _evaluate_nll(self, text: str, window: int) -> NllResult:
        """Score ``text`` as :meth:`evaluate_nll` describes (arguments already validated)."""

    @abc.abstractmethod
    def _close(self) -> None:
        """Release the resident model."""

    def _drop_prompt_cache(self) -> None:  # noqa: B027 (optional hook: most runtimes keep no cache)
        """Forget the KV state of the previous generation (default: there is none)."""

    def _release_scoring(self) -> None:  # noqa: B027 (optional hook: most runtimes keep nothing)
        """Free what ``_evaluate_nll`` keeps between calls (default: nothing)."""


def nll_result(total_nll: float, tokens: int, top1: Sequence[int] | None) -> NllResult:
    """Build an :class:`NllResult` from a summed NLL (helper for runtimes).

    Args:
        total_nll: Sum of per-token NLL in nats.
        tokens: Number of scored tokens (> 0).
        top1: Argmax ids per scored position, or None.

    Returns:
        The result with mean and perplexity filled.

    Raises:
        InferenceError: ``tokens`` is not positive.
    """
    if tokens < 1:
        raise InferenceError("the text produced no scorable tokens")
    mean = total_nll / tokens
    return NllResult(
        mean_nll=mean,
        perplexity=math.exp(mean),
        tokens=tokens,
        top1=tuple(top1) if top1 is not None else None,
    )


def chat_messages(prompt: Prompt) -> list[dict[str, str]]:
    """The conversation a chat template formats: a str prompt is one user turn.

    Args:
        prompt: a user message, or messages already checked by :meth:`Runtime.stream`.

    Returns:
        Fresh ``{"role", "content"}`` dicts, in order.
    """
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def completion_text(prompt: Prompt) -> str:
    """The text of a completion (``chat=False``) prompt, which :meth:`Runtime.stream` made sure
    is a str.

    Raises:
        InferenceError: ``prompt`` is a conversation.
    """
    if not isinstance(prompt, str):
        raise InferenceError("a list of messages needs chat=True")
    return prompt


def _checked_messages(prompt: object) -> tuple[ChatMessage, ...]:
    if isinstance(prompt, bytes | bytearray) or not isinstance(prompt, Sequence) or not prompt:
        raise InferenceError("a chat prompt must be a string or a non-empty list of messages")
    for i, m in enumerate(prompt):
        if (not isinstance(m, Mapping) or m.get("role") not in CHAT_ROLES
                or not isinstance(m.get("content"), str)):
            raise InferenceError(
                f"message {i} must be {{role: {'|'.join(CHAT_ROLES)}, content: str}}, got {m!r:.80}")
    return tuple(prompt)


def require_module(runtime: str, module: str, package: str, hint: str) -> None:
    """Import ``module`` for a runtime's ``check()``, or say why it cannot be used here.

    Args:
        runtime: the runtime's registry name.
        module: the module to import (``llama_cpp``).
        package: what the user installs (``llama-cpp-python``).
        hint: the install command.

    Raises:
        RuntimeUnavailableError: the package is not installed, or it is and its native library
            does not load (wrong ISA, missing libc).
    """
    try:
        importlib.import_module(module)
    except ImportError as e:
        # The package is there but its import fails (a missing shared library, a wrong ISA):
        # "not installed" would send the user to pip for nothing.
        if e.name != module and importlib.util.find_spec(module.partition(".")[0]) is not None:
            raise RuntimeUnavailableError(f"{package} is installed but cannot load: {e}",
                                          runtime=runtime) from e
        raise RuntimeUnavailableError(f"{package} is not installed ({hint})", runtime=runtime,
                                      hint=hint) from e
    except (OSError, RuntimeError) as e:
        raise RuntimeUnavailableError(f"{package} is installed but cannot load: {e}",
                                      runtime=runtime) from e


class StopStrings:
    """Cuts streamed text at the first stop string; a stop string is never shown to the user.

    Runtimes feed each decoded piece as it comes. A tail that could still become a stop string
    once the next piece arrives is held back until it cannot (or the generation ends).
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._longest = max((len(s) for s in stops), default=0)
        self._pending = ""
        self.hit = False  # a stop string was found: the generation should end

    def feed(self, text: str) -> str:
        """The part of the text so far that can be shown now (after a hit: nothing more)."""
        if not self._stops:
            return text
        if self.hit:
            return ""
        pending = self._pending + text
        cut = min((i for i in (pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._pending, self.hit = "", True
            return pending[:cut]
        hold = _stop_prefix_len(pending, self._stops, self._longest)
        self._pending = pending[len(pending) - hold :]
        return pending[: len(pending) - hold]

    def flush(self) -> str:
        """What is still held back, for the end of a generation that met no stop string."""
        out, self._pending = ("" if self.hit else self._pending), ""
        return out


def _stop_prefix_len(text: str, stops: tuple[str, ...], longest: int) -> int:
    # Length of the longest suffix of text that is a proper prefix of some stop string.
    for n in range(min(longest - 1, len(text)), 0, -1):
        tail = text[-n:]
        if any(s.startswith(tail) for s in stops):
            return n
    return 0
