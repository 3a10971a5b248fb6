"""The models ``--model`` can name besides a path or a hub id: the sample and the tiny Phi-3.

Kept apart from :mod:`packager.model` (which only reads sources) because making these models uses
the converters and the quality code, which themselves read sources.
"""

from __future__ import annotations

from pathlib import Path

from packager.model import ModelInfo, resolve_source

NAMED = ("sample", "sample-gguf", "tiny-phi3")


def resolve_model(spec: str, *, cache_dir: Path) -> ModelInfo:
    """What ``--model`` names: ``sample`` (the Gemma 3 270M HF checkpoint, made once and cached),
    ``sample-gguf`` (its Q4_K_M GGUF), ``tiny-phi3`` (a tiny random-weight Phi-3 made here in
    seconds, see :mod:`packager.tiny`), or anything :func:`resolve_source` reads.

    Raises:
        ModelSourceError: as :func:`resolve_source`; PackagingError: the sample or the tiny model
            cannot be made.
    """
    if spec == "tiny-phi3":
        from packager.tiny import ensure_tiny_phi3

        return resolve_source(str(ensure_tiny_phi3(cache_dir).hf_dir), cache_dir=cache_dir)
    if spec in ("sample", "sample-gguf"):
        from packager.sample import ensure_sample

        s = ensure_sample(cache_dir)
        return resolve_source(str(s.hf_dir if spec == "sample" else s.gguf), cache_dir=cache_dir)
    return resolve_source(spec, cache_dir=cache_dir)


__all__ = ["NAMED", "resolve_model"]
