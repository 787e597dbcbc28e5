"""The ntrain command line: `service.cli.main.main` is the `ntrain` entry point."""

from service.cli.main import main

__all__ = ["main"]
