"""The command line: ``primed serve|info|alloc|devices|list|stats|dump``."""

from primed.cli.main import main

__all__ = ["main"]
