"""The book's job as a JobSpec, for the demo, the tests and the benchmarks."""

from __future__ import annotations

from ntrain.v1 import training_pb2

from naive_model.config import TrainConfig


def book_job_spec(overrides: training_pb2.JobSpec | None = None) -> training_pb2.JobSpec:
    """The book's network and its training as a JobSpec: `TrainConfig`'s defaults.

    784 -> 512 relu -> 10 softmax, Glorot, RMSprop 1e-3, batch 128, on MNIST;
    the fields set in `overrides` replace these (merged as protobuf merges).
    """
    defaults = TrainConfig()
    spec = training_pb2.JobSpec(
        layers=[
            training_pb2.LayerSpec(units=layer.units, activation=layer.activation)
            for layer in defaults.layers
        ],
        initializer=defaults.initializer,
        optimizer=training_pb2.OptimizerSpec(
            name=defaults.optimizer, learning_rate=defaults.learning_rate
        ),
        batch_size=defaults.batch_size,
        epochs=defaults.epochs,
        dataset="mnist",
        strategy=training_pb2.StrategySpec(name="auto"),
        seed=defaults.seed,
    )
    if overrides is not None:
        if overrides.layers:
            del spec.layers[:]  # merging would append to the book's layers
        spec.MergeFrom(overrides)
    return spec
