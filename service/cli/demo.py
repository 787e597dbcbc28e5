"""The whole ntrain flow in one command (`make demo`).

Starts a server on a free local port with a temporary state directory, trains
the book's MNIST network (784 -> 512 relu -> 10 softmax, Glorot, RMSprop 1e-3,
batch 128) while a progress bar follows it, evaluates the model, shows a few
test images as ASCII art beside the digits the model predicts, and stops the
server, also on Ctrl-C.

MNIST is looked for where the service looks ($NTRAIN_MNIST_PATH,
~/.keras/datasets/mnist.npz, then Keras's download, fetched
without TensorFlow); when it cannot be had, the
demo says so in one line and trains on scikit-learn's 8x8 digits instead (real
handwritten digits shipped inside the package, installed by the `demo` extra:
no download), written as an .npz in Keras's layout to a data directory of its
own; without scikit-learn, on the synthetic data set.

    python -m service.cli.demo [--epochs 2] [--images 5] [--state-dir DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from ntrain.v1 import training_pb2

from naive_model.data import download_mnist, mnist_candidates, synthetic_dataset, to_features
from naive_model.data import find_mnist as find_mnist_file
from ntrain.client import TERMINAL_STATES, Client, NtrainError
from service.cli import output as cli_output
from service.cli.commands import follow_job
from service.cli.exit_status import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK
from service.cli.inputs import read_test_images
from service.cli.local_server import LocalServer, ServerStartError
from service.cli.progress import ProgressRenderer
from service.cli.specs import book_job_spec

DIGITS_FILE = "digits.npz"
SERVER_STOP_SECONDS = 30.0
DEMO_STEPS_PER_EXECUTION = 50
# Epochs when --epochs is not given: MNIST's 60,000 images need few; the 1,437
# training digits make 12 steps an epoch, and 20 epochs take a few seconds.
DEFAULT_EPOCHS = {"mnist": 2, DIGITS_FILE: 20, "synthetic": 2}
# The share of scikit-learn's digits held out for the test split (360 of 1,797).
DIGITS_TEST_SHARE = 0.2


class DemoError(Exception):
    """A failure that ends the demo, told in one line."""


def find_mnist(data_dir: Path | None) -> tuple[Path | None, str]:
    """The MNIST file the server will use, or None and a one-line reason.

    A download goes where the server looks (Keras's cache), fetched without
    TensorFlow: offline, it fails in well under a second.
    """
    found = find_mnist_file(data_dir=data_dir)
    if found is not None:
        return found, ""
    try:
        return download_mnist(), ""
    except OSError as error:
        places = ", ".join(str(candidate) for candidate in mnist_candidates(data_dir=data_dir))
        reason = f"MNIST not found (looked in {places}; download failed: {error})."
        return None, " ".join(reason.split())


def write_digits(data_dir: Path) -> Path | None:
    """scikit-learn's 8x8 digits as `data_dir/digits.npz` in Keras's MNIST layout.

    x_train and x_test are uint8 images (examples, 8, 8), their 0..16 ink
    levels stretched to 0..255 so the server scales them as it scales MNIST;
    y_train and y_test are the digits. A fixed shuffle holds out a fifth for
    the test split. None when scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return None
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # (1797, 8, 8)
    labels = digits.target.astype(np.uint8)  # (1797,)
    order = np.random.default_rng(0).permutation(len(images))
    test = order[: round(len(images) * DIGITS_TEST_SHARE)]
    train = order[len(test) :]
    path = data_dir / DIGITS_FILE
    np.savez(
        path, x_train=images[train], y_train=labels[train], x_test=images[test], y_test=labels[test]
    )
    return path


def load_test_images(path: Path | None, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` test images, flattened and scaled to [0, 1], with labels."""
    if path is None:
        dataset = synthetic_dataset()
        return dataset.x_test[:count], dataset.y_test[:count]
    images, labels = read_test_images(path, count)
    return to_features(images), labels


def drawn(image: np.ndarray) -> np.ndarray:
    """An image's pixels as drawn: an 8x8 digit doubled on each side, so it reads as one."""
    side = math.isqrt(len(image))
    if side >= 16:
        return image
    return np.kron(image.reshape(side, side), np.ones((2, 2), dtype=image.dtype)).ravel()


def run(args: argparse.Namespace, stack: ExitStack) -> float:
    """The demo itself; returns the final test accuracy."""
    data_dir = Path(args.data_dir) if args.data_dir else None
    mnist_path, reason = find_mnist(data_dir)
    images_path = mnist_path
    if mnist_path is not None:
        print(f"MNIST found at {mnist_path}", flush=True)
        dataset, images_name = "mnist", "MNIST test"
    else:
        data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ntrain-data-")))
        images_path = write_digits(data_dir)
        if images_path is not None:
            print(
                f"{reason} Training on scikit-learn's 8x8 digits instead "
                "(1,797 handwritten digits, bundled: no download).",
                flush=True,
            )
            dataset, images_name = DIGITS_FILE, "scikit-learn digits test"
        else:
            print(
                f"{reason} Training on the synthetic data set instead "
                "(for real digits offline: pip install 'ntrain[demo]').",
                flush=True,
            )
            dataset, images_name = "synthetic", "synthetic test"
    epochs = args.epochs if args.epochs is not None else DEFAULT_EPOCHS[dataset]

    if args.state_dir:
        state_dir = Path(args.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
    else:
        state_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ntrain-demo-")))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    if mnist_path is not None:
        env.setdefault("NTRAIN_MNIST_PATH", str(mnist_path))
    print("starting a server on a free local port ...", flush=True)
    try:
        server = LocalServer(
            state_dir,
            [] if data_dir is None else ["--data-dir", str(data_dir)],
            env=env,
            own_session=True,  # Ctrl-C reaches the demo, which stops the server in order
        )
    except ServerStartError as error:
        raise DemoError(str(error)) from None
    stack.callback(_stop_server, server)
    args.address = server.address
    client = stack.enter_context(Client(server.address))
    info = client.info()
    devices = ", ".join(device.name for device in info.devices) or "-"
    print(
        f"server ntrain {info.version} at {server.address} (TensorFlow {info.tensorflow_version},"
        f" devices {devices}; log {server.log_path})",
        flush=True,
    )

    images, labels = load_test_images(images_path, args.images)  # (count, features)
    job = client.submit(
        book_job_spec(
            training_pb2.JobSpec(
                dataset=dataset,
                epochs=epochs,
                # About ten progress updates per MNIST epoch, so the bar moves; a
                # compiled call of 50 steps keeps the per-call overhead negligible.
                steps_per_execution=DEMO_STEPS_PER_EXECUTION,
            )
        )
    )
    stack.callback(_cancel_if_running, client, job.job_id)
    print(
        f"\njob {job.job_id}: {images.shape[1]} -> 512 relu -> 10 softmax on {dataset}, "
        f"rmsprop 1e-3, batch 128, {epochs} epoch{'s' if epochs != 1 else ''}",
        flush=True,
    )
    ended = follow_job(client, job, ProgressRenderer(sys.stdout))
    if ended.state != training_pb2.JOB_STATE_SUCCEEDED:
        raise DemoError(
            f"job {ended.job_id} ended {cli_output.state_name(ended.state)}: "
            f"{ended.failure_reason or 'no reason given'}"
        )

    evaluation = client.evaluate(job.job_id)
    print("\n" + cli_output.format_evaluation(job.job_id, evaluation), flush=True)

    predictions = [
        training_pb2.Prediction(label=int(row.argmax()), probabilities=row.tolist())
        for row in client.predict(job.job_id, images)
    ]
    if images_path is None:
        # Synthetic inputs are noise around one prototype per class: nothing to look at.
        print(f"\n{len(predictions)} synthetic test examples and what the model says:")
        for index, (label, prediction) in enumerate(zip(labels, predictions, strict=True)):
            caption = cli_output.prediction_caption(prediction, int(label))
            print(f"  example {index}: " + "; ".join(caption))
        return evaluation.accuracy
    images_noun = "image" if len(predictions) == 1 else "images"
    print(f"\n{len(predictions)} {images_name} {images_noun} and what the model says:\n")
    for image, label, prediction in zip(images, labels, predictions, strict=True):
        caption = cli_output.prediction_caption(prediction, int(label))
        art = cli_output.ascii_image(drawn(image).tolist())
        print("\n".join(caption) if art is None else cli_output.image_beside_caption(art, caption))
        print()
    return evaluation.accuracy


def _cancel_if_running(client: Client, job_id: str) -> None:
    """On an early exit (Ctrl-C), stop the job before the server."""
    try:
        job = client.get(job_id)
        if job.state not in TERMINAL_STATES:
            _say(f"cancelling job {job_id} ...")
            client.cancel(job_id)
    except NtrainError:
        pass  # the server is going down anyway; stopping it ends the worker


def _stop_server(server: LocalServer) -> None:
    _say("stopping the server ...")
    status = server.stop(SERVER_STOP_SECONDS)
    if status not in (0, -signal.SIGTERM):
        _say(f"the server exited with status {status}; its log:\n{server.log_tail()}")


def _say(text: str) -> None:
    """Print during clean-up, which must go on even when stdout is gone (`| head`)."""
    try:
        print(text, flush=True)
    except OSError:
        pass


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.cli.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--epochs", type=int, help="training epochs (default 2 on MNIST, 20 on the 8x8 digits)"
    )
    parser.add_argument("--images", type=int, default=5, help="test images to show (default 5)")
    parser.add_argument("--state-dir", help="keep the server's state here (default: a temp dir)")
    parser.add_argument("--data-dir", help="the server's data directory (optional)")
    args = parser.parse_args(argv)
    # Stopped from outside (a CI timeout): clean up as on Ctrl-C, so no server is left behind.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with ExitStack() as stack:
            accuracy = run(args, stack)
    except KeyboardInterrupt:
        print("\nntrain demo: interrupted; the server was stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of our output went away (`| head`); the server is already stopped.
        sys.stdout = open(os.devnull, "w")  # so nothing more is flushed at exit
        return EXIT_ERROR
    except DemoError as error:
        print(f"ntrain demo: {error}", file=sys.stderr)
        return EXIT_ERROR
    except NtrainError as error:
        print(f"ntrain demo: {error}", file=sys.stderr)
        return EXIT_ERROR
    print(f"final test accuracy: {cli_output.format_percent(accuracy)}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
