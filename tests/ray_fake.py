"""A fake of Ray Jobs' REST API on 127.0.0.1, for tests of the server's Ray client and runner.

It keeps jobs in memory; the test writes their drivers' logs and ends them.
Its answers have the shape Ray 2.60's dashboard gives (`/api/jobs/...`).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from service.protocol import RayEvent, event_line


@dataclass
class FakeJob:
    request: dict
    status: str = "RUNNING"
    message: str = ""
    logs: str = ""
    events: int = 0
    stop_requests: int = 0


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: dict | None


@dataclass
class FakeRayJobs:
    token: str | None = None
    fail_with: int = 0  # answer every request with this HTTP status
    jobs: dict[str, FakeJob] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                fake._answer(self, "GET")

            def do_POST(self) -> None:
                fake._answer(self, "POST")

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"http://127.0.0.1:{self.http.server_address[1]}"
        self._thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()

    # -- what a test does to a job --------------------------------------------

    def emit(self, job_id: str, *events: RayEvent) -> None:
        """The driver prints these events (numbered on from the last)."""
        with self.lock:
            job = self.jobs[job_id]
            for event in events:
                job.events += 1
                job.logs += f"(RayTrainWorker pid=1) {event_line(job.events, event)}\n"

    def print(self, job_id: str, text: str) -> None:
        with self.lock:
            self.jobs[job_id].logs += text

    def finish(self, job_id: str, status: str, message: str = "") -> None:
        with self.lock:
            self.jobs[job_id].status, self.jobs[job_id].message = status, message

    # -- the REST API ---------------------------------------------------------

    def _answer(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        with self.lock:
            self.requests.append(Request(method, handler.path, dict(handler.headers), body))
            status, answer = self._route(handler, method, handler.path, body)
        data = json.dumps(answer).encode() if not isinstance(answer, bytes) else answer
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _route(self, handler, method: str, path: str, body) -> tuple[int, object]:
        if self.fail_with:
            return self.fail_with, b"Internal Server Error\nsomething broke"
        if self.token is not None and handler.headers.get("Authorization") != (
            f"Bearer {self.token}"
        ):
            return 401, b"Unauthorized"
        parts = path.strip("/").split("/")  # api, jobs, [id, [logs|stop]]
        if method == "POST" and parts == ["api", "jobs"]:
            submission_id = body["submission_id"]
            if submission_id in self.jobs:
                return 400, b"Job with submission_id already exists"
            self.jobs[submission_id] = FakeJob(request=body)
            return 200, {"job_id": submission_id, "submission_id": submission_id}
        job = self.jobs.get(parts[2]) if len(parts) >= 3 else None
        if job is None:
            return 404, b"Job does not exist"
        if method == "GET" and len(parts) == 3:
            return 200, {"submission_id": parts[2], "status": job.status, "message": job.message}
        if method == "GET" and parts[3:] == ["logs"]:
            return 200, {"logs": job.logs}
        if method == "POST" and parts[3:] == ["stop"]:
            job.stop_requests += 1
            stopped = job.status in ("PENDING", "RUNNING")
            if stopped:
                job.status, job.message = "STOPPED", "Job was intentionally stopped."
            return 200, {"stopped": stopped}
        return 404, b"no such route"
