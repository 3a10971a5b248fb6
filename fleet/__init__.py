"""edgepack fleet: host-side fleet operations.

Serving bundles to devices (:mod:`fleet.serve`), and in time inventory, rollouts and the remote
command client. The fleet imports :mod:`agent` (protocol, bundle format); the agent never imports
the fleet.
"""

from fleet.serve import BundleServer

__all__ = ["BundleServer"]
