"""The typed protocol between the service's stages: jobs, tasks and worker events.

Plain dataclasses, stdlib and naive_model's plain modules only (its config
and its results, which import no TensorFlow), so the server, the worker and
the CLI can all import it. What crosses the worker pipe is one of these
objects, pickled; the receiving side matches on their types. The proto
messages are converted to and from these in one place, `service.api.convert`.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from naive_model.config import STRATEGIES, LayerSpec, TrainConfig
from naive_model.results import (
    CheckpointSaved,
    EpochEnd,
    Progress,
    Resumed,
    TrainingResult,
)

# -- job states and strategies ---------------------------------------------------


class JobState(enum.Enum):
    """Where a job is in its life; each value is the contract's `JobState` number.

    QUEUED -> STARTING -> RUNNING -> SUCCEEDED | FAILED; CANCELLING -> CANCELED
    from STARTING or RUNNING (a QUEUED job is CANCELED at once); a job whose
    worker died, or that was stopped to make room, goes back to QUEUED. A test
    holds the names and numbers equal to the proto's (without its prefix).
    """

    QUEUED = 1
    STARTING = 2
    RUNNING = 3
    CANCELLING = 4
    SUCCEEDED = 5
    FAILED = 6
    CANCELED = 7

    @property
    def finished(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED})

# How urgent a job is: larger runs first and may preempt smaller.
MIN_PRIORITY, MAX_PRIORITY = -1000, 1000
PRIORITY_CLASSES = {"low": -100, "normal": 0, "high": 100}

# The strategies of jobs on the server's own host; multi_worker jobs run on a
# Ray cluster instead (the server's --ray-address).
SERVICE_STRATEGIES = tuple(name for name in STRATEGIES if name != "multi_worker")


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """A job as the service runs it: the training config plus where and how long."""

    train: TrainConfig
    dataset: str
    strategy: str = "auto"
    device_count: int = 0
    hosts: int = 0  # multi_worker: Ray workers, one per host
    gpus_per_host: int = 0  # multi_worker: GPUs of each (0: its CPU)
    checkpoint_every_epochs: int = 1  # 0: only at the end
    max_runtime_seconds: float = 0.0
    max_restarts: int = 2  # restarts from a checkpoint after the worker died
    name: str = ""  # for people; not unique
    # (key, value) pairs sorted by key: a tuple, so that the spec stays hashable.
    labels: tuple[tuple[str, str], ...] = ()
    priority: int = 0  # larger is more urgent (PRIORITY_CLASSES)
    # Set by the server when `dataset` names a pushed data set: NAME@sha256:<digest>,
    # the version the job trains on whatever is pushed under the name later.
    dataset_version: str = ""
    # How the training split is held: "auto" streams it when it passes the
    # job's data budget, "memory" holds it whole, "stream" always streams.
    data_mode: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, for the store."""
        data = asdict(self)
        data["train"]["layers"] = [asdict(layer) for layer in self.train.layers]
        data["labels"] = dict(self.labels)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        """The spec `to_dict` gave; specs stored before names and labels have neither."""
        train = dict(data["train"])
        train["layers"] = tuple(LayerSpec(**layer) for layer in train["layers"])
        labels = tuple(sorted(data.get("labels", {}).items()))
        return cls(**{**data, "train": TrainConfig(**train), "labels": labels})


@dataclass(frozen=True)
class JobFiles:
    """The layout of one job's directory: checkpoints, SavedModel, logs, TensorBoard events."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def model_info(self) -> Path:
        """JSON of the model's input size and classes (`ModelInfo`), written as training starts."""
        return self.root / "model.json"

    def has_model(self) -> bool:
        """Whether the SavedModel was exported (it appears whole: it is renamed into place)."""
        return (self.model / "saved_model.pb").is_file()

    @property
    def train_log(self) -> Path:
        return self.root / "train.log"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event files of the training (`tensorboard --logdir <state-dir>/jobs`)."""
        return self.root / "tensorboard"

    def has_checkpoint(self) -> bool:
        return (self.checkpoints / "checkpoint").is_file()


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    input_size: int
    num_classes: int


@dataclass(frozen=True, kw_only=True)
class ModelDescription:
    """What a job's model is and where it lives: `describe` shows it."""

    input_size: int
    num_classes: int
    layers: tuple[LayerSpec, ...]
    parameters: int  # weights and biases of every layer
    exported: bool  # the SavedModel is there (the job SUCCEEDED)
    path: Path  # the SavedModel's folder
    signature: str = "serving_default"
    dataset: str = ""  # what it was trained on: a pushed data set's NAME@sha256:<digest>


