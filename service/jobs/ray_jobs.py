"""A client of Ray Jobs' REST API, in plain HTTP: submit, status, logs, stop.

The server never imports ray: a multi_worker job is a Ray job whose
submission_id is the ntrain job id, whose entrypoint runs the driver
(`python -m service.driver`, on the cluster's own interpreter) and whose
runtime_env carries the `RayTrainTask` as JSON. The endpoints (Ray 2.60):

    POST /api/jobs/                  submit {entrypoint, submission_id, runtime_env, metadata}
    GET  /api/jobs/{submission_id}   {status: PENDING|RUNNING|STOPPED|SUCCEEDED|FAILED, message}
    GET  /api/jobs/{submission_id}/logs   {logs: the driver's whole output}
    POST /api/jobs/{submission_id}/stop   {stopped: bool}

With Ray's token authentication each request carries `Authorization: Bearer TOKEN`.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.protocol import RAY_TASK_ENV, RayTrainTask

RAY_TERMINAL = frozenset({"STOPPED", "SUCCEEDED", "FAILED"})
DRIVER_MODULE = "service.driver"
REQUEST_TIMEOUT_SECONDS = 10.0
# Environment of the driver and of every Ray worker of the job.
DRIVER_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "PYTHONUNBUFFERED": "1",
    "RAY_TRAIN_V2_ENABLED": "1",
    # Ray Train gives up on a worker group not started within 60 s and retries,
    # counted as a failure; a busy node (or one pulling a large runtime) needs longer.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
    # Each host says the same line with its own rank ("rank 1: training data ...");
    # Ray's log dedup would fold them into rank 0's with "[repeated 1x across cluster]".
    "RAY_DEDUP_LOGS": "0",
}


class RayJobsError(Exception):
    """A request to Ray Jobs failed; `status` is the HTTP status, 0 when none came back."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class RayJobNotFound(RayJobsError):
    """Ray Jobs knows no job of that submission id."""


@dataclass(frozen=True, kw_only=True)
class RayJobStatus:
    status: str  # PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED
    message: str = ""

    @property
    def finished(self) -> bool:
        return self.status in RAY_TERMINAL


def submission_request(task: RayTrainTask) -> dict[str, Any]:
    """The body of POST /api/jobs/ that runs `task`'s driver on the cluster."""
    return {
        "entrypoint": f"python -m {DRIVER_MODULE}",
        "submission_id": task.job_id,
        "runtime_env": {"env_vars": {**DRIVER_ENV, RAY_TASK_ENV: task.to_json()}},
        "metadata": {
            "ntrain_job_id": task.job_id,
            "hosts": str(task.hosts),
            "gpus_per_host": str(task.gpus_per_host),
        },
    }


class RayJobsClient:
    """Ray Jobs at `address` (http://HOST:8265), with an optional bearer token.

    Every method raises `RayJobsError` when Ray cannot be reached or answers
    with an error, `RayJobNotFound` for an unknown submission id.
    """

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        timeout: float = REQUEST_TIMEOUT_SECONDS,
    ):
        parsed = urllib.parse.urlsplit(address)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"ray address must be http://HOST:PORT, got {address!r}")
        self.address = address.rstrip("/")
        self._token = token
        self._timeout = timeout
        # Loopback and cluster-internal addresses never go through $http_proxy.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @classmethod
    def from_token_file(cls, address: str, token_file: Path | None) -> RayJobsClient:
        token = token_file.read_text().strip() if token_file is not None else None
        return cls(address, token=token or None)

    def submit(self, task: RayTrainTask) -> None:
        """Submit `task` as the Ray job `task.job_id`."""
        self._request("POST", "/api/jobs/", submission_request(task))

    def status(self, submission_id: str) -> RayJobStatus:
        body = self._request("GET", f"/api/jobs/{_quoted(submission_id)}")
        return RayJobStatus(status=str(body["status"]), message=str(body.get("message") or ""))

    def logs(self, submission_id: str) -> str:
        """The driver's output so far, whole."""
        return str(self._request("GET", f"/api/jobs/{_quoted(submission_id)}/logs")["logs"])

    def stop(self, submission_id: str) -> bool:
        """Ask Ray to stop the job; False when it had ended already."""
        return bool(self._request("POST", f"/api/jobs/{_quoted(submission_id)}/stop")["stopped"])

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.address + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self._token:
            request.add_header("Authorization", f"Bearer {self._token}")
        try:
            with self._opener.open(request, timeout=self._timeout) as response:
                text = response.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as error:
            detail = error.read().decode("utf-8", errors="replace").strip().splitlines()
            message = f"Ray Jobs answered {method} {path} with HTTP {error.code}"
            if detail:
                message += f": {detail[-1][:300]}"
            kind = RayJobNotFound if error.code == 404 else RayJobsError
            raise kind(message, error.code) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise RayJobsError(f"cannot reach Ray Jobs at {self.address}: {reason}") from None
        try:
            return json.loads(text)
        except ValueError:
            raise RayJobsError(
                f"Ray Jobs answered {method} {path} with no JSON: {text[:200]!r}"
            ) from None


def _quoted(submission_id: str) -> str:
    return urllib.parse.quote(submission_id, safe="")
