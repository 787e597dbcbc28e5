"""What a 1,024-image float32 Predict costs before the model: gRPC alone, and the worker hop.

    python -m benchmarks.predict_floor --json FILE [--rounds 7] [--calls 10]

In one process, as `benchmarks.inference` runs its server and client, three
entries interleaved round after round (the median of `--calls` calls each):

  in_process   the book's network (784 -> 512 relu -> 10 softmax, untrained:
               the same arithmetic) called on the array, as a SavedModel
  grpc         a gRPC server on loopback that parses the PredictRequest,
               checks its tensor as the real servicer does, and answers with
               a prebuilt 1,024 x 10 reply: the client builds the request
               from the array and reads the reply into one
  grpc_pipe    the same, the array also sent to another process through a
               multiprocessing Pipe (pickled, as the inference worker's
               socket carried it) and 40 KB sent back

grpc / in_process is the floor of `benchmarks.inference`'s float32 ratio
with no worker hop at all; grpc_pipe - grpc is what the hop through a socket
cost (shared memory took its place: service.processes.shared_inputs).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
from ntrain.v1 import training_pb2 as pb

from benchmarks.report import machine, paired_ratio, publish, side_by_side
from ntrain.client.tensors import fill_tensor, tensor_array, tensor_message
from service.api import convert
from service.jobs import validation

EXAMPLES, INPUT_SIZE, CLASSES = 1024, 784, 10


def _echo(conn) -> None:
    reply = np.zeros((EXAMPLES, CLASSES), np.float32)
    while conn.recv() is not None:
        conn.send(reply)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=10)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from naive_model.config import LayerSpec
    from naive_model.data import to_features
    from naive_model.export import export_saved_model, load_saved_model, predict_saved_model
    from naive_model.layers import build_model

    layers = (
        LayerSpec(units=512, activation="relu"),
        LayerSpec(units=CLASSES, activation="softmax"),
    )
    with tempfile.TemporaryDirectory() as folder:
        export_saved_model(build_model(INPUT_SIZE, layers), INPUT_SIZE, Path(folder) / "model")
        serve = load_saved_model(Path(folder) / "model")
    x = np.random.default_rng(0).random((EXAMPLES, INPUT_SIZE), dtype=np.float32)
    zeros = np.zeros((EXAMPLES, CLASSES), np.float32)
    reply = pb.PredictResponse(probabilities=tensor_message(zeros))

    parent, child = multiprocessing.Pipe()
    echo = multiprocessing.get_context("spawn").Process(target=_echo, args=(child,), daemon=True)
    echo.start()

    def checked(request: pb.PredictRequest) -> np.ndarray:
        inputs = convert.tensor_from_proto(request.tensor, "tensor")
        validation.check_predict_tensor(inputs, INPUT_SIZE)
        return inputs

    def bare(request, context):
        checked(request)
        return reply

    def piped(request, context):
        parent.send(checked(request))
        return pb.PredictResponse(probabilities=tensor_message(parent.recv()))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            handler,
            request_deserializer=pb.PredictRequest.FromString,
            response_serializer=pb.PredictResponse.SerializeToString,
        )
        for name, handler in (("Bare", bare), ("Piped", piped))
    }
    generic = grpc.method_handlers_generic_handler("floor.Floor", handlers)
    server.add_generic_rpc_handlers((generic,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")

    def through(method: str) -> Callable[[], object]:
        call = channel.unary_unary(
            f"/floor.Floor/{method}",
            request_serializer=pb.PredictRequest.SerializeToString,
            response_deserializer=pb.PredictResponse.FromString,
        )

        def request_of() -> pb.PredictRequest:  # as ntrain.client builds it
            request = pb.PredictRequest(job_id="j")
            fill_tensor(request.tensor, x)
            return request

        return lambda: tensor_array(call(request_of(), timeout=60).probabilities)

    calls = {
        "in_process": lambda: predict_saved_model(serve, to_features(x)),
        "grpc": through("Bare"),
        "grpc_pipe": through("Piped"),
    }

    def timer(call: Callable[[], object]) -> Callable[[], float]:
        def run() -> float:
            times = []
            for _ in range(args.calls):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            return statistics.median(times)

        return run

    for call in calls.values():  # traced, connected, warmed
        call()
    load_before = os.getloadavg()
    rounds = side_by_side({name: timer(call) for name, call in calls.items()}, args.rounds)
    parent.send(None)
    server.stop(0)

    def ms(name: str) -> float:
        return round(1000 * statistics.median(rounds[name]), 2)

    publish(
        {
            "benchmark": "predict_floor",
            "command": f"python -m benchmarks.predict_floor --rounds {args.rounds} "
            f"--calls {args.calls}",
            "machine": machine(),
            "load_average": {"before": load_before, "after": os.getloadavg()},
            "median_ms": {name: ms(name) for name in calls},
            "hop_ms": round(ms("grpc_pipe") - ms("grpc"), 2),
            "grpc/in_process_paired_median": round(
                paired_ratio(rounds["grpc"], rounds["in_process"]), 3
            ),
            "grpc_pipe/in_process_paired_median": round(
                paired_ratio(rounds["grpc_pipe"], rounds["in_process"]), 3
            ),
            "rounds_seconds": rounds,
        },
        args.json,
    )


if __name__ == "__main__":
    main()
