"""Fleet scale: 10,000 simulated devices, one mosquitto, one rollout controller, this machine.

Measures, in one run: (1) the time from the controller's start until its inventory holds every
device (their retained births), (2) the time to dispatch one wave to all of them (rollout start ->
10,000 installs published), (3) a whole four-wave rollout (1, 10%, 50%, 100%) with zero install
time, start to ``finished``, and (4) the controller's RSS and CPU seconds. The anchor: AWS IoT
Jobs' maximum rollout rate, 1,000 devices per minute; the goal is all 10,000 dispatched in <= 10 s
(>= 60x). The simulator runs as its own process (``edgepack fleet simulate``), so this process's
CPU and memory are the controller's; ``--profile`` adds the controller's hottest functions.

    .venv/bin/python bench/bench_fleet.py [--devices 10000] [--profile] [--smoke]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from machine import parse

FLEET = "bench"
PROFILES = ("raspberry-pi-5", "intel-core-ultra", "x86-64-cpu")
EDGEPACK = str(Path(sys.executable).parent / "edgepack")
ANCHOR_PER_MIN = 1000  # AWS IoT Jobs: maximum rollout rate, things per minute


def _wait(pred: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - t0


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(devices: int, work: Path, profile: bool) -> dict[str, Any]:
    from fleetkit import fake_release, wait_status, write_keyring

    from agent.bundle import SigningKey
    from fleet.broker import Broker
    from fleet.controller import Controller, ControllerConfig
    from fleet.rollout_ops import start_rollout
    from fleet.rollout_spec import Waves
    from fleet.simulator import raise_fd_limit

    raise_fd_limit(devices + 1024)
    key = SigningKey.generate("bench")
    release = fake_release(work / "release", key, PROFILES)
    keyring = write_keyring(work / "keyring.json", key)
    out: dict[str, Any] = {"devices": devices}
    with Broker(work / "broker") as broker:
        sim = subprocess.Popen(
            [EDGEPACK, "-q", "fleet", "simulate", "--broker", broker.url, "--fleet", FLEET,
             "--devices", str(devices), "--fail-rate", "0", "--slow-rate", "0", "--garbage-rate", "0",
             "--health-interval", "3600", "--release", str(release), "--install-seconds", "0"],
            stdout=subprocess.DEVNULL, stderr=open(work / "sim.log", "wb"))
        try:
            db = work / "fleet.db"
            ctl = Controller(ControllerConfig(db=db, broker_url=broker.url, fleet=FLEET,
                                              keyring=[keyring]))
            # Births retained so far: wait until the simulator has them all on the broker.
            _wait_births(broker.url, devices)
            rss0, cpu0 = _rss_mib(), _cpu_s()
            prof = cProfile.Profile() if profile else None
            t = threading.Thread(target=lambda: _run_profiled(ctl, prof), daemon=True)
            t0 = time.monotonic()
            t.start()
            out["inventory_s"] = round(_wait(lambda: len(ctl.inventory) >= devices, 300,
                                             "the inventory"), 2)
            out["inventory_rate_per_s"] = round(devices / max(out["inventory_s"], 1e-6))
            # (2) one wave to all
            rid = start_rollout(db, release, [keyring], {"fleet": FLEET, "waves": Waves.parse("100%"),
                                                         "device_timeout": 600.0},
                                base_url="http://127.0.0.1:9/").spec.rollout_id
            t1 = time.monotonic()
            base = ctl.counters["dispatched"]
            _wait(lambda: ctl.counters["dispatched"] - base >= devices, 300, "the dispatch")
            out["dispatch_all_s"] = round(time.monotonic() - t1, 2)
            wait_status(db, rid, ("finished",), 600)
            out["one_wave_to_finished_s"] = round(time.monotonic() - t1, 2)
            # (3) a whole four-wave rollout of the next release, zero install time
            release3 = fake_release(work / "release3", key, PROFILES, version=3)
            t2 = time.monotonic()
            rid3 = start_rollout(db, release3, [keyring], {"fleet": FLEET, "device_timeout": 600.0,
                                                           "waves": Waves.parse("1,10%,50%,100%")},
                                 base_url="http://127.0.0.1:9/").spec.rollout_id
            doc = wait_status(db, rid3, ("finished", "aborted"), 900)
            out["four_waves_s"] = round(time.monotonic() - t2, 2)
            out["four_waves_status"] = doc["status"]
            out["four_waves_committed"] = doc["totals"]["committed"]
            out["controller_rss_mib"] = round(_rss_mib(), 1)
            out["controller_rss_growth_mib"] = round(_rss_mib() - rss0, 1)
            out["controller_cpu_s"] = round(_cpu_s() - cpu0, 2)
            out["controller_wall_s"] = round(time.monotonic() - t0, 2)
            out["messages"] = ctl.counters["messages"]
            ctl.request_stop()
            t.join(60)
            if prof is not None:
                out["profile_shares"] = shares(prof)
        finally:
            sim.terminate()
            try:
                sim.wait(120)
            except subprocess.TimeoutExpired:
                sim.kill()
    out["dispatch_rate_per_min"] = round(devices / out["dispatch_all_s"] * 60)
    out["vs_anchor"] = round(out["dispatch_rate_per_min"] / ANCHOR_PER_MIN, 1)
    return out


# Where a function's own time is counted: by the file it is defined in.
_BUCKETS = (("sqlite3", "SQLite (writes, fsync)"), ("json", "JSON encode/decode"),
            ("paho", "paho-mqtt (publish, socket I/O)"), ("rollout", "rollout state machine"),
            ("inventory", "inventory fold"), ("protocol", "protocol parsing/validation"),
            ("dataclasses", "dataclasses"), ("controller", "controller loop"),
            ("store", "controller store"))


def shares(prof: cProfile.Profile) -> dict[str, float]:
    """Share of the controller thread's busy time per part, from its own time per function."""
    st = pstats.Stats(prof)
    totals: dict[str, float] = {}
    for (filename, _line, name), (_cc, _nc, tt, _ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        if ("lock" in name and "acquire" in name) or name in ("<method 'get' of '_queue.SimpleQueue' objects>",):
            continue  # waiting for messages, not work
        where = f"{filename} {name}"
        bucket = next((label for key, label in _BUCKETS if key in where), "other")
        totals[bucket] = totals.get(bucket, 0.0) + tt
    busy = sum(totals.values()) or 1.0
    return {k: round(100 * v / busy, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def _run_profiled(ctl: Any, prof: cProfile.Profile | None) -> None:
    if prof is None:
        ctl.run()
        return
    prof.enable()
    try:
        ctl.run()
    finally:
        prof.disable()


def _wait_births(url: str, devices: int) -> None:
    from agent.protocol import fleet_filter
    from agent.transport.mqtt import MqttTransport

    seen: set[str] = set()
    t = MqttTransport(url, "bench-births", session_expiry=0)
    t.subscribe(fleet_filter(FLEET, "birth"), handler=lambda m: seen.add(m.topic))
    t.start()
    t.wait_connected(30)
    try:
        _wait(lambda: len(seen) >= devices, 600, "the simulated births")
    finally:
        t.stop()


def markdown(r: dict[str, Any]) -> str:
    n = r["devices"]
    return "\n".join([
        f"# Fleet scale: {n:,} simulated devices, one mosquitto, one controller", "",
        "Simulator (`edgepack fleet simulate`, its own process, one epoll loop) and Debian's mosquitto "
        "on 127.0.0.1; the controller in this process (its RSS and CPU below). Zero install time: "
        "what is measured is the controller, the broker and the protocol.", "",
        "| measure | result |", "|---|---|",
        f"| controller start -> inventory holds all {n:,} devices | {r['inventory_s']} s "
        f"({r['inventory_rate_per_s']:,} births/s) |",
        f"| one wave to all {n:,}: rollout start -> every install published | **{r['dispatch_all_s']} s** |",
        f"| ... -> every device committed | {r['one_wave_to_finished_s']} s |",
        f"| four-wave rollout (1, 10%, 50%, 100%), start -> {r['four_waves_status']} | {r['four_waves_s']} s "
        f"({r['four_waves_committed']:,} committed) |",
        f"| controller RSS at the end (growth over the run) | {r['controller_rss_mib']} MiB "
        f"(+{r['controller_rss_growth_mib']} MiB) |",
        f"| controller CPU over {r['controller_wall_s']} s | {r['controller_cpu_s']} s "
        f"({r['messages']:,} messages in) |",
        f"| dispatch rate vs AWS IoT Jobs' maximum (1,000/min) | {r['dispatch_rate_per_min']:,}/min = "
        f"**{r['vs_anchor']}x** (goal >= 60x: {n:,} in <= 10 s) |",
        "", r.get("dominates", ""),
    ])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--profile", action="store_true", help="profile the controller (slower)")
    args, results = parse(ap, argv, smoke={"devices": 200})
    with tempfile.TemporaryDirectory(prefix="edgepack-bench-fleet-") as d:
        r = run(args.devices, Path(d), False)
    if args.profile:  # a second run under cProfile: its shares, not its (slower) times
        with tempfile.TemporaryDirectory(prefix="edgepack-bench-fleet-") as d:
            r["profile_shares"] = run(args.devices, Path(d), True)["profile_shares"]
        top = ", ".join(f"{k} {v}%" for k, v in list(r["profile_shares"].items())[:6])
        r["dominates"] = (f"What dominates the controller's busy time (a second run under cProfile, own "
                          f"time per function grouped by module): {top}. The controller is one Python "
                          "thread: it is CPU-bound on one core while the simulator uses the other.")
    results.write("fleet", r, markdown(r))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
