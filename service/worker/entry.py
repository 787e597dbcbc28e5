"""The worker process's entry point: one training, then the process ends; or the inference worker.

    python -m service.worker.entry --fd N [--preload] [--log PATH] [--dataset NAME]
    python -m service.worker.entry --fd N --preload --model-cache N --cache-bytes B ...

The server starts one per job. With `--model-cache` the process is the
inference worker instead (service.worker.serving): it answers Evaluate and
Predict tasks one after another, keeping models loaded, until the server
closes its socket. A warm worker
(`--preload`) imports TensorFlow first, says `Ready` with its resident size
then (what the runtime takes, which admission counts), and waits; a cold one
says it once it has imported TensorFlow for its task. TensorFlow is
imported but not initialised, so the task can still choose its GPUs
(CUDA_VISIBLE_DEVICES) and split the CPU into logical devices. This module
imports nothing heavy, so a cold worker pays the import only once it knows its
task, and nothing of gRPC or protobuf's generated code: it speaks the typed
protocol. The server ends a job by ending this process; nothing here polls for it.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path

from service.protocol import Failed, Heartbeat, JobFiles, Ready, StopTraining, TrainTask


def _keep_scikit_learn_out() -> None:
    """Make `import sklearn` fail in this process, before TensorFlow is imported.

    Importing TensorFlow imports Keras, and Keras imports scikit-learn (and
    SciPy) for its scikit-learn wrappers whenever it is installed, as it is
    for the demo's digits. A worker never uses them: they were 0.9 of the 6.2
    CPU-seconds a worker takes to start (paired runs of the import, 6.2 against
    5.3), paid again for every job and every trial of a search.
    """
    sys.modules.setdefault("sklearn", None)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m service.worker.entry")
    parser.add_argument("--fd", type=int, required=True, help="the socket to the server")
    parser.add_argument("--preload", action="store_true", help="import TensorFlow now")
    parser.add_argument("--log", default=None, help="output file until the task names one")
    parser.add_argument("--dataset", default=None, help="a data set to load while waiting")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument(
        "--model-cache", type=int, default=0, help="serve models, keeping this many loaded"
    )
    parser.add_argument(
        "--cache-bytes", type=int, default=0, help="what kept models and test splits may take"
    )
    args = parser.parse_args(argv)
    _keep_scikit_learn_out()
    conn = Connection(args.fd)
    _exit_with_parent()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.log is not None:
        _redirect_output(Path(args.log))
    if args.model_cache:
        _serve_models(conn, args)
        return
    if args.preload:
        from service.worker import tasks  # imports TensorFlow: the point of a warm worker

        runtime_bytes = tasks.import_tensorflow()  # measured before the data set is loaded
        if args.dataset is not None:
            tasks.preload_dataset(args.dataset, Path(args.data_dir) if args.data_dir else None)
        conn.send(Ready(resident_bytes=runtime_bytes))
    try:
        task = conn.recv()
    except EOFError:
        return  # the server let this warm worker go
    train(conn, task, measured=args.preload)


def _serve_models(conn: Connection, args: argparse.Namespace) -> None:
    """The inference worker: on the CPU, warmed up, then answering until the server lets go."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # Evaluate and Predict run on the CPU
    from service.worker import serving, tasks  # imports TensorFlow

    runtime_bytes = tasks.resident_bytes()
    server = serving.ModelServer(max_models=args.model_cache, cache_bytes=args.cache_bytes)
    server.warm_up(args.dataset, Path(args.data_dir) if args.data_dir else None)
    conn.send(Ready(resident_bytes=runtime_bytes))
    serving.serve(conn, server)


def train(conn: Connection, task: TrainTask, *, measured: bool) -> None:
    """Run one training, sending its events to `conn`; a failure is sent as `Failed`.

    Args:
        measured: this worker said `Ready` already (a warm one, before its data set).
    """
    # Before TensorFlow touches a device: which GPUs this process may see,
    # named as the server's device probe named them (service.devices): in
    # PCI bus order, nvidia-smi's, unless the server's environment set one.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    os.environ["CUDA_VISIBLE_DEVICES"] = task.cuda_visible_devices
    _redirect_output(JobFiles(task.job_dir).train_log)
    send = _LockedSend(conn)
    if task.heartbeat_seconds:
        _beat(send, task.heartbeat_seconds)
    from naive_model.data import DatasetError
    from service.worker import tasks

    try:
        if not measured:  # a cold worker: the runtime now, before the task's data and model
            send(Ready(resident_bytes=tasks.import_tensorflow()))
        stop = _listen_for_stop(conn)
        tasks.train(task, send, stop.requested.is_set, stop_reason=lambda: stop.reason)
    # Each failure is reported before its traceback is logged: the log is on the
    # state directory's disk, and when that disk is full the traceback cannot be
    # written, and the server would hear only an exit code.
    except FileNotFoundError as error:  # a data set that is not there: the request's fault
        send(Failed(reason=str(error), data_missing=True))
        _log_traceback()
    except DatasetError as error:  # a file that is no usable data set: named in the request
        send(Failed(reason=str(error), data_unusable=True))
        _log_traceback()
    except Exception as error:  # reported to the server, which fails the job with it
        send(Failed(reason=f"{type(error).__name__}: {error}"))
        _log_traceback()
    finally:
        _flush_output()
        with send.lock:  # no heartbeat half-written into a closed socket
            conn.close()


def _log_traceback() -> None:
    try:
        traceback.print_exc()
    except OSError:  # a full disk: the server has the failure already
        pass


def _flush_output() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:
            pass


class _LockedSend:
    """`conn.send` for several threads: one message at a time on the socket."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self.lock = threading.Lock()

    def __call__(self, message: object) -> None:
        with self.lock:
            self.conn.send(message)


def _beat(send: _LockedSend, seconds: float) -> None:
    """A thread that sends `Heartbeat` every `seconds`, so a hung worker can be told apart.

    It runs beside the training, so a long compiled call (which releases the
    GIL) does not silence it; a stopped or deadlocked process does.
    """

    def beat() -> None:
        while True:
            time.sleep(seconds)
            try:
                send(Heartbeat())
            except (OSError, ValueError):
                return  # the socket is closed: the task is over

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()


class _StopRequest:
    """The server's StopTraining, once it came: `requested` is set, `reason` says why."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.reason = ""


def _listen_for_stop(conn: Connection) -> _StopRequest:
    """A thread that waits for the server's StopTraining."""
    stop = _StopRequest()

    def listen() -> None:
        try:
            message = conn.recv()
            while not isinstance(message, StopTraining):
                message = conn.recv()
        except (EOFError, OSError):
            return  # the server is gone: the parent watch ends this process
        stop.reason = message.reason
        stop.requested.set()

    threading.Thread(target=listen, name="stop-listener", daemon=True).start()
    return stop


def _exit_with_parent() -> None:
    """End this process if the server dies, so no orphan keeps a GPU."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _redirect_output(path: Path) -> None:
    """Send this process's stdout and stderr (TensorFlow's C++ logs too) to a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)


def _exit_now() -> None:
    """End the process without the interpreter's and TensorFlow's teardown.

    By now the task's files are written and closed and its answer sent. A
    normal exit of a process that ran TensorFlow takes about a second
    (1.05 s measured, against 0.05 s this way): a second longer before a
    preempted job's devices are free, a stopping server exits, or the next
    job on a slot starts. The atexit hooks still run: autograph's temporary
    files, logging's flush.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(0)


if __name__ == "__main__":
    main()
    _exit_now()
