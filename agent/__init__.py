"""edgepack agent: the device side.

Light by design (stdlib + cryptography, psutil, py-cpuinfo, paho-mqtt, plus one runtime extra):
it owns the bundle format and trust decisions (:mod:`agent.bundle`), device profiles and the
matcher (:mod:`agent.profiles`), the hardware probe, the runtimes and the on-disk store.
It never imports :mod:`packager`.
"""

from agent.errors import EdgepackError

__version__ = "0.1.0"
__all__ = ["EdgepackError", "__version__"]
