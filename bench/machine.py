"""Machine facts every benchmark result carries, the one result writer, and the two run modes.

Every benchmark parses its flags through :func:`parse`, which adds the same two:

* full run (default): the counts a result is quoted with; files go to ``bench/results/``.
* smoke run (``--smoke``, or ``EDGEPACK_BENCH_SMOKE=1``): the whole code path with tiny counts (one
  run, a handful of tokens, the smallest variant already in the packager cache), so CI proves the
  benchmark still works (tests/integration/test_benchmarks_smoke.py). Its files go to
  ``--results-dir`` or a new temporary folder, never to ``bench/results/``.

Invariant: benchmarks write files only through :class:`Results`, and every file notes the machine:
a JSON result under ``"machine"``, a Markdown page in its last line, a history table in each row's
own columns (see ``bench/_decode.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
SMOKE_ENV = "EDGEPACK_BENCH_SMOKE"


def machine() -> dict[str, Any]:
    """What a result is read against: when, which CPU, cores, RAM, OS, load and library versions."""
    import psutil

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor()

    def ver(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu": cpu,
        "cores_logical": psutil.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        # Others may share this machine: the load average says how far to trust absolute numbers.
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "llama_cpp_python": ver("llama-cpp-python"),
        "onnxruntime_genai": ver("onnxruntime-genai"),
        "openvino_genai": ver("openvino-genai"),
        "edgepack": ver("edgepack"),
    }


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


class Results:
    """Where one benchmark run writes its files.

    Args:
        directory: ``bench/results/`` for a full run; a throwaway folder for a smoke run.
        smoke: marks every JSON result ``"smoke": true``, so its numbers are never quoted.
    """

    def __init__(self, directory: Path = RESULTS, *, smoke: bool = False) -> None:
        self.directory = Path(directory)
        self.smoke = smoke

    def write(self, name: str, result: dict[str, Any], markdown: str) -> None:
        """Write NAME.json and NAME.md, the machine noted in both."""
        m = self.write_json(name, result)["machine"]
        head = (f"_Machine: {m['cpu']}, {m['cores_physical']} cores / {m['cores_logical']} threads, "
                f"{m['ram_gib']} GiB, {m['os']}, Python {m['python']}, llama-cpp-python "
                f"{m['llama_cpp_python']}; {m['date']}._\n\n")
        self._put(f"{name}.md", markdown.rstrip() + "\n\n" + head, append=False)

    def write_json(self, name: str, result: dict[str, Any]) -> dict[str, Any]:
        """Write NAME.json, adding the machine facts unless ``result`` has them; returns ``result``."""
        result.setdefault("machine", machine())
        if self.smoke:
            result["smoke"] = True
        self._put(f"{name}.json", json.dumps(result, indent=2, sort_keys=True) + "\n", append=False)
        return result

    def append_rows(self, name: str, head: str, rows: Sequence[str]) -> None:
        """Append table rows to NAME.md, starting the file with ``head`` when it is new: the
        committed tables keep every earlier run next to the new one."""
        path = self.directory / f"{name}.md"
        text = "".join(r.rstrip("\n") + "\n" for r in rows)
        self._put(path.name, text if path.exists() else head.rstrip("\n") + "\n" + text, append=True)

    def _put(self, filename: str, text: str, *, append: bool) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / filename
        with path.open("a" if append else "w") as f:
            f.write(text)
        print(f"wrote {path}", file=sys.stderr)


def parse(ap: argparse.ArgumentParser, argv: Sequence[str] | None,
          smoke: Mapping[str, Any]) -> tuple[argparse.Namespace, Results]:
    """Add ``--smoke`` and ``--results-dir`` to ``ap``, parse ``argv`` and say where to write.

    Args:
        ap: the benchmark's parser, with its own flags and their full-run defaults.
        argv: the arguments (None: ``sys.argv[1:]``).
        smoke: the defaults a smoke run uses instead (a flag given explicitly still wins).

    Returns:
        The parsed arguments and the :class:`Results` to write to.
    """
    ap.add_argument("--smoke", action="store_true",
                    default=os.environ.get(SMOKE_ENV, "") not in ("", "0"),
                    help=f"tiny counts, results to a temporary folder [{SMOKE_ENV}=1]")
    ap.add_argument("--results-dir", type=Path,
                    help="where to write (default: bench/results/; with --smoke a new temporary folder)")
    if ap.parse_known_args(argv)[0].smoke:
        ap.set_defaults(**smoke)
    args = ap.parse_args(argv)
    if not args.smoke:
        return args, Results(args.results_dir or RESULTS)
    directory = args.results_dir or Path(tempfile.mkdtemp(prefix="edgepack-bench-smoke-"))
    if directory.resolve() == RESULTS:
        ap.error("a smoke run never writes to bench/results/ (its numbers are not results)")
    return args, Results(directory, smoke=True)