@dataclass(frozen=True, kw_only=True)
class LogLines:
    """A piece of a job's log: whole lines, and the byte offset just past them."""

    lines: tuple[str, ...]
    next_offset: int


@dataclass(frozen=True, kw_only=True)
class ModelFilePart:
    """A piece of one file of a job's SavedModel; `path` is relative, "/"-separated."""

    path: str
    data: bytes
    offset: int
    sha256: str = ""  # on a file's last piece: the whole file's SHA-256, in hex


# -- tasks: what the server asks of a worker ----------------------------------------


@dataclass(frozen=True, kw_only=True)
class TrainTask:
    job_id: str
    job_dir: Path
    spec: JobSpec
    strategy: str  # cpu, gpu or mirrored: what the scheduler resolved
    replicas: int
    cuda_visible_devices: str  # "" hides every GPU; tokens as the server's own list names them
    gpu_names: tuple[str, ...]  # host names of the visible GPUs, in their local order
    data_dir: Path | None
    # An uploaded data set's converted folder (`spec.dataset` resolved by the
    # server); None: spec.dataset is a built-in or a file in data_dir.
    dataset_dir: Path | None = None
    checkpoint_seconds: float | None = None  # also checkpoint mid-epoch this often
    # The job shares its GPU: TensorFlow may use at most this much of it (0: all of it).
    gpu_memory_limit_mb: int = 0
    # How often the worker says it is alive, whatever its compiled calls are doing (0: never).
    heartbeat_seconds: float = 0.0
    # Training data past this many bytes is streamed (data_mode "auto"); 0: half the host's memory.
    data_budget_bytes: int = 0


@dataclass(frozen=True, kw_only=True)
class EvaluateTask:
    job_dir: Path
    spec: JobSpec
    dataset: str
    use_checkpoint: bool
    data_dir: Path | None
    dataset_dir: Path | None = None  # as TrainTask's


@dataclass(frozen=True, kw_only=True)
class SharedArray:
    """An array the server wrote to a shared-memory file, in C order, for the worker to map.

    The server removes the file's name once the worker has answered a task
    that named it (the worker keeps its mapping); nothing of it outlives the
    two processes.
    """

    path: str  # /dev/shm/ntrain-inputs-...
    shape: tuple[int, ...]
    dtype: str  # "float32" or "uint8"


@dataclass(frozen=True, kw_only=True)
class PredictTask:
    job_dir: Path
    # (examples, input_size) numpy array: float32, or uint8 pixels the worker scales
    # as data sets are scaled for training (naive_model.data.to_features); or a
    # SharedArray holding one (large inputs: service.processes.shared_inputs).
    inputs: Any


@dataclass(frozen=True, kw_only=True)
class ConvertTask:
    """Check an uploaded file and convert it into a new folder in the canonical layout.

    Run by `python -m service.worker.conversion`, never in the server: a
    hostile file costs a worker's memory and time, not the server's.
    """

    source: Path
    folder: Path
    format: str
    label_column: str = ""
    test_fraction: float | None = None
    num_classes: int = 0


@dataclass(frozen=True)
class Converted:
    """The folder holds the data set; its manifest says what it is."""

    seconds: float


@dataclass(frozen=True)
class ConversionFailed:
    """The file is no usable data set (`where` names the place), or converting it failed.

    kind: "data" (the file's fault), "disk_full", or "error" (anything else).
    """

    kind: str
    message: str
    where: str = ""


