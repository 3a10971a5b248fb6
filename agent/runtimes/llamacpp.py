"""llama.cpp runtime through llama-cpp-python (GGUF models). ``llama_cpp`` is imported lazily.

Generation drives ``Llama.generate`` (the token generator that ``create_completion`` and
``create_chat_completion`` are built on) with our own small loop instead of consuming
``create_completion(stream=True)``, because that gives us, at no extra cost per token:

* exact token counts for :class:`~agent.runtimes.base.Usage` (the stream carries none);
* cancellation between tokens (a ``threading.Event`` check), ending the llama generator cleanly;
* less per-token work than ``create_completion``, which re-detokenizes the whole completion on
  every token. Sampling is identical: same sampler chain, same parameters, same prefix-cache reuse.

``Llama.generate`` itself never stops at end of generation (``create_completion`` does), so
``GenerationParams.ignore_eos`` is our loop going on past such a token: it counts, adds no text.

Chat formats the user turn with a ``Jinja2ChatFormatter`` (as ``create_chat_completion`` does)
using ``LoadOptions.chat_template`` when given, else the GGUF's ``tokenizer.chat_template``; a model
with neither refuses chat instead of guessing a format.

``evaluate_nll`` reuses the resident context rather than a second ``Llama(logits_all=True)``: with
logits_all, llama-cpp-python keeps an ``n_ctx x vocab`` float32 score matrix (2 GiB for 2048 x
262,144). We decode each window in sub-batches of :data:`_NLL_BATCH` tokens asking llama.cpp for
every position's logits (it sizes its output buffer per batch), score them with
:func:`~agent.runtimes.base.score_logits`, and clear the KV cache before and after.
"""

from __future__ import annotations

import codecs
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from agent.errors import InferenceError
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
    from llama_cpp import Llama

# Positions decoded per llama_decode call when scoring: bounds logits memory to
# 64 x vocab x 4 bytes (64 MiB for Gemma's 262,144) while keeping batched matmuls efficient.
_NLL_BATCH = 64
_GPU_DEVICES = ("gpu", "cuda", "metal", "vulkan")


