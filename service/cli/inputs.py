"""What the command line reads: layer specs from text, inputs from .npy/.npz files, MNIST.

Inputs for Predict keep uint8 pixels as uint8 (`ntrain.client.tensors.examples_array`):
they cross the wire a quarter the size of float32, and the server scales them
as it scales its data sets.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from ntrain.v1 import training_pb2

from naive_model.data import find_mnist, mnist_candidates
from ntrain.client.tensors import examples_array
from service.cli.exit_status import CliError


def parse_layers(text: str) -> list[training_pb2.LayerSpec]:
    """'512:relu,10:softmax' -> layer specs; a bare '512' means relu.

    The server checks units and activations; here only the shape of the text.
    """
    layers = []
    for index, item in enumerate(part.strip() for part in text.split(",")):
        units, _, activation = item.partition(":")
        try:
            count = int(units)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"layer {index} must look like UNITS:ACTIVATION (e.g. 512:relu), got {item!r}"
            ) from None
        if ":" in activation or (item.count(":") and not activation):
            raise argparse.ArgumentTypeError(
                f"layer {index} must look like UNITS:ACTIVATION (e.g. 512:relu), got {item!r}"
            )
        layers.append(training_pb2.LayerSpec(units=count, activation=activation or "relu"))
    return layers


def format_layers(layers) -> str:
    return ",".join(f"{layer.units}:{layer.activation}" for layer in layers)


def load_inputs(path: str | Path) -> tuple[np.ndarray, list[int] | None]:
    """Inputs, (examples, features), and labels when the file has them, from .npy or .npz.

    An .npz may hold x (or x_test, or inputs) with y (or y_test); a lone array
    is taken as the inputs. uint8 pixels stay uint8; other numbers become float32.
    """
    path = Path(path)
    if path.suffix and path.suffix not in (".npy", ".npz"):
        raise CliError(
            f"{path}: --input takes a .npy or .npz file of numbers (numpy.save or numpy.savez); "
            "a CSV or Parquet file's feature columns can be saved as one with numpy or pandas"
        )
    labels = None
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                key = next((k for k in ("x", "x_test", "inputs") if k in archive.files), None)
                if key is None and len(archive.files) == 1:
                    key = archive.files[0]
                if key is None:
                    raise CliError(
                        f"{path}: no inputs; expected an array named x, x_test or inputs "
                        f"(has {', '.join(archive.files)})"
                    )
                inputs = archive[key]
                label_key = {"x": "y", "x_test": "y_test"}.get(key)
                if label_key in archive.files:
                    labels = archive[label_key]
        else:
            inputs = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise CliError(f"cannot read inputs from {path}: {error}") from None
    if not np.issubdtype(inputs.dtype, np.number):
        raise CliError(f"{path}: inputs must be numbers, got dtype {inputs.dtype}")
    flat = examples_array(inputs)  # (examples, features)
    if labels is not None and len(labels) != len(flat):
        labels = None
    return flat, ([int(label) for label in labels] if labels is not None else None)


def find_mnist_file(explicit: str | None) -> Path:
    """The MNIST file to take test images from: --mnist-file, else where the product looks."""
    if explicit:
        return Path(explicit)
    found = find_mnist()
    if found is None:
        places = ", ".join(str(candidate) for candidate in mnist_candidates())
        raise CliError(f"MNIST not found (looked in {places}); pass --mnist-file PATH")
    return found


def read_test_images(path: Path, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` test images of an .npz data set, as the file holds them, and labels."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            images, labels = archive["x_test"][:count], archive["y_test"][:count]
    except (OSError, KeyError, ValueError) as error:
        raise CliError(f"cannot read test images from {path}: {error}") from None
    return images, labels  # (count, ...), (count,)


def load_mnist_test(count: int, explicit: str | None) -> tuple[np.ndarray, list[int]]:
    """The first `count` MNIST test images, uint8 (count, 784), and their labels."""
    images, labels = read_test_images(find_mnist_file(explicit), count)
    return examples_array(images), [int(label) for label in labels]
