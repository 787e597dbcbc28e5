"""`Client`: the ntrain service as Python calls, with typed errors and a reconnecting watch."""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message

from ntrain.client.channel import (
    ADDRESS_ENV,
    DEFAULT_ADDRESS,
    Credentials,
    load_credentials,
    normalize_address,
    open_channel,
)
from ntrain.client.exceptions import (
    DownloadError,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
    from_rpc_error,
)
from ntrain.client.states import state_value
from ntrain.client.tensors import examples_array, fill_tensor, tensor_array
from ntrain.client.watch import (
    RECONNECT_SECONDS,
    JobEvent,
    follow_log,
    watch_events,
    watch_experiment_states,
)
from ntrain.v1 import training_pb2, training_pb2_grpc

# Seconds for quick requests, and for Evaluate/Predict, which run a worker process.
QUICK_TIMEOUT = 30.0
MODEL_TIMEOUT = 300.0
# Downloads of a model whose stream broke off (the server restarted) before giving up.
DOWNLOAD_ATTEMPTS = 3
# Predict sends inputs in requests of at most this many bytes of values: gRPC's
# default 4 MiB message limit, less room for the rest of the message.
PREDICT_CHUNK_BYTES = 4 * 1024**2 - 64 * 1024
# The most examples the server takes in one Predict request.
PREDICT_CHUNK_EXAMPLES = 10_000
UPLOAD_CHUNK = 2**20  # bytes of a data set file in one UploadDataset message
# An upload's deadline: a minute, and a second for every 5 MB (conversion included).
UPLOAD_SECONDS_PER_BYTE = 1 / 5e6
DATASET_FORMATS = {
    ".npz": "npz",
    ".npy": "npy",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
TERMINAL_STATES = frozenset(
    {
        training_pb2.JOB_STATE_SUCCEEDED,
        training_pb2.JOB_STATE_FAILED,
        training_pb2.JOB_STATE_CANCELED,
    }
)

Answer = TypeVar("Answer")
JobSpecLike = training_pb2.JobSpec | Mapping[str, Any] | str | os.PathLike[str]
ExperimentSpecLike = training_pb2.ExperimentSpec | Mapping[str, Any] | str | os.PathLike[str]


class Client:
    """A connection to an ntrain server.

        client = Client("127.0.0.1:50051")            # or Client.from_env()
        job = client.submit({"dataset": "mnist", "epochs": 2})
        for event in client.watch(job.job_id):
            print(event.payload)
        probabilities = client.predict(job.job_id, images)   # (examples, classes)

    Jobs, events and results are the contract's messages (`ntrain.v1`);
    failures raise `ntrain.client.NtrainError` subclasses named after their
    status (`NotFound`, `InvalidArgument`, ...), each with a one-line message.

    Args:
        address: HOST:PORT (a bare host gets port 50051); default
            $NTRAIN_ADDRESS, else 127.0.0.1:50051.
        token: a bearer token (sent only over TLS, or to a loopback address).
        tls: True for TLS trusting the system's CAs, or the path of the CA
            certificate that signed the server's; None or False for plaintext.
        credentials: TLS material and token at once (`load_credentials`), instead
            of `token` and `tls`.
        timeout: seconds to wait for quick calls; model_timeout: for evaluate
            and predict, which load the model in a worker process.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        token: str | None = None,
        tls: bool | str | os.PathLike[str] | None = None,
        credentials: Credentials | None = None,
        timeout: float = QUICK_TIMEOUT,
        model_timeout: float = MODEL_TIMEOUT,
    ):
        if credentials is not None and (token is not None or tls is not None):
            raise ValueError("pass credentials, or token and tls, not both")
        if credentials is None:
            credentials = Credentials(token=token, use_tls=tls is True)
            if isinstance(tls, str | os.PathLike):
                ca = load_credentials(tls_ca=os.fspath(tls), environ={}).tls_ca
                credentials = dataclasses.replace(credentials, tls_ca=ca)
        self.address = normalize_address(address or os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS)
        self.timeout = timeout
        self.model_timeout = model_timeout
        self._channel = open_channel(self.address, credentials)
        self._stub = training_pb2_grpc.TrainingServiceStub(self._channel)

    @classmethod
    def from_env(cls, address: str | None = None, **kwargs: Any) -> Client:
        """A client configured as the command line is: $NTRAIN_ADDRESS, $NTRAIN_TLS_CA,
        $NTRAIN_TLS_CERT/KEY, and $NTRAIN_TOKEN or $NTRAIN_TOKEN_FILE."""
        return cls(address, credentials=load_credentials(), **kwargs)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, method: Callable[..., Answer], request: Any, timeout: float) -> Answer:
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as error:
            raise from_rpc_error(error, self.address, timeout) from None

    def _stream(self, responses: Iterable[Answer], timeout: float | None) -> Iterator[Answer]:
        try:
            yield from responses
        except grpc.RpcError as error:
            raise from_rpc_error(error, self.address, timeout) from None

    # -- jobs ------------------------------------------------------------------------------

    def submit(self, spec: JobSpecLike, *, request_id: str | None = None) -> training_pb2.Job:
        """Submit a training job; the same request_id and spec return the same job.

        Args:
            spec: a `JobSpec`, a dict in the proto3 JSON mapping
                (`{"dataset": "mnist", "optimizer": {"learningRate": 0.01}}`), or
                the path of a .json (or .yaml) file holding one.
            request_id: idempotency key; default a fresh random one.

        Raises:
            InvalidArgument: the spec is malformed or the server refuses it.
        """
        request = training_pb2.SubmitJobRequest(
            spec=job_spec(spec), request_id=request_id or uuid.uuid4().hex
        )
        return self._call(self._stub.SubmitJob, request, self.timeout)

    def get(self, job_id: str) -> training_pb2.Job:
        """The job as it stands: spec, state, transitions, progress, result."""
        return self._call(
            self._stub.GetJob, training_pb2.GetJobRequest(job_id=job_id), self.timeout
        )

    def list(
        self,
        *,
        states: Iterable[str | int] = (),
        labels: Mapping[str, str] | None = None,
        limit: int | None = None,
    ) -> builtins.list[training_pb2.Job]:
        """Jobs, newest first, in the given states (names like "RUNNING"; none: every state)
        carrying every one of `labels` ({"team": "vision"}: key and value match)."""
        wanted = [state_value(s) if isinstance(s, str) else s for s in states]
        jobs: builtins.list[training_pb2.Job] = []
        token = ""
        while limit is None or len(jobs) < limit:
            page = 1000 if limit is None else min(limit - len(jobs), 1000)
            request = training_pb2.ListJobsRequest(
                page_size=page,
                page_token=token,
                states=wanted,  # type: ignore[arg-type]  # JobState values are ints
                labels=labels or {},
            )
            response = self._call(self._stub.ListJobs, request, self.timeout)
            jobs.extend(response.jobs)
            token = response.next_page_token
            if not token or not response.jobs:
                break
        return jobs if limit is None else jobs[:limit]

    def watch(
        self,
        job_id: str,
        after: int = 0,
        *,
        reconnect_seconds: float = RECONNECT_SECONDS,
        on_reconnect: Callable[[int], None] | None = None,
    ) -> Iterator[JobEvent]:
        """Every event of a job after sequence `after`, then live ones until it ends.

        A dropped stream reconnects from the last event seen, so none is missed
        or repeated; after `reconnect_seconds` without a connection it raises
        `Unavailable`. `on_reconnect(last_sequence)` is told when it starts trying.
        """
        events = watch_events(
            self._stub,
            job_id,
            after_sequence=after,
            reconnect_seconds=reconnect_seconds,
            on_reconnect=on_reconnect,
        )
        for event in self._stream(events, None):
            yield JobEvent.from_proto(event)

    def wait(
        self, job_id: str, *, on_event: Callable[[JobEvent], None] | None = None
    ) -> training_pb2.Job:
        """Follow a job until it ends (calling `on_event` for each event); the job as it ended."""
        for event in self.watch(job_id):
            if on_event is not None:
                on_event(event)
        return self.get(job_id)

    def cancel(self, job_id: str) -> training_pb2.Job:
        """Stop a queued or running job.

        Raises:
            FailedPrecondition: the job has already ended.
        """
        return self._call(
            self._stub.CancelJob, training_pb2.CancelJobRequest(job_id=job_id), self.timeout
        )

    def logs(
        self,
        job_id: str,
        *,
        follow: bool = False,
        offset: int = 0,
        reconnect_seconds: float = RECONNECT_SECONDS,
        on_reconnect: Callable[[int], None] | None = None,
    ) -> Iterator[str]:
        """The lines of the job's training log (its worker's output), without line ends.

        follow: go on as lines are written, until the job has ended (as `tail -f`
        would, but it stops by itself); a dropped stream reconnects where it
        stopped, as `watch` does (`on_reconnect(offset)` is told when it starts
        trying). offset: start at this byte of the log.
        """
        timeout = None if follow else self.timeout
        lines = follow_log(
            self._stub,
            job_id,
            offset=offset,
            follow=follow,
            timeout=timeout,
            reconnect_seconds=reconnect_seconds,
            on_reconnect=on_reconnect,
        )
        return self._stream(lines, timeout)

    # -- experiments -----------------------------------------------------------------------

    def submit_experiment(
        self, spec: ExperimentSpecLike, *, request_id: str | None = None
    ) -> training_pb2.Experiment:
        """Start a hyperparameter search whose trials are jobs.

        Args:
            spec: an `ExperimentSpec`, a dict in the proto3 JSON mapping, or the
                path of a .json or .yaml file holding one (README: "Experiments").
            request_id: idempotency key; default a fresh random one.
        """
        request = training_pb2.SubmitExperimentRequest(
            spec=experiment_spec(spec), request_id=request_id or uuid.uuid4().hex
        )
        return self._call(self._stub.SubmitExperiment, request, self.timeout)

    def get_experiment(self, experiment_id: str) -> training_pb2.Experiment:
        """The experiment as it stands, with its trials."""
        request = training_pb2.GetExperimentRequest(experiment_id=experiment_id)
        return self._call(self._stub.GetExperiment, request, self.timeout)

    def list_experiments(self, *, limit: int = 50) -> builtins.list[training_pb2.Experiment]:
        """Experiments, newest first."""
        request = training_pb2.ListExperimentsRequest(page_size=limit)
        return builtins.list(
            self._call(self._stub.ListExperiments, request, self.timeout).experiments
        )

    def watch_experiment(
        self,
        experiment_id: str,
        *,
        reconnect_seconds: float = RECONNECT_SECONDS,
        on_reconnect: Callable[[], None] | None = None,
    ) -> Iterator[training_pb2.Experiment]:
        """The experiment now, then each time it changes, until it and its trials ended.

        A dropped stream reconnects (no state is given twice); after
        `reconnect_seconds` without a connection it raises `Unavailable`.
        `on_reconnect()` is told when it starts trying.
        """
        states = watch_experiment_states(
            self._stub,
            experiment_id,
            reconnect_seconds=reconnect_seconds,
            on_reconnect=on_reconnect,
        )
        return self._stream(states, None)

    def wait_experiment(self, experiment_id: str) -> training_pb2.Experiment:
        """Follow an experiment until it and its trials have ended; it as it ended."""
        for _ in self.watch_experiment(experiment_id):
            pass
        return self.get_experiment(experiment_id)

    def cancel_experiment(self, experiment_id: str) -> training_pb2.Experiment:
        """End a running experiment; its queued and running trials are canceled.

        Raises:
            FailedPrecondition: it has already ended.
        """
        request = training_pb2.CancelExperimentRequest(experiment_id=experiment_id)
        return self._call(self._stub.CancelExperiment, request, self.timeout)

    def best_trial(self, experiment_id: str) -> training_pb2.Trial:
        """The experiment's best trial that ran to its end.

        Raises:
            FailedPrecondition: no trial has finished yet.
        """
        experiment = self.get_experiment(experiment_id)
        if not experiment.HasField("best_trial"):
            raise FailedPrecondition(
                f"experiment {experiment_id} has no finished trial yet "
                f"({len(experiment.trials)} asked)"
            )
        return experiment.trials[experiment.best_trial]

    def download_best_model(
        self, experiment_id: str, directory: str | os.PathLike[str], *, version: int = 1
    ) -> Path:
        """Download the best trial's SavedModel (as `download_model` does)."""
        trial = self.best_trial(experiment_id)
        return self.download_model(trial.job_id, directory, version=version)

    # -- models ----------------------------------------------------------------------------

    def download_model(
        self, job_id: str, directory: str | os.PathLike[str], *, version: int = 1
    ) -> Path:
        """Download the job's SavedModel as TF Serving expects it: `directory/<version>/`.

        The folder holds `saved_model.pb` and `variables/`; load it with
        `tf.saved_model.load(path)` (signature `serving_default`: `inputs`
        float32 [None, input_size] -> `probabilities`) or point TF Serving's
        `--model_base_path` at `directory`. The files are written to a hidden
        folder beside it first and renamed into place once complete.

        Returns:
            The version folder, `directory/<version>`.

        Raises:
            FailedPrecondition: the job has no trained model (it has not SUCCEEDED).
            FileExistsError: `directory/<version>` exists already.
            DownloadError: the server sent a path outside the folder, or no model.
        """
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"version must be a positive integer, got {version!r}")
        base = Path(directory)
        target = base / str(version)
        if target.exists():
            raise FileExistsError(f"{target} exists already; choose another --version or folder")
        base.mkdir(parents=True, exist_ok=True)
        partial = base / f".{version}.partial-{uuid.uuid4().hex[:8]}"
        partial.mkdir()
        try:
            self._write_model(job_id, partial)
            if not (partial / "saved_model.pb").is_file():
                raise DownloadError(f"the server sent no saved_model.pb for job {job_id}")
            partial.rename(target)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return target

    def _write_model(self, job_id: str, folder: Path) -> None:
        """Download into `folder`; a stream that breaks off (UNAVAILABLE) starts again, afresh."""
        for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
            try:
                self._write_model_once(job_id, folder)
                return
            except Unavailable:
                if attempt == DOWNLOAD_ATTEMPTS:
                    raise
                shutil.rmtree(folder)
                folder.mkdir()
                time.sleep(min(2.0**attempt, 10.0))

    def _write_model_once(self, job_id: str, folder: Path) -> None:
        request = training_pb2.DownloadModelRequest(job_id=job_id)
        chunks = self._stub.DownloadModel(request, timeout=self.model_timeout)
        file = None
        path, written, digest = "", 0, hashlib.sha256()
        try:
            for chunk in self._stream(chunks, self.model_timeout):
                if chunk.path != path or file is None:
                    if file is not None:
                        file.close()
                    destination = model_file_destination(folder, chunk.path)
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    file = destination.open("xb")  # each file once: never overwrite
                    path, written, digest = chunk.path, 0, hashlib.sha256()
                if chunk.offset != written:
                    raise DownloadError(
                        f"the server sent {chunk.path!r} out of order (byte {chunk.offset}, "
                        f"expected {written})"
                    )
                file.write(chunk.data)
                digest.update(chunk.data)
                written += len(chunk.data)
                if chunk.sha256 and chunk.sha256 != digest.hexdigest():
                    raise DownloadError(
                        f"{chunk.path!r} arrived damaged: its SHA-256 is {digest.hexdigest()}, "
                        f"the server's {chunk.sha256}"
                    )
        finally:
            if file is not None:
                file.close()

    # -- data sets ---------------------------------------------------------------------------

    def push_dataset(
        self,
        files: str | os.PathLike[str] | builtins.list[str | os.PathLike[str]],
        *,
        name: str,
        label_column: str = "",
        test_fraction: float | None = None,
        num_classes: int = 0,
        format: str | None = None,
    ) -> training_pb2.Dataset:
        """Upload a data set file (or .npy files: x then y) and return its version.

        The file goes in chunks of 1 MiB after a header with its size and
        SHA-256; the server checks both and converts the file once. Pushing
        the same bytes again returns the stored version without sending them.

        Args:
            files: one .npz, .csv or .parquet file, or .npy files that the
                server reads as x, y (or x_train, y_train, x_test, y_test).
            format: npz, npy, csv or parquet; None takes it from the suffix.
        """
        paths = [Path(files)] if isinstance(files, str | os.PathLike) else [Path(f) for f in files]
        if format is None:
            suffixes = {path.suffix.lower() for path in paths}
            format = DATASET_FORMATS.get(suffixes.pop()) if len(suffixes) == 1 else None
            if format is None:
                raise ValueError(
                    f"cannot tell the format of {', '.join(map(str, paths))} from its suffix: "
                    f"pass format= ({', '.join(sorted(set(DATASET_FORMATS.values())))})"
                )
        digest, size = _sha256_of(paths)
        header = training_pb2.DatasetUpload(
            name=name,
            size_bytes=size,
            sha256=digest,
            format=format,
            label_column=label_column,
            num_classes=num_classes,
        )
        if test_fraction is not None:
            header.test_fraction = test_fraction

        def requests() -> Iterator[training_pb2.UploadDatasetRequest]:
            yield training_pb2.UploadDatasetRequest(header=header)
            for path in paths:
                with open(path, "rb") as file:
                    while chunk := file.read(UPLOAD_CHUNK):
                        yield training_pb2.UploadDatasetRequest(chunk=chunk)

        timeout = 60.0 + size * UPLOAD_SECONDS_PER_BYTE
        return self._call(self._stub.UploadDataset, requests(), timeout)

    def datasets(self, name: str = "") -> builtins.list[training_pb2.Dataset]:
        """Every pushed data set's versions (or `name`'s), newest push first."""
        request = training_pb2.ListDatasetsRequest(name=name)
        return builtins.list(self._call(self._stub.ListDatasets, request, self.timeout).datasets)

    def dataset(self, reference: str) -> training_pb2.Dataset:
        """The version `NAME` (its newest) or `NAME@sha256:<digest>` names."""
        request = training_pb2.GetDatasetRequest(dataset=reference)
        return self._call(self._stub.GetDataset, request, self.timeout)

    def delete_dataset(self, reference: str) -> builtins.list[training_pb2.Dataset]:
        """Delete `NAME@sha256:<digest>`, or every version of `NAME`; returns what went."""
        request = training_pb2.DeleteDatasetRequest(dataset=reference)
        return builtins.list(self._call(self._stub.DeleteDataset, request, self.timeout).deleted)

    # -- evaluate and predict (in the server's workers) -------------------------------------

    def evaluate(
        self, job_id: str, *, dataset: str | None = None, checkpoint: bool = False
    ) -> training_pb2.EvaluateResponse:
        """Loss and accuracy of the job's model on a test split (its own data set by default).

        checkpoint: use the latest checkpoint, as while the job runs or after it failed.
        """
        request = training_pb2.EvaluateRequest(
            job_id=job_id, dataset=dataset or "", use_checkpoint=checkpoint
        )
        return self._call(self._stub.Evaluate, request, self.model_timeout)

    def predict(self, job_id: str, inputs: Any) -> np.ndarray:
        """Class probabilities, (examples, classes), for `inputs`, (examples, ...).

        Each example is flattened and sent as one tensor: uint8 pixels as they
        are (the server scales them to [0, 1] as it scales its data sets),
        other values as float32. The predicted classes are
        `probabilities.argmax(axis=1)`.
        """
        flat = examples_array(inputs)  # (examples, features)
        per_request = max(
            1, min(PREDICT_CHUNK_EXAMPLES, PREDICT_CHUNK_BYTES // (flat[0:1].nbytes or 1))
        )
        parts: builtins.list[np.ndarray] = []
        for start in range(0, len(flat), per_request):
            request = training_pb2.PredictRequest(job_id=job_id)
            fill_tensor(request.tensor, flat[start : start + per_request])
            response = self._call(self._stub.Predict, request, self.model_timeout)
            parts.append(tensor_array(response.probabilities))
        if not parts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(parts)  # (examples, classes)

    # -- the server ------------------------------------------------------------------------

    def info(self) -> training_pb2.ServerInfo:
        """Versions, devices, strategies and the queue."""
        return self._call(
            self._stub.GetServerInfo, training_pb2.GetServerInfoRequest(), self.timeout
        )

    def health(self, service: str = "") -> str:
        """The standard gRPC health check's answer: "SERVING", "NOT_SERVING", ..."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        response = self._call(
            stub.Check, health_pb2.HealthCheckRequest(service=service), self.timeout
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def _sha256_of(paths: builtins.list[Path]) -> tuple[str, int]:
    """The SHA-256 (hex) and size of the files' bytes, one after another."""
    digest, size = hashlib.sha256(), 0
    for path in paths:
        with open(path, "rb") as file:
            while chunk := file.read(UPLOAD_CHUNK):
                digest.update(chunk)
                size += len(chunk)
    return digest.hexdigest(), size


def model_file_destination(folder: Path, path: str) -> Path:
    """Where a model file named `path` by the server goes inside `folder`.

    Raises:
        DownloadError: the path is empty, absolute, or climbs out (`..`), so that
            a server can never make the client write outside the folder.
    """
    parts = PurePosixPath(path).parts
    if (
        not path
        or "\\" in path
        or "\0" in path
        or path.startswith("/")
        or any(part in ("", ".", "..") for part in parts)
        or path != "/".join(parts)
    ):
        raise DownloadError(f"the server sent a model file path outside the folder: {path!r}")
    destination = folder.joinpath(*parts)
    if not destination.resolve().is_relative_to(folder.resolve()):
        raise DownloadError(f"the server sent a model file path outside the folder: {path!r}")
    return destination


def job_spec(spec: JobSpecLike) -> training_pb2.JobSpec:
    """A JobSpec from a JobSpec, a dict in the proto3 JSON mapping, or a .json/.yaml file.

    Raises:
        InvalidArgument: the file cannot be read or the fields do not fit a JobSpec.
    """
    if isinstance(spec, training_pb2.JobSpec):
        return spec
    return _parse_message(spec, training_pb2.JobSpec(), "a job spec")


def experiment_spec(spec: ExperimentSpecLike) -> training_pb2.ExperimentSpec:
    """An ExperimentSpec from one, a dict in the proto3 JSON mapping, or a .json/.yaml file.

    Raises:
        InvalidArgument: the file cannot be read or the fields do not fit an ExperimentSpec.
    """
    if isinstance(spec, training_pb2.ExperimentSpec):
        return spec
    return _parse_message(spec, training_pb2.ExperimentSpec(), "an experiment spec")


def _parse_message(spec: Any, message: Message, what: str) -> Any:
    if isinstance(spec, Mapping):
        fields: Any = spec
    else:
        path = Path(spec)
        try:
            text = path.read_text()
            if path.suffix in (".yaml", ".yml"):
                try:
                    import yaml  # only for YAML files: PyYAML is not one of the client's needs
                except ImportError:
                    raise InvalidArgument(
                        f"reading {path} needs PyYAML (pip install pyyaml); or give {what} as .json"
                    ) from None
                fields = yaml.safe_load(text)
            else:
                fields = json.loads(text)
        except (OSError, ValueError, ImportError) as error:
            raise InvalidArgument(f"cannot read {what} from {path}: {error}") from None
    try:
        return json_format.ParseDict(fields, message)
    except (json_format.ParseError, TypeError, AttributeError) as error:
        raise InvalidArgument(f"not {what}: {' '.join(str(error).split())}") from None
