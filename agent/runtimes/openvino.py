"""OpenVINO runtime through openvino-genai (OpenVINO IR folders). Imported lazily.

A model is an IR folder as optimum-intel exports it: ``openvino_model.xml/.bin`` (a stateful
decoder: the KV cache lives inside the infer request), ``openvino_tokenizer.xml`` and
``openvino_detokenizer.xml`` (openvino-tokenizers), configs and the chat template.

Generation runs ``LLMPipeline.generate`` on a worker thread, because it blocks until the end
while we hand out text as it comes. A :class:`_Streamer` (an ``openvino_genai.StreamerBase``) sees
every token on that thread: it counts them, leaves out the end-of-generation tokens (genai passes
them on), decodes through genai's own ``TextStreamer`` (incremental, UTF-8 safe), cuts stop
strings (held back while they may still be forming, as the llama.cpp runtime does), and tells
genai to stop (a stop string) or cancel (``Runtime.cancel`` or an abandoned stream) by its return
value. Text goes to the caller's thread through a queue. We tokenize prompts ourselves so the
token counts are exact and a chat template that writes BOS does not get a second one; genai's own
chat templating is switched off.

``evaluate_nll`` compiles ``openvino_model.xml`` a second time with plain OpenVINO (kept until
close): genai exposes no logits. Each window starts from ``reset_state()``, is fed in sub-batches
of :data:`_NLL_BATCH` tokens (positions and attention mask continue over the KV state, ``beam_idx``
= 0), and the logits are scored by :func:`~agent.runtimes.base.score_logits`. It runs with
``INFERENCE_PRECISION_HINT=f32`` and an f32 KV cache: CPUs with AVX512-BF16 otherwise compute in
bf16 with a u8 KV cache, which would blur the weight-compression loss being measured. Generation
keeps OpenVINO's (faster) defaults.
The scoring model costs ~1.3 s to compile and ~620 MiB of RSS for the sample int8 IR (measured:
bench/results/fidelity.md); :meth:`~agent.runtimes.base.Runtime.release_scoring` frees it.

``GenerationParams.ignore_eos`` sets genai's ``GenerationConfig.ignore_eos``: genai goes on past
its stop ids, and the streamer counts those tokens without showing them.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from agent.errors import InferenceError, RuntimeUnavailableError
from agent.runtimes.base import (
    GenerationParams,
    LoadOptions,
    NllResult,
    Prompt,
    Runtime,
    StopStrings,
    StreamStats,
    chat_messages,
    completion_text,
    nll_result,
    score_logits,
)

if TYPE_CHECKING:
    import openvino_genai

# Our device names -> OpenVINO's.
OV_DEVICES = {"cpu": "CPU", "gpu": "GPU", "npu": "NPU"}
MODEL_XML = "openvino_model.xml"
REQUIRED_FILES = (MODEL_XML, "openvino_tokenizer.xml", "openvino_detokenizer.xml")
# Positions per infer call when scoring: bounds the logits to 64 x vocab x 4 bytes (64 MiB for
# Gemma's 262,144) while keeping the matmuls batched.
_NLL_BATCH = 64
_DEVICE_HINTS = {
    "GPU": "Intel GPUs need the compute runtime (intel-opencl-icd / Level Zero) and access to "
           "/dev/dri/renderD*.",
    "NPU": "Intel NPUs need the intel_vpu kernel driver and the NPU user-mode driver.",
}
_END = object()  # queue sentinel: the worker thread finished


def _has_device(available: list[str], ov_device: str) -> bool:
    # Several GPUs show up as GPU.0, GPU.1.
    return any(d == ov_device or d.startswith(ov_device + ".") for d in available)


class OpenVINORuntime(Runtime):
    """OpenVINO IR models on openvino-genai's LLMPipeline (CPU, Intel GPU, Intel NPU)."""

    name: ClassVar[str] = "openvino"

    def __init__(self) -> None:
        super().__init__()
        self._pipe: openvino_genai.LLMPipeline | None = None
        self._tokenizer: openvino_genai.Tokenizer | None = None
        self._template: str | None = None
        self._bos_id = -1
        self._bos_text = ""
        self._stop_ids: frozenset[int] = frozenset()
        self._n_ctx = 0
        self._device = "CPU"
        self._nll_model: Any = None  # openvino.CompiledModel, compiled on first evaluate_nll

    # --- viability ---------------------------------------------------------------------------------

    @classmethod
    def _check_device(cls, device: str) -> None:
        import openvino  # check() imported openvino_genai, which imported it: this cannot fail now

        ov_device = OV_DEVICES.get(device)
        if ov_device is None:
            raise RuntimeUnavailableError(
                f"openvino does not know device {device!r} ({', '.join(OV_DEVICES)})",
                runtime=cls.name,
            )
        if ov_device == "CPU":
            return  # always there; skip probing the other plugins
        available = list(openvino.Core().available_devices)
        if not _has_device(available, ov_device):
            raise RuntimeUnavailableError(
                f"OpenVINO device {ov_device} is not available here (available: "
                f"{', '.join(available) or 'none'})",
                runtime=cls.name, hint=_DEVICE_HINTS.get(ov_device, ""),
            )

    @classmethod
    def _describe(cls) -> dict[str, Any]:
        import openvino
        import openvino_genai

        core = openvino.Core()
        available = list(core.available_devices)
        names: dict[str, str] = {}
        caps: dict[str, list[str]] = {}
        for d in available:
            # A device whose plugin answers partly is still reported, without the missing facts.
            with contextlib.suppress(RuntimeError):
                names[d] = str(core.get_property(d, "FULL_DEVICE_NAME"))
            with contextlib.suppress(RuntimeError):
                caps[d] = [str(c) for c in core.get_property(d, "OPTIMIZATION_CAPABILITIES")]
        ours = [name for name, ov in OV_DEVICES.items() if _has_device(available, ov)]
        return {
            "version": openvino_genai.__version__,
            "openvino": openvino.get_version(),
            "devices": ours or ["cpu"],
            "device_names": names,
            "capabilities": caps,
        }

    # --- hooks -------------------------------------------------------------------------------------

    def _load(self, model_path: Path, options: LoadOptions) -> None:
        import openvino_genai

        ov_device = OV_DEVICES.get(options.device)
        if ov_device is None:
            raise InferenceError(
                f"openvino does not support device {options.device!r} ({', '.join(OV_DEVICES)})"
            )
        type(self).check(options.device)
        if not model_path.is_dir():
            raise InferenceError(f"openvino needs an OpenVINO IR folder, got the file {model_path}")
        missing = [f for f in REQUIRED_FILES if not (model_path / f).is_file()]
        if missing:
            raise InferenceError(f"{model_path} is not an OpenVINO IR folder: no {', '.join(missing)}"
                                 " (export it with the edgepack packager or optimum-cli)")
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if ov_device == "CPU":
            config["INFERENCE_NUM_THREADS"] = options.resolved_threads()
        elif ov_device == "NPU":
            # The NPU compiles static shapes: a prompt budget and a response budget that add up
            # to the context.
            response = min(256, options.context // 4)
            config.update(MAX_PROMPT_LEN=options.context - response, MIN_RESPONSE_LEN=response)
        pipe = openvino_genai.LLMPipeline(str(model_path), ov_device, **config)
        tokenizer = pipe.get_tokenizer()
        gen = pipe.get_generation_config()
        stop_ids = {int(i) for i in gen.stop_token_ids}
        if gen.eos_token_id >= 0:
            stop_ids.add(int(gen.eos_token_id))
        self._template = options.chat_template or tokenizer.chat_template or None
        self._bos_id = int(tokenizer.get_bos_token_id())
        self._bos_text = tokenizer.get_bos_token() if self._bos_id >= 0 else ""
        self._stop_ids = frozenset(stop_ids)
        self._n_ctx = options.context
        self._device = ov_device
        self._tokenizer = tokenizer
        self._pipe = pipe

    def _close(self) -> None:
        self._pipe = None
        self._tokenizer = None
        self._nll_model = None
        self._template = None
        self._stop_ids = frozenset()

    def _prompt_ids(self, prompt: Prompt, chat: bool) -> Any:
        tokenizer = self._tokenizer
        assert tokenizer is not None
        if not chat:
            return tokenizer.encode(completion_text(prompt), add_special_tokens=True)
        if self._template is None:
            raise InferenceError(
                "this model has no chat template; pass LoadOptions(chat_template=...) at load"
            )
        text = tokenizer.apply_chat_template(
            chat_messages(prompt), add_generation_prompt=True,
            chat_template=self._template,
        )
        # A template that writes BOS itself must not get a second one from the tokenizer.
        templated_bos = bool(self._bos_text) and text.startswith(self._bos_text)
        return tokenizer.encode(text, add_special_tokens=not templated_bos)

    def _generation_config(self, params: GenerationParams, max_tokens: int) -> Any:
        import openvino_genai

        config = openvino_genai.GenerationConfig()
        config.max_new_tokens = max_tokens
        config.apply_chat_template = False  # prompts arrive formatted and tokenized
        config.repetition_penalty = float(params.repeat_penalty)
        config.stop_token_ids = set(self._stop_ids)
        # genai then goes on past its stop ids; the streamer counts those tokens, shows no text.
        config.ignore_eos = params.ignore_eos
        if params.temperature == 0:
            config.do_sample = False
        else:
            config.do_sample = True
            config.temperature = float(params.temperature)
            config.top_p = float(params.top_p)
            if params.top_k:
                config.top_k = params.top_k
            if params.seed is not None:
                config.rng_seed = params.seed
        return config

    def _stream(
        self, prompt: Prompt, params: GenerationParams, *, chat: bool
    ) -> Generator[str, None, StreamStats]:
        pipe, tokenizer = self._pipe, self._tokenizer
        if pipe is None or tokenizer is None:
            raise InferenceError("no model loaded")
        inputs = self._prompt_ids(prompt, chat)
        n_prompt = int(inputs.input_ids.shape[1])
        room = self._n_ctx - n_prompt
        if room < 1:
            raise InferenceError(
                f"prompt of {n_prompt} tokens does not fit the context of {self._n_ctx}"
            )
        config = self._generation_config(params, min(params.max_tokens, room))
        out: queue.SimpleQueue[Any] = queue.SimpleQueue()
        abandoned = threading.Event()
        streamer = _streamer_class()(tokenizer, out, stops=params.stop,
                                     stop_ids=frozenset() if params.ignore_eos else self._stop_ids,
                                     skip_ids=self._stop_ids, cancel=self._cancel_event,
                                     abandoned=abandoned)

        def work() -> None:
            try:
                pipe.generate(inputs, config, streamer)
            except BaseException as e:  # handed to the caller's thread, raised there
                out.put(e)
            finally:
                out.put(_END)

        worker = threading.Thread(target=work, name="openvino-generate", daemon=True)
        worker.start()
        try:
            while (item := out.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            # A consumer that stops early (or an error) must not leave genai generating.
            abandoned.set()
            worker.join()
        return StreamStats(prompt_tokens=n_prompt, completion_tokens=streamer.tokens,
                           finish_reason=streamer.finish)

    def _evaluate_nll(self, text: str, window: int) -> NllResult:
        import numpy as np

        tokenizer = self._tokenizer
        if tokenizer is None:
            raise InferenceError("no model loaded")
        ids = tokenizer.encode(text, add_special_tokens=False).input_ids.data[0]
        tokens = [int(t) for t in ids]
        bos = self._bos_id
        request = self._scoring_model().create_infer_request()
        total = 0.0
        scored = 0
        top1: list[int] = []
        for w in range(0, len(tokens), window):
            chunk = tokens[w : w + window]
            # Without BOS the window's first token is context only, not scored.
            inputs = [bos, *chunk] if bos >= 0 else chunk
            targets = chunk if bos >= 0 else chunk[1:]
            # Each window starts from an empty KV state: results do not depend on earlier ones.
            request.reset_state()
            for start in range(0, len(inputs), _NLL_BATCH):
                part = inputs[start : start + _NLL_BATCH]
                n = len(part)
                result = request.infer({
                    "input_ids": np.asarray([part], dtype=np.int64),
                    # The mask covers the KV state too: every earlier position of the window.
                    "attention_mask": np.ones((1, start + n), dtype=np.int64),
                    "position_ids": np.arange(start, start + n, dtype=np.int64)[None, :],
                    "beam_idx": np.zeros((1,), dtype=np.int32),
                })
                # Position p predicts targets[p]; the last input predicts nothing we score.
                n_out = max(0, min(n, len(targets) - start))
                if n_out:
                    part_nll, part_top1 = score_logits(
                        result["logits"][0, :n_out], targets[start : start + n_out]
                    )
                    total += part_nll
                    top1.extend(part_top1)
                    scored += n_out
        return nll_result(total, scored, top1)

    def _scoring_model(self) -> Any:
        if self._nll_model is None:
            import openvino

            assert self._model_path is not None and self._options is not None
            # NPUs compile static shapes only; score on the CPU there (the weights are the same).
            device = "CPU" if self._device == "NPU" else self._device
            config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
            if device == "CPU":
                config["KV_CACHE_PRECISION"] = "f32"
                config["INFERENCE_NUM_THREADS"] = self._options.resolved_threads()
            self._nll_model = openvino.Core().compile_model(
                str(self._model_path / MODEL_XML), device, config
            )
        return self._nll_model

    def _release_scoring(self) -> None:
        self._nll_model = None  # the compiled scoring model is freed with its last reference


@functools.cache
def _streamer_class() -> type:
    """The genai streamer class, defined on first use (its base class lives in openvino_genai)."""
    import openvino_genai

    status = openvino_genai.StreamingStatus

    class _Streamer(openvino_genai.StreamerBase):
        """Runs on the generating thread: counts tokens, decodes, cuts stop strings, stops."""

        def __init__(self, tokenizer: Any, out: queue.SimpleQueue[Any], *, stops: tuple[str, ...],
                     stop_ids: frozenset[int], skip_ids: frozenset[int], cancel: threading.Event,
                     abandoned: threading.Event) -> None:
            super().__init__()
            self._out = out
            self._stops = StopStrings(stops)
            self._stop_ids = stop_ids  # end the generation (empty with ignore_eos)
            self._skip_ids = skip_ids  # counted but never shown (end-of-generation tokens)
            self._cancel = cancel
            self._abandoned = abandoned
            self._text = openvino_genai.TextStreamer(tokenizer, self._on_text)
            self._ended = False
            self.tokens = 0
            self.finish = "length"

        def write(self, token: int | list[int]) -> Any:
            for t in [token] if isinstance(token, int) else token:
                if t in self._stop_ids:
                    # genai passes the end-of-generation token on; it is not part of the output.
                    self.finish = "stop"
                    return status.STOP
                self.tokens += 1
                if t in self._skip_ids:
                    continue
                self._text.write(t)
                if self._stops.hit:
                    return status.STOP
            if self._cancel.is_set() or self._abandoned.is_set():
                return status.CANCEL
            return status.RUNNING

        def _on_text(self, text: str) -> Any:
            if self._stops.hit:
                return status.STOP
            self._emit(self._stops.feed(text))
            if self._stops.hit:
                self.finish = "stop"
                return status.STOP
            return status.RUNNING

        def end(self) -> None:
            if self._ended:  # genai may call end() more than once
                return
            self._ended = True
            self._text.end()  # flushes what the decoder held back, through _on_text
            self._emit(self._stops.flush())

        def _emit(self, text: str) -> None:
            if text:
                self._out.put(text)

    return _Streamer
