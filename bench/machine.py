"""Machine facts every benchmark result carries, and the result writer."""

from __future__ import annotations

import json
import platform
import statistics
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
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
        "llama_cpp_python": ver("llama-cpp-python"),
        "edgepack": ver("edgepack"),
    }


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def write(name: str, result: dict[str, Any], markdown: str) -> None:
    """Write bench/results/NAME.json and NAME.md (with the machine noted)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    m = result.setdefault("machine", machine())
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    head = (f"_Machine: {m['cpu']}, {m['cores_physical']} cores / {m['cores_logical']} threads, "
            f"{m['ram_gib']} GiB, {m['os']}, Python {m['python']}, llama-cpp-python "
            f"{m['llama_cpp_python']}; {m['date']}._\n\n")
    (RESULTS / f"{name}.md").write_text(markdown.rstrip() + "\n\n" + head)
