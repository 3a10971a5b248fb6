"""A tiny random-weight Phi-3, made here in seconds: the Phi path through every tool, for fast tests.

The model is a real ``Phi3ForCausalLM`` (transformers) with Phi-3-mini's layout — fused
``qkv_proj`` and ``gate_up_proj``, multi-head attention, untied embeddings, a vocabulary padded to
a multiple of 64 — but 2 layers of width 256 and random weights. Its tokenizer is a sentencepiece
BPE model **trained here** on the packaged evaluation text (:func:`packager.quality.eval_text`),
with Phi-3's byte fallback and its special tokens as added tokens after the sentencepiece pieces
(``<|endoftext|>`` = EOS, ``<|assistant|>``, ``<|system|>``, ``<|end|>``, ``<|user|>``) and
Phi-3.5-mini's chat template. The folder is an ordinary HF checkpoint
(:func:`packager.model.resolve_source` reads it), about 11 MB.

Sizes were picked so every quantizer takes every tensor whole: the rows are 256 or 512 wide,
multiples of llama.cpp's 32-value Q4_0/Q8_0 blocks **and** its 256-value k-quant super-blocks
(Q4_K_M really is Q4_K/Q6_K here, no fallbacks), of every ONNX int4 ``block_size`` (16-256), and
of OpenVINO's int4 group size 128.

Random weights generate noise, by design; but a benchmark must get all the tokens it asks for.
Phi-3 has no ``lm_head`` bias, so the model carries one: residual channel 0 (:data:`BIAS_CHANNEL`)
is a constant that no layer writes (the embedding sets it, the rows of ``o_proj`` and
``down_proj`` that would write it are zero), and ``lm_head`` column 0 turns it into a per-token
logit offset. Every token that ends or derails a generation — EOS and the other special tokens,
the byte-fallback pieces, the padding ids — gets :data:`SUPPRESSED_BIAS`, so greedy decoding never
stops and always emits printable word pieces. ``eos_bias`` sets EOS's own offset:
``eos_bias=EOS_STOPS_AT_ONCE`` makes a model whose first generated token is EOS (for tests of what
a gate does with a model that stops early).

Cache: ``<cache_dir>/tiny-phi3/<name>-<key>/`` where the key hashes the seed, ``eos_bias`` and
every parameter below (:func:`spec_key`). The folder is written atomically
(:func:`packager.cache.atomic_dir`) and checked before the rename: the HF tokenizer must split the
evaluation text exactly as the trained sentencepiece model does, and a greedy generation must
produce every requested token (or, with an EOS-first model, none). The build is deterministic for
a seed: the same bytes, hence the same source digest and the same cached variants, on every run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import PackagingError
from packager.cache import atomic_dir

log = logging.getLogger(__name__)

NAME = "tiny-phi3"
MARKER = "edgepack-tiny.json"  # written last into the folder: the spec, key and check figures
# Bumped when the code changes what the folder holds (the key hashes it with the spec).
RECIPE_VERSION = 1

# Phi-3's special tokens, in its order (it has placeholders between them, which we leave out);
# they follow the sentencepiece pieces as added tokens, as in Phi-3's tokenizer_config.json.
SPECIAL_TOKENS = ("<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>")
EOS_TOKEN = "<|endoftext|>"
# generation_config.json's eos_token_id list, as Phi-3 has it: end of text, assistant, end of turn.
GENERATION_STOP_TOKENS = ("<|endoftext|>", "<|assistant|>", "<|end|>")
SP_BASE_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 (Llama / Phi-3 sentencepiece layout)
VOCAB_MULTIPLE = 64  # Phi-3 pads its 32,011 tokens to 32,064

# Phi-3.5-mini-instruct's chat template (as published): no BOS, turns end with <|end|>.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

BIAS_CHANNEL = 0  # the residual channel that stays constant and acts as lm_head's bias input
SUPPRESSED_BIAS = -30.0  # logit offset (about) of tokens a benchmark must never see
EOS_STOPS_AT_ONCE = 60.0  # an eos_bias above every other logit: generation ends at once
CHECK_PROMPT = "The river rises in the hills and"
CHECK_TOKENS = 24


@dataclass(frozen=True)
class TinySpec:
    """Every parameter of the tiny model; all of it goes into the cache key."""

    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4  # head_dim 64
    num_key_value_heads: int = 4  # multi-head attention, as Phi-3-mini and Phi-3.5-mini
    max_position_embeddings: int = 4096  # Phi-3-mini-4k's context
    sp_vocab_size: int = 3000  # trained pieces; the eval text supports at most ~3,950
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    # Weight scales: embeddings N(0, 1); projections N(0, 1/fan_in) keep the residual's scale;
    # lm_head gives logits of about this standard deviation, so each position has a clear top-1
    # (a near-uniform model would flip its argmax under any quantization noise).
    logit_std: float = 3.0
    bias_channel_value: float = 3.0  # the constant in BIAS_CHANNEL of every token embedding

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @property
    def vocab_size(self) -> int:
        n = self.sp_vocab_size + len(SPECIAL_TOKENS)
        return -(-n // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class TinyModel:
    """A built tiny Phi-3 on disk."""

    hf_dir: Path  # the HF checkpoint (config, safetensors, tokenizer, generation config)
    name: str  # the model's name (config ``_name_or_path``): "tiny-phi3", "tiny-phi3-s1", ...
    seed: int
    eos_bias: float
    key: str  # the cache key (see spec_key)
    spec: TinySpec
    n_params: int
    vocab_size: int
    eos_token_id: int
    built: bool  # True when this call made the folder; False on a cache hit
    build_seconds: float  # how long the build took (recorded in the marker; 0 when unknown)

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.hf_dir.iterdir() if p.is_file())


def model_name(seed: int, eos_bias: float) -> str:
    """``tiny-phi3`` for the default, with ``-s<seed>`` and ``-eos<bias>`` when they differ."""
    name = NAME if seed == 0 else f"{NAME}-s{seed}"
    if eos_bias != SUPPRESSED_BIAS:
        name += f"-eos{eos_bias:+g}"
    return name


def spec_key(spec: TinySpec, *, seed: int, eos_bias: float) -> str:
    """A short hex digest of everything that changes the folder's bytes (recipe version too)."""
    blob = json.dumps({"recipe": RECIPE_VERSION, "spec": dataclasses.asdict(spec), "seed": seed,
                       "eos_bias": eos_bias, "template": PHI3_CHAT_TEMPLATE,
                       "specials": SPECIAL_TOKENS}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def ensure_tiny_phi3(cache_dir: Path, *, seed: int = 0, eos_bias: float = SUPPRESSED_BIAS,
                     spec: TinySpec | None = None) -> TinyModel:
    """Make the tiny Phi-3 under ``cache_dir/tiny-phi3/`` once; later calls reuse it.

    Args:
        cache_dir: the packager cache (see :func:`packager.cache.default_cache_dir`).
        seed: the weights' random seed; the same seed gives the same bytes.
        eos_bias: EOS's logit offset. The default suppresses it (a generation always runs to
            its token limit); :data:`EOS_STOPS_AT_ONCE` makes EOS the first generated token.
        spec: the shape and scales (default :class:`TinySpec`).

    Returns:
        The :class:`TinyModel` (``built`` says whether this call made it).

    Raises:
        PackagingError: the tokenizer or the generation check failed (nothing is cached then).
    """
    spec = spec or TinySpec()
    if not math.isfinite(eos_bias):
        raise PackagingError(f"eos_bias must be a finite number, got {eos_bias!r}")
    key = spec_key(spec, seed=seed, eos_bias=eos_bias)
    name = model_name(seed, eos_bias)
    hf_dir = cache_dir / NAME / f"{name}-{key}"
    marker = _read_marker(hf_dir, key)
    built = marker is None
    if marker is None:
        marker = _build(hf_dir, spec, seed=seed, eos_bias=eos_bias, key=key, name=name)
    else:
        log.info("%s present: %s", name, hf_dir)
    return TinyModel(hf_dir=hf_dir, name=name, seed=seed, eos_bias=eos_bias, key=key, spec=spec,
                     n_params=int(marker["n_params"]), vocab_size=spec.vocab_size,
                     eos_token_id=spec.sp_vocab_size, built=built,
                     build_seconds=float(marker.get("build_seconds", 0.0)))


def _read_marker(hf_dir: Path, key: str) -> dict[str, Any] | None:
    try:
        marker = json.loads((hf_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(marker, dict) and marker.get("key") == key and (hf_dir / "config.json").is_file()
    return marker if ok else None


# --- (1) the tokenizer -------------------------------------------------------------------------


def train_tokenizer(text: str, vocab_size: int) -> bytes:
    """Train a Phi-3-style sentencepiece BPE model on ``text``; returns the ``.model`` bytes.

    Llama/Phi-3 settings: ``<unk>``/``<s>``/``</s>`` = 0/1/2, byte fallback, digits split, a
    dummy prefix, whitespace kept as it is. Trained from an iterator with one thread, so the bytes
    depend only on the text and the settings (a file input would record its path in the model).
    """
    import sentencepiece as spm

    lines = [line for line in text.splitlines() if line.strip()]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True,
        allow_whitespace_only_pieces=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, max_sentence_length=1 << 20, minloglevel=2,
    )
    return out.getvalue()


# Phi-3's tokenizer_config.json strips the whitespace after its chat tokens (<|user|>\n -> one
# token), and llama.cpp does the same for models named phi3; <|endoftext|> keeps it.
_RSTRIP = frozenset(SPECIAL_TOKENS) - {EOS_TOKEN}


def _token(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False,
            "rstrip": content in _RSTRIP, "single_word": False, "special": True}


def _write_tokenizer(dst: Path, sp_model: bytes, spec: TinySpec) -> None:
    """tokenizer.model, added_tokens.json, special_tokens_map.json, tokenizer_config.json (as
    Phi-3 ships them), then tokenizer.json from transformers' conversion of those."""
    from transformers import AutoTokenizer

    (dst / "tokenizer.model").write_bytes(sp_model)
    added = {t: spec.sp_vocab_size + i for i, t in enumerate(SPECIAL_TOKENS)}
    decoder = {str(i): _token(t) for i, t in enumerate(SP_BASE_TOKENS)}
    decoder.update({str(i): _token(t) for t, i in added.items()})
    (dst / "added_tokens.json").write_text(json.dumps(added, indent=2))
    (dst / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": "<unk>",
    }, indent=2))
    (dst / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_eos_token": False, "added_tokens_decoder": decoder,
        "bos_token": "<s>", "chat_template": PHI3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False, "eos_token": EOS_TOKEN, "legacy": False,
        "model_max_length": spec.max_position_embeddings, "pad_token": EOS_TOKEN,
        "padding_side": "left", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>", "use_default_system_prompt": False,
    }, indent=2))
    # The fast tokenizer's JSON, which ORT GenAI and optimum read; made from the files above.
    tok: Any = AutoTokenizer.from_pretrained(dst)
    (dst / "tokenizer.json").write_text(tok.backend_tokenizer.to_str(pretty=True), encoding="utf-8")


