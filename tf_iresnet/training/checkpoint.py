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
import re
import shutil
import tempfile

import keras
import tensorflow as tf
from absl import logging

from tf_iresnet.training.strategy import is_chief, task_info

CHECKPOINT_PREFIX = "ckpt"
MAX_TO_KEEP = 3
UNUSABLE_DIR = "unusable_checkpoints"
_FILE = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)(\.index|\.data-\d+-of-\d+)$")


def _number(path: str) -> int | None:
    match = re.search(rf"{CHECKPOINT_PREFIX}-(\d+)$", path)
    return int(match.group(1)) if match else None


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
        self._objects = {"model": model, "optimizer": optimizer}
        self.checkpoint = tf.train.Checkpoint(**self._objects)
        self._manager: tf.train.CheckpointManager | None = None
        if self.is_chief:
            tf.io.gfile.makedirs(model_dir)
            try:
                self._manager = self._make_manager()
            except Exception:  # noqa: BLE001 - a garbled index file: restoring rewrites it
                self._manager = None

    @property
    def latest_checkpoint(self) -> str | None:
        """Path prefix of the newest checkpoint the index file `model_dir/checkpoint` names, or
        None (no index file, or an unreadable one: `restore_or_initialize` sorts that out)."""
        try:
            return tf.train.latest_checkpoint(self.model_dir)
        except Exception:  # noqa: BLE001 - a garbled index file (UnicodeDecodeError, ParseError)
            return None

    @property
    def step(self) -> int:
        """The step counter, `optimizer.iterations`."""
        return int(self.optimizer.iterations.numpy())

    def restore_or_initialize(self) -> int:
        """Restores the newest usable checkpoint if there is one; returns the step to resume from.

        The candidates are the checkpoints the index file `model_dir/checkpoint` lists (every
        `ckpt-<N>` on disk when that file is missing or unreadable), newest first. A candidate
        that is incomplete (its `.index` or `.data-*` file missing) or unreadable (truncated,
        bit-flipped: TensorFlow checks a checksum per tensor) is skipped with a warning that
        names its files; on the chief they are moved, untouched, into
        `model_dir/unusable_checkpoints/` (so that new checkpoints never overwrite them) and
        the index file is rewritten to list the remaining ones. Stale `ckpt-<N>_temp`
        directories of a save that was killed are removed. The checkpoint and the objects given
        must match one-to-one (every saved value used, every existing variable restored).

        Returns:
          The restored `optimizer.iterations`, or 0 (variables untouched) when `model_dir`
          holds no checkpoint at all.

        Raises:
          CheckpointError: no candidate is usable (the message names every file tried), the
            index file lists checkpoints none of whose files exist (rather than silently
            starting from step 0), or the newest readable checkpoint was written by a different
            model (other variables or shapes).
        """
        self._remove_stale_temp_dirs()
        listed, index_problem = self._listed_checkpoints()
        on_disk = self._checkpoints_on_disk()
        if listed is None and index_problem is None and on_disk:
            index_problem = f"The checkpoint index file {self._index_file} is missing"
        if index_problem:
            logging.warning("%s; using the checkpoint files found in %s instead.",
                            index_problem, self.model_dir)
        candidates = listed if listed is not None else sorted(on_disk, reverse=True)
        if not candidates:
            return 0
        if listed is not None and not any(n in on_disk for n in listed):
            raise CheckpointError(
                f"The index file {self._index_file} lists checkpoints "
                f"{', '.join(self._prefix(n) for n in listed)}, but none of their files exist "
                f"in {self.model_dir}: the run would silently restart from step 0. Put the "
                f"checkpoint files back to resume, or delete {self._index_file} to really start "
                "from scratch (or train with a fresh --model_dir)."
            )
        unusable: dict[int, tuple[list[str], str]] = {}
        restored = None
        for number in candidates:
            files = on_disk.get(number, [])
            problem = self._incomplete(number, files)
            if problem is None:
                problem = self._try_restore(number)
            if problem is None:
                restored = number
                break
            unusable[number] = (files, problem)
            logging.warning("Checkpoint %s is unusable (%s); files: %s.", self._prefix(number),
                            problem, ", ".join(files) or "none")
        if restored is None:
            tried = "; ".join(f"{self._prefix(n)} ({p}; files: {', '.join(f) or 'none'})"
                              for n, (f, p) in unusable.items())
            raise CheckpointError(
                f"No checkpoint in {self.model_dir} can be restored: {tried}. To start from "
                "scratch, move these files"
                + (f" and the index file {self._index_file}"
                   if tf.io.gfile.exists(self._index_file) else "")
                + " out of the directory (keep them if they matter), or train with a fresh "
                "--model_dir."
            )
        if unusable:
            moved = self._set_aside(unusable, on_disk)
            logging.warning(
                "Resuming from %s, the newest usable checkpoint, instead of the unusable %s%s.",
                self._prefix(restored), ", ".join(self._prefix(n) for n in unusable),
                f" (their files are kept in {moved})" if moved else "")
        if self.is_chief and (unusable or index_problem):
            self._rewrite_index(sorted(
                n for n in candidates
                if n <= restored and n in on_disk and self._incomplete(n, on_disk[n]) is None))
        return self.step

    # ----------------------------------------------------------------- restore helpers

    @property
    def _index_file(self) -> str:
        return os.path.join(self.model_dir, "checkpoint")

    def _prefix(self, number: int) -> str:
        return os.path.join(self.model_dir, f"{CHECKPOINT_PREFIX}-{number}")

    def _remove_stale_temp_dirs(self) -> None:
        if not self.is_chief:
            return
        for path in tf.io.gfile.glob(os.path.join(self.model_dir, f"{CHECKPOINT_PREFIX}-*_temp")):
            logging.warning("Removing %s, left by a checkpoint save that did not finish.", path)
            tf.io.gfile.rmtree(path)

    def _listed_checkpoints(self) -> tuple[list[int] | None, str | None]:
        """Checkpoint numbers the index file lists, newest first (None: no usable index file),
        and what is wrong with the index file, if anything."""
        if not tf.io.gfile.exists(self._index_file):
            return None, None
        try:
            state = tf.train.get_checkpoint_state(self.model_dir)
            paths = list(state.all_model_checkpoint_paths) if state else []
            if state and state.model_checkpoint_path and state.model_checkpoint_path not in paths:
                paths.append(state.model_checkpoint_path)
            numbers = sorted({_number(p) for p in paths}, reverse=True)
        except Exception as e:  # noqa: BLE001 - UnicodeDecodeError, ParseError, ValueError...
            return None, (f"The checkpoint index file {self._index_file} is unreadable "
                          f"({type(e).__name__}: {str(e)[:200]})")
        if state is None or None in numbers:
            return None, f"The checkpoint index file {self._index_file} is unreadable"
        return numbers, None

    def _checkpoints_on_disk(self) -> dict[int, list[str]]:
        found: dict[int, list[str]] = {}
        for path in tf.io.gfile.glob(os.path.join(self.model_dir, f"{CHECKPOINT_PREFIX}-*")):
            name = os.path.basename(path)
            match = _FILE.match(name)
            if match and not name.endswith("_temp"):
                found.setdefault(int(match.group(1)), []).append(path)
        return {n: sorted(files) for n, files in found.items()}

    def _incomplete(self, number: int, files: list[str]) -> str | None:
        prefix = self._prefix(number)
        if not files:
            return "its files are missing"
        if prefix + ".index" not in files:
            return f"{prefix}.index is missing"
        if not any(".data-" in f for f in files):
            return f"{prefix}.data-* is missing"
        return None

    def _try_restore(self, number: int) -> str | None:
        """Restores checkpoint `number`; None on success, else why it is unreadable.

        Raises:
          CheckpointError: it was written by a different model.
        """
        path = self._prefix(number)
        # A fresh Checkpoint per attempt: a failed attempt leaves no pending restorations.
        checkpoint = tf.train.Checkpoint(**self._objects)
        status = None
        try:
            status = checkpoint.restore(path)
            status.assert_consumed()
        except (ValueError, AssertionError) as e:
            if status is not None:
                status.expect_partial()  # no second warning about unused values on deletion
            raise CheckpointError(
                f"The checkpoint {path} in {self.model_dir} was written by a different model or "
                f"training setup and does not match this one: {e}\nUse a fresh --model_dir for "
                "this configuration (or the configuration that wrote it; see "
                f"{os.path.join(self.model_dir, 'config.json')}). Nothing was changed in "
                f"{self.model_dir}."
            ) from e
        except (tf.errors.OpError, IndexError, UnicodeDecodeError) as e:
            if status is not None:
                status.expect_partial()
            return f"unreadable: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        return None

    def _set_aside(self, unusable: dict, on_disk: dict) -> str | None:
        if not self.is_chief:
            return None
        target = os.path.join(self.model_dir, UNUSABLE_DIR)
        tf.io.gfile.makedirs(target)
        for number, (files, _) in unusable.items():
            for path in files:
                tf.io.gfile.rename(path, os.path.join(target, os.path.basename(path)),
                                   overwrite=True)
            on_disk.pop(number, None)
        return target

    def _rewrite_index(self, numbers: list[int]) -> None:
        """Lists `numbers` (ascending) in the index file and restarts the manager on it."""
        if not numbers:
            return
        paths = [self._prefix(n) for n in numbers]
        tf.compat.v1.train.update_checkpoint_state(self.model_dir, paths[-1],
                                                   all_model_checkpoint_paths=paths)
        self._manager = self._make_manager()

    def _make_manager(self) -> tf.train.CheckpointManager:
        return tf.train.CheckpointManager(self.checkpoint, self.model_dir,
                                          max_to_keep=MAX_TO_KEEP,
                                          checkpoint_name=CHECKPOINT_PREFIX)

    def save(self) -> str | None:
        """Saves a checkpoint numbered by the step counter, `optimizer.iterations`.

        Every worker must call this; only the chief's copy is kept.

        Returns:
          The checkpoint path prefix on the chief, None on other workers.
        """
        number = self.step
        if self.is_chief:
            if self._manager is None:
                self._manager = self._make_manager()
            return self._manager.save(checkpoint_number=number)
        _, task_id = task_info(self.strategy)
        tmp_dir = tempfile.mkdtemp(prefix=f"ckpt_worker{task_id}_")
        try:
            self.checkpoint.write(os.path.join(tmp_dir, f"{CHECKPOINT_PREFIX}-{number}"))
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        return None
