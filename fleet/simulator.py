"""``edgepack fleet simulate``: thousands of simulated devices in one process, on the real protocol.

For fleet-scale work only — controller tests, rollout demos, the 10,000-device benchmark. It never
stands in for the real agent in tests of the agent: it has no store, no model and no runtime, only
the agent's protocol behaviour (:mod:`fleet._simdevice`) with made-up figures (:mod:`fleet._simdata`).

How it runs: one thread, one epoll loop (:mod:`fleet._epoll`) driving one paho MQTT 5 client per
device (client id = device id, persistent session, last will ``lost``, TCP_NODELAY) — paho's own
``loop_start()`` uses select() and fails silently past fd 1024. :meth:`Simulator.start` raises the
process's RLIMIT_NOFILE soft limit towards the hard one (one fd per device, kept at fd >= 1024 so
that paho clients on select() elsewhere in the process — a controller under test — keep working
when they reconnect; this needs a soft limit of ~1024 + devices + 256), then connects the
devices at most ``connect_window`` at a time (a new CONNECT goes out when a CONNACK came back), so
10,000 devices do not overflow the broker's accept queue (a SYN storm stalls in 1 s retransmits).

Life of a device:
- on connect it sends SUBSCRIBE ``cmd/+``, then its retained birth and the retained ``online``
  state; it counts as online when the broker acknowledged that state (the broker processes one
  connection's packets in order, so its commands subscription is in effect by then). Health goes
  out every ``health_interval`` seconds, the first one at a random point of the first interval so
  a fleet's health does not arrive in one burst (the agent sends its first one at once);
- ``offline_rate``: that fraction of the fleet connects once at start, leaves its birth and the
  retained state ``offline``, and disconnects cleanly (a device that was switched off). Commands
  sent to it are queued by the broker (persistent session). With ``offline_seconds`` it comes
  back after that long (±10%); without, it stays away until :meth:`Simulator.bring_online`;
- ``join_late`` devices first connect ``join_after`` seconds after start: new births in the
  middle of a rollout (provisioning);
- a lost connection is retried with jittered exponential backoff (0.5 s doubling to 30 s);
  :meth:`Simulator.take_offline` says ``offline`` and disconnects, or (``clean=False``) cuts the
  TCP connection so the broker publishes the last will ``lost``.

Determinism: profiles (exact proportions of the mix, largest remainder), behaviours (exact counts
of the rates) and offline devices are chosen by ``seed``; so are facts and baseline figures per
device and the figures of each install (by job id). Timing is not deterministic.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import random
import resource
import signal
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

from agent.profiles import DeviceProfile, load_profiles
from agent.protocol import check_id, state_payload
from agent.transport.mqtt import DEFAULT_KEEPALIVE, DEFAULT_SESSION_EXPIRY
from fleet._epoll import FD_FLOOR, EpollLoop, MqttLink, Timer
from fleet._simdata import HARDWARE, Catalog, SimulatorError, apportion, parse_mix
from fleet._simdevice import BEHAVIOURS, SimDevice

log = logging.getLogger("fleet.simulator")
_T = TypeVar("_T")

DEFAULT_MIX: Final = "raspberry-pi-5:60%,intel-core-ultra:30%,x86-64-cpu:10%"
CONNECT_TIMEOUT = 30.0  # seconds from TCP connect to CONNACK before the attempt is abandoned
_BACKOFF_MIN, _BACKOFF_MAX = 0.5, 30.0  # seconds
_CONNECTS_PER_TURN = 64  # connects started per loop iteration, so I/O keeps flowing meanwhile
_FD_MARGIN = 256  # file descriptors beyond one per device (broker, logs, the test's own clients)
COUNTERS: Final = ("connects", "connect_failures", "disconnects", "commands", "rejected", "duplicates",
                   "busy", "installs", "install_failures", "rollbacks", "replays", "replies", "events",
                   "births", "health", "messages_out")


@dataclass
class SimConfig:
    """Everything a simulation needs. Rates are fractions of the fleet (0.02 = 2%).

    Raises:
        SimulatorError: a value out of range.
    """

    broker_url: str
    fleet: str
    devices: int = 100  # devices present at start (offline ones included)
    profiles: str | Mapping[str, float] = DEFAULT_MIX  # "name:60%,name:40%" or {name: weight}
    fail_rate: float = 0.0  # installs fail: the model does not load (install_failed, rolled back)
    garbage_rate: float = 0.0  # the gate's fidelity check fails (fidelity_failed, rolled back)
    slow_rate: float = 0.0  # the gate passes with figures slower by slow_factor
    slow_factor: float = 0.5  # decode tok/s x this, TTFT / this, on slow devices
    offline_rate: float = 0.0  # retained birth + state offline at start
    offline_seconds: float | None = None  # offline devices come back after this long; None: never
    install_seconds: float = 0.0  # seconds one install takes (±20% per job)
    join_late: int = 0  # extra devices that first connect join_after seconds after start
    join_after: float = 0.0  # seconds
    release: Any = None  # release.json (or its folder), a Release, or a {"bundles": ...} stand-in
    seed: int = 0
    health_interval: float = 60.0  # seconds between one device's health messages
    behaviours: Mapping[str, str] = field(default_factory=dict)  # device id -> behaviour override
    prefix: str = "sim"  # device ids are <prefix>-00001, ...
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    keepalive: int = DEFAULT_KEEPALIVE  # seconds
    session_expiry: int = DEFAULT_SESSION_EXPIRY  # seconds the broker keeps an offline device's session
    connect_window: int = 64  # connections waiting for their CONNACK at once
    profiles_dir: Path | None = None  # default: agent.profiles' own

    def __post_init__(self) -> None:
        check_id(self.fleet, "fleet")
        broker_address(self.broker_url)
        if self.devices < 0 or self.join_late < 0:
            raise SimulatorError("devices and join_late must be >= 0")
        for name in ("fail_rate", "garbage_rate", "slow_rate", "offline_rate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise SimulatorError(f"{name} must be in 0..1, got {v!r}")
        if self.fail_rate + self.garbage_rate + self.slow_rate > 1.0:
            raise SimulatorError("fail_rate + garbage_rate + slow_rate must not exceed 1")
        if not 0.0 < self.slow_factor <= 1.0:
            raise SimulatorError(f"slow_factor must be in (0, 1], got {self.slow_factor!r}")
        if self.health_interval <= 0 or self.install_seconds < 0 or self.join_after < 0 \
                or self.connect_window < 1 or (self.offline_seconds is not None and self.offline_seconds < 0):
            raise SimulatorError("health_interval and connect_window must be > 0; install_seconds, "
                                 "join_after and offline_seconds >= 0")
        bad = {d: b for d, b in self.behaviours.items() if b not in BEHAVIOURS}
        if bad:
            raise SimulatorError(f"unknown behaviour(s) {bad}", hint=f"Known: {', '.join(BEHAVIOURS)}.")
        check_id(f"{self.prefix}-0", "device prefix")


class Simulator:
    """N simulated devices on one broker, served by one loop thread.

    Usage::

        with Simulator(broker.url, "lab", devices=2000, fail_rate=0.02) as sim:
            assert sim.wait_online(60)
            ...  # drive a rollout; then sim.installs(), sim.counters()

    Args:
        broker_url: ``mqtt://host:port`` or ``mqtts://host:port``.
        fleet: the fleet id.
        devices: devices present at start.
        **options: any other :class:`SimConfig` field.

    Raises:
        SimulatorError: a bad option or an unknown profile.
        ReleaseError: ``release`` names an unreadable or invalid release file.
    """

    def __init__(self, broker_url: str, fleet: str, devices: int = 100, **options: Any) -> None:
        self.config = cfg = SimConfig(broker_url, fleet, devices, **options)
        known = load_profiles(cfg.profiles_dir) if cfg.profiles_dir else load_profiles()
        playable = {n: p for n, p in known.items() if n in HARDWARE}
        mix = parse_mix(cfg.profiles, playable)
        self.profiles: dict[str, DeviceProfile] = {n: playable[n] for n in mix}
        self.catalog = Catalog(playable, _load_release(cfg.release))
        self.install_seconds = cfg.install_seconds
        self.slow_factor = cfg.slow_factor
        self._host, self._port, tls = broker_address(cfg.broker_url)
        self._tls = ssl.create_default_context(cafile=cfg.ca_file) if tls else None
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._loop: EpollLoop | None = None  # made by start(): no fds are held before
        total = cfg.devices + cfg.join_late
        width = max(5, len(str(total)))
        ids = [f"{cfg.prefix}-{i:0{width}d}" for i in range(1, total + 1)]
        rng = random.Random(cfg.seed)
        self._devices: dict[str, SimDevice] = {}
        for group in (ids[:cfg.devices], ids[cfg.devices:]):
            profiles = apportion(mix, len(group))
            rng.shuffle(profiles)
            behaviours = _assign(rng, group, cfg)
            for dev_id, pname in zip(group, profiles, strict=True):
                b = cfg.behaviours.get(dev_id, behaviours.get(dev_id, "ok"))
                self._devices[dev_id] = SimDevice(self, fleet, dev_id, self.profiles[pname], HARDWARE[pname],
                                                  b, cfg.seed)
        self.join_late_ids = ids[cfg.devices:]
        n_off = round(cfg.offline_rate * cfg.devices)
        self.offline_at_start: frozenset[str] = frozenset(rng.sample(ids[:cfg.devices], n_off))
        self._queue: deque[SimDevice] = deque()
        self._connecting = 0
        self._up = 0  # links with an accepted connection
        self._online = 0
        self._announced_offline = 0
        self._settled = threading.Condition()
        self._want_offline: set[str] = set()  # devices to keep away (taken offline, stopping)
        self._announced: set[str] = set()  # offline-at-start devices that left their birth
        self._stopping = False
        self.last_error = ""
        self._thread: threading.Thread | None = None
        self.started_at: float | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Raise RLIMIT_NOFILE if needed, start the loop thread and begin connecting.

        Raises:
            SimulatorError: already started, or the hard fd limit is below one per device.
        """
        if self._loop is not None or self.started_at is not None:
            raise SimulatorError("a simulator starts once")
        raise_fd_limit(len(self._devices) + _FD_MARGIN, want=FD_FLOOR + len(self._devices) + _FD_MARGIN)
        self.started_at = time.monotonic()
        self._loop = EpollLoop()
        self._loop.idle = self._pump
        self._thread = threading.Thread(target=self.loop.run, name="edgepack-simulator", daemon=True)
        self.loop.call_soon(self._begin)
        self._thread.start()

    def _begin(self) -> None:
        cfg = self.config
        for dev_id in list(self._devices)[:cfg.devices]:
            self._enqueue(self._devices[dev_id])
        if self.join_late_ids:
            self.loop.call_later(cfg.join_after, self._join_late)

    def _join_late(self) -> None:
        if self._stopping:
            return
        log.info("%d late device(s) joining", len(self.join_late_ids))
        for dev_id in self.join_late_ids:
            self._enqueue(self._devices[dev_id])

    def stop(self, timeout: float | None = None, *, clean: bool = True) -> None:
        """Take every device offline and end the loop thread.

        Args:
            timeout: seconds to wait for the devices' goodbyes (default 10 s + 1 s per 500
                devices: 10,000 clean goodbyes took ~9 s here).
            clean: publish ``offline`` and disconnect (as ``Agent.stop``); False cuts every
                connection so the broker publishes each last will (``lost``).
        """
        if self._thread is None:
            return
        if timeout is None:
            timeout = 10.0 + len(self._devices) / 500
        self.loop.call_soon(self._shutdown, clean)
        deadline = time.monotonic() + timeout
        while (self._up or self._connecting) and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.02)
        if self._up:
            log.warning("%d device(s) still connected after %.1fs; closing anyway", self._up, timeout)
        self.loop.stop()
        self._thread.join(timeout)
        self.loop.close()
        self._thread = None
        self._loop = None

    def _shutdown(self, clean: bool) -> None:
        self._stopping = True
        self._queue.clear()
        self._leave(list(self._devices.values()), clean)

    def __enter__(self) -> Simulator:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # --- what tests and benchmarks ask ------------------------------------------------------------

    @property
    def loop(self) -> EpollLoop:
        """The running loop.

        Raises:
            SimulatorError: not started, or stopped.
        """
        if self._loop is None:
            raise SimulatorError("the simulator is not running", hint="Call start() first.")
        return self._loop

    @property
    def device_ids(self) -> list[str]:
        """Every device id, those present at start first, then the late joiners."""
        return list(self._devices)

    @property
    def online_count(self) -> int:
        return self._online

    def wait_online(self, timeout: float, count: int | None = None) -> bool:
        """Wait until ``count`` devices are online (default: every device present at start that
        is not offline at start, and every offline one has left its birth and ``offline``).

        Returns:
            True if that happened within ``timeout`` seconds (see :attr:`last_error` if not).
        """
        cfg = self.config
        want_offline = len(self.offline_at_start) if count is None else 0
        want = cfg.devices - len(self.offline_at_start) if count is None else count
        with self._settled:
            return self._settled.wait_for(
                lambda: self._online >= want and self._announced_offline >= want_offline, timeout)

    def device(self, device_id: str) -> SimDevice:
        """One device (read its ``installs``, ``rollbacks``, ``behaviour``, ``phase``, ``current``
        ... ; change nothing from another thread: use :meth:`call`).

        Raises:
            KeyError: no such device.
        """
        return self._devices[device_id]

    def devices_with(self, behaviour: str) -> list[str]:
        """The ids of the devices with ``behaviour`` (``ok``, ``fail``, ``garbage``, ``slow``)."""
        return [d.id for d in self._devices.values() if d.behaviour == behaviour]

    def installs(self) -> dict[str, int]:
        """Installs executed per device (replays not counted)."""
        return {d.id: d.installs for d in self._devices.values()}

    def counters(self) -> dict[str, int]:
        """Fleet-wide tallies (:data:`COUNTERS`) plus ``online``, ``connected`` and ``devices``."""
        return {**self._counters, "online": self._online, "connected": self._up,
                "devices": len(self._devices)}

    def call(self, fn: Callable[[], _T], timeout: float = 10.0) -> _T:
        """Run ``fn`` on the loop thread and return its result (a consistent read or a change).

        Raises:
            SimulatorError: not started, or not answered within ``timeout``.
        """
        if self.loop.on_loop_thread():
            return fn()
        done = threading.Event()
        box: list[Any] = []

        def run() -> None:
            try:
                box.append((True, fn()))
            except BaseException as e:
                box.append((False, e))
            done.set()

        self.loop.call_soon(run)
        if not done.wait(timeout):
            raise SimulatorError(f"the simulator loop did not answer within {timeout:.1f}s")
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def take_offline(self, device_ids: Iterable[str], *, clean: bool = True) -> None:
        """Disconnect devices: with ``clean`` they say ``offline`` first (an agent stopping);
        otherwise the connection is cut and the broker publishes their last will (``lost``). They
        stay away until :meth:`bring_online`. Thread-safe."""
        devs = [self._devices[d] for d in device_ids]
        self.loop.call_soon(self._leave, devs, clean)

    def bring_online(self, device_ids: Iterable[str]) -> None:
        """Connect devices again (or for the first time). Thread-safe."""
        devs = [self._devices[d] for d in device_ids]

        def go() -> None:
            for dev in devs:
                self._want_offline.discard(dev.id)
                if dev.phase in ("new", "offline", "lost", "waiting"):
                    self._enqueue(dev)

        self.loop.call_soon(go)

    # --- Host (for the devices; loop thread) ---------------------------------------------------------

    def later(self, delay: float, fn: Callable[..., Any], *args: Any) -> Timer:
        return self.loop.call_later(delay, fn, *args)

    def publish(self, dev: SimDevice, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                correlation_data: bytes | None = None, on_ack: Callable[[], None] | None = None) -> None:
        if dev.link is None:
            return
        dev.link.publish(topic, payload, qos=qos, retain=retain, correlation_data=correlation_data,
                         on_ack=on_ack)
        self._counters["messages_out"] += 1

    def count(self, name: str, n: int = 1) -> None:
        self._counters[name] = self._counters.get(name, 0) + n

    def epoch(self) -> float:
        return time.time()

    # --- connections (loop thread) ----------------------------------------------------------------------

    def _enqueue(self, dev: SimDevice) -> None:
        if self._stopping or dev.phase in ("queued", "connecting", "connected", "online"):
            return
        dev.phase = "queued"
        self._queue.append(dev)

    def _pump(self) -> None:
        started = 0
        while self._queue and self._connecting < self.config.connect_window and started < _CONNECTS_PER_TURN:
            dev = self._queue.popleft()
            if dev.phase != "queued":
                continue
            started += 1
            self._connect(dev)

    def _connect(self, dev: SimDevice) -> None:
        if dev.link is None:
            dev.link = MqttLink(
                self.loop, dev.id, self._host, self._port, keepalive=self.config.keepalive,
                session_expiry=self.config.session_expiry, will=(dev.topics.state, state_payload("lost")),
                username=self.config.username, password=self.config.password, tls=self._tls,
                on_connect=functools.partial(self._connected, dev),
                on_connect_failed=functools.partial(self._connect_failed, dev),
                on_disconnect=functools.partial(self._disconnected, dev),
                on_message=dev.on_command)
        dev.phase = "connecting"
        self._connecting += 1
        attempt = dev.attempts = dev.attempts + 1
        self.loop.call_later(CONNECT_TIMEOUT, self._connect_timeout, dev, attempt)
        dev.link.connect()

    def _connect_timeout(self, dev: SimDevice, attempt: int) -> None:
        if dev.phase == "connecting" and dev.attempts == attempt:
            dev.link.drop()
            self._connect_failed(dev, f"no CONNACK within {CONNECT_TIMEOUT:g}s")

    def _connect_failed(self, dev: SimDevice, why: str) -> None:
        if dev.phase != "connecting":
            return
        self._connecting -= 1
        self._counters["connect_failures"] += 1
        self.last_error = f"{dev.id}: {why}"
        self._retry(dev)

    def _retry(self, dev: SimDevice) -> None:
        if self._stopping or dev.id in self._want_offline:
            dev.phase = "offline"
            return
        dev.phase = "backoff"
        step = min(max(dev.attempts - 1, 0), 8)
        delay = min(_BACKOFF_MAX, _BACKOFF_MIN * 2**step) * random.uniform(1.0, 1.5)
        self.loop.call_later(delay, self._enqueue, dev)

    def _connected(self, dev: SimDevice, session_present: bool) -> None:
        if dev.phase == "connecting":
            self._connecting -= 1
        self._up += 1
        self._counters["connects"] += 1
        dev.phase = "connected"
        dev.link.subscribe(dev.topics.cmd_filter)
        dev.announce()
        if dev.id in self.offline_at_start and dev.id not in self._announced:
            # Switched off before we started watching: birth and "offline" stay retained.
            self.publish(dev, dev.topics.state, state_payload("offline", ts=self.epoch()), retain=True,
                         on_ack=lambda: self._announced_off(dev))
            return
        if dev.id in self._want_offline:  # taken offline while it was connecting
            self.publish(dev, dev.topics.state, state_payload("offline", ts=self.epoch()), retain=True,
                         on_ack=dev.link.disconnect)
            return
        self.publish(dev, dev.topics.state, state_payload("online", ts=self.epoch()), retain=True,
                     on_ack=lambda: self._now_online(dev))

    def _announced_off(self, dev: SimDevice) -> None:
        self._announced.add(dev.id)
        self._want_offline.add(dev.id)
        dev.link.disconnect()
        with self._settled:
            self._announced_offline += 1
            self._settled.notify_all()
        if self.config.offline_seconds is not None:
            jitter = random.Random(f"{self.config.seed}/{dev.id}/back").uniform(0.9, 1.1)
            back = self.config.offline_seconds * jitter
            self.loop.call_later(back, self._come_back, dev)

    def _come_back(self, dev: SimDevice) -> None:
        self._want_offline.discard(dev.id)
        self._enqueue(dev)

    def _now_online(self, dev: SimDevice) -> None:
        if dev.phase != "connected":
            return
        dev.phase = "online"
        dev.attempts = 0
        with self._settled:
            self._online += 1
            self._settled.notify_all()
        interval = self.config.health_interval
        dev.health_timer = self.loop.call_later(random.uniform(0, interval), self._health, dev)

    def _health(self, dev: SimDevice) -> None:
        if dev.phase != "online":
            return
        self.publish(dev, dev.topics.health, dev.health(), qos=0, retain=True)
        self._counters["health"] += 1
        dev.health_timer = self.loop.call_later(self.config.health_interval, self._health, dev)

    def _disconnected(self, dev: SimDevice, why: str) -> None:
        self._up -= 1
        self._counters["disconnects"] += 1
        if dev.health_timer is not None:
            dev.health_timer.cancel()
            dev.health_timer = None
        if dev.phase == "online":
            with self._settled:
                self._online -= 1
                self._settled.notify_all()
        if dev.id not in self._want_offline and not self._stopping:
            log.info("%s lost its connection (%s); reconnecting", dev.id, why)
            self.last_error = f"{dev.id}: {why}"
        self._retry(dev)

    def _leave(self, devs: list[SimDevice], clean: bool) -> None:
        for dev in devs:
            self._want_offline.add(dev.id)
            if dev.phase in ("queued", "backoff", "new"):
                dev.phase = "offline"
            if dev.link is None or not dev.link.connected:
                continue
            if not clean:
                dev.link.drop()
            else:
                link = dev.link
                self.publish(dev, dev.topics.state, state_payload("offline", ts=self.epoch()), retain=True,
                             on_ack=link.disconnect)


