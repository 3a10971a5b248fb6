"""The ``edgepack`` host command: composes the packager's and the fleet's commands, and the demo.

This is the one place allowed to import both :mod:`packager` and :mod:`fleet`; packaging never
imports the fleet, and neither is imported by :mod:`agent`.
"""

__all__: list[str] = []
