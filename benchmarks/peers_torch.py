"""PyTorch peers of naive_model.Trainer: the same model, step and epoch, written in PyTorch.

    torch_eager    the step run eagerly from a Python loop
    torch_compile  the same step through torch.compile (dynamo splits it at
                   backward(): a compiled forward with its AOT backward, then
                   a compiled optimizer update)

What each computes per step, as naive_model.Trainer does on one replica:
  - gather the batch's 128 rows of images and labels, through the epoch's
    permutation, from tensors that stay in memory all run;
  - hidden = relu(x @ W1^T + b1) (128, 512); logits = hidden @ W2^T + b2
    (128, 10) (nn.Linear holds its weight as (out, in));
  - per-example cross-entropy from the logits (F.cross_entropy, the
    log-softmax at the label);
  - loss = their sum / 128; backward; torch.optim.SGD, w -= lr * g;
  - the loss sum and the count of correct argmax predictions added to
    accumulator tensors, never read on the host inside the epoch.
Per epoch: a new permutation of all training examples (torch.randperm), of
which the first steps * 128 are used (the partial batch is dropped); the
accumulators are read on the host once, at the end. An epoch is timed from
the permutation to the host holding its loss and accuracy, as
Trainer.train_epoch times its own.

Weights: glorot (xavier) uniform, zero biases. Labels are int64, as
F.cross_entropy requires. PyTorch uses its default thread count (the cores).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from naive_model.data import Dataset
from naive_model.results import EpochResult


def build_mlp(sizes: tuple[int, ...], generator: torch.Generator) -> nn.Sequential:
    """relu dense layers, then a last layer returning logits; glorot weights, zero biases."""
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        linear = nn.Linear(fan_in, fan_out)
        nn.init.xavier_uniform_(linear.weight, generator=generator)
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers[:-1])  # the softmax is in the loss


class TorchMLP:
    """The book's MLP trained by PyTorch, one epoch per `train_epoch`, like naive_model.Trainer.

    Args:
        dataset: the data; its training split is wrapped once (no copy of the images).
        hidden: units of the hidden layer.
        batch_size, learning_rate: as TrainConfig's.
        compile: run the step through torch.compile.
        seed: seeds the weights and the epochs' permutations.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        hidden: int,
        batch_size: int,
        learning_rate: float,
        compile: bool,
        seed: int = 0,
    ):
        self.batch_size = batch_size
        self.num_examples = len(dataset.x_train)
        self.steps_per_epoch = self.num_examples // batch_size  # the partial batch is dropped
        self.images = torch.from_numpy(dataset.x_train)  # (N, input_size) float32
        self.labels = torch.from_numpy(dataset.y_train).long()  # (N,) int64
        self.generator = torch.Generator().manual_seed(seed)
        self.model = build_mlp((dataset.input_size, hidden, dataset.num_classes), self.generator)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=learning_rate)
        self.epoch = 0
        self._step = torch.compile(self.train_step) if compile else self.train_step

    def train_step(self, indices: torch.Tensor, loss_sum: torch.Tensor, hits: torch.Tensor):
        """One SGD step on the examples at `indices`; adds to the loss sum and the hits."""
        images = self.images.index_select(0, indices)  # (batch, input_size)
        labels = self.labels.index_select(0, indices)  # (batch,)
        logits = self.model(images)  # (batch, classes)
        losses = F.cross_entropy(logits, labels, reduction="none")  # (batch,)
        loss = losses.sum() / self.batch_size
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            loss_sum += losses.sum()
            hits += (logits.argmax(dim=1) == labels).sum()

    def train_epoch(self) -> EpochResult:
        """Train one epoch; the result's seconds run until its loss is on the host."""
        start = time.perf_counter()
        self.epoch += 1
        used = self.steps_per_epoch * self.batch_size
        order = torch.randperm(self.num_examples, generator=self.generator)[:used]
        batches = order.view(self.steps_per_epoch, self.batch_size)  # (steps, batch)
        loss_sum, hits = torch.zeros(()), torch.zeros((), dtype=torch.int64)
        for indices in batches:
            self._step(indices, loss_sum, hits)
        loss, accuracy = loss_sum.item() / used, hits.item() / used
        return EpochResult(
            epoch=self.epoch,
            loss=loss,
            accuracy=accuracy,
            steps=self.steps_per_epoch,
            examples=used,
            seconds=time.perf_counter() - start,
        )


def peers(dataset: Dataset, *, hidden: int, batch_size: int, learning_rate: float) -> dict:
    """torch_eager and torch_compile, each having trained (and compiled) one epoch."""
    runners = {}
    for name, compile in (("torch_eager", False), ("torch_compile", True)):
        runner = TorchMLP(
            dataset,
            hidden=hidden,
            batch_size=batch_size,
            learning_rate=learning_rate,
            compile=compile,
        )
        runner.train_epoch()
        runners[name] = runner
    return runners
