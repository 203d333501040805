"""``python -m watcher`` runs the command line."""

from __future__ import annotations

import sys

from watcher.cli import main

sys.exit(main())
