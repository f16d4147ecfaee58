"""``lmcache-node``: the command line (node commands, ``serve`` and ``demo``).

Kept apart from the adapters: building the parser or running ``status`` imports no engine
and no demo; ``serve`` and ``demo`` import theirs when they run.
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
