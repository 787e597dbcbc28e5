"""Evaluate and Predict through a real server's inference worker, beside an in-process load.

    python -m benchmarks.inference --json FILE [--quick] [--data PATH]

A TrainingServer on a free loopback port (warm workers on, the default
--model-cache) trains two jobs of the book's network (784 -> 512 relu -> 10
softmax) for one epoch on MNIST (`--data`), and this process loads the same
SavedModels with `tf.saved_model.load`. Then every entry runs in interleaved
rounds (7; `--quick` 2):

  predict_1               Predict of 1 example (a float32 tensor) on a cached model
                          (50 calls a round; --quick 5): p50 and p99 over every call
                          (targets <= 20 ms, <= 50 ms), beside the in-process call of
                          the same model. predict_1_uint8: the same image as uint8.
  predict_1024            Predict of 1,024 examples in one request (5 calls a round;
                          --quick 2), as one tensor of float32 values and of uint8
                          pixels (the server scales them): medians, each beside
                          in-process on the same array (target: within 2x, the paired
                          median of the rounds' ratios; the uint8 in-process call
                          includes the scaling, naive_model.data.to_features).
                          `serialisation` times each conversion of the request and
                          reply on its own, per dtype: building the request from the
                          array (ntrain.client.tensors) and serialising it, the
                          server parsing it and turning it into an array (its checks
                          included), building and serialising the reply, parsing it
                          into an array. `examples` is the same call with one
                          Example per row, as JSON clients send it (and as the
                          client did before tensors).

Both service entries time what a client does: from a numpy array to a numpy
array (the request built, the call, the reply read), as the in-process entries
go from an array to an array.
  evaluate                Evaluate of the MNIST test split, model and split cached
                          (target <= 1 s), beside evaluate_saved_model in-process
                          on arrays in memory.
  predict_uncached        the first Predict (1 example) of a model the worker does
                          not hold, its worker ready (target <= 1.5 s): the second
                          job's export is renamed into place anew before each, as a
                          job that exported again, so the worker loads it from disk;
                          beside tf.saved_model.load plus the first call in-process.

The answers are checked against in-process ones (`checks`), and the worker's
load count shows that cached calls loaded nothing and uncached ones one model
each. See benchmarks/README.md for how to read it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
from ntrain.v1 import training_pb2 as pb
from ntrain.v1 import training_pb2_grpc

from benchmarks.report import SHARED_MNIST, machine, paired_ratio, publish, side_by_side
from ntrain.client.tensors import fill_tensor, tensor_array
from service.api import convert
from service.api.server import ServerConfig, TrainingServer
from service.cli.specs import book_job_spec
from service.jobs import validation

TARGETS = {
    "predict_1_p50_ms": 20.0,
    "predict_1_p99_ms": 50.0,
    "predict_1024_service/in_process": 2.0,
    "predict_1024_uint8_service/in_process": 2.0,
    "evaluate_seconds": 1.0,
    "predict_uncached_seconds": 1.5,
}
BATCH = 1024
SERIALISATION_STEPS = (
    "request_build",
    "request_serialize",
    "request_parse",
    "request_to_array",
    "reply_build",
    "reply_serialize",
    "reply_parse",
)
DTYPES = ("float32", "uint8")


def job_spec(seed: int) -> pb.JobSpec:
    return book_job_spec(
        pb.JobSpec(
            optimizer=pb.OptimizerSpec(name="sgd", learning_rate=1e-2),
            epochs=1,
            strategy=pb.StrategySpec(name="cpu"),
            seed=seed,
        )
    )


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def predict_request(job_id: str, x: np.ndarray) -> pb.PredictRequest:
    """As ntrain.client builds it: the array as one tensor, filled in place."""
    request = pb.PredictRequest(job_id=job_id)
    fill_tensor(request.tensor, x)
    return request


def examples_request(job_id: str, x: np.ndarray) -> pb.PredictRequest:
    """The same request as JSON clients send it: one Example of floats per row."""
    return pb.PredictRequest(job_id=job_id, inputs=[pb.Example(values=row) for row in x])


def probabilities(response: pb.PredictResponse) -> np.ndarray:
    """As ntrain.client reads it: (examples, classes)."""
    if response.HasField("probabilities"):
        return tensor_array(response.probabilities)
    return np.array([p.probabilities for p in response.predictions], dtype=np.float32)


def request_to_array(request: pb.PredictRequest, input_size: int) -> np.ndarray:
    """What the servicer does with a parsed tensor PredictRequest before the worker sees it."""
    inputs = convert.tensor_from_proto(request.tensor, "tensor")
    validation.check_predict_tensor(inputs, input_size)
    return inputs


def restage(model: Path) -> None:
    """Put a copy of the export in its place as the training loop exports: beside, then renamed."""
    staging = model.with_name(f".{model.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(model, staging)
    shutil.rmtree(model)
    staging.rename(model)


def percentiles(samples: list[float]) -> dict:
    ms = np.asarray(samples) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "samples": len(ms),
    }


class Bench:
    """The server, its client, the in-process models, and what every round timed."""

    def __init__(self, state_dir: Path, data_dir: Path):
        self.server = TrainingServer(
            ServerConfig(
                port=0,
                metrics_port=None,
                state_dir=state_dir,
                data_dir=data_dir,
                warm_worker=True,
                gpu_inventory=(),
            )
        )
        self.server.start()
        # The server starts the inference worker as it starts, the host being idle.
        self.worker_started_with_server = self.models.worker.pid is not None
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.stub = training_pb2_grpc.TrainingServiceStub(self.channel)
        self.samples: dict[str, list[float]] = {}
        self.loads_in_cached_calls = 0
        self.loads_in_uncached_calls: list[int] = []

    @property
    def models(self):
        assert self.server.manager is not None
        return self.server.manager.models

    def train(self, spec: pb.JobSpec) -> str:
        job = self.stub.SubmitJob(pb.SubmitJobRequest(spec=spec), timeout=60)
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            state = self.stub.GetJob(pb.GetJobRequest(job_id=job.job_id), timeout=10)
            if state.state == pb.JOB_STATE_SUCCEEDED:
                return job.job_id
            if state.state in (pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELED):
                raise RuntimeError(f"job {job.job_id} ended: {state.failure_reason}")
            time.sleep(0.1)
        raise RuntimeError(f"job {job.job_id} did not finish")

    def wait_for_ready_worker(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.models.worker.ready:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the inference worker was not ready after {timeout:.0f} s")
            time.sleep(0.05)

    def model_dir(self, job_id: str) -> Path:
        assert self.server.manager is not None
        return self.server.manager.store.job_files(job_id).model

    def calls(self, name: str, count: int, call: Callable[[], object]) -> Callable[[], float]:
        """A timer: `count` calls, each kept in samples[name]; the round's median."""
        self.samples[name] = []

        def run() -> float:
            seconds = [timed(call) for _ in range(count)]
            self.samples[name].extend(seconds)
            return statistics.median(seconds)

        return run

    def cached(self, name: str, count: int, call: Callable[[], object]) -> Callable[[], float]:
        """Like `calls`, and counts the models the worker loaded meanwhile (none, if cached)."""
        timer = self.calls(name, count, call)

        def run() -> float:
            before = self.models.cache_state().loads
            median = timer()
            self.loads_in_cached_calls += self.models.cache_state().loads - before
            return median

        return run

    def uncached(self, job_id: str, x: np.ndarray) -> Callable[[], float]:
        """The first Predict after the job's export was renamed into place anew."""
        self.samples["predict_uncached_service"] = []

        def run() -> float:
            restage(self.model_dir(job_id))
            self.wait_for_ready_worker()
            before = self.models.cache_state().loads
            seconds = timed(
                lambda: probabilities(self.stub.Predict(predict_request(job_id, x), timeout=120))
            )
            self.loads_in_uncached_calls.append(self.models.cache_state().loads - before)
            self.samples["predict_uncached_service"].append(seconds)
            return seconds

        return run

    def close(self) -> None:
        self.channel.close()
        self.server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--quick", action="store_true", help="2 rounds of fewer calls")
    parser.add_argument("--data", type=Path, default=SHARED_MNIST, help="an MNIST-shaped .npz")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not args.data.is_file():
        parser.error(f"no MNIST at {args.data}; pass --data PATH/mnist.npz")
    rounds = 2 if args.quick else 7
    single_calls = 5 if args.quick else 50
    batch_calls = 2 if args.quick else 5

    with tempfile.TemporaryDirectory(prefix="ntrain-bench-inference-") as scratch:
        data_dir = Path(scratch) / "data"
        data_dir.mkdir()
        (data_dir / "mnist.npz").symlink_to(args.data.resolve())
        bench = Bench(Path(scratch) / "state", data_dir)
        try:
            results = run(bench, data_dir, rounds, single_calls, batch_calls)
        finally:
            bench.close()
    results["config"] = {
        "model": "784-512relu-10softmax, 1 epoch of SGD",
        "rounds": rounds,
        "predict_1_calls_per_round": single_calls,
        "predict_1024_calls_per_round": batch_calls,
        "model_cache": ServerConfig().model_cache,
        "quick": args.quick,
    }
    results["machine"] = machine()
    publish(results, args.json)
    return 0


