"""How the command line fails: one line on standard error and an exit status."""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1  # a failed request, or a job that did not succeed
EXIT_USAGE = 2  # bad command-line arguments
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


class CliError(Exception):
    """A failure to report as one line, with the exit status to use."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR):
        super().__init__(message)
        self.exit_code = exit_code
