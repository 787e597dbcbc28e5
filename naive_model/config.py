"""Training configuration as plain data.

This module imports nothing heavy (no TensorFlow, no numpy) so that a server can
validate a request without loading TensorFlow. Every invalid value raises
`ValueError` naming the field and the value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

ACTIVATIONS = ("relu", "softmax", "sigmoid", "tanh", "linear")
INITIALIZERS = ("seed", "glorot")
OPTIMIZERS = ("sgd", "momentum", "adagrad", "rmsprop", "adam")
STRATEGIES = ("auto", "cpu", "gpu", "mirrored", "multi_worker")
# The dtype a step computes in. Weights and optimizer state stay float32 in all
# three; float16 also scales the loss (Keras's LossScaleOptimizer).
PRECISIONS = ("float32", "bfloat16", "float16")

# A model whose weights and optimizer state exceed this is refused before any
# tensor is built. The bound is generous for a dense network and keeps a typo
# (units=10**9) from taking a worker's whole memory.
MAX_MODEL_BYTES = 4 * 1024**3
MAX_UNITS = 1_000_000
MAX_LAYERS = 64
MAX_BATCH_SIZE = 1 << 20
MAX_EPOCHS = 100_000
# Seeds go to TensorFlow's int32 initializer seeds and int64 shuffle seeds.
MAX_SEED = 2**31 - 1
FLOAT32_MAX = 3.4028234663852886e38

# Error messages show at most about this many characters of a value: a client
# may send a megabyte where a name belongs, and an answer echoing it whole
# fails itself (gRPC's metadata limit) and floods the logs.
SHOWN_CHARACTERS = 100

# The runtime (Python, TensorFlow and what Keras imports beside it) is measured,
# not assumed: each worker reports its resident size right after its imports
# (`Ready.resident_bytes`), and admission counts the largest seen. Until a worker
# has reported, this stands in: above every install measured (TensorFlow 2.21 on
# a CPU host: 575 MiB with the server extra alone, about 690 with JAX and SciPy,
# 760 where Ray's extra brings pandas and pyarrow; Keras imports what it finds).
RUNTIME_FALLBACK_BYTES = 1024 * 1024**2
# What a run allocates beyond its import whatever its model: the traced step's
# graph and kernels, the strategy's devices, and the checkpoint and SavedModel
# code, imported on first use, with their buffers; malloc keeps some freed
# memory besides. Measured: peaks exceed the model's and data's own bytes by
# 40-60 MiB, and the same model's peak differs by up to 10% between runs.
FIRST_USE_BYTES = 192 * 1024**2

# Variables the optimizer keeps per weight (slots), used to size the model.
_OPTIMIZER_SLOTS = {"sgd": 0, "momentum": 1, "adagrad": 1, "rmsprop": 1, "adam": 2}


def shown(value: object, limit: int = SHOWN_CHARACTERS) -> str:
    """A value as an error message shows it: its repr, cut to about `limit` characters."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value)} characters)" if isinstance(value, str | bytes) else ""
    return f"{text[:limit]}...{size}"


@dataclass(frozen=True, kw_only=True)
class LayerSpec:
    """One dense layer: how many units and which activation follows it."""

    units: int
    activation: str = "relu"

    def validate(self, index: int) -> None:
        if not isinstance(self.units, int) or not 0 < self.units <= MAX_UNITS:
            raise ValueError(
                f"layers[{index}].units must be an integer in 1..{MAX_UNITS}, got {self.units!r}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"layers[{index}].activation must be one of {', '.join(ACTIVATIONS)}, "
                f"got {shown(self.activation)}"
            )


