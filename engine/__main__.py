"""`python -m engine ...` entry point (import-safe: dist_checkpointing spawns workers)."""

import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main())
