"""JAX peers of naive_model.Trainer: the same model, step and epoch, written in JAX.

    jax_scan  the whole epoch is one jax.jit program: the epoch's permutation,
              then lax.scan over its batches
    jax_step  one jax.jit call per batch from a Python loop

What each computes per step, as naive_model.Trainer does on one replica:
  - gather the batch's 128 rows of images and labels, through the epoch's
    permutation, from arrays that stay on the device all run;
  - hidden = relu(x @ W1 + b1) (128, 512); logits = hidden @ W2 + b2 (128, 10);
  - per-example cross-entropy from the logits (minus the log-softmax at the
    label, as tf.nn.sparse_softmax_cross_entropy_with_logits computes it);
  - loss = their sum / 128; the gradients of W1, b1, W2, b2; SGD w -= lr * g;
  - the loss sum and the count of correct argmax predictions added to
    accumulators on the device.
Per epoch: a new permutation of all training examples (seeded by the
epoch), of which the first steps * 128 are used (the partial batch is
dropped); the accumulators are read on the host once, at the end. An epoch
is timed from the permutation to the host holding its loss and accuracy, as
Trainer.train_epoch times its own.

Weights: glorot uniform, zero biases (the same distribution as Trainer's,
drawn from JAX's generator). JAX runs in 32 bits: labels and the count of
correct predictions are int32 (Trainer counts in int64).
"""

from __future__ import annotations

import time
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from naive_model.data import Dataset
from naive_model.results import EpochResult

Params = list[tuple[jax.Array, jax.Array]]  # [(W, b)] per layer


def glorot_params(key: jax.Array, sizes: tuple[int, ...]) -> Params:
    """Glorot-uniform weights and zero biases for dense layers of `sizes`."""
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        key, subkey = jax.random.split(key)
        limit = (6.0 / (fan_in + fan_out)) ** 0.5
        weights = jax.random.uniform(subkey, (fan_in, fan_out), minval=-limit, maxval=limit)
        params.append((weights, jnp.zeros((fan_out,))))
    return params


def losses_and_logits(
    params: Params, images: jax.Array, labels: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Per-example cross-entropy and the logits of the relu/softmax MLP."""
    (w1, b1), (w2, b2) = params
    hidden = jax.nn.relu(images @ w1 + b1)  # (batch, hidden)
    logits = hidden @ w2 + b2  # (batch, classes)
    log_probabilities = jax.nn.log_softmax(logits)  # (batch, classes)
    losses = -jnp.take_along_axis(log_probabilities, labels[:, None], axis=1)[:, 0]  # (batch,)
    return losses, logits


def train_step(
    params: Params, images: jax.Array, labels: jax.Array, learning_rate: float
) -> tuple[Params, jax.Array, jax.Array]:
    """One SGD step on a batch; returns the new params, the loss sum and the hits."""

    def mean_loss(params):
        losses, logits = losses_and_logits(params, images, labels)
        loss_sum = jnp.sum(losses)
        return loss_sum / images.shape[0], (loss_sum, logits)

    gradients, (loss_sum, logits) = jax.grad(mean_loss, has_aux=True)(params)
    params = jax.tree.map(lambda weight, grad: weight - learning_rate * grad, params, gradients)
    hits = jnp.sum(jnp.argmax(logits, axis=1) == labels)
    return params, loss_sum, hits


class JaxMLP:
    """The book's MLP trained by JAX, one epoch per `train_epoch`, like naive_model.Trainer.

    Args:
        dataset: the data; its training split is put on the device once.
        hidden: units of the hidden layer.
        batch_size, learning_rate: as TrainConfig's.
        scan: the whole epoch in one jitted lax.scan (jax_scan), or one
            jitted call per step (jax_step).
        seed: seeds the weights and every epoch's permutation.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        hidden: int,
        batch_size: int,
        learning_rate: float,
        scan: bool,
        seed: int = 0,
    ):
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.num_examples = len(dataset.x_train)
        self.steps_per_epoch = self.num_examples // batch_size  # the partial batch is dropped
        self.images = jnp.asarray(dataset.x_train)  # (N, input_size), on the device
        self.labels = jnp.asarray(dataset.y_train)  # (N,) int32
        self.seed = seed
        self.params = glorot_params(
            jax.random.key(seed), (dataset.input_size, hidden, dataset.num_classes)
        )
        self.epoch = 0
        self._run_epoch = self._scan_epoch if scan else self._step_epoch

    def _order(self, epoch: jax.Array) -> jax.Array:
        """The epoch's batches of example indices, (steps, batch)."""
        key = jax.random.fold_in(jax.random.key(self.seed), epoch)
        used = self.steps_per_epoch * self.batch_size
        order = jax.random.permutation(key, self.num_examples)[:used]  # (used,)
        return order.reshape(self.steps_per_epoch, self.batch_size)

    @partial(jax.jit, static_argnums=0, donate_argnums=1)
    def _scan_epoch_compiled(self, params, images, labels, epoch):
        def one_step(carry, indices):  # indices: (batch,)
            params, loss_sum, hits = carry
            params, step_loss, step_hits = train_step(
                params, images[indices], labels[indices], self.learning_rate
            )
            return (params, loss_sum + step_loss, hits + step_hits), None

        start = (params, jnp.float32(0), jnp.int32(0))
        (params, loss_sum, hits), _ = lax.scan(one_step, start, self._order(epoch))
        return params, loss_sum, hits

    def _scan_epoch(self, epoch: int):
        return self._scan_epoch_compiled(self.params, self.images, self.labels, epoch)

    @partial(jax.jit, static_argnums=0)
    def _order_compiled(self, epoch):
        return self._order(epoch)

    @partial(jax.jit, static_argnums=0, donate_argnums=(1, 2, 3))
    def _step_compiled(self, params, loss_sum, hits, images, labels, order, step):
        indices = order[step]  # (batch,)
        params, step_loss, step_hits = train_step(
            params, images[indices], labels[indices], self.learning_rate
        )
        return params, loss_sum + step_loss, hits + step_hits

    def _step_epoch(self, epoch: int):
        order = self._order_compiled(epoch)  # (steps, batch)
        params, loss_sum, hits = self.params, jnp.float32(0), jnp.int32(0)
        for step in range(self.steps_per_epoch):
            params, loss_sum, hits = self._step_compiled(
                params, loss_sum, hits, self.images, self.labels, order, step
            )
        return params, loss_sum, hits

    def train_epoch(self) -> EpochResult:
        """Train one epoch; the result's seconds run until its loss is on the host."""
        start = time.perf_counter()
        self.epoch += 1
        self.params, loss_sum, hits = self._run_epoch(self.epoch)
        examples = self.steps_per_epoch * self.batch_size
        loss, accuracy = float(loss_sum) / examples, int(hits) / examples
        return EpochResult(
            epoch=self.epoch,
            loss=loss,
            accuracy=accuracy,
            steps=self.steps_per_epoch,
            examples=examples,
            seconds=time.perf_counter() - start,
        )


def peers(dataset: Dataset, *, hidden: int, batch_size: int, learning_rate: float) -> dict:
    """jax_scan and jax_step, each having trained (and compiled) one epoch."""
    runners = {}
    for name, scan in (("jax_scan", True), ("jax_step", False)):
        runner = JaxMLP(
            dataset, hidden=hidden, batch_size=batch_size, learning_rate=learning_rate, scan=scan
        )
        runner.train_epoch()
        runners[name] = runner
    return runners