def _default_layers() -> tuple[LayerSpec, ...]:
    return (LayerSpec(units=512, activation="relu"), LayerSpec(units=10, activation="softmax"))


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that decides how a model is built and trained.

    `batch_size` is the global batch: with N replicas each takes batch_size / N.
    `steps_per_execution` is how many steps run inside one compiled call
    (0 means a whole epoch per call). `precision` is the dtype the layers
    compute in (mixed precision: the weights and the loss stay float32).
    """

    layers: tuple[LayerSpec, ...] = field(default_factory=_default_layers)
    initializer: str = "glorot"
    optimizer: str = "rmsprop"
    learning_rate: float = 1e-3
    momentum: float = 0.0
    batch_size: int = 128
    epochs: int = 5
    steps_per_execution: int = 0
    jit_compile: bool = False
    seed: int = 0
    shuffle: bool = True
    precision: str = "float32"

    def validate(
        self,
        *,
        input_size: int | None = None,
        num_classes: int | None = None,
        num_replicas: int = 1,
    ) -> None:
        """Raise ValueError naming the first invalid field.

        Args:
            input_size: features per example, when the data set is known.
            num_classes: classes in the data set, checked against the last layer.
            num_replicas: replicas the global batch is split over.
        """
        if not self.layers:
            raise ValueError("layers must hold at least one layer, got none")
        if len(self.layers) > MAX_LAYERS:
            raise ValueError(
                f"layers must hold at most {MAX_LAYERS} layers, got {len(self.layers)}"
            )
        for index, layer in enumerate(self.layers):
            layer.validate(index)
        if self.initializer not in INITIALIZERS:
            raise ValueError(
                f"initializer must be one of {', '.join(INITIALIZERS)}, "
                f"got {shown(self.initializer)}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {shown(self.optimizer)}"
            )
        _check_positive_finite("learning_rate", self.learning_rate)
        if self.learning_rate > FLOAT32_MAX:  # the optimizer holds it as float32
            raise ValueError(
                f"learning_rate must be at most {FLOAT32_MAX:.7g} (float32's largest), "
                f"got {shown(self.learning_rate)}"
            )
        if not isinstance(self.momentum, int | float) or not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not isinstance(self.batch_size, int) or not 0 < self.batch_size <= MAX_BATCH_SIZE:
            raise ValueError(
                f"batch_size must be an integer in 1..{MAX_BATCH_SIZE}, got {self.batch_size!r}"
            )
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be at least 1, got {num_replicas!r}")
        if self.batch_size % num_replicas:
            raise ValueError(
                f"batch_size must be divisible by the replica count {num_replicas}, "
                f"got {self.batch_size}"
            )
        if not isinstance(self.epochs, int) or not 0 < self.epochs <= MAX_EPOCHS:
            raise ValueError(f"epochs must be an integer in 1..{MAX_EPOCHS}, got {self.epochs!r}")
        if not isinstance(self.steps_per_execution, int) or self.steps_per_execution < 0:
            raise ValueError(
                "steps_per_execution must be 0 (a whole epoch) or a positive integer, "
                f"got {self.steps_per_execution!r}"
            )
        if not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer in 0..{MAX_SEED}, got {self.seed!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if num_classes is not None and self.layers[-1].units != num_classes:
            raise ValueError(
                f"layers[{len(self.layers) - 1}].units must equal the data set's "
                f"{num_classes} classes, got {self.layers[-1].units}"
            )
        if input_size is not None:
            needed = self.model_bytes(input_size)
            if needed > MAX_MODEL_BYTES:
                raise ValueError(
                    f"layers describe a model needing about {needed / 1024**3:.1f} GiB for "
                    f"weights and optimizer state, more than the {MAX_MODEL_BYTES / 1024**3:.0f} "
                    f"GiB limit; got units {[layer.units for layer in self.layers]}"
                )

    def parameter_count(self, input_size: int) -> int:
        """Weights and biases of the model for inputs of `input_size` features."""
        count, fan_in = 0, input_size
        for layer in self.layers:
            count += fan_in * layer.units + layer.units
            fan_in = layer.units
        return count

    def model_bytes(self, input_size: int) -> int:
        """float32 bytes for the weights, their gradients and the optimizer slots."""
        copies = 2 + _OPTIMIZER_SLOTS.get(self.optimizer, 2)
        return 4 * copies * self.parameter_count(input_size)

    def memory_estimate(
        self,
        *,
        input_size: int,
        num_train: int,
        num_test: int,
        num_replicas: int = 1,
        feature_bytes: int = 4,
    ) -> MemoryEstimate:
        """What a training run of this config needs at its peak; see `MemoryEstimate`.

        Args:
            feature_bytes: per feature of the training images as they came: 1
                for uint8 pixels (kept so on the device), 4 for float32.
        """
        weights = 4 * self.parameter_count(input_size)
        slots = _OPTIMIZER_SLOTS.get(self.optimizer, 2)
        per_replica_batch = -(-self.batch_size // max(num_replicas, 1))
        # Forward values and their gradients, for each layer's output.
        activations = 4 * 2 * per_replica_batch * sum(layer.units for layer in self.layers)
        return MemoryEstimate(
            weights=weights,
            optimizer_slots=slots * weights,
            # The gradients, the update's temporaries (one, or one per slot), activations.
            step=(1 + max(1, slots)) * weights + activations,
            # The initializer's random draw, its scaled form and the variable.
            variable_copies=3 * weights,
            # The training split as each replica's variables: its images as
            # they came (uint8 or float32), int64 labels and the int64 epoch order.
            device_data=num_train * (feature_bytes * input_size + 8 + 8),
            # The images as loaded and their float32 form (a uint8 training
            # split keeps both), the labels as loaded (int64 at worst) and as int32.
            host_data=(num_train + num_test) * ((feature_bytes + 4) * input_size + 8 + 4),
            replicas=max(num_replicas, 1),
        )

    @property
    def effective_momentum(self) -> float:
        """The momentum the optimizer uses: "momentum" defaults to 0.9."""
        if self.optimizer == "momentum" and self.momentum == 0.0:
            return 0.9
        return float(self.momentum)


@dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    """Bytes a training run needs at its peak, by what holds them.

    A run's memory peaks at one of two moments: a training step (each
    replica's gradients, the optimizer's temporaries and the activations) or
    the creation of variables when the model is built or exported (the
    initializer's random draw and its scaled form beside the new variable,
    once per run). Beside them the host holds the runtime, as a worker
    measured it after its imports (`host_bytes(runtime_bytes=...)`), and what
    the run allocates on first use whatever its model (`first_use`).
    Calibrated against the peak resident memory of worker processes
    (benchmarks/memory_peak.py, every config, in each documented install:
    the server extra, with Ray's, and with the dev, Ray and bench extras):
    1.035 to 1.22 times the peak with the server extra alone (a 589 MiB
    runtime; [300000, 10] SGD's export closest, the wide activations' step
    farthest), 1.033 to 1.236 with Ray's (634 MiB), 1.077 to 1.209 with
    all extras (750 MiB; the mirrored and [300000, 10] runs not measured).
    """

    weights: int  # one float32 copy of the weights and biases
    optimizer_slots: int  # the optimizer's per-weight variables (momentum, RMS, Adam's m and v)
    step: int  # per replica: gradients, update temporaries, activations at its batch
    variable_copies: int  # building or exporting the model, once per run
    device_data: int  # per replica: the training split held in variables
    host_data: int  # the data set loaded on the host
    replicas: int
    first_use: int = FIRST_USE_BYTES  # on the host: graphs, writers, allocator slack

    @property
    def per_device(self) -> int:
        """What one replica's device holds at the peak (a GPU's share of the run)."""
        return (
            self.weights
            + self.optimizer_slots
            + self.device_data
            + max(self.variable_copies, self.step)
        )

    def host_bytes(self, *, runtime_bytes: int, on_gpus: bool = False) -> int:
        """What the host needs: the runtime, the data, and the replicas when they are on it.

        Args:
            runtime_bytes: a worker's resident size after its imports, as
                measured in this install (`Ready.resident_bytes`).
            on_gpus: the replicas' tensors are on GPUs, not in host memory.
        """
        host = runtime_bytes + self.first_use + self.host_data
        if on_gpus:
            return host
        persistent = self.weights + self.optimizer_slots + self.device_data
        return (
            host + self.replicas * persistent + max(self.variable_copies, self.replicas * self.step)
        )


@dataclass(frozen=True, kw_only=True)
class StrategyConfig:
    """Which `tf.distribute` strategy runs the model.

    kind: auto (mirrored over every GPU when several are visible, one GPU when
    one is, else the CPU), cpu, gpu (one device), mirrored (`devices`, or the
    first `num_devices` GPUs, or logical CPUs when there is no GPU), or
    multi_worker (`cluster` is a TF_CONFIG-style dict; None reads TF_CONFIG).
    """

    kind: str = "auto"
    num_devices: int = 0
    devices: tuple[str, ...] = ()
    cluster: dict | None = None

    def validate(self) -> None:
        if self.kind not in STRATEGIES:
            raise ValueError(
                f"strategy must be one of {', '.join(STRATEGIES)}, got {shown(self.kind)}"
            )
        if not isinstance(self.num_devices, int) or self.num_devices < 0:
            raise ValueError(
                f"num_devices must be a non-negative integer, got {self.num_devices!r}"
            )


def _check_positive_finite(name: str, value: float) -> None:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a positive finite number, got {shown(value)}")
