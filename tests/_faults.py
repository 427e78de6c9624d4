"""Runs a training binary (``python tests/_faults.py train.density --flags...``) with faults
injected from the environment, for the fault-injection tests:

* ``KILL_IN_SAVE=N``: SIGKILL the process while it writes checkpoint ``ckpt-N``, after its
  shards are written into ``ckpt-N_temp/`` and before they are merged into place.
"""

import os
import runpy
import signal
import sys

import tensorflow as tf
from tensorflow.python.ops import gen_io_ops

_merge = gen_io_ops.merge_v2_checkpoints


def _merge_then_maybe_die(checkpoint_prefixes, destination_prefix, *args, **kwargs):
    kill_at = os.environ.get("KILL_IN_SAVE")
    if kill_at and tf.executing_eagerly():
        if destination_prefix.numpy().decode().endswith(f"ckpt-{kill_at}"):
            os.kill(os.getpid(), signal.SIGKILL)
    return _merge(checkpoint_prefixes, destination_prefix, *args, **kwargs)


gen_io_ops.merge_v2_checkpoints = _merge_then_maybe_die

if __name__ == "__main__":
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