def broker_address(url: str) -> tuple[str, int, bool]:
    """``(host, port, tls)`` of an ``mqtt://`` or ``mqtts://`` URL.

    Raises:
        SimulatorError: any other URL.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise SimulatorError(f"bad broker URL {url!r}: {e}") from e
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise SimulatorError(f"bad broker URL {url!r}: want mqtt://host:port or mqtts://host:port")
    tls = parts.scheme == "mqtts"
    return parts.hostname, port or (8883 if tls else 1883), tls


def _assign(rng: random.Random, ids: list[str], cfg: SimConfig) -> dict[str, str]:
    """Exact counts of each failure behaviour, on devices chosen by the seed."""
    order = list(ids)
    rng.shuffle(order)
    out: dict[str, str] = {}
    start = 0
    for behaviour, rate in (("fail", cfg.fail_rate), ("garbage", cfg.garbage_rate), ("slow", cfg.slow_rate)):
        n = round(rate * len(ids))
        for d in order[start:start + n]:
            out[d] = behaviour
        start += n
    return out


def _load_release(release: Any) -> Any:
    if release is None or not isinstance(release, str | Path):
        return release
    from agent.bundle.release import read_release_unverified

    # No signature check: the simulator only borrows the bundles' names, digests and versions;
    # whoever rolls the release out (the controller) verifies it.
    return read_release_unverified(Path(release))


def raise_fd_limit(needed: int, *, want: int | None = None) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit towards ``want`` (up to the hard limit).

    Args:
        needed: descriptors the simulation cannot do without.
        want: descriptors it would like (default ``needed``); the simulator asks for room to keep
            its sockets above fd 1024 (:data:`fleet._epoll.FD_FLOOR`).

    Returns:
        The soft limit now in effect.

    Raises:
        SimulatorError: the hard limit is below ``needed``.
    """
    want = max(needed, want or 0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if target < needed:
            raise SimulatorError(f"{needed} file descriptors needed, the hard limit is {hard}",
                                 hint="Raise it (ulimit -Hn, LimitNOFILE=) or simulate fewer devices.")
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        log.info("raised RLIMIT_NOFILE soft limit from %d to %d", soft, target)
        soft = target
    return soft


# --- the CLI -------------------------------------------------------------------------------------------


def add_arguments(s: argparse.ArgumentParser) -> None:
    """The ``fleet simulate`` options (the common fleet options are added by :mod:`fleet.cli`)."""
    s.add_argument("--devices", type=int, required=True, help="devices present at start")
    s.add_argument("--profiles", default=DEFAULT_MIX,
                   help=f"profile mix, name:weight[%%],... (default {DEFAULT_MIX.replace('%', '%%')})")
    s.add_argument("--fail-rate", type=float, default=0.02, help="installs fail to load (default 0.02)")
    s.add_argument("--slow-rate", type=float, default=0.05,
                   help="gate passes with slower figures (default 0.05)")
    s.add_argument("--slow-factor", type=float, default=0.5,
                   help="decode x, TTFT / this on slow devices (default 0.5)")
    s.add_argument("--garbage-rate", type=float, default=0.01,
                   help="gate fails its fidelity check (default 0.01)")
    s.add_argument("--offline-rate", type=float, default=0.0,
                   help="offline at start: retained birth + state offline (default 0)")
    s.add_argument("--offline-seconds", type=float, default=None,
                   help="offline devices come back after this long (default: never)")
    s.add_argument("--install-seconds", type=float, default=0.0, help="seconds per install (default 0)")
    s.add_argument("--join-late", type=int, default=0, help="devices that first connect later")
    s.add_argument("--join-after", type=float, default=0.0, help="seconds before they join")
    s.add_argument("--release", help="release.json: installs report its bundles' digests and versions")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--health-interval", type=float, default=60.0, help="seconds (default 60)")
    s.add_argument("--duration", type=float, default=None, help="seconds to run (default: until Ctrl-C)")
    s.add_argument("--prefix", default="sim", help="device id prefix (default sim)")


def cmd_simulate(args: argparse.Namespace) -> int:
    """``edgepack fleet simulate``: run the simulated fleet until --duration or Ctrl-C / SIGTERM."""
    import psutil

    from agent._cli import dump, err

    sim = Simulator(args.broker, args.fleet, args.devices, profiles=args.profiles, fail_rate=args.fail_rate,
                    slow_rate=args.slow_rate, slow_factor=args.slow_factor, garbage_rate=args.garbage_rate,
                    offline_rate=args.offline_rate, offline_seconds=args.offline_seconds,
                    install_seconds=args.install_seconds, join_late=args.join_late,
                    join_after=args.join_after, release=args.release, seed=args.seed,
                    health_interval=args.health_interval, prefix=args.prefix, username=args.username,
                    password=args.password, ca_file=args.ca_file)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, on_signal)
    t0 = time.monotonic()
    try:
        sim.start()
        wait = args.timeout if args.timeout is not None else 30.0 + args.devices / 100
        ok = sim.wait_online(wait)
        online_s = time.monotonic() - t0
        rss = psutil.Process().memory_info().rss / 2**20
        if not ok:
            err(f"only {sim.online_count} of {args.devices - len(sim.offline_at_start)} devices online "
                f"after {wait:.0f}s (last error: {sim.last_error or 'none'}); if the count stopped near "
                "a round number, check the broker's open-files limit (mosquitto inherits the ulimit -n "
                "of whoever started it) and its max_connections")
        else:
            more = (f", {len(sim.offline_at_start)} offline" if sim.offline_at_start else "") + (
                f", {args.join_late} joining after {args.join_after:g}s" if args.join_late else "")
            err(f"{sim.online_count} devices online in {online_s:.1f}s{more} on {args.broker}, "
                f"fleet {args.fleet!r}; RSS {rss:.0f} MiB")
        end = t0 + args.duration if args.duration is not None else math.inf
        try:
            while not stop.is_set() and time.monotonic() < end:
                stop.wait(min(10.0, max(0.05, end - time.monotonic())))
                c = sim.counters()
                err(f"[{time.monotonic() - t0:.0f}s] online {c['online']}, installs {c['installs']} "
                    f"({c['install_failures']} failed), replays {c['replays']}, commands {c['commands']}")
        except KeyboardInterrupt:
            pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        sim.stop()
    if args.json:
        dump({"devices": args.devices, "online_seconds": round(online_s, 2), "rss_mib": round(rss, 1),
              "counters": sim.counters(), "behaviours": {b: sim.devices_with(b) for b in BEHAVIOURS[1:]}})
    return 0 if ok else 1


__all__ = ["COUNTERS", "DEFAULT_MIX", "SimConfig", "Simulator", "SimulatorError", "add_arguments",
           "cmd_simulate", "raise_fd_limit"]
