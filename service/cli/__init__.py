"""The ntrain command line: `service.cli.app.main` is the `ntrain` entry point."""

from service.cli.app import main

__all__ = ["main"]