@dataclass(frozen=True)
class StopTraining:
    """Server to a training worker: checkpoint at the next compiled-call boundary, then end."""

    reason: str = ""  # why, for the job's log: "preempted by job-...", a shutdown


@dataclass(frozen=True)
class DescribeCache:
    """Server to the inference worker: which models it holds (it answers `ModelCacheState`)."""


# What the server sends a worker: its one task, and for training perhaps a stop;
# the inference worker takes Evaluate and Predict tasks, and DescribeCache, one after another.
ServerMessage = TrainTask | EvaluateTask | PredictTask | StopTraining | DescribeCache


# -- events: what a worker tells the server ------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Ready:
    """A worker has TensorFlow imported; a warm one now waits for its task.

    resident_bytes: the process's resident size right after the imports,
        before any data or model: what the runtime itself takes in this
        install, which admission counts for every job (WorkerPool.runtime_bytes).
    """

    resident_bytes: int


@dataclass(frozen=True)
class Heartbeat:
    """A training worker is alive (sent from a thread of its own, between and during calls)."""


@dataclass(frozen=True, kw_only=True)
class Running:
    """Training started: the strategy is built, the model and data are on the devices."""

    replicas: int
    data: str = ""  # how the training data is held, and why ("streamed in windows of ...")


@dataclass(frozen=True, kw_only=True)
class DeviceMemory:
    """GPU memory TensorFlow's allocator gave the job's tensors, per host GPU, at an epoch's end.

    bytes_in_use: allocated when read (`get_memory_info()["current"]`).
    peak_bytes: the most allocated at once during the epoch, its evaluation
        included (`["peak"]`; the worker resets it as each epoch starts).
    Neither counts the CUDA context or memory the allocator reserved but had
    not handed out.
    """

    bytes_in_use: dict[str, int] = field(default_factory=dict)
    peak_bytes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Stopped:
    """The worker saved a checkpoint on request and ended its task early."""

    epoch: int  # the epoch it was in
    step: int


@dataclass(frozen=True, kw_only=True)
class Failed:
    """The task failed; `reason` is one line for the job's record."""

    reason: str
    data_missing: bool = False  # the data set was not found: the request's fault
    data_unusable: bool = False  # the data set's file is no usable data set (NaN values)


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    loss: float
    accuracy: float
    examples: int
    dataset: str
    source: str  # "model" or the checkpoint path


@dataclass(frozen=True, kw_only=True)
class Predictions:
    probabilities: Any  # (examples, classes) float32 numpy array


@dataclass(frozen=True, kw_only=True)
class ModelCacheState:
    """What the inference worker holds loaded, and how often it loaded a model."""

    models: tuple[Path, ...]  # the job directories whose models it holds, least recent first
    model_bytes: int  # their weights
    data_bytes: int  # the test splits it keeps for Evaluate
    loads: int  # models loaded from disk since the worker started (misses and reloads)


WorkerEvent = (
    Ready
    | Heartbeat
    | Running
    | Progress
    | EpochEnd
    | CheckpointSaved
    | Resumed
    | DeviceMemory
    | TrainingResult
    | Stopped
    | Failed
    | Evaluation
    | Predictions
    | ModelCacheState
)


# -- a job's history ------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class StateChange:
    state: JobState
    reason: str = ""


# What a job's stored history holds, in order: WatchJob replays these.
JobEventPayload = StateChange | Progress | EpochEnd | TrainingResult


# -- a multi_worker job on Ray: its task, and its events as lines of the driver's log ---

RAY_TASK_ENV = "NTRAIN_RAY_TASK"  # the driver's environment variable holding its task
EVENT_MARKER = "NTRAIN-EVENT"


