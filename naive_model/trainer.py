"""The compiled, distributed training loop.

Built in layers, as Keras's trainer does: a per-replica step; `strategy.run`
of it; and a loop of N such steps inside one `tf.function` that traces once
(step counts are tensors under a fixed input signature). Loss and accuracy
accumulate on the devices in sync-on-read variables and are read once per
call. The outer loop (epochs, evaluation, checkpoints, export) is
`naive_model.loop.run_training`; `fit` is its plainest form.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from naive_model.config import TrainConfig
from naive_model.data import UINT8_SCALE, Dataset, to_features
from naive_model.distribute import host_place, is_chief
from naive_model.export import export_saved_model
from naive_model.layers import build_model
from naive_model.losses import per_example_loss
from naive_model.optimizers import make_optimizer
from naive_model.results import EpochResult, Metrics, Progress
from naive_model.streaming import (
    MappedDataset,
    host_rows,
    read_block,
    read_rows,
    read_shard,
    window_block,
)

_SCALAR_INT64 = tf.TensorSpec(shape=(), dtype=tf.int64)
COMPUTE_DTYPES = {"float32": tf.float32, "bfloat16": tf.bfloat16, "float16": tf.float16}


@dataclass(frozen=True)
class RestoredCheckpoint:
    path: str | None  # the checkpoint restored; None: there was none
    damaged: tuple[str, ...]  # newer ones skipped, each "ckpt-7 is damaged (why)"


class CheckpointDamaged(ValueError):
    """Every checkpoint of a directory fails to read: the message names each and why."""


def _checkpoint_candidates(directory: Path) -> list[Path]:
    """Checkpoint prefixes (`dir/ckpt-7`), newest first: those the list names, and any on disk.

    The `checkpoint` list file may itself be damaged or name files that are
    gone; both sources are read, and the numbers order them.
    """
    prefixes = {path.with_suffix("") for path in directory.glob("ckpt-*.index")}
    try:
        state = tf.train.get_checkpoint_state(str(directory))
    except Exception:  # a garbled list file (a parse error): the files on disk still count
        state = None
    if state is not None:
        for name in (*state.all_model_checkpoint_paths, state.model_checkpoint_path):
            if name:
                prefixes.add(directory / Path(name).name)

    def number(prefix: Path) -> int:
        tail = prefix.name.rsplit("-", 1)[-1]
        return int(tail) if tail.isdigit() else -1

    return sorted(prefixes, key=number, reverse=True)


def _unreadable(prefix: Path) -> str | None:
    """Why the checkpoint at `prefix` does not read whole (every tensor, checksums), or None."""
    try:
        reader = tf.train.load_checkpoint(str(prefix))
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    # The reader's errors have many types: IndexError for a short read,
    # DataLossError for a bad checksum, NotFoundError, ValueError, ...
    except Exception as error:
        return _first_line(str(error).replace(f"{prefix.parent}/", ""))
    return None


def _set_aside(prefix: Path) -> None:
    for path in prefix.parent.glob(f"{prefix.name}.*"):
        if not path.name.endswith(".damaged"):
            path.rename(path.with_name(path.name + ".damaged"))


def _first_line(message: str) -> str:
    """A reader's message as one short line (some run to several, with C++ frames)."""
    lines = message.strip().splitlines()
    line = lines[0] if lines else "unreadable"
    return line if len(line) <= 160 else line[:157] + "..."


class TrainingStopped(Exception):
    """Training was asked to stop between two compiled calls; the epoch is unfinished."""

    def __init__(self, epoch: int, step: int):
        super().__init__(f"training stopped in epoch {epoch} at global step {step}")
        self.epoch = epoch
        self.step = step


class TrainingDiverged(ArithmeticError):
    """The training loss became NaN or infinite."""

    def __init__(self, epoch: int, step: int, loss: float, learning_rate: float):
        super().__init__(
            f"loss became {loss} at epoch {epoch}, step {step} (learning rate {learning_rate:g})"
        )
        self.epoch = epoch
        self.step = step


