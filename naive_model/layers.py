"""NaiveDense and NaiveSequential: the chapter-2 model, as small as it can be."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tensorflow as tf

from naive_model.config import ACTIVATIONS, INITIALIZERS, LayerSpec

ACTIVATION_FUNCTIONS: dict[str, Callable[[tf.Tensor], tf.Tensor]] = {
    "relu": tf.nn.relu,
    "softmax": tf.nn.softmax,
    "sigmoid": tf.sigmoid,
    "tanh": tf.tanh,
    "linear": tf.identity,
}
assert tuple(ACTIVATION_FUNCTIONS) == ACTIVATIONS


def _initial_weights(
    initializer: str, input_size: int, output_size: int, seed: int | None
) -> tf.Tensor:
    shape = (input_size, output_size)
    if initializer == "seed":
        # The book's initialisation: uniform in [0, 0.1).
        return tf.random.stateless_uniform(shape, seed=(seed or 0, 0), minval=0.0, maxval=1e-1)
    if initializer == "glorot":
        limit = (6.0 / (input_size + output_size)) ** 0.5
        return tf.random.stateless_uniform(shape, seed=(seed or 0, 1), minval=-limit, maxval=limit)
    raise ValueError(f"initializer must be one of {', '.join(INITIALIZERS)}, got {initializer!r}")


class NaiveDense(tf.Module):
    """A dense layer: activation(inputs @ W + b)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        activation: str | Callable[[tf.Tensor], tf.Tensor] = "relu",
        *,
        initializer: str = "seed",
        seed: int | None = None,
        name: str | None = None,
    ):
        super().__init__(name=name)
        if isinstance(activation, str):
            if activation not in ACTIVATION_FUNCTIONS:
                raise ValueError(
                    f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}"
                )
            self.activation_name = activation
            activation = ACTIVATION_FUNCTIONS[activation]
        else:
            self.activation_name = getattr(activation, "__name__", "custom")
        self.activation = activation
        self.W = tf.Variable(
            _initial_weights(initializer, input_size, output_size, seed), name="W"
        )  # (input_size, output_size)
        self.b = tf.Variable(tf.zeros((output_size,)), name="b")  # (output_size,)

    def pre_activation(self, inputs: tf.Tensor) -> tf.Tensor:
        # The weights stay float32; under mixed precision the inputs come in
        # the compute dtype (bfloat16, float16) and the weights are cast to it.
        # (A cast to the dtype a tensor already has is no op at all.)
        inputs = tf.convert_to_tensor(inputs)
        W, b = tf.cast(self.W, inputs.dtype), tf.cast(self.b, inputs.dtype)
        return tf.matmul(inputs, W) + b  # (batch, output_size)

    def __call__(self, inputs: tf.Tensor) -> tf.Tensor:
        return self.activation(self.pre_activation(inputs))

    @property
    def weights(self) -> list[tf.Variable]:
        return [self.W, self.b]


class NaiveSequential(tf.Module):
    """Layers called in order."""

    def __init__(self, layers: Sequence[NaiveDense], name: str | None = None):
        super().__init__(name=name)
        self.layers = list(layers)

    def __call__(self, inputs: tf.Tensor) -> tf.Tensor:
        x = inputs
        for layer in self.layers:
            x = layer(x)
        return x

    def logits(self, inputs: tf.Tensor) -> tf.Tensor:
        """The output before the last activation (the softmax's input)."""
        x = inputs
        for layer in self.layers[:-1]:
            x = layer(x)
        return self.layers[-1].pre_activation(x)

    @property
    def weights(self) -> list[tf.Variable]:
        return [weight for layer in self.layers for weight in layer.weights]


def build_model(
    input_size: int,
    layers: Sequence[LayerSpec],
    *,
    initializer: str = "glorot",
    seed: int = 0,
) -> NaiveSequential:
    """Build a NaiveSequential of dense layers of any sizes.

    Each layer draws its weights from its own seed (seed + index), so a model is
    the same whichever device or process builds it.
    """
    dense_layers, fan_in = [], input_size
    for index, spec in enumerate(layers):
        dense_layers.append(
            NaiveDense(
                fan_in,
                spec.units,
                spec.activation,
                initializer=initializer,
                seed=seed + index,
                name=f"dense_{index}",
            )
        )
        fan_in = spec.units
    return NaiveSequential(dense_layers, name="naive_sequential")
