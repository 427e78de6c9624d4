"""A tiny training job for the training-machinery tests, importable and runnable as a script.

Linear regression (`y = x . w + b + noise`, 4 features) with a one-unit Dense model trained by
`tf_iresnet.training.Trainer`. The tests import the pieces to train in-process, and run this
file as a subprocess for the kill-and-restart and multi-worker tests:

    python tests/_workers.py --model_dir DIR --steps N --strategy NAME --out RESULT.json

The result JSON holds the step the run started from, the final step, the number of replicas
and the final weights, so the test can compare processes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FEATURES = 4
TRUE_W = (1.5, -2.0, 0.5, 3.0)
TRUE_B = 0.7


def make_data(n: int = 64, seed: int = 0):
    """Returns float32 arrays x [n, FEATURES] and y [n, 1] from a fixed linear model."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)).astype("float32")
    y = x @ np.asarray(TRUE_W, "float32")[:, None] + TRUE_B
    y = (y + 0.01 * rng.normal(size=y.shape)).astype("float32")
    return x, y


def make_dataset(x, y, global_batch: int, shard_by_data: bool = False):
    """An endless, unshuffled dataset of global batches (same batches in every process)."""
    import tensorflow as tf

    ds = (
        tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(global_batch, drop_remainder=True)
    )
    if shard_by_data:
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        ds = ds.with_options(options)
    return ds


def make_model_and_optimizer(strategy, learning_rate: float = 0.05):
    """A zero-initialised Dense(1) model and an Adam optimizer, both under `strategy.scope()`."""
    import keras

    with strategy.scope():
        model = keras.Sequential(
            [keras.Input((FEATURES,)), keras.layers.Dense(1, kernel_initializer="zeros")]
        )
        optimizer = keras.optimizers.Adam(learning_rate)
    return model, optimizer


def step_fn(model, batch, step):
    """Mean squared error over this replica's batch; logs it and the mean absolute error."""
    import tensorflow as tf

    x, y = batch
    err = model(x, training=True) - y
    mse = tf.reduce_mean(tf.square(err))
    return mse, {"mae": tf.reduce_mean(tf.abs(err))}


def weights(model) -> list:
    """The model's weights as nested lists (JSON-serialisable)."""
    return [w.numpy().tolist() for w in model.weights]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--strategy", default="default")
    parser.add_argument("--checkpoint_every", type=int, default=10)
    parser.add_argument("--log_every", type=int, default=10)
    parser.add_argument("--global_batch", type=int, default=16)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    # The strategy first: MultiWorkerMirroredStrategy must exist before any other TF op.
    from tf_iresnet.training import Trainer, make_strategy
    from tf_iresnet.training.strategy import task_info

    strategy = make_strategy(args.strategy)
    model, optimizer = make_model_and_optimizer(strategy)
    x, y = make_data()
    multi_worker = args.strategy == "multi_worker_mirrored"
    trainer = Trainer(
        strategy=strategy,
        model=model,
        optimizer=optimizer,
        train_step_fn=step_fn,
        model_dir=args.model_dir,
        total_steps=args.steps,
        log_every=args.log_every,
        checkpoint_every=args.checkpoint_every,
        config=vars(args),
        progress=False,
    )
    start = trainer.restore()
    print(f"start_step={start}", flush=True)
    trainer.train(make_dataset(x, y, args.global_batch, shard_by_data=multi_worker))
    task_type, task_id = task_info(strategy)
    result = {
        "start_step": start,
        "final_step": trainer.step,
        "optimizer_iterations": int(optimizer.iterations.numpy()),
        "num_replicas": strategy.num_replicas_in_sync,
        "task": [task_type, task_id],
        "weights": weights(model),
    }
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