def _sum_on_read(dtype: tf.DType) -> tf.Variable:
    """A per-replica accumulator: local adds, summed across replicas when read."""
    return tf.Variable(
        tf.zeros((), dtype),
        trainable=False,
        synchronization=tf.VariableSynchronization.ON_READ,
        aggregation=tf.VariableAggregation.SUM,
    )


def _all_gpus(strategy: tf.distribute.Strategy) -> bool:
    return all("GPU" in device.upper() for device in strategy.extended.worker_devices)


class Trainer:
    """Trains a NaiveSequential on a Dataset under a tf.distribute strategy.

    Args:
        config: what to build and how to train it.
        dataset: the data; the model's input and output sizes follow it.
        strategy: where to run; None means the default (current) strategy.
        eager: run the loop without tf.function, for debugging.
        window_batches: stream the training split a window of this many
            batches at a time (`naive_model.streaming`) instead of holding it
            whole on every device; None holds it.

    Raises:
        ValueError: an invalid config for this data set and replica count.
    """

    def __init__(
        self,
        config: TrainConfig,
        dataset: Dataset | MappedDataset,
        strategy: tf.distribute.Strategy | None = None,
        *,
        eager: bool = False,
        window_batches: int | None = None,
    ):
        if window_batches is not None and window_batches < 1:
            raise ValueError(f"window_batches must be positive or None, got {window_batches}")
        self.config = config
        self.dataset = dataset
        self.strategy = strategy or tf.distribute.get_strategy()
        self.num_replicas = self.strategy.num_replicas_in_sync
        config.validate(
            input_size=dataset.input_size,
            num_classes=dataset.num_classes,
            num_replicas=self.num_replicas,
        )
        self.global_batch_size = config.batch_size
        self.per_replica_batch_size = config.batch_size // self.num_replicas
        # Fixed shapes: the partial last batch is dropped (a new shuffle each
        # epoch brings the dropped examples back in later epochs).
        self.steps_per_epoch = len(dataset.x_train) // config.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"batch_size must be at most the {len(dataset.x_train)} training examples, "
                f"got {config.batch_size}"
            )
        self.streaming = window_batches is not None
        # Streaming: the devices hold one window, and a compiled call never crosses one.
        self.steps_per_window = min(window_batches or self.steps_per_epoch, self.steps_per_epoch)
        self.window_rows = self.steps_per_window * config.batch_size
        # Streaming on a cluster, each host reads and holds only its share of
        # every window: the rows of its replicas' slices of each global batch.
        self.host, self.hosts = host_place(self.strategy) if self.streaming else (0, 1)
        self.rows_per_step = config.batch_size // self.hosts  # of the data this host holds
        self.replicas_per_host = self.num_replicas // self.hosts
        self.held_window_rows = self.steps_per_window * self.rows_per_step
        self.steps_per_execution = min(
            config.steps_per_execution or self.steps_per_window, self.steps_per_window
        )
        self._windows: Iterator[tuple[tf.Tensor, tf.Tensor, tf.Tensor]] | None = None
        self._next_window_index = -1  # epoch * windows_per_epoch + window, of its next window
        self.compute_dtype = COMPUTE_DTYPES[config.precision]
        with self.strategy.scope():
            self.model = build_model(
                dataset.input_size, config.layers, initializer=config.initializer, seed=config.seed
            )
            self.optimizer = make_optimizer(config)
            # Built inside the scope before tracing: its slots must be mirrored too.
            self.optimizer.build(self.model.weights)
            self._epochs_done = tf.Variable(0, dtype=tf.int64, trainable=False)
            # Where an unfinished epoch stands, so a checkpoint taken between
            # compiled calls resumes mid-epoch: steps done, and the epoch's
            # loss sum and hits so far (the order is redrawn from the seed).
            self._step_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
            self._partial_loss = tf.Variable(0.0, dtype=tf.float64, trainable=False)
            self._partial_correct = tf.Variable(0, dtype=tf.int64, trainable=False)
            # The training data lives on the devices; each step gathers its batch
            # through the epoch's order. (Reordering the data once an epoch and
            # slicing was measured slower: the 188 MB gather costs more than
            # 468 small ones.) Images that came as uint8 stay uint8 there, 4x
            # smaller, and are scaled inside the step. Labels and predictions are
            # int64: TensorFlow's GPU kernels for int32 (the variable's gather,
            # Equal) keep their tensors in host memory, so int32 labels would
            # cross to the host and back on every step.
            # Streaming, they hold the current window's block of rows, and
            # `order` the order they train in.
            if self.streaming:
                images = np.zeros(
                    (self.held_window_rows, dataset.input_size), dataset.x_train.dtype
                )  # (held_window_rows, input_size)
                labels = np.zeros((self.held_window_rows,), np.int64)
            else:
                images = dataset.training_images()  # (N, input_size) uint8 or float32
                labels = np.asarray(dataset.y_train, dtype=np.int64)  # (N,)
            self._images = tf.Variable(images, trainable=False)
            self._labels = tf.Variable(labels, trainable=False)
            self._order = tf.Variable(tf.range(len(images), dtype=tf.int64), trainable=False)
            self._loss_sum = _sum_on_read(tf.float32)
            self._correct = _sum_on_read(tf.int64)
        self._checkpoint = tf.train.Checkpoint(
            model=self.model,
            optimizer=self.optimizer,
            epochs_done=self._epochs_done,
            step_in_epoch=self._step_in_epoch,
            partial_loss=self._partial_loss,
            partial_correct=self._partial_correct,
        )
        self._managers: dict[str, tf.train.CheckpointManager] = {}
        # XLA: on one device the whole in-graph loop is one XLA program (the
        # epoch's steps in a while loop, batches sliced and gathered inside),
        # as JAX compiles a `lax.scan` over an epoch. Over several devices
        # the loop stays a TensorFlow graph, since `strategy.run` cannot be
        # compiled, and XLA takes each replica's step: on GPUs only the
        # update too, since MirroredStrategy then sees the XLA context, skips
        # merge_call and all-reduces the gradients with collective ops
        # (CollectiveReduceV2, NCCL) that XLA compiles into an all-reduce of
        # its own. Over logical CPUs the all-reduce goes through merge_call
        # and ReductionToOneDevice, which XLA cannot compile: only the
        # gradients are jitted there.
        whole_loop_jit = config.jit_compile and not eager and self.num_replicas == 1
        if eager:
            self._train_loop = self._run_steps
        else:
            self._train_loop = tf.function(
                self._run_steps,
                input_signature=[_SCALAR_INT64] * 2,
                jit_compile=True if whole_loop_jit else None,
            )
        self._learn, self._gradients = self._learn_batch, self._gradients_batch
        if config.jit_compile and not eager and not whole_loop_jit:
            if _all_gpus(self.strategy):
                self._learn = tf.function(self._learn_batch, jit_compile=True)
            else:
                self._gradients = tf.function(self._gradients_batch, jit_compile=True)
        self._evaluate_batch = tf.function(
            self._evaluate_batch_eager,
            input_signature=[
                tf.TensorSpec((None, dataset.input_size), tf.float32),
                tf.TensorSpec((None,), tf.int64),
            ],
        )

    # -- the compiled core -------------------------------------------------

    def _replica_step(self, step_in_epoch: tf.Tensor) -> None:
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        # Replicas count from 0 on each host when the host holds only its share.
        local_replica = replica % self.replicas_per_host
        start = step_in_epoch * self.rows_per_step + tf.cast(
            local_replica * self.per_replica_batch_size, tf.int64
        )
        # tf.slice, whose size is static, not `order[start:stop]`: XLA cannot
        # prove that strided slice has n elements, so it pads the batch to the
        # whole order and masks it (every step computed on all the data).
        indices = tf.slice(self._order, [start], [self.per_replica_batch_size])  # (per_replica,)
        images = tf.gather(self._images, indices)  # (per_replica, input_size)
        labels = tf.gather(self._labels, indices)  # (per_replica,)
        loss_sum, correct = self._learn(images, labels)
        self._loss_sum.assign_add(loss_sum)
        self._correct.assign_add(correct)

    def _learn_batch(self, images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Forward, backward and update on one replica's batch; returns loss sum and hits."""
        gradients, loss_sum, correct = self._gradients(images, labels)
        self.optimizer.apply_gradients(zip(gradients, self.model.weights, strict=True))
        return loss_sum, correct

    def _gradients_batch(self, images: tf.Tensor, labels: tf.Tensor):
        images = self._to_compute_dtype(images)  # (per_replica, input_size)
        with tf.GradientTape() as tape:
            losses, scores = per_example_loss(self.model, images, labels)  # (per_replica,)
            # Divide by the global batch: the optimizer sums gradients over
            # replicas, so the sum is the gradient of the global mean loss.
            loss = tf.reduce_sum(losses) / self.global_batch_size
            # float16 only: the LossScaleOptimizer's scale (others return the loss).
            scaled = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled, self.model.weights)
        predicted = tf.argmax(scores, axis=1, output_type=tf.int64)  # (per_replica,)
        hits = tf.reduce_sum(tf.cast(predicted == labels, tf.int64))
        return gradients, tf.reduce_sum(losses), hits

    def _to_compute_dtype(self, images: tf.Tensor) -> tf.Tensor:
        """uint8 pixels scaled as `data.to_features` does, then cast to the compute dtype."""
        if images.dtype == tf.uint8:
            # The host's values to within one ulp: Grappler turns the division
            # by a constant into a multiplication by its reciprocal.
            images = tf.cast(images, tf.float32) / UINT8_SCALE
        return tf.cast(images, self.compute_dtype)

    def _run_steps(self, first_step: tf.Tensor, num_steps: tf.Tensor) -> None:
        for offset in tf.range(num_steps):
            self.strategy.run(self._replica_step, args=(first_step + offset,))

    # -- the host loop ------------------------------------------------------

    @property
    def epoch(self) -> int:
        """Epochs completed."""
        return int(self._epochs_done.numpy())

    @property
    def step_in_epoch(self) -> int:
        """Steps done of an unfinished epoch (0 between epochs)."""
        return int(self._step_in_epoch.numpy())

    @property
    def global_step(self) -> int:
        """Steps run, over every epoch.

        With float16 this counts the steps whose update the loss scale skipped
        (non-finite gradients), which the optimizer's `iterations` does not.
        """
        return self.epoch * self.steps_per_epoch + self.step_in_epoch

    @property
    def data_devices(self) -> dict[str, tuple[str, ...]]:
        """Where the training data lives: each replica's device for images, labels and order."""

        def devices(variable: tf.Variable) -> tuple[str, ...]:
            return tuple(copy.device for copy in getattr(variable, "values", (variable,)))

        return {
            "images": devices(self._images),
            "labels": devices(self._labels),
            "order": devices(self._order),
        }

    @property
    def trace_count(self) -> int:
        """How many times the training loop was traced (1 when all is well)."""
        if isinstance(self._train_loop, tf.types.experimental.PolymorphicFunction):
            return self._train_loop.experimental_get_tracing_count()
        return 0

    def train_epoch(
        self,
        on_progress: Callable[[Progress], None] | None = None,
        *,
        first_call_steps: int | None = None,
        between_calls: Callable[[], None] | None = None,
    ) -> EpochResult:
        """Train one epoch (or the rest of one) in calls of `steps_per_execution` steps.

        An epoch a checkpoint left unfinished continues where it stood, with
        the same order and the loss and accuracy it had so far.

        Args:
            on_progress: called after every compiled call with the epoch so far.
            first_call_steps: a shorter first call, so the first report comes
                right after tracing (the loop traces once whatever the count).
            between_calls: called between two compiled calls, when the
                trainer's position is saved in its variables: a checkpoint
                taken there resumes mid-epoch. It may raise TrainingStopped.

        Raises:
            TrainingDiverged: the loss became NaN or infinite; nothing of the
                call that diverged is kept in the position.
        """
        epoch = self.epoch + 1
        epoch_start = time.perf_counter()
        start_step = int(self._step_in_epoch.numpy())
        base_loss, base_correct = (
            float(self._partial_loss.numpy()),
            int(self._partial_correct.numpy()),
        )
        self._start_epoch(epoch, start_step)
        step_in_epoch = start_step
        loss = accuracy = 0.0
        while step_in_epoch < self.steps_per_epoch:
            if step_in_epoch > start_step and between_calls is not None:
                between_calls()
            call_size = self.steps_per_execution
            if step_in_epoch == start_step and first_call_steps:
                call_size = min(first_call_steps, call_size)
            steps = min(call_size, self.steps_per_epoch - step_in_epoch)
            first = step_in_epoch
            if self.streaming:
                first = step_in_epoch % self.steps_per_window  # the step in its window
                if first == 0 or step_in_epoch == start_step:
                    self._next_window()
                steps = min(steps, self.steps_per_window - first)
            call_start = time.perf_counter()
            self._train_loop(tf.constant(first, tf.int64), tf.constant(steps, tf.int64))
            step_in_epoch += steps
            # Reading the accumulators is the one host sync of the call; the
            # divergence check rides on it at no extra cost.
            loss_sum = base_loss + float(self._loss_sum.numpy())
            correct = base_correct + int(self._correct.numpy())
            step = (epoch - 1) * self.steps_per_epoch + step_in_epoch
            self._check_finite(loss_sum, epoch, step)
            self._remember_position(step_in_epoch, loss_sum, correct)
            examples_so_far = step_in_epoch * self.global_batch_size
            loss, accuracy = loss_sum / examples_so_far, correct / examples_so_far
            if on_progress is not None:
                seconds = time.perf_counter() - call_start
                on_progress(
                    Progress(
                        epoch=epoch,
                        epochs=self.config.epochs,
                        step=step,
                        steps_per_epoch=self.steps_per_epoch,
                        step_in_epoch=step_in_epoch,
                        loss=loss,
                        accuracy=accuracy,
                        examples_per_second=steps * self.global_batch_size / seconds,
                        examples=step * self.global_batch_size,
                        call_steps=steps,
                        call_examples=steps * self.global_batch_size,
                        call_seconds=seconds,
                    )
                )
        self._epochs_done.assign_add(1)
        self._remember_position(0, 0.0, 0)
        return EpochResult(
            epoch=epoch,
            loss=loss,
            accuracy=accuracy,
            steps=self.steps_per_epoch - start_step,
            examples=(self.steps_per_epoch - start_step) * self.global_batch_size,
            seconds=time.perf_counter() - epoch_start,
        )

    def _check_finite(self, loss_sum: float, epoch: int, step: int) -> None:
        # A NaN or infinite loss poisons the sum, so one look per call finds it.
        if not math.isfinite(loss_sum):
            raise TrainingDiverged(epoch, step, loss_sum, self.config.learning_rate)

    def _remember_position(self, step_in_epoch: int, loss_sum: float, correct: int) -> None:
        self._step_in_epoch.assign(step_in_epoch)
        self._partial_loss.assign(loss_sum)
        self._partial_correct.assign(correct)

    def fit(
        self,
        epochs: int | None = None,
        *,
        on_progress: Callable[[Progress], None] | None = None,
        on_epoch_end: Callable[[EpochResult], None] | None = None,
    ) -> list[EpochResult]:
        """Train `epochs` more epochs (default: the config's)."""
        results = []
        for _ in range(epochs or self.config.epochs):
            results.append(self.train_epoch(on_progress))
            if on_epoch_end is not None:
                on_epoch_end(results[-1])
        return results

    def _start_epoch(self, epoch: int, start_step: int = 0) -> None:
        if self.streaming:
            index = epoch * self.windows_per_epoch + start_step // self.steps_per_window
            if index != self._next_window_index:  # the first epoch, or a resume
                self._windows = self._window_stream(index)
                self._next_window_index = index
        elif self.config.shuffle:
            # Seeded by (seed, epoch): every worker of a cluster draws the same order.
            # Drawn on the host, where every build of TensorFlow has the kernel.
            with tf.device("/cpu:0"):
                order = tf.random.experimental.stateless_shuffle(
                    tf.range(len(self.dataset.x_train), dtype=tf.int64),
                    seed=[self.config.seed, epoch],
                )
            self._order.assign(order)
        for accumulator in (self._loss_sum, self._correct):
            accumulator.assign(tf.zeros_like(accumulator.read_value()))

    @property
    def data_share(self) -> str | None:
        """What of each window this host reads, in words; None when it reads all of it."""
        if self.hosts == 1:
            return None
        return (
            f"host {self.host} of {self.hosts} reads and holds {self.held_window_rows} "
            f"of each window's {self.window_rows} rows"
        )

    @property
    def windows_per_epoch(self) -> int:
        return math.ceil(self.steps_per_epoch / self.steps_per_window)

    def _window_stream(self, first_index: int) -> Iterator[tuple]:
        """Every window from `first_index` on (epoch * windows_per_epoch + window), read ahead.

        Each window is one block of the file as it lies there, with the order
        its rows train in (`streaming.window_block`): the devices gather them
        through `_order`, as they gather a held split's, so the host only copies.
        One stream runs across epochs, so the next epoch's first window is read
        while this one's last trains: an iterator made each epoch traced its
        function and read that window with the devices idle (`python -m
        benchmarks.datasets --only throughput`: 0.77-0.81 of the in-memory
        speed, against 1.00 with one stream).
        """
        x, y, rows = self.dataset.x_train, self.dataset.y_train, self.window_rows
        config = self.config
        windows = self.windows_per_epoch

        def read(index):
            epoch, window = divmod(int(index), windows)
            start, order = window_block(
                len(x), rows, window, seed=config.seed, epoch=epoch, shuffle=config.shuffle
            )
            count = len(order)
            # Padding rows (past a short block's end) stay where they are.
            order = np.concatenate([order, np.arange(count, rows)])  # (window_rows,)
            if self.hosts == 1:
                return (*read_block(x, y, start, count, rows), order)
            mine = host_rows(order, config.batch_size, self.host, self.hosts)
            return read_shard(x, y, start, count, mine)

        dtype = tf.as_dtype(x.dtype)
        stream = (
            tf.data.Dataset.range(first_index, 2**62)
            .map(lambda index: tf.numpy_function(read, [index], (dtype, tf.int64, tf.int64)))
            .prefetch(1)
        )
        return iter(stream)

    def _next_window(self) -> None:
        assert self._windows is not None
        images, labels, order = next(self._windows)  # (held_window_rows, input_size), 2x (held,)
        self._next_window_index += 1
        self._images.assign(images)
        self._labels.assign(labels)
        self._order.assign(order)

    # -- evaluation, checkpoints, export -------------------------------------

    def _evaluate_batch_eager(self, images, labels):
        images = self._to_compute_dtype(images)  # (batch, input_size)
        losses, scores = per_example_loss(self.model, images, labels)  # (batch,)
        predicted = tf.argmax(scores, axis=1, output_type=tf.int64)
        return tf.reduce_sum(losses), tf.reduce_sum(tf.cast(predicted == labels, tf.int64))

    def evaluate(self, x: np.ndarray | None = None, y: np.ndarray | None = None) -> Metrics:
        """Loss and accuracy on (x, y), by default the data set's test split.

        The model computes in the config's precision, as it trained (the
        exported SavedModel computes in float32).
        """
        if x is None or y is None:
            x, y = self.dataset.x_test, self.dataset.y_test
        loss_sum, correct = 0.0, 0
        batch = 2048
        for start in range(0, len(x), batch):
            batch_loss, batch_correct = self._evaluate_batch(
                tf.constant(to_features(read_rows(x, start, start + batch)), tf.float32),
                tf.constant(read_rows(y, start, start + batch), tf.int64),
            )
            loss_sum += float(batch_loss)
            correct += int(batch_correct)
        return Metrics(loss=loss_sum / len(x), accuracy=correct / len(x), examples=len(x))

    def _manager(self, directory: str | Path, max_to_keep: int) -> tf.train.CheckpointManager:
        directory = Path(directory)
        if not is_chief(self.strategy):
            # Every worker must save (the save is collective); only the chief's copy is kept.
            resolver = self.strategy.cluster_resolver
            directory = directory / f".worker-{resolver.task_type}-{resolver.task_id}"
        key = str(directory)
        if key not in self._managers:
            self._managers[key] = tf.train.CheckpointManager(
                self._checkpoint, key, max_to_keep=max_to_keep
            )
        return self._managers[key]

    def save_checkpoint(self, directory: str | Path, *, max_to_keep: int = 3) -> str:
        """Save model, optimizer and progress; keep the newest `max_to_keep`."""
        manager = self._manager(directory, max_to_keep)
        path = manager.save(checkpoint_number=self.global_step)
        if not is_chief(self.strategy):
            shutil.rmtree(manager.directory, ignore_errors=True)
        return path

    def restore_checkpoint(self, directory: str | Path) -> str | None:
        """Restore the newest intact checkpoint in `directory`; None when there is none."""
        return self.restore_newest_intact(directory).path

    def restore_newest_intact(self, directory: str | Path) -> RestoredCheckpoint:
        """Restore the newest checkpoint that reads whole, newest first, skipping damaged ones.

        A damaged one (a truncated or missing file, flipped bytes) is renamed
        aside (`ckpt-7.index.damaged`) and the checkpoint list is rewritten
        without it, so later saves and resumes do not meet it again.

        Raises:
            CheckpointDamaged: there are checkpoints and none of them reads.
        """
        directory = Path(directory)
        damaged: list[str] = []
        candidates = _checkpoint_candidates(directory)
        for index, prefix in enumerate(candidates):
            # Read every tensor before restoring any: a restore that fails half way
            # would leave some variables from this checkpoint and some from none.
            problem = _unreadable(prefix)
            if problem is not None:
                damaged.append(f"{prefix.name} is damaged ({problem})")
                _set_aside(prefix)
                continue
            self._checkpoint.restore(str(prefix)).assert_existing_objects_matched()
            intact = [
                str(path) for path in candidates[index:] if path.with_suffix(".index").exists()
            ]
            if damaged:
                tf.compat.v1.train.update_checkpoint_state(
                    str(directory), str(prefix), all_model_checkpoint_paths=intact[::-1]
                )
            return RestoredCheckpoint(str(prefix), tuple(damaged))
        if damaged:
            raise CheckpointDamaged(
                f"every checkpoint in {directory} is damaged: {'; '.join(damaged)}"
            )
        return RestoredCheckpoint(None, ())

    def export(self, path: str | Path) -> None:
        """Write a SavedModel whose serving_default maps inputs to probabilities."""
        export_saved_model(self.model, self.dataset.input_size, path)
