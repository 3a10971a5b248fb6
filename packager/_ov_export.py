"""OpenVINO export wrapper, run by the converter environment's Python (not by edgepack's).

Usage: ``python _ov_export.py [--threads N] [--check-text T --check-prompt P --check-tokens K]
-- <optimum-cli export openvino arguments>``.

This file must import nothing from edgepack: the converter environment has only optimum-intel,
NNCF, OpenVINO, openvino-tokenizers, transformers and torch. It

1. relaxes optimum-intel's transformers version guard for the Gemma family
   (``GemmaOpenVINOConfig.MAX_TRANSFORMERS_VERSION`` is "5.0" while optimum-intel 2.2.0 itself
   pins transformers < 5.6; exports made with the guard relaxed were checked to be correct);
2. runs ``optimum-cli export openvino`` in-process with the given arguments (weights, tokenizer
   and detokenizer IRs);
3. checks the IR against the source checkpoint, because a wrong conversion raises no error:
   OpenVINO tokenizer ids vs the HF tokenizer's, teacher-forced logits of the OpenVINO model vs
   the PyTorch model on the same text (top-1 agreement and mean NLL of each), and a few greedy
   tokens decoded by the OpenVINO detokenizer. The figures are printed as one line
   ``EDGEPACK_CHECK {json}``; the caller decides whether they pass.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

CHECK_MARK = "EDGEPACK_CHECK "
# Run as a script, this file's folder would come first on sys.path, where edgepack's
# packager/openvino.py shadows the openvino package (the caller also passes -I, which skips it).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]


def relax_gemma_guard() -> None:
    import transformers
    from optimum.exporters.openvino import model_configs

    cfg = model_configs.GemmaOpenVINOConfig  # Gemma2/Gemma3Text configs inherit the attribute
    old = getattr(cfg, "MAX_TRANSFORMERS_VERSION", None)
    if old is not None:
        cfg.MAX_TRANSFORMERS_VERSION = transformers.__version__
        print(f"edgepack: Gemma export guard relaxed ({old} -> {transformers.__version__})", flush=True)


def export(optimum_args: list[str]) -> None:
    from optimum.commands.optimum_cli import main as optimum_cli

    sys.argv = ["optimum-cli", "export", "openvino", *optimum_args]
    optimum_cli()


def _infer_logits(request: Any, ids: list[int], past: int) -> Any:
    import numpy as np

    n = len(ids)
    out = request.infer({
        "input_ids": np.asarray([ids], dtype=np.int64),
        "attention_mask": np.ones((1, past + n), dtype=np.int64),
        "position_ids": np.arange(past, past + n, dtype=np.int64)[None, :],
        "beam_idx": np.zeros((1,), dtype=np.int32),
    })
    return out["logits"][0]


def _nll_top1(logits: Any, targets: list[int]) -> tuple[float, list[int]]:
    import numpy as np

    rows = np.asarray(logits, dtype=np.float64)
    peak = rows.max(axis=1)
    lse = peak + np.log(np.exp(rows - peak[:, None]).sum(axis=1))
    nll = float((lse - rows[np.arange(len(targets)), targets]).mean())
    return nll, [int(i) for i in rows.argmax(axis=1)]


def check(hf_dir: Path, ir_dir: Path, *, text: str, prompt: str, tokens: int,
          threads: int) -> dict[str, Any]:
    import openvino as ov
    import openvino_tokenizers  # noqa: F401  (registers the tokenizer operations with OpenVINO)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    core = ov.Core()
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
        torch.set_num_threads(threads)
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    ov_tok = core.compile_model(ir_dir / "openvino_tokenizer.xml", "CPU")
    ov_detok = core.compile_model(ir_dir / "openvino_detokenizer.xml", "CPU")
    model = core.compile_model(ir_dir / "openvino_model.xml", "CPU", config)
    request = model.create_infer_request()

    # (a) tokenizer: the IR must split text exactly as the source tokenizer does.
    hf_ids = [int(i) for i in hf_tok(text)["input_ids"]]
    ov_ids = [int(i) for i in ov_tok([text])["input_ids"][0]]
    # (b) teacher-forced logits on the same ids: OpenVINO vs PyTorch (the source itself).
    ids = hf_ids
    request.reset_state()
    ov_nll, ov_top1 = _nll_top1(_infer_logits(request, ids[:-1], 0), ids[1:])
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    ref.eval()
    with torch.no_grad():
        ref_logits = ref(torch.tensor([ids[:-1]])).logits[0].numpy()
    ref_nll, ref_top1 = _nll_top1(ref_logits, ids[1:])
    del ref, ref_logits
    gc.collect()
    agree = sum(a == b for a, b in zip(ov_top1, ref_top1, strict=True)) / len(ref_top1)
    # (c) a few greedy tokens through the KV state, decoded by the detokenizer IR.
    prompt_ids = [int(i) for i in hf_tok(prompt)["input_ids"]]
    request.reset_state()
    logits = _infer_logits(request, prompt_ids, 0)
    generated: list[int] = []
    past = len(prompt_ids)
    for _ in range(tokens):
        nxt = int(logits[-1].argmax())
        if nxt == hf_tok.eos_token_id:
            break
        generated.append(nxt)
        logits = _infer_logits(request, [nxt], past)
        past += 1
    import numpy as np

    detok = ov_detok(np.asarray([generated], dtype=np.int64))
    ov_text = str(detok["string_output"][0]) if generated else ""
    return {
        "tokenizer_match": hf_ids == ov_ids,
        "tokens_scored": len(ids) - 1,
        "top1_agreement": agree,
        "ov_nll": ov_nll,
        "ref_nll": ref_nll,
        "finite": math.isfinite(ov_nll),
        "prompt": prompt,
        "generated": ov_text,
        "generated_hf_decode": hf_tok.decode(generated),
        "seconds": round(time.monotonic() - t0, 2),
    }


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print("usage: _ov_export.py [options] -- <optimum-cli export openvino args>", file=sys.stderr)
        return 2
    split = argv.index("--")
    ap = argparse.ArgumentParser(prog="_ov_export.py")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--check-hf", type=Path)
    ap.add_argument("--check-out", type=Path)
    ap.add_argument("--check-text", default="")
    ap.add_argument("--check-prompt", default="")
    ap.add_argument("--check-tokens", type=int, default=12)
    args = ap.parse_args(argv[:split])
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    relax_gemma_guard()
    t0 = time.monotonic()
    export(argv[split + 1:])
    print(f"edgepack: export finished in {time.monotonic() - t0:.1f} s", flush=True)
    if args.check_hf and args.check_out and args.check_text:
        result = check(args.check_hf, args.check_out, text=args.check_text,
                       prompt=args.check_prompt or args.check_text[:40],
                       tokens=args.check_tokens, threads=args.threads)
        print(CHECK_MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