# --- (2) the weights -----------------------------------------------------------------------------


def suppressed_ids(spec: TinySpec) -> list[int]:
    """Token ids a benchmark must never generate: sentencepiece's control and byte pieces, the
    special tokens (EOS among them; its offset is ``eos_bias``) and the padding ids."""
    n_sp = spec.sp_vocab_size
    base = list(range(len(SP_BASE_TOKENS) + 256))  # <unk> <s> </s>, then <0x00>..<0xFF>
    return base + list(range(n_sp, spec.vocab_size))


def _config(spec: TinySpec) -> Any:
    from transformers import Phi3Config

    eos = spec.sp_vocab_size
    return Phi3Config(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, hidden_act="silu",
        max_position_embeddings=spec.max_position_embeddings,
        original_max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=spec.rms_norm_eps,
        # transformers 5 takes RoPE only as rope_parameters (a rope_theta keyword is dropped)
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta,
                         "partial_rotary_factor": 1.0},
        sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=eos,
        pad_token_id=eos,
    )


def _init_weights(model: Any, spec: TinySpec, *, seed: int, eos_bias: float) -> None:
    """Deterministic random weights with the bias channel (see the module docstring)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    d, c = spec.hidden_size, BIAS_CHANNEL

    def normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std

    # Parameters in a fixed order (named_parameters is declaration order) so a seed means one
    # set of weights whatever transformers' own init did.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.fill_(1.0)
            elif pname.endswith("embed_tokens.weight"):
                p.copy_(normal(tuple(p.shape), 1.0))
                p[:, c] = spec.bias_channel_value
            elif pname == "lm_head.weight":
                w = normal(tuple(p.shape), spec.logit_std / math.sqrt(d))
                w[:, c] = 0.0
                # After the final norm, channel c holds about bias_channel_value / rms(h); with
                # the residual's rms near 1 that is bias_channel_value: scale the offset by it.
                unit = 1.0 / spec.bias_channel_value
                for tok in suppressed_ids(spec):
                    w[tok, :] = 0.0
                    w[tok, c] = SUPPRESSED_BIAS * unit
                w[spec.sp_vocab_size, c] = eos_bias * unit
                p.copy_(w)
            else:  # the projections: N(0, 1/fan_in)
                w = normal(tuple(p.shape), 1.0 / math.sqrt(p.shape[1]))
                if pname.endswith(("o_proj.weight", "down_proj.weight")):
                    w[c, :] = 0.0  # no layer writes the bias channel
                p.copy_(w)


# --- (3) build and check -------------------------------------------------------------------------


def _build(hf_dir: Path, spec: TinySpec, *, seed: int, eos_bias: float, key: str,
           name: str) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import GenerationConfig, Phi3ForCausalLM

    from packager.quality import eval_text

    t0 = time.monotonic()
    log.info("making %s (seed %d, key %s) in %s", name, seed, key, hf_dir)
    text, eval_sha = eval_text()
    with atomic_dir(hf_dir) as tmp:
        sp_model = train_tokenizer(text, spec.sp_vocab_size)
        _write_tokenizer(tmp, sp_model, spec)
        config = _config(spec)
        torch.manual_seed(seed)  # transformers' own init runs first; ours overwrites all of it
        model: Any = Phi3ForCausalLM(config)
        _init_weights(model, spec, seed=seed, eos_bias=eos_bias)
        model.generation_config = GenerationConfig(
            bos_token_id=1, pad_token_id=spec.sp_vocab_size,
            eos_token_id=[spec.sp_vocab_size + SPECIAL_TOKENS.index(t)
                          for t in GENERATION_STOP_TOKENS])
        model.save_pretrained(tmp, safe_serialization=True)
        n_params = int(model.num_parameters())
        del model
        _keep_name(tmp / "config.json", name)
        for f in tmp.iterdir():
            f.chmod(0o644)  # safetensors writes 0600; cache files are ordinary readable files
        check = _check(tmp, sp_model, text, expect_stop=eos_bias > 0)
        seconds = round(time.monotonic() - t0, 2)
        marker = {"key": key, "name": name, "seed": seed, "eos_bias": eos_bias,
                  "spec": dataclasses.asdict(spec), "recipe": RECIPE_VERSION, "n_params": n_params,
                  "eval_sha256": eval_sha, "transformers": transformers.__version__,
                  "check": check, "build_seconds": seconds}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
    log.info("%s made in %.1f s (%d params, vocab %d): %s", name, seconds, n_params,
             spec.vocab_size, hf_dir)
    return marker


def _keep_name(cfg_path: Path, name: str) -> None:
    # transformers does not save name_or_path; packager.model names an HF folder by it (else by
    # the folder, which carries the cache key).
    cfg = json.loads(cfg_path.read_text())
    cfg["_name_or_path"] = name
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _check(hf_dir: Path, sp_model: bytes, text: str, *, expect_stop: bool) -> dict[str, Any]:
    """The folder is what the tools will read: tokenizer = the trained model, generation works."""
    import sentencepiece as spm
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok: Any = AutoTokenizer.from_pretrained(hf_dir)
    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    ids = [int(i) for i in tok(text)["input_ids"]]
    if ids != sp.encode(text):
        raise PackagingError("the HF tokenizer made from the trained sentencepiece model splits the "
                             "evaluation text differently from it",
                             hint="transformers' LlamaTokenizer conversion changed: check the "
                             "tokenizer_config.json written by packager/tiny.py.")
    model: Any = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    inputs = tok(CHECK_PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=CHECK_TOKENS, do_sample=False)
    new = [int(i) for i in out[0, inputs["input_ids"].shape[1]:]]
    stops = set(model.generation_config.eos_token_id)
    n = next((i for i, t in enumerate(new) if t in stops), len(new))
    if expect_stop and n != 0:
        raise PackagingError(f"the EOS-first tiny model generated {n} tokens before stopping")
    if not expect_stop and n != CHECK_TOKENS:
        raise PackagingError(f"the tiny model stopped after {n} of {CHECK_TOKENS} tokens: its "
                             "stop tokens are not suppressed")
    generated = str(tok.decode(new[:n], skip_special_tokens=True))
    log.info("check passed: %d eval tokens match sentencepiece; %r -> %d tokens %r", len(ids),
             CHECK_PROMPT, n, generated)
    return {"eval_tokens": len(ids), "prompt": CHECK_PROMPT, "generated_tokens": n,
            "generated": generated}


__all__ = ["EOS_STOPS_AT_ONCE", "NAME", "SUPPRESSED_BIAS", "TinyModel", "TinySpec",
           "ensure_tiny_phi3"]
