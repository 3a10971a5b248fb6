"""Fidelity-check agreement across honest CPU paths and for wrong models, and the gate's added cost.

The post-install gate's fidelity check (agent/fidelity.py) compares the top-1 ids a device computes
on a fixed probe with the ids the packager recorded on the build host (packager.quality.probe_ids:
the serving runtime, 2 threads, a context of 160). This measures, on the sample's variants (cached
builds: GGUF Q4_K_M and Q8_0, ONNX int4, OpenVINO int8):

* honest paths: the SAME artifact through every CPU path this host can exercise — 1 vs 2 threads,
  the context a device profile loads (4096) instead of the packager's, and on OpenVINO the scoring
  precision (f32 as shipped; the CPU's default, which is bf16 with AVX512-BF16; bf16 forced; f32
  with a u8 KV cache);
* other builds of the same model (Q4_K_M vs Q8_0 vs OpenVINO int8 vs ONNX int4): how far apart
  legitimately different numerics land;
* wrong answers: the Q4_K_M ids checked against a corrupted table (shifted by one position, random
  ids) and against the same file with corrupted weights (one layer's quantization blocks shuffled;
  1% of the blocks of every FFN down-projection shuffled) — a device computing garbage;
* the gate's added cost: :func:`agent.fidelity.check` on a model loaded as the gate loads it
  (context 1024, 2 threads), including OpenVINO's second compile and its release, with the peak
  RSS it adds.

The default ``[slo] min_agreement`` (agent/profiles/schema.py) is chosen from these numbers; this
benchmark prints where it sits between the lowest honest and the highest wrong agreement.

Usage: .venv/bin/python bench/bench_fidelity.py [--variants gguf-q4_k_m,gguf-q8_0,onnx-int4,openvino-int8]
       [--repeats 3] [--smoke]
A smoke run measures only the Q4_K_M GGUF (the suite's bundle), once.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _sample import ONNX_INT4_OPTIONS, sample_source, sample_variant
from machine import median, parse

VARIANTS = ("gguf-q4_k_m", "gguf-q8_0", "onnx-int4", "openvino-int8")
RUNTIME = {"gguf-q4_k_m": "llamacpp", "gguf-q8_0": "llamacpp", "onnx-int4": "ortgenai",
           "openvino-int8": "openvino"}
THREADS = 2  # the packager's and the gate's on this 2-core host
GATE_CONTEXT = 1024  # the suite's device profile (tests/agentkit.py AGENT_PROFILE)
DEVICE_CONTEXT = 4096  # the largest profile context (x86-64-cpu)


def artifact(name: str) -> Path:
    """The cached build of one variant (built once per machine, as the test suite does)."""
    if name == "gguf-q4_k_m":
        model, _ = sample_source("gguf")  # the PyPI Q4_K_M, shipped as it is
        return model.path
    if name == "gguf-q8_0":
        from packager.gguf import build_gguf_variant

        model, cache = sample_source("hf")
        return build_gguf_variant(model, "Q8_0", cache / "variants", cache_dir=cache, threads=THREADS)
    if name == "onnx-int4":
        return sample_variant("ortgenai", "onnx", "int4", ONNX_INT4_OPTIONS, threads=THREADS)
    return sample_variant("openvino", "openvino-ir", "int8", threads=THREADS)


def openvino_scoring(config: dict[str, Any]) -> type:
    """An OpenVINO runtime whose scoring model compiles with ``config`` instead of the shipped f32
    (the runtime's ``_scoring_model`` hook, agent/runtimes/openvino.py): what a device scoring at
    another precision would compute."""
    from agent.runtimes.openvino import MODEL_XML, OpenVINORuntime

    class Scoring(OpenVINORuntime):
        def _scoring_model(self) -> Any:
            if self._nll_model is None:
                import openvino

                assert self._model_path is not None and self._options is not None
                cfg = {"INFERENCE_NUM_THREADS": self._options.resolved_threads(), **config}
                self._nll_model = openvino.Core().compile_model(str(self._model_path / MODEL_XML),
                                                                "CPU", cfg)
            return self._nll_model

    return Scoring


def ids_through(runtime: str, path: Path, *, threads: int = THREADS, context: int = GATE_CONTEXT,
                cls: type | None = None) -> tuple[int, ...]:
    """The probe's top-1 ids as a device computes them: load, then agent.fidelity.probe_top1."""
    from agent.fidelity import probe_top1
    from agent.runtimes import LoadOptions, get_runtime

    rt = (cls or get_runtime(runtime))()
    with rt:
        rt.load(path, LoadOptions(context=context, threads=threads))
        return probe_top1(rt)


def honest_paths(name: str, path: Path) -> dict[str, Callable[[], tuple[int, ...]]]:
    runtime = RUNTIME[name]
    paths: dict[str, Callable[[], tuple[int, ...]]] = {
        "1 thread": lambda: ids_through(runtime, path, threads=1),
        "2 threads": lambda: ids_through(runtime, path, threads=2),
        f"context {DEVICE_CONTEXT}": lambda: ids_through(runtime, path, context=DEVICE_CONTEXT),
    }
    if runtime == "openvino":
        for label, cfg in (("CPU default precision (bf16 here)", {}),
                           ("bf16 forced", {"INFERENCE_PRECISION_HINT": "bf16"}),
                           ("f32 + u8 KV cache", {"INFERENCE_PRECISION_HINT": "f32",
                                                  "KV_CACHE_PRECISION": "u8"})):
            paths[label] = lambda cfg=cfg: ids_through(runtime, path, cls=openvino_scoring(cfg))
    return paths


def corrupted_gguf(src: Path, work: Path, label: str, pick: Callable[[str], float]) -> Path:
    """A copy of ``src`` whose chosen tensors have a share (``pick(tensor name)``, 0-1) of their
    quantization blocks shuffled: every block keeps valid scales, so the model loads, runs and
    stays finite, and computes garbage, as a kernel reading the wrong data would."""
    import gguf  # host tool (packager extra)
    import numpy as np

    out = work / f"{label}.gguf"
    shutil.copyfile(src, out)
    rng = np.random.default_rng(list(label.encode()))
    reader = gguf.GGUFReader(str(out), "r+")
    for t in reader.tensors:
        share = pick(t.name)
        if share <= 0:
            continue
        _, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        blocks = t.data.view(np.uint8).reshape(-1, type_size)
        chosen = rng.choice(len(blocks), max(2, int(len(blocks) * share)), replace=False)
        blocks[chosen] = blocks[rng.permutation(chosen)]
    reader.data.flush()
    del reader
    return out


class PeakRss:
    """This process's highest RSS while the block runs, sampled every 10 ms on a thread."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self._stop = threading.Event()
        self.base = self.peak = self.after = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.after = self._proc.memory_info().rss
        self.peak = max(self.peak, self.after)


def gate_cost(name: str, path: Path, table: Any, repeats: int) -> dict[str, float]:
    """Milliseconds and peak added RSS of agent.fidelity.check on a model loaded as the gate does."""
    from agent.fidelity import check
    from agent.runtimes import LoadOptions, get_runtime

    times, added, kept = [], [], []
    with get_runtime(RUNTIME[name])() as rt:
        rt.load(path, LoadOptions(context=GATE_CONTEXT, threads=THREADS))
        for _ in range(repeats):
            with PeakRss() as rss:
                t0 = time.perf_counter()
                report = check(rt, table)
                times.append((time.perf_counter() - t0) * 1000)
            added.append((rss.peak - rss.base) / 2**20)
            kept.append((rss.after - rss.base) / 2**20)
            assert report.checked and report.ok, report
    return {"ms": median(times), "ms_min": min(times), "peak_added_mib": median(added),
            "kept_after_mib": median(kept)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    ap.add_argument("--repeats", type=int, default=3, help="timed gate checks per variant")
    args, results = parse(ap, argv, smoke={"variants": "gguf-q4_k_m", "repeats": 1})

    from agent.bundle import Fidelity
    from agent.fidelity import PROBE_POSITIONS, PROBE_SHA256, PROBE_WINDOW, agreement
    from agent.profiles.schema import Slo
    from packager.quality import probe_ids

    names = [n for n in args.variants.split(",") if n]
    tables: dict[str, tuple[int, ...]] = {}
    honest: list[dict[str, Any]] = []
    costs: dict[str, dict[str, float]] = {}
    paths: dict[str, Path] = {}
    for name in names:
        paths[name] = path = artifact(name)
        tables[name] = probe_ids(path, runtime=RUNTIME[name], threads=THREADS)  # as the packager does
        for label, run in honest_paths(name, path).items():
            honest.append({"variant": name, "path": label, "agreement": agreement(tables[name], run())})
            print(honest[-1], flush=True)
        table = Fidelity(probe_sha256=PROBE_SHA256, window=PROBE_WINDOW, top1=tables[name],
                         threshold=Slo().min_agreement, runtime=RUNTIME[name])
        costs[name] = gate_cost(name, path, table, args.repeats)
        print(name, "gate cost", costs[name], flush=True)

    cross = [{"table": a, "ids": b, "agreement": agreement(tables[a], tables[b])}
             for i, a in enumerate(names) for b in names[i + 1:]]
    wrong: list[dict[str, Any]] = []
    if "gguf-q4_k_m" in tables:
        ref = tables["gguf-q4_k_m"]
        rng = random.Random(0)
        wrong += [
            {"case": "Q4_K_M ids vs its table shifted by one position",
             "agreement": agreement(ref[1:] + ref[:1], ref)},
            {"case": "Q4_K_M ids vs a table of random ids",
             "agreement": agreement([rng.randrange(262_144) for _ in ref], ref)},
        ]
        with tempfile.TemporaryDirectory(prefix="edgepack-fidelity-") as work:
            for label, pick in (
                    ("one layer's (blk.3) weight blocks shuffled",
                     lambda t: 1.0 if t.startswith("blk.3.") else 0.0),
                    ("1% of the blocks of every ffn_down shuffled",
                     lambda t: 0.01 if "ffn_down" in t else 0.0)):
                bad = corrupted_gguf(paths["gguf-q4_k_m"], Path(work), label.split()[1], pick)
                wrong.append({"case": f"Q4_K_M table vs the same file with {label}",
                              "agreement": agreement(ref, ids_through("llamacpp", bad))})
                print(wrong[-1], flush=True)

    default = Slo().min_agreement
    low_honest = min(h["agreement"] for h in honest)
    high_wrong = max((w["agreement"] for w in wrong), default=float("nan"))
    md = ["# Fidelity check: top-1 agreement on the probe (sample: Gemma 3 270M)", "",
          f"Probe: agent/fidelity.py, {PROBE_POSITIONS} positions (sha256 {PROBE_SHA256[:12]}), window "
          f"{PROBE_WINDOW}. Table: packager.quality.probe_ids ({THREADS} threads, context 160). "
          f"Each row: the SAME artifact's ids through another CPU path, against its table.", "",
          "| variant | path | agreement |", "|---|---|---:|"]
    md += [f"| {h['variant']} | {h['path']} | {h['agreement']:.3f} |" for h in honest]
    if cross:
        md += ["", "## Other builds of the same model (not a device difference: how far apart "
               "legitimately different numerics land)", "",
               "| table | ids of | agreement |", "|---|---|---:|"]
        md += [f"| {c['table']} | {c['ids']} | {c['agreement']:.3f} |" for c in cross]
    if wrong:
        md += ["", "## Wrong answers (what the check must refuse)", "", "| case | agreement |", "|---|---:|"]
        md += [f"| {w['case']} | {w['agreement']:.3f} |" for w in wrong]
    md += ["", "## The gate's added cost (agent.fidelity.check, model loaded as the gate loads it)", "",
           "| variant | runtime | ms (median) | ms (min) | peak RSS added (MiB) | kept after (MiB) |",
           "|---|---|---:|---:|---:|---:|"]
    md += [f"| {n} | {RUNTIME[n]} | {c['ms']:.0f} | {c['ms_min']:.0f} | {c['peak_added_mib']:.0f} | "
           f"{c['kept_after_mib']:.0f} |" for n, c in costs.items()]
    md += ["", f"Default `[slo] min_agreement` = {default:.2f} (agent/profiles/schema.py): lowest honest "
           f"agreement {low_honest:.3f}, highest wrong {high_wrong:.3f}; other builds of the model "
           f"{min((c['agreement'] for c in cross), default=float('nan')):.3f}-"
           f"{max((c['agreement'] for c in cross), default=float('nan')):.3f}.",
           "Caveat: only CPU paths run here; GPU/NPU numerics (CUDA, Metal, DirectML, Intel GPU) are "
           "not measured, which is what the margin below the honest agreement is for."]
    results.write("fidelity", {"benchmark": "fidelity", "model": "gemma-3-270m (sample)",
                               "probe_sha256": PROBE_SHA256, "positions": PROBE_POSITIONS,
                               "honest": honest, "cross_build": cross, "wrong": wrong,
                               "gate_cost": costs, "default_min_agreement": default,
                               "lowest_honest": low_honest, "highest_wrong": high_wrong,
                               "repeats": args.repeats, "threads": THREADS},
                  "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
