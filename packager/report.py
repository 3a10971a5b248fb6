"""The packaging report's measurements and chart: speed per variant on this host, and a PNG.

``edgepack build`` measures each built variant's quality (packager.quality); this module adds how
fast it runs here — the same short fixed benchmark the agent's post-install gate runs
(:func:`agent.gate.measure`: greedy, fixed prompt, TTFT, decode tok/s, peak RSS) through the
runtime that will serve it — and draws one point per variant: size against quality loss, the
marker's colour the decode rate.

Invariants:
- A variant whose runtime or device cannot run on this host (CUDA, QNN, NPU, ...) still appears,
  with the reason instead of figures: the report never invents a number.
- Speed is measured on the CPU with the profile's threads (0 = physical cores); it is a figure of
  this machine (named in the report), not of the target device.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import EdgepackError

log = logging.getLogger(__name__)

SPEED_TOKENS = 32  # tokens per measured generation: the agent gate's default length


def machine_note() -> str:
    """One line naming this host, for figures measured on it."""
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"{cpu}, {psutil.cpu_count(logical=False) or psutil.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, {platform.system()} "
            f"{platform.machine()}, Python {platform.python_version()}")


def measure_speed(artifact: Path, runtime: str, *, threads: int = 0, context: int = 1024,
                  chat_template: str | None = None) -> dict[str, Any]:
    """TTFT, decode tok/s and peak RSS of one variant on this host's CPU.

    Args:
        artifact: the variant's file or folder.
        runtime: the runtime that serves it (a registry name).
        threads: CPU threads (0 = physical cores).
        context: the context to load with.
        chat_template: unused by the benchmark (completion mode); passed so loading matches.

    Returns:
        ``{"ttft_ms", "decode_tok_s", "peak_rss_mb", "tokens"}``, or ``{"error": reason}`` when the
        runtime cannot run here or the model fails to generate.
    """
    from agent.gate import GateConfig, measure
    from agent.runtimes import LoadOptions, get_runtime

    try:
        rt_cls = get_runtime(runtime)
        rt_cls.check()
        with rt_cls() as rt:
            rt.load(artifact, LoadOptions(context=context, threads=threads, chat_template=chat_template))
            figures = measure(rt, GateConfig(max_tokens=SPEED_TOKENS))
    except EdgepackError as e:
        log.warning("speed of %s not measured: %s", artifact.name, e)
        return {"error": str(e)}
    log.info("%s: TTFT %.0f ms, decode %.1f tok/s", artifact.name, figures.ttft_ms, figures.decode_tok_s)
    return figures.to_dict()


@dataclass(frozen=True)
class ChartPoint:
    """One marker of the chart: the variants that share an artifact's figures, merged."""

    runtime: str
    size_mib: float
    delta_pct: float
    decode_tok_s: float  # 0 when it could not run here
    label: str  # "llamacpp Q8_0 (cpu, cuda, metal)"


def chart_points(variants: Mapping[str, Mapping[str, Any]]) -> list[ChartPoint]:
    """The chart's points. Pure.

    Variants with the same runtime, quant, size and quality (one GGUF file for cpu, cuda and
    metal profiles; one IR for CPU and GPU) are one point whose label lists their devices, so
    labels do not print over each other.

    Args:
        variants: the build report's variants (key -> runtime, quant, device, size_bytes,
            quality, speed).

    Returns:
        The points in first-seen order.
    """
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for v in variants.values():
        q = v.get("quality", {})
        if q.get("delta_pct") is None:
            continue  # not measured against a reference: it has no place on a quality-loss axis
        key = (v.get("runtime"), v.get("quant") or v.get("precision"), v["size_bytes"],
               round(float(q.get("delta_pct", float("nan"))), 3))
        groups.setdefault(key, []).append(v)
    points = []
    for (runtime, quant, size, delta), group in groups.items():
        devices = sorted({str(v.get("device") or "?") for v in group})
        rate = max(float(v.get("speed", {}).get("decode_tok_s") or 0) for v in group)
        points.append(ChartPoint(str(runtime), size / 2**20, delta, rate,
                                 f"{runtime} {quant} ({', '.join(devices)})"))
    return points


