"""Saving and resuming training state: the model and the optimizer, whose step counter
`optimizer.iterations` numbers the checkpoints.

`CheckpointState` wraps `tf.train.Checkpoint` and `tf.train.CheckpointManager`. On this stack
(Keras 3.15 / TF 2.21) a Keras 3 model and optimizer are `AutoTrackable`s, so
`tf.train.Checkpoint(model=..., optimizer=...)` tracks every model weight (trainable and not,
e.g. ActNorm's "initialized" flag or BatchNorm statistics) and the optimizer's iteration count
and slots. Optimizer slots that do not exist yet are restored when created (deferred restore),
but a corrupt or mismatched checkpoint would then only fail at the first training step; the
`Trainer` therefore builds the optimizer before restoring, so restoring is checked in full.

Multi-worker: every worker must call `save` (saving may run collective ops), but only the chief
writes into `model_dir`; the others write to a private temporary directory that is deleted
right after, as the TensorFlow multi-worker guide prescribes.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import keras
import tensorflow as tf

from tf_iresnet.training.strategy import is_chief, task_info

CHECKPOINT_PREFIX = "ckpt"
MAX_TO_KEEP = 3


class CheckpointError(RuntimeError):
    """A checkpoint in `model_dir` cannot be used: corrupt, unreadable or of another model."""


class CheckpointState:
    """Checkpoints of a training run in one directory, saved every so often and resumed.

    #### Examples

    ```python
    with strategy.scope():
        model, optimizer = build_model(), keras.optimizers.Adam(1e-3)
        optimizer.build(model.trainable_variables)
    state = CheckpointState(model_dir, model=model, optimizer=optimizer, strategy=strategy)
    step = state.restore_or_initialize()  # optimizer.iterations; 0 for a fresh model_dir
    ...
    state.save()  # model_dir/ckpt-<optimizer.iterations>
    ```

    Args:
      model_dir: directory of the run; checkpoints are `model_dir/ckpt-<step>.*`, `<step>`
        being `optimizer.iterations`, and the index file `model_dir/checkpoint`. Must be
        visible to all workers when multi-worker. The newest `MAX_TO_KEEP` are kept.
      model: the Keras model, built (its variables exist) before restoring.
      optimizer: the Keras optimizer (built, see above); its `iterations` is the step.
      strategy: the strategy the variables were created under; defaults to the current one.
        Decides which worker writes to `model_dir`.
    """

    def __init__(
        self,
        model_dir: str,
        *,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        strategy: tf.distribute.Strategy | None = None,
    ):
        self.model_dir = model_dir
        self.strategy = strategy or tf.distribute.get_strategy()
        self.is_chief = is_chief(self.strategy)
        self.optimizer = optimizer
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
        self._manager: tf.train.CheckpointManager | None = None
        if self.is_chief:
            tf.io.gfile.makedirs(model_dir)
            self._manager = tf.train.CheckpointManager(
                self.checkpoint,
                model_dir,
                max_to_keep=MAX_TO_KEEP,
                checkpoint_name=CHECKPOINT_PREFIX,
            )

    @property
    def latest_checkpoint(self) -> str | None:
        """Path prefix of the newest checkpoint in `model_dir`, or None if there is none.

        Raises:
          CheckpointError: if checkpoint files exist but the index file `checkpoint` is missing
            or unreadable (TensorFlow would otherwise silently start from scratch and then
            overwrite them).
        """
        latest = tf.train.latest_checkpoint(self.model_dir)
        if latest is not None:
            return latest
        stray = tf.io.gfile.glob(os.path.join(self.model_dir, f"{CHECKPOINT_PREFIX}-*.index"))
        if stray:
            state_file = os.path.join(self.model_dir, "checkpoint")
            raise CheckpointError(
                f"{self.model_dir} holds checkpoint files ({', '.join(sorted(stray)[:3])}) but "
                f"its checkpoint index file {state_file} is missing or unreadable. Delete the "
                "stray checkpoint files (or restore the index file) to resume, or train with a "
                "fresh --model_dir."
            )
        return None

    @property
    def step(self) -> int:
        """The step counter, `optimizer.iterations`."""
        return int(self.optimizer.iterations.numpy())

    def restore_or_initialize(self) -> int:
        """Restores the newest checkpoint if there is one; returns the step to resume from.

        The checkpoint and the objects given must match one-to-one (every saved value used,
        every existing variable restored).

        Returns:
          The restored `optimizer.iterations`, or 0 (variables untouched) when `model_dir`
          holds no checkpoint.

        Raises:
          CheckpointError: the checkpoint is corrupt or unreadable (the message names its files
            and says to delete them or use a fresh model_dir), or it was written by a
            different model (other variables or shapes).
        """
        path = self.latest_checkpoint
        if path is None:
            return 0
        files = sorted(tf.io.gfile.glob(path + ".*"))
        status = None
        try:
            status = self.checkpoint.restore(path)
            status.assert_consumed()
        except (ValueError, AssertionError) as e:
            if status is not None:
                status.expect_partial()  # no second warning about unused values on deletion
            raise CheckpointError(
                f"The checkpoint {path} in {self.model_dir} was written by a different model or "
                f"training setup and does not match this one: {e}\nUse a fresh --model_dir for "
                "this configuration (or the configuration that wrote it; see "
                f"{os.path.join(self.model_dir, 'config.json')})."
            ) from e
        except (tf.errors.OpError, IndexError) as e:
            raise CheckpointError(
                f"The checkpoint {path} (files: {', '.join(files) or 'none found'}) is corrupt "
                f"or unreadable: {type(e).__name__}: {e}\nDelete these files to resume from the "
                f"previous checkpoint in {self.model_dir} (if any), or train with a fresh "
                "--model_dir."
            ) from e
        return self.step

    def save(self) -> str | None:
        """Saves a checkpoint numbered by the step counter, `optimizer.iterations`.

        Every worker must call this; only the chief's copy is kept.

        Returns:
          The checkpoint path prefix on the chief, None on other workers.
        """
        number = self.step
        if self._manager is not None:
            return self._manager.save(checkpoint_number=number)
        _, task_id = task_info(self.strategy)
        tmp_dir = tempfile.mkdtemp(prefix=f"ckpt_worker{task_id}_")
        try:
            self.checkpoint.write(os.path.join(tmp_dir, f"{CHECKPOINT_PREFIX}-{number}"))
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        return None
