"""The frozen agent's entry script: what the ``edgepack-agent`` console script runs."""

import sys

from agent.cli import main

sys.exit(main())
