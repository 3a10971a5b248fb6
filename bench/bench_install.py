"""Install cost vs hashing cost: `edgepack-agent install` (verify + stage + fsync + switch) of the
sample's Q4_K_M bundle against coreutils `sha256sum` of the same bytes. Target ratio <= 1.3.

Usage: .venv/bin/python bench/bench_install.py [--runs 5] [--smoke]
Both sides read a warm page cache (each is run once before timing); runs alternate to cancel drift.
The bundle is built and signed by the packager (bench/_sample.py); the install is
``agent.store.Store.install`` without a load check, as ``edgepack-agent install --no-load-check``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _sample import SampleBundle, install, sample_bundle
from machine import median, parse


def time_install(bundle: SampleBundle, work: Path) -> float:
    state = Path(tempfile.mkdtemp(dir=work))
    t0 = time.perf_counter()
    install(bundle, state)
    dt = time.perf_counter() - t0
    shutil.rmtree(state)
    return dt


def time_sha256sum(bundle: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["sha256sum", str(bundle)], check=True, capture_output=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args, results = parse(ap, argv, smoke={"runs": 1})
    with tempfile.TemporaryDirectory(prefix="edgepack-bench-") as tmp:
        work = Path(tmp)
        bundle = sample_bundle(work)
        size = bundle.path.stat().st_size
        time_install(bundle, work)  # warm-up: page cache for both sides
        time_sha256sum(bundle.path)
        ours, raw = [], []
        for _ in range(args.runs):
            ours.append(time_install(bundle, work))
            raw.append(time_sha256sum(bundle.path))
        ratio = median(ours) / median(raw)
        result = {
            "benchmark": "install_vs_sha256sum",
            "bundle_bytes": size,
            "runs": args.runs,
            "install_s": ours,
            "sha256sum_s": raw,
            "install_median_s": median(ours),
            "sha256sum_median_s": median(raw),
            "ratio_install_over_sha256sum": ratio,
            "target": "<= 1.3",
        }
        md = (
            "# Install vs sha256sum (sample Q4_K_M bundle)\n\n"
            "| bundle | edgepack-agent install (verify + stage + fsync + switch) | sha256sum | ratio | target |\n"
            "|---|---:|---:|---:|---|\n"
            f"| {size / 2**20:.0f} MiB | {median(ours):.3f} s | {median(raw):.3f} s | **{ratio:.2f}** | <= 1.3 |\n\n"
            f"Medians of {args.runs} alternating runs on a warm page cache. The install streams the tar once,\n"
            "hashing with hashlib (SHA-NI where the CPU has it) while writing to staging, then fsyncs.\n"
        )
        results.write("install", result, md)
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