@dataclass(frozen=True, kw_only=True)
class RayTrainTask:
    """What the Ray driver (`python -m service.driver`) is asked to run.

    job_dir and data_dir are paths on the Ray nodes: the server's state
    directory (and data directory) must be shared with them at the same path.
    storage_path: where Ray Train keeps its checkpoints (shared too).
    data_budget_bytes: the server's --data-budget-bytes. Every host must make the
        same choice to stream or not (their compiled steps run in lock step), so
        a node's own memory does not decide: 0 holds the data unless the job
        asks to stream.
    """

    job_id: str
    job_dir: Path
    spec: JobSpec
    hosts: int
    gpus_per_host: int
    data_dir: Path | None
    storage_path: Path
    dataset_dir: Path | None = None  # as TrainTask's (shared with the nodes too)
    data_budget_bytes: int = 0

    def to_json(self) -> str:
        return json.dumps(
            {
                "job_id": self.job_id,
                "job_dir": str(self.job_dir),
                "spec": self.spec.to_dict(),
                "hosts": self.hosts,
                "gpus_per_host": self.gpus_per_host,
                "data_dir": None if self.data_dir is None else str(self.data_dir),
                "storage_path": str(self.storage_path),
                "dataset_dir": None if self.dataset_dir is None else str(self.dataset_dir),
                "data_budget_bytes": self.data_budget_bytes,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> RayTrainTask:
        data = json.loads(text)
        return cls(
            job_id=data["job_id"],
            job_dir=Path(data["job_dir"]),
            spec=JobSpec.from_dict(data["spec"]),
            hosts=data["hosts"],
            gpus_per_host=data["gpus_per_host"],
            data_dir=None if data["data_dir"] is None else Path(data["data_dir"]),
            storage_path=Path(data["storage_path"]),
            dataset_dir=Path(data["dataset_dir"]) if data.get("dataset_dir") else None,
            data_budget_bytes=data.get("data_budget_bytes", 0),
        )


# The events the driver prints, each once, under the name of its type.
RayEvent = Running | Progress | EpochEnd | CheckpointSaved | Resumed | TrainingResult | Failed
_RAY_EVENT_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (Running, Progress, EpochEnd, CheckpointSaved, Resumed, TrainingResult, Failed)
}


def event_line(sequence: int, event: RayEvent) -> str:
    """One line of the driver's output: the marker, the event's number (from 1), its JSON.

    The numbers let a reader that starts over (a restarted server) skip what
    it had already taken.
    """
    body = {"type": type(event).__name__, "fields": asdict(event)}
    return f"{EVENT_MARKER} {sequence} {json.dumps(body, allow_nan=True)}"


def parse_event_lines(text: str) -> list[tuple[int, RayEvent]]:
    """Every event line in `text` (a driver's log) with its number, in order.

    Other lines (Ray's own, TensorFlow's) are passed over, and so is a last
    line without its newline yet: it may be cut.
    """
    found = []
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        start = line.find(EVENT_MARKER + " ")
        if start < 0:
            continue
        try:
            number, body = line[start + len(EVENT_MARKER) + 1 :].split(" ", 1)
            data = json.loads(body)
            found.append((int(number), _RAY_EVENT_TYPES[data["type"]](**data["fields"])))
        except (ValueError, KeyError, TypeError):
            continue  # not one of ours after all
    return found


__all__ = [
    "CheckpointSaved",
    "DescribeCache",
    "DeviceMemory",
    "EpochEnd",
    "Evaluation",
    "EvaluateTask",
    "Failed",
    "Heartbeat",
    "JobState",
    "MAX_PRIORITY",
    "MIN_PRIORITY",
    "PRIORITY_CLASSES",
    "JobEventPayload",
    "JobFiles",
    "JobSpec",
    "LogLines",
    "ModelCacheState",
    "ModelDescription",
    "ModelFilePart",
    "ModelInfo",
    "PredictTask",
    "Predictions",
    "Progress",
    "Ready",
    "Resumed",
    "Running",
    "SERVICE_STRATEGIES",
    "SharedArray",
    "EVENT_MARKER",
    "RAY_TASK_ENV",
    "RayEvent",
    "RayTrainTask",
    "ServerMessage",
    "StateChange",
    "StopTraining",
    "Stopped",
    "TERMINAL_STATES",
    "TrainTask",
    "TrainingResult",
    "WorkerEvent",
    "event_line",
    "parse_event_lines",
]
