"""One worker of a MultiWorkerMirroredStrategy cluster, for test_naive_multi_worker.

Usage: python multi_worker_main.py TF_CONFIG_JSON OUT.npz CHECKPOINT_DIR [WINDOW_BATCHES]

With WINDOW_BATCHES the training data is streamed in windows of that many
batches, each worker reading its share of every window.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from naive_model.config import LayerSpec, StrategyConfig, TrainConfig  # noqa: E402
from naive_model.data import synthetic_dataset  # noqa: E402
from naive_model.distribute import is_chief, make_strategy  # noqa: E402


def main() -> None:
    cluster, out_path, checkpoint_dir = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    window_batches = int(sys.argv[4]) if len(sys.argv) > 4 else None
    # The strategy comes first: it starts the collective server the peer dials.
    strategy = make_strategy(StrategyConfig(kind="multi_worker", cluster=cluster))

    import numpy as np

    from naive_model.trainer import Trainer

    dataset = synthetic_dataset(num_train=1024, num_test=256, input_size=64)
    config = TrainConfig(
        layers=(LayerSpec(units=32, activation="relu"), LayerSpec(units=10, activation="softmax")),
        optimizer="adam",
        learning_rate=0.01,
        batch_size=64,
        steps_per_execution=4,
    )
    trainer = Trainer(config, dataset, strategy, window_batches=window_batches)
    result = trainer.train_epoch()
    trainer.save_checkpoint(checkpoint_dir)
    np.savez(
        out_path,
        *[w.numpy() for w in trainer.model.weights],
        replicas=strategy.num_replicas_in_sync,
        loss=result.loss,
        chief=is_chief(strategy),
        steps=trainer.global_step,
        # The last window as this worker holds it: its share of the rows, in file order.
        held_images=trainer._images.numpy(),
        share=trainer.data_share or "",
    )


if __name__ == "__main__":
    main()