class LlamaCppRuntime(Runtime):
    """GGUF models on llama.cpp (CPU; GPU offload when the wheel was built with it)."""

    name: ClassVar[str] = "llamacpp"

    def __init__(self) -> None:
        super().__init__()
        self._llm: Llama | None = None
        self._chat_formatter: Any = None
        self._vocab: Any = None
        self._n_ctx = 0
        # token id -> (bytes, is end-of-generation), filled lazily: one ctypes call per distinct
        # token for the model's lifetime instead of two per generated token.
        self._pieces: dict[int, tuple[bytes, bool]] = {}

    @classmethod
    def _describe(cls) -> dict[str, Any]:
        import llama_cpp

        gpu = bool(llama_cpp.llama_supports_gpu_offload())
        return {
            "version": llama_cpp.__version__,
            "devices": ["cpu", "gpu"] if gpu else ["cpu"],
            "gpu_offload": gpu,
            "system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip(),
        }

    # --- hooks -----------------------------------------------------------------------------------

    def _load(self, model_path: Path, options: LoadOptions) -> None:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if options.device == "cpu":
            gpu_layers = 0
        elif options.device in _GPU_DEVICES:
            if not llama_cpp.llama_supports_gpu_offload():
                raise InferenceError(
                    f"device {options.device!r} asked but this llama-cpp-python has no GPU offload"
                )
            gpu_layers = -1
        else:
            raise InferenceError(
                f"llamacpp does not support device {options.device!r} (cpu, {', '.join(_GPU_DEVICES)})"
            )
        if not model_path.is_file():
            raise InferenceError(f"llamacpp needs a GGUF file, got {model_path}")
        threads = options.resolved_threads()
        llm = llama_cpp.Llama(
            model_path=str(model_path),
            n_ctx=options.context,
            n_threads=threads,
            n_threads_batch=threads,
            n_gpu_layers=gpu_layers,
            verbose=False,
        )
        try:
            self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
            template = options.chat_template or llm.metadata.get("tokenizer.chat_template") or None
            self._chat_formatter = None
            if template:
                eos_id, bos_id = llm.token_eos(), llm.token_bos()
                self._chat_formatter = Jinja2ChatFormatter(
                    template=template,
                    eos_token=_token_text(llm, eos_id),
                    bos_token=_token_text(llm, bos_id),
                    add_generation_prompt=True,
                    stop_token_ids=[eos_id],
                )
        except BaseException:
            llm.close()
            raise
        self._pieces = {}
        # llama.cpp may round its context up; llama-cpp-python's token buffers have the size we
        # asked for, so that is the limit.
        self._n_ctx = min(llm.n_ctx(), options.context)
        self._llm = llm

    def _close(self) -> None:
        llm, self._llm = self._llm, None
        self._chat_formatter = None
        self._vocab = None
        self._pieces = {}
        if llm is not None:
            llm.close()

    def _prompt_tokens(self, llm: Llama, prompt: Prompt, chat: bool) -> list[int]:
        if not chat:
            # Same tokenization as create_completion on a str prompt: BOS, special tokens parsed.
            return llm.tokenize(completion_text(prompt).encode("utf-8"), add_bos=True, special=True)
        if self._chat_formatter is None:
            raise InferenceError(
                "this model has no chat template; pass LoadOptions(chat_template=...) at load"
            )
        formatted = self._chat_formatter(messages=chat_messages(prompt))
        # As llama-cpp-python's chat handler: the template adds BOS itself when added_special.
        return llm.tokenize(
            formatted.prompt.encode("utf-8"), add_bos=not formatted.added_special, special=True
        )

    def _stream(
        self, prompt: Prompt, params: GenerationParams, *, chat: bool
    ) -> Generator[str, None, StreamStats]:
        import llama_cpp

        llm = self._llm
        if llm is None:
            raise InferenceError("no model loaded")
        tokens = self._prompt_tokens(llm, prompt, chat)
        room = self._n_ctx - len(tokens)
        if room < 1:
            raise InferenceError(
                f"prompt of {len(tokens)} tokens does not fit the context of {self._n_ctx}"
            )
        max_tokens = min(params.max_tokens, room)
        stops = StopStrings(params.stop)
        cancel = self._cancel_event
        pieces = self._pieces
        vocab = self._vocab
        is_eog = llama_cpp.llama_vocab_is_eog
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # As create_completion does; llama-cpp-python derives a default seed when none is given.
        if params.seed is not None:
            llm.set_seed(params.seed)
        gen = llm.generate(
            tokens,
            top_k=params.top_k,
            top_p=params.top_p,
            # min_p off: GenerationParams does not carry it and we want only what the caller set.
            min_p=0.0,
            temp=params.temperature,
            repeat_penalty=params.repeat_penalty,
        )
        completion = 0
        finish = "length"
        try:
            for token in gen:
                entry = pieces.get(token)
                if entry is None:
                    entry = pieces[token] = (llm.detokenize([token]), is_eog(vocab, token))
                piece, eog = entry
                if eog and not params.ignore_eos:
                    finish = "stop"
                    break
                completion += 1
                # With ignore_eos an end-of-generation token counts but is not text.
                yield stops.feed(decoder.decode(b"" if eog else piece))
                if stops.hit:
                    finish = "stop"
                    break
                if completion >= max_tokens or cancel.is_set():
                    break
        finally:
            gen.close()
        # What the UTF-8 decoder and the stop-string filter still hold (nothing after a stop string).
        tail = stops.feed(decoder.decode(b"", final=True)) + stops.flush()
        if tail:
            yield tail
        return StreamStats(
            prompt_tokens=len(tokens), completion_tokens=completion, finish_reason=finish
        )

    def _drop_prompt_cache(self) -> None:
        if self._llm is not None:
            self._llm.reset()  # n_tokens = 0: the next generate() shares no prefix with the last

    def _evaluate_nll(self, text: str, window: int) -> NllResult:
        import llama_cpp
        import numpy as np

        llm = self._llm
        if llm is None:
            raise InferenceError("no model loaded")
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        bos = llm.token_bos()
        n_vocab = llm.n_vocab()
        ctx = llm.ctx
        memory = llama_cpp.llama_get_memory(ctx)
        batch = llama_cpp.llama_batch_init(_NLL_BATCH, 0, 1)
        total = 0.0
        scored = 0
        top1: list[int] = []
        try:
            for w in range(0, len(tokens), window):
                chunk = tokens[w : w + window]
                # Without BOS the window's first token is context only, not scored.
                inputs = [bos, *chunk] if bos >= 0 else chunk
                targets = chunk if bos >= 0 else chunk[1:]
                # Each window starts from an empty cache: results do not depend on earlier ones.
                llama_cpp.llama_memory_clear(memory, True)
                for start in range(0, len(inputs), _NLL_BATCH):
                    part = inputs[start : start + _NLL_BATCH]
                    n_out = 0
                    for i, tok in enumerate(part):
                        pos = start + i
                        batch.token[i] = tok
                        batch.pos[i] = pos
                        batch.n_seq_id[i] = 1
                        batch.seq_id[i][0] = 0
                        # Position p predicts targets[p]; the last input predicts nothing we score.
                        want = pos < len(targets)
                        batch.logits[i] = want
                        n_out += want
                    batch.n_tokens = len(part)
                    rc = llama_cpp.llama_decode(ctx, batch)
                    if rc != 0:
                        raise InferenceError(f"llama_decode returned {rc} while scoring")
                    if n_out:
                        logits = np.ctypeslib.as_array(
                            llama_cpp.llama_get_logits(ctx), shape=(n_out, n_vocab)
                        )
                        part_nll, part_top1 = score_logits(logits, targets[start : start + n_out])
                        total += part_nll
                        top1.extend(part_top1)
                        scored += n_out
        finally:
            llama_cpp.llama_batch_free(batch)
            llama_cpp.llama_memory_clear(memory, True)
            # llama-cpp-python's prefix cache must not trust the KV we just overwrote.
            llm.reset()
        return nll_result(total, scored, top1)


def _token_text(llm: Llama, token: int) -> str:
    if token < 0:
        return ""
    return llm.detokenize([token], special=True).decode("utf-8", "replace")