def run(bench: Bench, data_dir: Path, rounds: int, single_calls: int, batch_calls: int) -> dict:
    import tensorflow as tf  # only now: the server's process must start without it

    from naive_model.data import load_dataset, to_features
    from naive_model.export import evaluate_saved_model, load_saved_model, predict_saved_model

    started = time.perf_counter()
    cached_job, uncached_job = bench.train(job_spec(1)), bench.train(job_spec(2))
    print(f"trained two jobs in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    dataset = load_dataset("mnist", data_dir=data_dir)
    x_test, y_test = dataset.x_test, dataset.y_test
    # For MNIST, exactly the file's uint8 pixels (x_test is them / 255).
    pixels = np.round(np.clip(x_test, 0, 1) * 255).astype(np.uint8)
    one = {"float32": x_test[:1], "uint8": pixels[:1]}  # (1, 784)
    batch = {  # (1024, 784)
        "float32": np.resize(x_test, (BATCH, x_test.shape[1])),
        "uint8": np.resize(pixels, (BATCH, pixels.shape[1])),
    }
    serve = load_saved_model(bench.model_dir(cached_job))
    serve_uncached = bench.model_dir(uncached_job)

    stub = bench.stub

    def service_predict(x: np.ndarray) -> np.ndarray:
        return probabilities(stub.Predict(predict_request(cached_job, x), timeout=60))

    def service_predict_examples(x: np.ndarray) -> np.ndarray:
        return probabilities(stub.Predict(examples_request(cached_job, x), timeout=60))

    def in_process_predict(x: np.ndarray) -> np.ndarray:
        return predict_saved_model(serve, to_features(x))  # uint8 scaled as the worker does

    evaluate_request = pb.EvaluateRequest(job_id=cached_job)
    # Warm both sides up: the worker loads the model, this process traces its calls.
    bench.wait_for_ready_worker()
    service_batch = {dtype: service_predict(batch[dtype]) for dtype in DTYPES}
    service_examples = service_predict_examples(batch["float32"])
    evaluation = stub.Evaluate(evaluate_request, timeout=120)
    in_process_batch = {dtype: in_process_predict(batch[dtype]) for dtype in DTYPES}
    in_process_evaluation = evaluate_saved_model(serve, x_test, y_test)

    # The conversions of a 1,024-example Predict, each on its own, per dtype.
    input_size = x_test.shape[1]
    reply = convert.predictions_to_proto(in_process_batch["float32"], as_tensor=True)
    reply_bytes = reply.SerializeToString()
    serialisation: dict[str, Callable[[], object]] = {}
    request_bytes = {}
    for dtype in DTYPES:
        request = predict_request(cached_job, batch[dtype])
        request_bytes[dtype] = request.SerializeToString()
        serialisation |= {
            f"{dtype}_request_build": lambda x=batch[dtype]: predict_request(cached_job, x),
            f"{dtype}_request_serialize": request.SerializeToString,
            f"{dtype}_request_parse": lambda data=request_bytes[dtype]: (
                pb.PredictRequest.FromString(data)
            ),
            f"{dtype}_request_to_array": lambda r=request: request_to_array(r, input_size),
            f"{dtype}_reply_build": lambda: convert.predictions_to_proto(
                in_process_batch["float32"], as_tensor=True
            ),
            f"{dtype}_reply_serialize": reply.SerializeToString,
            f"{dtype}_reply_parse": lambda: probabilities(
                pb.PredictResponse.FromString(reply_bytes)
            ),
        }

    timers = {}
    for dtype in DTYPES:
        suffix = "" if dtype == "float32" else "_uint8"
        timers |= {
            f"predict_1{suffix}_service": bench.cached(
                f"predict_1{suffix}_service", single_calls, lambda x=one[dtype]: service_predict(x)
            ),
            f"predict_1{suffix}_in_process": bench.calls(
                f"predict_1{suffix}_in_process",
                single_calls,
                lambda x=one[dtype]: serve(inputs=tf.constant(to_features(x))),
            ),
            f"predict_1024{suffix}_service": bench.cached(
                f"predict_1024{suffix}_service",
                batch_calls,
                lambda x=batch[dtype]: service_predict(x),
            ),
            f"predict_1024{suffix}_in_process": bench.calls(
                f"predict_1024{suffix}_in_process",
                batch_calls,
                lambda x=batch[dtype]: in_process_predict(x),
            ),
        }
    timers |= {
        "predict_1024_examples_service": bench.cached(
            "predict_1024_examples_service",
            batch_calls,
            lambda: service_predict_examples(batch["float32"]),
        ),
        **{
            f"serialisation_{step}": bench.calls(f"serialisation_{step}", batch_calls, call)
            for step, call in serialisation.items()
        },
        "evaluate_service": bench.cached(
            "evaluate_service", 1, lambda: stub.Evaluate(evaluate_request, timeout=120)
        ),
        "evaluate_in_process": bench.calls(
            "evaluate_in_process", 1, lambda: evaluate_saved_model(serve, x_test, y_test)
        ),
        "predict_uncached_service": bench.uncached(uncached_job, one["float32"]),
        "predict_uncached_in_process": bench.calls(
            "predict_uncached_in_process",
            1,
            lambda: predict_saved_model(load_saved_model(serve_uncached), one["float32"]),
        ),
    }
    print(f"{rounds} interleaved rounds of {len(timers)} entries", file=sys.stderr)
    medians = side_by_side(timers, rounds)

    def paired(name: str) -> float:
        return paired_ratio(medians[f"{name}_service"], medians[f"{name}_in_process"])

    samples = bench.samples

    def median_ms(name: str) -> float:
        return statistics.median(samples[name]) * 1e3

    def batch_entry(dtype: str) -> dict:
        name = "predict_1024" if dtype == "float32" else "predict_1024_uint8"
        parts = {step: median_ms(f"serialisation_{dtype}_{step}") for step in SERIALISATION_STEPS}
        return {
            "service_ms": median_ms(f"{name}_service"),
            "in_process_ms": median_ms(f"{name}_in_process"),
            "service/in_process_paired_median": paired(name),
            "request_bytes": len(request_bytes[dtype]),
            "serialisation_ms": parts,
            "serialisation_total_ms": sum(parts.values()),
            "serialisation_share_of_service": sum(parts.values()) / median_ms(f"{name}_service"),
        }

    predict_1 = {
        "service": percentiles(samples["predict_1_service"]),
        "in_process": percentiles(samples["predict_1_in_process"]),
        "service/in_process_paired_median": paired("predict_1"),
        "uint8_service": percentiles(samples["predict_1_uint8_service"]),
        "uint8_in_process": percentiles(samples["predict_1_uint8_in_process"]),
        "uint8_service/in_process_paired_median": paired("predict_1_uint8"),
    }
    predict_1024 = {
        "float32": batch_entry("float32"),
        "uint8": batch_entry("uint8"),
        "examples_service_ms": median_ms("predict_1024_examples_service"),
        "examples_service/in_process_paired_median": paired_ratio(
            medians["predict_1024_examples_service"], medians["predict_1024_in_process"]
        ),
    }
    evaluate = {
        "service_seconds": statistics.median(samples["evaluate_service"]),
        "in_process_seconds": statistics.median(samples["evaluate_in_process"]),
        "service/in_process_paired_median": paired("evaluate"),
        "examples": int(evaluation.examples),
    }
    uncached = {
        "service_seconds": statistics.median(samples["predict_uncached_service"]),
        "in_process_seconds": statistics.median(samples["predict_uncached_in_process"]),
        "service/in_process_paired_median": paired("predict_uncached"),
    }
    figures = {
        "predict_1_p50_ms": predict_1["service"]["p50_ms"],
        "predict_1_p99_ms": predict_1["service"]["p99_ms"],
        "predict_1024_service/in_process": predict_1024["float32"][
            "service/in_process_paired_median"
        ],
        "predict_1024_uint8_service/in_process": predict_1024["uint8"][
            "service/in_process_paired_median"
        ],
        "evaluate_seconds": evaluate["service_seconds"],
        "predict_uncached_seconds": uncached["service_seconds"],
    }
    return {
        "predict_1": predict_1,
        "predict_1024": predict_1024,
        "evaluate": evaluate,
        "predict_uncached": uncached,
        "rounds_seconds": medians,
        "targets": {f"{name} <=": value for name, value in TARGETS.items()},
        "met": {name: figures[name] <= value for name, value in TARGETS.items()},
        "checks": {
            **{
                f"predict_1024_{dtype}_max_abs_difference": float(
                    np.max(np.abs(service_batch[dtype] - in_process_batch[dtype]))
                )
                for dtype in DTYPES
            },
            "predict_1024_examples_max_abs_difference": float(
                np.max(np.abs(service_examples - in_process_batch["float32"]))
            ),
            "evaluate_loss_difference": abs(evaluation.loss - in_process_evaluation.loss),
            "evaluate_accuracy_difference": abs(
                evaluation.accuracy - in_process_evaluation.accuracy
            ),
            "models_loaded_in_cached_calls": bench.loads_in_cached_calls,
            "models_loaded_per_uncached_call": bench.loads_in_uncached_calls,
            "inference_worker_started_with_server": bench.worker_started_with_server,
            "inference_workers_started": bench.models.worker.started,
        },
    }


if __name__ == "__main__":
    sys.exit(main())
