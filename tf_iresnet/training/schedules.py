"""Learning-rate schedules: linear warm-up to the base rate, then step decay.

The reference i-ResNet code's warm-up ends at twice the configured rate (REFERENCE.md, section
4). Here the warm-up reaches exactly `base_lr`, and the decay factors apply on top of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="tf_iresnet")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to `base_lr`, then piecewise-constant decay.

    With `W = warmup_steps` and optimizer step `s` (0 for the first update, as Keras passes
    `optimizer.iterations`):

        lr(s) = base_lr * min(1, (s + 1) / W) * factor ** #{b in boundaries : s >= b}

    so the first update uses `base_lr / W`, update number `W` (step `W - 1`) uses exactly
    `base_lr`, and from step `boundaries[i]` on the rate is multiplied by `factor` once more.

    #### Examples

    ```python
    # CIFAR-10 classifier: warm-up over 10 epochs, x0.2 at epochs 60, 120 and 160.
    spe = 391  # steps per epoch
    lr = WarmupSchedule(0.1, 10 * spe, boundaries=(60 * spe, 120 * spe, 160 * spe), factor=0.2)
    optimizer = keras.optimizers.SGD(lr, momentum=0.9)
    ```

    Args:
      base_lr: peak learning rate, reached at the end of the warm-up. Positive.
      warmup_steps: length of the linear warm-up in optimizer steps; 0 disables it.
      boundaries: strictly increasing step numbers, each at least `warmup_steps`, from which
        on the rate is multiplied by one more `factor`. Default: none (constant after warm-up).
      factor: multiplicative decay at each boundary, in (0, 1] typically. Default 0.1.
      name: optional name scope for the ops.

    Raises:
      ValueError: for a non-positive `base_lr` or `factor`, a negative `warmup_steps`, or
        boundaries that are not increasing or fall inside the warm-up.
    """

    def __init__(
        self,
        base_lr: float,
        warmup_steps: int,
        boundaries: Sequence[int] = (),
        factor: float = 0.1,
        name: str | None = None,
    ):
        super().__init__()
        boundaries = tuple(int(b) for b in boundaries)
        if not base_lr > 0:
            raise ValueError(f"base_lr must be positive, got {base_lr}.")
        if int(warmup_steps) < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}.")
        if not factor > 0:
            raise ValueError(f"factor must be positive, got {factor}.")
        if any(b2 <= b1 for b1, b2 in zip(boundaries[:-1], boundaries[1:], strict=True)):
            raise ValueError(f"boundaries must be strictly increasing, got {boundaries}.")
        if boundaries and boundaries[0] < int(warmup_steps):
            raise ValueError(
                f"boundaries must not fall inside the warm-up (warmup_steps={warmup_steps}), "
                f"got {boundaries}."
            )
        self.base_lr = float(base_lr)
        self.warmup_steps = int(warmup_steps)
        self.boundaries = boundaries
        self.factor = float(factor)
        self.name = name

    def __call__(self, step: tf.Tensor | int) -> tf.Tensor:
        """Returns the float32 learning rate for optimizer step `step` (an integer scalar)."""
        with tf.name_scope(self.name or "WarmupSchedule"):
            step = tf.cast(step, tf.int64)
            lr = tf.constant(self.base_lr, tf.float32)
            if self.warmup_steps > 0:
                done = tf.cast(tf.minimum(step + 1, self.warmup_steps), tf.float32)
                lr = lr * done / float(self.warmup_steps)
            if self.boundaries:
                passed = tf.reduce_sum(
                    tf.cast(step >= tf.constant(self.boundaries, tf.int64), tf.float32)
                )
                lr = lr * tf.pow(tf.constant(self.factor, tf.float32), passed)
            return lr

    def get_config(self) -> dict[str, Any]:
        return {
            "base_lr": self.base_lr,
            "warmup_steps": self.warmup_steps,
            "boundaries": list(self.boundaries),
            "factor": self.factor,
            "name": self.name,
        }
