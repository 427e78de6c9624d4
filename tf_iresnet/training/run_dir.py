"""The run directory's safety: one process per `model_dir`, usable output directories, and
exports that replace the previous one only once complete.

* `RunLock`: a lock file `model_dir/LOCK` holding the owner's pid and host. A second process
  on the same directory refuses to start and names the owner; the lock of a process that died
  (on this host) is taken over with a warning.
* `check_output_dirs`: `--model_dir` and `--export_dir` are checked (a directory, creatable,
  writable) before any training, not after it.
* `swap_in_directory`: writes a directory (a SavedModel) beside its destination and swaps it in
  when complete, so a killed export never destroys the previous good one.

Paths go through `tf.io.gfile`. The lock is exclusive on local file systems (`O_EXCL`); on
remote ones (`gs://`, ...) it is advisory: written, then read back.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable

import tensorflow as tf
from absl import logging

LOCK_FILENAME = "LOCK"


class RunDirError(RuntimeError):
    """A run or export directory that cannot be used (locked by another process, not a
    directory, not writable)."""


def _is_local(path: str) -> bool:
    return "://" not in path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


class RunLock:
    """Exclusive use of a run directory by one process (the chief of a multi-worker run).

    #### Examples

    ```python
    with RunLock(model_dir):
        ...  # train; a second process on model_dir gets a RunDirError naming this one
    ```

    Args:
      model_dir: the run directory (created if needed).

    Raises (on `acquire` / entering):
      RunDirError: another live process holds the lock (the message names its pid and host
        and the lock file), or the lock of a process on another host exists (its liveness
        cannot be checked from here).
    """

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.path = os.path.join(model_dir, LOCK_FILENAME)
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(),
                      "token": uuid.uuid4().hex, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._held = False

    def acquire(self) -> RunLock:
        tf.io.gfile.makedirs(self.model_dir)
        for _ in range(3):
            if self._create():
                self._held = True
                return self
            holder = self._read()
            if holder is None:  # being written right now, or garbage: look again
                time.sleep(0.2)
                holder = self._read()
            if holder is not None and not self._stale(holder):
                raise RunDirError(
                    f"{self.model_dir} is in use by process {holder.get('pid')} on host "
                    f"{holder.get('host')} (since {holder.get('since')}; lock file "
                    f"{self.path}). Wait for it to finish, stop it, or use another "
                    f"--model_dir. If that process is gone, delete {self.path}."
                )
            logging.warning(
                "Taking over the lock %s of process %s on host %s, which no longer runs.",
                self.path, holder.get("pid") if holder else "?",
                holder.get("host") if holder else "?")
            tf.io.gfile.remove(self.path)
        raise RunDirError(f"Could not take the lock {self.path}: it keeps changing.")

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        holder = self._read()
        if holder is not None and holder.get("token") == self.owner["token"]:
            tf.io.gfile.remove(self.path)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _create(self) -> bool:
        text = json.dumps(self.owner)
        if _is_local(self.path):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return True
        if tf.io.gfile.exists(self.path):
            return False
        with tf.io.gfile.GFile(self.path, "w") as f:
            f.write(text)
        holder = self._read()
        return holder is not None and holder.get("token") == self.owner["token"]

    def _read(self) -> dict | None:
        try:
            with tf.io.gfile.GFile(self.path, "r") as f:
                data = json.loads(f.read())
            return data if isinstance(data, dict) else None
        except (tf.errors.NotFoundError, ValueError, UnicodeDecodeError):
            return None

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return False
        pid = holder.get("pid")
        return not isinstance(pid, int) or not _pid_alive(pid)


def check_output_dirs(model_dir: str, export_dir: str = "") -> None:
    """Checks, before training, that the run directory and the export destination are usable.

    `model_dir` must be a directory (created if missing) that this process can write;
    `export_dir` (skipped when empty) must not be a file, and its parent must be a creatable,
    writable directory (the export is written beside it, then swapped in). Only the probe
    files written and removed here, and missing directories, are created.

    Raises:
      RunDirError: saying which directory is unusable and why.
    """
    _check_writable_dir(model_dir, "--model_dir")
    if export_dir:
        if tf.io.gfile.exists(export_dir) and not tf.io.gfile.isdir(export_dir):
            raise RunDirError(f"--export_dir {export_dir} is a file, not a directory: give a "
                              "directory path (it is created, or its SavedModel replaced).")
        _check_writable_dir(os.path.dirname(os.path.abspath(export_dir))
                            if _is_local(export_dir) else os.path.dirname(export_dir),
                            "the parent of --export_dir")


def _check_writable_dir(path: str, what: str) -> None:
    if tf.io.gfile.exists(path) and not tf.io.gfile.isdir(path):
        raise RunDirError(f"{what} {path} is a file, not a directory: give a directory path.")
    probe = os.path.join(path, f".write_probe-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tf.io.gfile.makedirs(path)
        with tf.io.gfile.GFile(probe, "w") as f:
            f.write("")
        tf.io.gfile.remove(probe)
    except (tf.errors.OpError, OSError) as e:
        reason = getattr(e, "message", None) or str(e)
        raise RunDirError(f"{what} {path} cannot be created or written: {reason}") from None


def swap_in_directory(destination: str, write: Callable[[str], None]) -> None:
    """Runs `write(tmp)` on a fresh directory beside `destination`, then replaces
    `destination` with it.

    Until `write` returns, `destination` is untouched; a kill between the two renames leaves
    the previous version as `<destination>.old-<id>` beside it. A failed `write` removes its
    temporary directory and re-raises.
    """
    destination = destination.rstrip("/")
    tag = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp, old = f"{destination}.tmp-{tag}", f"{destination}.old-{tag}"
    parent = os.path.dirname(destination)
    if parent:
        tf.io.gfile.makedirs(parent)
    try:
        write(tmp)
    except BaseException:
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.rmtree(tmp)
        raise
    if tf.io.gfile.exists(destination):
        tf.io.gfile.rename(destination, old)
    try:
        tf.io.gfile.rename(tmp, destination)
    except (tf.errors.OpError, OSError):
        if tf.io.gfile.exists(old) and not tf.io.gfile.exists(destination):
            tf.io.gfile.rename(old, destination)
        raise
    if tf.io.gfile.exists(old):
        tf.io.gfile.rmtree(old)
