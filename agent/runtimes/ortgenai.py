"""ONNX Runtime GenAI runtime (ONNX GenAI folders). ``onnxruntime_genai`` is imported lazily.

A model is a folder made by the onnxruntime-genai model builder: ``genai_config.json``,
``model.onnx`` (+ external data), tokenizer files and, when the model has one, a chat template.
The folder names the execution provider it was built for (``provider_options`` in its config);
loading it where that provider is missing raises :class:`RuntimeUnavailableError`.

Generation drives ``og.Generator`` token by token (``append_tokens`` then ``generate_next_token``),
which gives exact token counts, cancellation between tokens and our own stop-string handling.
``search.max_length`` (the KV buffer ORT GenAI preallocates) is set at load from
``LoadOptions.context``, raised to the sliding window for models that have one (Gemma 3: ORT
GenAI sizes windowed caches from it and fails below the window); the context limit itself is
enforced here.

``evaluate_nll`` feeds each window to a fresh generator, :data:`_NLL_BATCH` tokens at a time,
and reads the generator's ``logits`` output, which after ``append_tokens`` holds a row per
appended token; rows are scored with :func:`~agent.runtimes.base.score_logits` like every runtime.
Why not a plain ``onnxruntime.InferenceSession`` with an empty past KV cache: the 0.18 builder
gives Gemma 3's sliding layers a windowed cache whose GroupQueryAttention refuses a past buffer
smaller than the window. This way needs no second session or copy of the weights, works on every
execution provider, keeps memory bounded, and in fp32 matches transformers to 1e-5 nats on
50-1025 tokens.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from pathlib import Path
from typing import Any, ClassVar

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

# Execution providers by their genai_config.json name -> (our device name, pip package with it).
_PROVIDERS = {
    "cuda": ("cuda", "onnxruntime-genai-cuda"),
    "dml": ("dml", "onnxruntime-genai-directml"),
    "qnn": ("qnn", "onnxruntime-genai with QNN (Windows on Snapdragon)"),
    "webgpu": ("webgpu", "onnxruntime-genai with WebGPU"),
    "NvTensorRtRtx": ("trt-rtx", "onnxruntime-genai-trt-rtx"),
}
_GPU_ALIASES = ("gpu",)  # LoadOptions.device "gpu" means the GPU EP the folder was built for
_CHAT_TEMPLATE_FILE = "chat_template.jinja"
# Tokens appended per step when scoring: bounds the logits buffer to 64 x vocab x 4 bytes (64 MiB
# for Gemma's 262,144; a whole 513-token window took 2.6 GB peak RSS) and is faster too.
_NLL_BATCH = 64


class OrtGenAIRuntime(Runtime):
    """ONNX GenAI folders on onnxruntime-genai (CPU; CUDA / DirectML / QNN builds where present)."""

    name: ClassVar[str] = "ortgenai"

    def __init__(self) -> None:
        super().__init__()
        self._model: Any = None
        self._tokenizer: Any = None
        self._eos: frozenset[int] = frozenset()
        self._bos = -1
        self._n_ctx = 0
        self._max_length = 0
        self._template: str | None = None

    @classmethod
    def _describe(cls) -> dict[str, Any]:
        import onnxruntime_genai as og

        devices = ["cpu", *(d for d in ("cuda", "dml", "qnn", "webgpu") if _ep_available(og, d))]
        try:
            import onnxruntime

            ort_version = onnxruntime.__version__
        except ImportError:  # genai depends on it; a broken install still gets described
            ort_version = ""
        return {"version": og.__version__, "devices": devices, "onnxruntime": ort_version}

    # --- hooks -----------------------------------------------------------------------------------

    def _load(self, model_path: Path, options: LoadOptions) -> None:
        import onnxruntime_genai as og

        cfg_path = model_path / "genai_config.json"
        if not cfg_path.is_file():
            raise InferenceError(f"ortgenai needs an ONNX GenAI folder with genai_config.json, "
                                 f"got {model_path}")
        try:
            genai = json.loads(cfg_path.read_text(encoding="utf-8"))
            decoder = genai["model"]["decoder"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InferenceError(f"unreadable {cfg_path}: {e}") from e
        ep = _folder_ep(decoder)
        device = _device_for(ep)
        if options.device not in (device, *(_GPU_ALIASES if device != "cpu" else ())):
            raise InferenceError(
                f"this model was built for the {ep} execution provider; load it with "
                f"device={device!r}, not {options.device!r}"
            )
        if ep != "cpu" and not _ep_available(og, device):
            package = _PROVIDERS.get(ep, (device, f"onnxruntime-genai with {ep}"))[1]
            raise RuntimeUnavailableError(
                f"this model needs the {ep} execution provider, which the onnxruntime-genai here "
                f"does not have (it has: {', '.join(self.describe()['devices'])})",
                runtime=self.name,
                hint=f"Install {package} on a device with that accelerator, or ship a cpu build.",
            )
        context = int(genai["model"].get("context_length") or options.context)
        window = int((decoder.get("sliding_window") or {}).get("window_size") or 0)
        n_ctx = min(options.context, context)
        max_length = min(max(n_ctx, window), context)
        threads = options.resolved_threads()
        config = og.Config(str(model_path))
        config.overlay(json.dumps({
            "model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}},
            "search": {"max_length": max_length},
        }))
        model = og.Model(config)
        tokenizer = og.Tokenizer(model)
        # Special tokens are added by us (BOS) or by the chat template, never by encode().
        tokenizer.update_options(add_special_tokens="false")
        eos = genai["model"].get("eos_token_id", [])
        self._eos = frozenset(int(t) for t in (eos if isinstance(eos, list) else [eos]))
        bos = genai["model"].get("bos_token_id")
        self._bos = int(bos) if isinstance(bos, int) else -1
        self._template = options.chat_template or _folder_template(model_path)
        self._n_ctx, self._max_length = n_ctx, max_length
        self._model, self._tokenizer = model, tokenizer

    def _close(self) -> None:
        # Tokenizer first: it references the model's native handle.
        self._tokenizer = None
        self._model = None
        self._template = None

    def _encode(self, text: str) -> list[int]:
        return [int(t) for t in self._tokenizer.encode(text)]

    def _prompt_tokens(self, prompt: Prompt, chat: bool) -> list[int]:
        if chat:
            if self._template is None:
                raise InferenceError(
                    "this model has no chat template; pass LoadOptions(chat_template=...) at load"
                )
            messages = json.dumps(chat_messages(prompt))
            text = self._tokenizer.apply_chat_template(
                messages, template_str=self._template, add_generation_prompt=True
            )
        else:
            text = completion_text(prompt)
        tokens = self._encode(text)
        # As llama.cpp: BOS first, unless the chat template already wrote it.
        if self._bos >= 0 and tokens[:1] != [self._bos]:
            tokens.insert(0, self._bos)
        return tokens

    def _stream(
        self, prompt: Prompt, params: GenerationParams, *, chat: bool
    ) -> Generator[str, None, StreamStats]:
        import onnxruntime_genai as og

        model, tokenizer = self._model, self._tokenizer
        if model is None:
            raise InferenceError("no model loaded")
        tokens = self._prompt_tokens(prompt, chat)
        room = self._n_ctx - len(tokens)
        if room < 1:
            raise InferenceError(
                f"prompt of {len(tokens)} tokens does not fit the context of {self._n_ctx}"
            )
        max_tokens = min(params.max_tokens, room)
        search: dict[str, Any] = {
            "max_length": self._max_length,
            "repetition_penalty": params.repeat_penalty,
            "do_sample": params.temperature > 0,
        }
        if params.temperature > 0:
            search.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        if params.seed is not None:
            search["random_seed"] = params.seed
        if params.ignore_eos:
            # An og.Generator whose search is done cannot go on (it then yields padding), so its
            # end-of-sequence ids are masked until the wanted length instead: the same count of
            # tokens, though after the point the model would have stopped the text is not
            # llama.cpp's (which goes on past the token).
            search["min_length"] = len(tokens) + max_tokens
        gen_params = og.GeneratorParams(model)
        gen_params.set_search_options(**search)
        generator = og.Generator(model, gen_params)
        stops = StopStrings(params.stop)
        cancel = self._cancel_event
        eos = self._eos
        completion = 0
        finish = "length"
        try:
            generator.append_tokens(tokens)
            decoder = tokenizer.create_stream()
            while not generator.is_done():
                generator.generate_next_token()
                token = int(generator.get_next_tokens()[0])
                if token in eos:
                    finish = "stop"
                    break
                completion += 1
                yield stops.feed(decoder.decode(token))
                if stops.hit:
                    finish = "stop"
                    break
                if completion >= max_tokens or cancel.is_set():
                    break
        finally:
            del generator  # frees its KV buffers now, not at the next garbage collection
        tail = stops.flush()
        if tail:
            yield tail
        return StreamStats(
            prompt_tokens=len(tokens), completion_tokens=completion, finish_reason=finish
        )

    def _evaluate_nll(self, text: str, window: int) -> NllResult:
        import onnxruntime_genai as og

        model = self._model
        if model is None:
            raise InferenceError("no model loaded")
        tokens = self._encode(text)
        bos = self._bos
        total = 0.0
        scored = 0
        top1: list[int] = []
        for w in range(0, len(tokens), window):
            chunk = tokens[w : w + window]
            # Without BOS the window's first token is context only, not scored.
            inputs = [bos, *chunk] if bos >= 0 else chunk
            targets = chunk if bos >= 0 else chunk[1:]
            if not targets:
                continue
            if len(inputs) > self._max_length:
                raise InferenceError(
                    f"window of {len(inputs)} tokens exceeds the model's {self._max_length}"
                )
            # A fresh generator per window: an empty KV cache, so windows do not depend on
            # each other. After append_tokens its "logits" output holds a row per appended token.
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=self._max_length)
            generator = og.Generator(model, params)
            try:
                for start in range(0, len(targets), _NLL_BATCH):
                    part = inputs[start : start + _NLL_BATCH]
                    generator.append_tokens(part)
                    logits = generator.get_output("logits")
                    if logits.ndim != 3 or logits.shape[1] != len(part):
                        raise InferenceError(
                            f"the model returned logits of shape {logits.shape} for {len(part)} "
                            "tokens: it keeps only the last position (built with prune_lm_head?), "
                            "so it cannot be scored"
                        )
                    # Position p predicts targets[p]; the last input predicts nothing we score.
                    n_out = min(len(part), len(targets) - start)
                    part_nll, part_top1 = score_logits(logits[0, :n_out],
                                                       targets[start : start + n_out])
                    total += part_nll
                    top1.extend(part_top1)
                    scored += n_out
            finally:
                del generator
        return nll_result(total, scored, top1)


def _folder_ep(decoder: dict[str, Any]) -> str:
    """The execution provider a folder was built for: the first of its provider_options, or cpu."""
    for entry in decoder.get("session_options", {}).get("provider_options", []) or []:
        if isinstance(entry, dict) and entry:
            return str(next(iter(entry)))
    return "cpu"


def _device_for(ep: str) -> str:
    return _PROVIDERS.get(ep, (ep, ""))[0] if ep != "cpu" else "cpu"


def _ep_available(og: Any, device: str) -> bool:
    probe = getattr(og, f"is_{device}_available", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:  # the probe itself fails when the provider library is broken
        return False


def _folder_template(folder: Path) -> str | None:
    jinja = folder / _CHAT_TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    try:
        template = json.loads((folder / "tokenizer_config.json").read_text("utf-8")).get(
            "chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    return template if isinstance(template, str) and template.strip() else None
