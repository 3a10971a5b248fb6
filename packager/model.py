"""What the packager knows about a source model, read from its files without loading weights.

``resolve_source`` turns what the user typed (a local HF folder, a local ``.gguf`` file, or a
Hugging Face id) into a :class:`ModelInfo`. Only config/metadata is parsed: the planner needs the
shape (parameters, layers, KV heads, context), never the weights. The source digest covers every
file the build reads, so cached artifacts are keyed by content, not by path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from agent.errors import ModelSourceError
from packager.cache import sha256_file, sha256_files

log = logging.getLogger(__name__)

# Files of an HF checkpoint that a build reads, hence hashed into the source digest and fetched.
HF_PATTERNS = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "*.safetensors", "model.safetensors.index.json",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PROBE_TIMEOUT_S = 3.0  # a reachable hub answers a TCP connect well within this


# A ready folder's kind is also the only artifact format it can become: it is shipped as it is.
SOURCE_KINDS = ("hf", "gguf", "onnx", "openvino-ir")
READY_FORMATS = ("onnx", "openvino-ir")


@dataclass(frozen=True)
class ModelInfo:
    """The shape and identity of a source model."""

    name: str
    architecture: str  # HF model_type (e.g. "phi3", "gemma3_text") or GGUF general.architecture
    n_params: int
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int  # tokens the model was trained for
    has_chat_template: bool
    source_kind: str  # "hf" | "gguf" | "onnx" | "openvino-ir" (a ready runtime folder)
    path: Path  # the HF folder, the .gguf file, or the ready ONNX GenAI / OpenVINO IR folder
    source_digest: str  # "sha256:<hex>" over the source files' bytes
    native_quant: str = ""  # GGUF input: its file type (e.g. "Q4_K_M"); "" for HF input

    def __post_init__(self) -> None:
        if self.source_kind not in SOURCE_KINDS:
            raise ValueError(f"source_kind must be one of {SOURCE_KINDS}, not {self.source_kind!r}")
        if min(self.n_layers, self.hidden_size, self.n_heads, self.n_kv_heads, self.head_dim) <= 0:
            raise ValueError(f"model {self.name!r} has a non-positive dimension")

    def to_dict(self) -> dict[str, Any]:
        """As plain data (for --json output and manifests)."""
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def resolve_source(spec: str, *, cache_dir: Path) -> ModelInfo:
    """Read a model source: a local HF folder, a local ``.gguf`` file, or a Hugging Face id.

    Args:
        spec: a folder with ``config.json`` and ``*.safetensors``, a ``.gguf`` file, or "org/name".
        cache_dir: the packager cache; hub downloads go to ``cache_dir/hub``.

    Returns:
        The model's :class:`ModelInfo`.

    Raises:
        ModelSourceError: the path does not exist or is not a model, the id is unknown, or the hub
            is unreachable (raised within seconds, naming the id and how to pass a local folder).
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "genai_config.json").is_file():
            return read_onnx_folder(path)
        if (path / "openvino_model.xml").is_file():
            return read_openvino_folder(path)
        return read_hf_folder(path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelSourceError(f"{path} is a file but not a .gguf model")
        return read_gguf(path)
    looks_like_path = spec.startswith(("/", ".", "~")) or spec.lower().endswith(".gguf")
    if looks_like_path or not _HUB_ID.match(spec):
        raise ModelSourceError(
            f"model source {spec!r} does not exist",
            hint="Pass a folder with config.json and *.safetensors, a .gguf file, a ready ONNX "
            "GenAI or OpenVINO IR folder, or a Hugging Face id such as microsoft/Phi-3.5-mini-instruct.",
        )
    return read_hf_folder(_download(spec, cache_dir / "hub"))


def _download(repo_id: str, hub_cache: Path) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    offline_hint = (
        f"Download it where the hub is reachable (huggingface-cli download {repo_id} "
        "--local-dir DIR), copy DIR here and pass DIR as the model source."
    )
    try:  # (1) a snapshot fetched earlier needs no network
        return Path(snapshot_download(repo_id, cache_dir=hub_cache, allow_patterns=list(HF_PATTERNS),
                                      local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass  # not cached yet: go to the network
    # (2) fail fast when offline instead of waiting out the hub client's timeouts and retries
    reason = _hub_unreachable_reason()
    if reason:
        raise ModelSourceError(
            f"cannot fetch {repo_id!r}: the Hugging Face hub is unreachable ({reason})",
            hint=offline_hint,
        )
    # (3) download
    log.info("downloading %s from the Hugging Face hub into %s", repo_id, hub_cache)
    try:
        return Path(snapshot_download(repo_id, cache_dir=hub_cache, allow_patterns=list(HF_PATTERNS),
                                      etag_timeout=10))
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise ModelSourceError(
            f"Hugging Face model {repo_id!r} does not exist or needs access rights: {e}",
            hint="Check the id; for gated models run `huggingface-cli login` first.",
        ) from e
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise ModelSourceError(f"cannot fetch {repo_id!r} from the Hugging Face hub: {e}",
                               hint=offline_hint) from e


def _hub_unreachable_reason() -> str:
    """Why the hub cannot be reached right now, or "" if a TCP connection to it succeeds."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or 443
    result: list[str] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S).close()
            result.append("")
        except OSError as e:
            result.append(f"{host}:{port}: {e}")

    # getaddrinfo has no timeout of its own: bound the whole probe with a daemon thread
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(_PROBE_TIMEOUT_S + 0.5)
    return result[0] if result else f"{host}:{port}: no answer within {_PROBE_TIMEOUT_S:.0f} s"


# --- HF folders -------------------------------------------------------------------------------


def read_hf_folder(folder: Path) -> ModelInfo:
    """Read a local HF checkpoint folder (``config.json`` + ``*.safetensors``).

    Raises:
        ModelSourceError: the config is missing or unreadable, there are no safetensors weights,
            or the config lacks a dimension we need.
    """
    cfg_path = folder / "config.json"
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ModelSourceError(f"{folder} has no config.json: not an HF checkpoint") from e
    except (OSError, ValueError) as e:
        raise ModelSourceError(f"cannot read {cfg_path}: {e}") from e
    if not any(folder.glob("*.safetensors")):
        raise ModelSourceError(
            f"{folder} has no *.safetensors weights",
            hint="Re-save the model with save_pretrained(..., safe_serialization=True).",
        )
    shape = shape_from_hf_config(config, where=str(cfg_path))
    tok_cfg = folder / "tokenizer_config.json"
    has_template = (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file()
    if not has_template and tok_cfg.is_file():
        try:
            has_template = bool(json.loads(tok_cfg.read_text(encoding="utf-8")).get("chat_template"))
        except (OSError, ValueError):
            has_template = False  # an unreadable tokenizer config surfaces later in the converter
    files = sorted({p for pat in HF_PATTERNS for p in folder.glob(pat) if p.is_file()})
    return ModelInfo(
        name=_hf_name(folder, config),
        **shape,
        has_chat_template=has_template,
        source_kind="hf",
        path=folder.resolve(),
        source_digest="sha256:" + sha256_files(files, root=folder),
    )


def _hf_name(folder: Path, config: dict[str, Any]) -> str:
    # hub snapshots live in .../models--org--name/snapshots/<sha>/: use the repo name, not the sha
    for parent in folder.resolve().parents:
        if parent.name.startswith("models--"):
            return parent.name.split("--")[-1]
    name = config.get("_name_or_path") or config.get("_model_name_or_path") or folder.resolve().name
    return str(name).rstrip("/").split("/")[-1]


def shape_from_hf_config(config: dict[str, Any], *, where: str = "config.json") -> dict[str, Any]:
    """The model shape and parameter count from an HF ``config.json`` (as a dict).

    Counts decoder-only llama/phi3/gemma/qwen2-like models: embeddings (twice unless tied), per layer
    q/k/v/o projections with grouped-query attention, a gated MLP (3 x hidden x intermediate) and
    the norms. Multimodal configs are read through their ``text_config``.

    Args:
        config: the parsed config.json.
        where: named in errors.

    Returns:
        Keyword arguments for :class:`ModelInfo`: architecture, n_params, n_layers, hidden_size,
        n_heads, n_kv_heads, head_dim, vocab_size, max_context.

    Raises:
        ModelSourceError: a required key is missing or not a positive integer.
    """
    cfg = dict(config)
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg, **cfg["text_config"]}
    arch = str(cfg.get("model_type") or config.get("model_type") or "unknown")

    def need(key: str) -> int:
        v = cfg.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ModelSourceError(f"{where}: {key} is missing or not a positive integer ({v!r})")
        return v

    hidden, layers, heads = need("hidden_size"), need("num_hidden_layers"), need("num_attention_heads")
    inter, vocab = need("intermediate_size"), need("vocab_size")
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    # Gemma ties input and output embeddings by default; llama/phi3/qwen2 configs say so explicitly.
    tied = bool(cfg.get("tie_word_embeddings", arch.startswith("gemma")))
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    per_layer = hidden * q_out + 2 * hidden * kv_out + q_out * hidden  # q, k, v, o
    per_layer += 3 * hidden * inter  # gate, up, down
    if arch.startswith("gemma3"):
        per_layer += 4 * hidden + 2 * head_dim  # pre/post attn + ffn norms, q/k norms
    else:
        per_layer += 2 * hidden  # input + post-attention norms
    if arch.startswith("qwen2") or cfg.get("attention_bias"):
        per_layer += q_out + 2 * kv_out  # q/k/v biases
    n_params = vocab * hidden * (1 if tied else 2) + layers * per_layer + hidden  # + final norm
    max_ctx = cfg.get("max_position_embeddings") or cfg.get("max_sequence_length") or 2048
    return {
        "architecture": arch, "n_params": int(n_params), "n_layers": layers, "hidden_size": hidden,
        "n_heads": heads, "n_kv_heads": int(kv_heads), "head_dim": int(head_dim),
        "vocab_size": vocab, "max_context": int(max_ctx),
    }


# --- ready runtime folders (ONNX GenAI, OpenVINO IR) ----------------------------------------


def read_onnx_folder(folder: Path) -> ModelInfo:
    """Read a ready ONNX Runtime GenAI folder (``genai_config.json`` + ``*.onnx``).

    The shape comes from ``genai_config.json`` (or an HF ``config.json`` beside it, which is
    more complete); the parameter count is estimated when only the genai config is there.

    Raises:
        ModelSourceError: the config is unreadable, there is no ``.onnx`` file, or a dimension
            is missing.
    """
    cfg_path = folder / "genai_config.json"
    try:
        genai = json.loads(cfg_path.read_text(encoding="utf-8"))
        model = genai["model"]
        dec = model["decoder"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelSourceError(f"cannot read {cfg_path}: {e}") from e
    if not any(folder.glob("*.onnx")):
        raise ModelSourceError(f"{folder} has a genai_config.json but no *.onnx model")
    if (folder / "config.json").is_file():
        shape = shape_from_hf_config(json.loads((folder / "config.json").read_text("utf-8")))
    else:
        def need(d: dict[str, Any], key: str) -> int:
            v = d.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ModelSourceError(f"{cfg_path}: {key} is missing or not a positive integer")
            return v

        hidden, layers = need(dec, "hidden_size"), need(dec, "num_hidden_layers")
        heads, vocab = need(dec, "num_attention_heads"), need(model, "vocab_size")
        kv = dec.get("num_key_value_heads") or heads
        # No MLP size in a genai config: the usual decoder estimate (12 h^2 per layer) + embeddings.
        shape = {"architecture": str(model.get("type", "unknown")),
                 "n_params": vocab * hidden + 12 * layers * hidden * hidden, "n_layers": layers,
                 "hidden_size": hidden, "n_heads": heads, "n_kv_heads": int(kv),
                 "head_dim": int(dec.get("head_size") or hidden // heads), "vocab_size": vocab,
                 "max_context": int(model.get("context_length") or 2048)}
    return _ready_folder(folder, "onnx", shape, bool(chat_template_in(folder)))


def read_openvino_folder(folder: Path) -> ModelInfo:
    """Read a ready OpenVINO IR folder (``openvino_model.xml/.bin``, as optimum-intel exports it).

    Raises:
        ModelSourceError: the HF ``config.json`` optimum writes beside the IR is missing or
            unreadable, or the ``.bin`` weights are missing.
    """
    if not (folder / "openvino_model.bin").is_file():
        raise ModelSourceError(f"{folder} has openvino_model.xml but no openvino_model.bin")
    cfg_path = folder / "config.json"
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelSourceError(
            f"cannot read {cfg_path}: {e}",
            hint="Export with optimum-cli export openvino, which writes config.json beside the IR.",
        ) from e
    shape = shape_from_hf_config(config, where=str(cfg_path))
    return _ready_folder(folder, "openvino-ir", shape, bool(chat_template_in(folder)))


def chat_template_in(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("tokenizer_config.json", "genai_config.json"):
        with contextlib.suppress(OSError, ValueError):
            t = json.loads((folder / name).read_text(encoding="utf-8")).get("chat_template")
            if isinstance(t, str) and t:
                return t
    return None


def _ready_folder(folder: Path, kind: str, shape: dict[str, Any], has_template: bool) -> ModelInfo:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return ModelInfo(
        name=folder.resolve().name, **shape, has_chat_template=has_template, source_kind=kind,
        path=folder.resolve(), source_digest="sha256:" + sha256_files(files, root=folder),
    )


# --- GGUF files -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GgufHeader:
    """A GGUF file's metadata: scalar key/values (arrays as their length) and tensor shapes."""

    fields: dict[str, Any]  # scalars as values; arrays as ArrayLen (their element count)
    tensor_elements: dict[str, int]  # tensor name -> element count

    @property
    def n_params(self) -> int:
        return sum(self.tensor_elements.values())


class ArrayLen(int):
    """Stands in for a GGUF array value we skip (e.g. 262,144 tokenizer strings): its length."""


# GGUF value types (gguf-py GGUFValueType): fixed-size ones as struct formats
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_header(path: Path) -> GgufHeader:
    """Parse a GGUF file's header (metadata and tensor infos) without touching tensor data.

    ``gguf.GGUFReader`` builds a numpy view per array element and takes ~10 s on a Gemma 3 file
    (262,144 tokens + 514,906 merges); skipping arrays makes this ~0.3 s. Tests cross-check the
    parameter count against GGUFReader.

    Raises:
        ModelSourceError: the file is not a GGUF (v2/v3) or is truncated.
    """
    import mmap
    import struct

    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            if mm[:4] != b"GGUF":
                raise ModelSourceError(f"{path} is not a readable GGUF file: bad magic")
            version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
            if version not in (2, 3):
                raise ModelSourceError(f"{path} is not a readable GGUF file: version {version}")
            off = 24

            def string() -> str:
                nonlocal off
                (n,) = struct.unpack_from("<Q", mm, off)
                off += 8 + n
                return bytes(mm[off - n:off]).decode("utf-8", "replace")

            def value(vtype: int) -> Any:
                nonlocal off
                if vtype in _GGUF_SCALARS:
                    fmt = _GGUF_SCALARS[vtype]
                    (v,) = struct.unpack_from(fmt, mm, off)
                    off += struct.calcsize(fmt)
                    return v
                if vtype == _GGUF_STRING:
                    return string()
                if vtype == _GGUF_ARRAY:
                    etype, count = struct.unpack_from("<IQ", mm, off)
                    off += 12
                    if etype in _GGUF_SCALARS:
                        off += count * struct.calcsize(_GGUF_SCALARS[etype])
                    else:
                        for _ in range(count):
                            value(etype)
                    return ArrayLen(count)
                raise ValueError(f"unknown GGUF value type {vtype}")

            fields: dict[str, Any] = {}
            for _ in range(n_kv):
                key = string()
                (vtype,) = struct.unpack_from("<I", mm, off)
                off += 4
                fields[key] = value(vtype)
            tensors: dict[str, int] = {}
            for _ in range(n_tensors):
                name = string()
                (n_dims,) = struct.unpack_from("<I", mm, off)
                dims = struct.unpack_from(f"<{n_dims}Q", mm, off + 4)
                off += 4 + 8 * n_dims + 4 + 8  # dims, ggml type, data offset
                count = 1
                for d in dims:
                    count *= d
                tensors[name] = count
    except (OSError, ValueError, struct.error, IndexError) as e:
        raise ModelSourceError(f"{path} is not a readable GGUF file: {e}") from e
    return GgufHeader(fields, tensors)


def read_gguf(path: Path) -> ModelInfo:
    """Read a ``.gguf`` file's metadata and count its parameters (tensor element counts).

    Raises:
        ModelSourceError: the file is not a readable GGUF or lacks a dimension we need.
    """
    header = read_gguf_header(path)
    fields = header.fields
    arch = str(fields.get("general.architecture", "unknown"))

    def need(key: str) -> int:
        v = fields.get(f"{arch}.{key}")
        if not isinstance(v, int) or isinstance(v, ArrayLen) or v <= 0:
            raise ModelSourceError(f"{path}: GGUF key {arch}.{key} is missing ({v!r})")
        return v

    hidden, heads = need("embedding_length"), need("attention.head_count")
    kv = fields.get(f"{arch}.attention.head_count_kv", heads)
    head_dim = fields.get(f"{arch}.attention.key_length") or hidden // heads
    vocab = fields.get(f"{arch}.vocab_size") or fields.get("tokenizer.ggml.tokens") or 0
    ftype = fields.get("general.file_type")
    return ModelInfo(
        name=str(fields.get("general.name") or path.stem),
        architecture=arch,
        n_params=header.n_params,
        n_layers=need("block_count"),
        hidden_size=hidden,
        n_heads=heads,
        n_kv_heads=int(kv),
        head_dim=int(head_dim),
        vocab_size=int(vocab),
        max_context=int(fields.get(f"{arch}.context_length") or 2048),
        has_chat_template=bool(fields.get("tokenizer.chat_template")),
        source_kind="gguf",
        path=path.resolve(),
        source_digest="sha256:" + sha256_file(path),
        native_quant=gguf_file_type_name(ftype if isinstance(ftype, int) else None),
    )


def gguf_file_type_name(ftype: int | None) -> str:
    """llama.cpp's name for a ``general.file_type`` value, e.g. 15 -> "Q4_K_M" ("" if unknown)."""
    if ftype is None:
        return ""
    import gguf

    try:
        name = gguf.LlamaFileType(int(ftype)).name  # e.g. MOSTLY_Q4_K_M, ALL_F32
    except ValueError:
        return ""
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")