def write_chart(variants: Mapping[str, Mapping[str, Any]], out: Path, *, title: str) -> Path | None:
    """Draw size (MiB) against quality loss (Δ perplexity %), one point per artifact (see
    :func:`chart_points`), coloured by decode tok/s on this host (grey when it could not run here).

    Args:
        variants: the build report's variants (key -> size_bytes, quality, speed, runtime).
        out: the PNG to write.
        title: the chart title.

    Returns:
        ``out``, or None when matplotlib is not installed or no variant was measured against a
        reference (the markdown report stands alone).
    """
    points = chart_points(variants)
    if not points:
        log.info("no variant has a measured quality loss: no chart")
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on build hosts
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no chart (pip install 'edgepack[packager]')")
        return None
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    vmax = max((p.decode_tok_s for p in points), default=0.0) or 1.0
    markers = {"llamacpp": "o", "ortgenai": "s", "openvino": "^"}
    scatter = None
    xs, ys = [p.size_mib for p in points], [p.delta_pct for p in points]
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    placed: list[ChartPoint] = []
    for p in points:
        # A label next to a labelled neighbour goes under its point instead of over the other.
        crowded = any(abs(p.size_mib - o.size_mib) < 0.1 * span_x
                      and abs(p.delta_pct - o.delta_pct) < 0.1 * span_y for o in placed)
        placed.append(p)
        kw: dict[str, Any] = {"marker": markers.get(p.runtime, "D"), "s": 80,
                              "edgecolors": "black", "linewidths": 0.5}
        if p.decode_tok_s > 0:
            scatter = ax.scatter([p.size_mib], [p.delta_pct], c=[p.decode_tok_s], cmap="viridis",
                                 vmin=0, vmax=vmax, **kw)
        else:
            ax.scatter([p.size_mib], [p.delta_pct], c="lightgrey", **kw)
        ax.annotate(p.label, (p.size_mib, p.delta_pct), textcoords="offset points",
                    xytext=(6, -12) if crowded else (6, 5), fontsize=7)
    if scatter is not None:
        fig.colorbar(scatter, ax=ax, label="decode tok/s on this host (grey: cannot run here)")
    ax.set_xlabel("bundle payload size (MiB)")
    ax.set_ylabel("perplexity increase over fp32/f16 reference (%)")
    ax.set_title(title, fontsize=10)
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.25, y=0.12)  # room for the labels right of the outermost points
    legend = [plt.Line2D([], [], marker=m, linestyle="", color="grey", label=r)
              for r, m in markers.items()]
    # Below the axes: inside, it covers whichever corner a point lands in.
    ax.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(markers),
              fontsize=8, frameon=False)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def precision_class(v: Mapping[str, Any]) -> str:
    """The precision a variant belongs to across runtimes (int4, int8, fp16, fp32)."""
    return str(v.get("precision") or "?")


def _delta(q: Mapping[str, Any]) -> str:
    d = q.get("delta_pct")
    return "n/a (no reference)" if d is None else f"{float(d):+.2f}"


def cross_runtime_rows(variants: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Markdown rows comparing the same precision across runtimes (e.g. int4 GGUF vs ONNX vs IR)."""
    by_precision: dict[str, list[tuple[str, Mapping[str, Any]]]] = {}
    for key, v in variants.items():
        by_precision.setdefault(precision_class(v), []).append((key, v))
    rows: list[str] = []
    for precision in sorted(by_precision):
        group = by_precision[precision]
        if len({v.get("runtime") for _, v in group}) < 2:
            continue
        for key, v in group:
            q, s = v.get("quality", {}), v.get("speed", {})
            rate = f"{s['decode_tok_s']:.1f}" if "decode_tok_s" in s else "n/a"
            rows.append(f"| {precision} | {v.get('runtime')} | {key} | {v['size_bytes'] / 2**20:.1f} | "
                        f"{_delta(q)} | "
                        f"{q.get('top1_agreement') or float('nan'):.3f} | {rate} |")
    return rows
