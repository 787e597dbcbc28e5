"""`ntrain serve` in a child process on free loopback ports: the demo's, the tests' and benchmarks'.

The child writes its gRPC port to a port file once it serves (the only sign
of readiness a child process gives) and logs where its metrics are; SIGTERM
stops it gracefully (running jobs checkpoint), and a kill follows if it does
not end in time.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

START_SECONDS = 120.0
STOP_SECONDS = 60.0


class ServerStartError(RuntimeError):
    """The server exited, or did not start in time; the message ends with its log's tail."""


class LocalServer:
    """`ntrain serve --state-dir STATE_DIR --port 0 --metrics-port 0 ARGS...` until `stop`.

    The server is started with `--exit-with-parent`: if this process ends
    without stopping it (SIGKILL), it stops itself, as on SIGTERM.

    Args:
        args: more flags for `ntrain serve`; later flags win over the ones above
            (`--no-metrics` turns the metrics endpoint off).
        env: the child's environment (None: this process's).
        log_path: where its output goes (default STATE_DIR/server.log).
        executable: how to run the command line (default this interpreter's `-m service.cli`).
        own_session: a session of its own, so Ctrl-C reaches only the caller, which
            stops the server in order.

    Raises:
        ServerStartError: it exited or did not write its port within `start_seconds`.
    """

    def __init__(
        self,
        state_dir: Path,
        args: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        executable: Sequence[str] = (sys.executable, "-m", "service.cli"),
        own_session: bool = False,
        start_seconds: float = START_SECONDS,
    ):
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path or self.state_dir / "server.log"
        port_file = self.state_dir / "server.port"
        port_file.unlink(missing_ok=True)  # an earlier server on this state directory left it
        command = [
            *executable, "serve", "--port", "0", "--metrics-port", "0",
            "--state-dir", str(self.state_dir), "--port-file", str(port_file),
            "--exit-with-parent", *args,
        ]  # fmt: skip
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=None if env is None else dict(env),
                start_new_session=own_session,
            )
        try:
            self.port = self._wait_for_port(port_file, start_seconds)
        except ServerStartError as error:
            self.stop()
            raise ServerStartError(f"{error}; the end of its log:\n{self.log_tail()}") from None
        self.address = f"127.0.0.1:{self.port}"

    def _wait_for_port(self, port_file: Path, seconds: float) -> int:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerStartError(f"the server exited with status {self.process.returncode}")
            if port_file.exists():
                return int(port_file.read_text())
            time.sleep(0.05)
        raise ServerStartError(f"the server did not start within {seconds:.0f} s")

    @property
    def metrics_port(self) -> int | None:
        """The metrics endpoint's port, as the server's start-up line gives it (None: none)."""
        found = re.search(r"metrics on https?://[^ ]*:(\d+)/metrics", self.log_text())
        return int(found[1]) if found else None

    def stop(self, seconds: float = STOP_SECONDS) -> int | None:
        """SIGTERM, then a kill after `seconds`; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(seconds)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
